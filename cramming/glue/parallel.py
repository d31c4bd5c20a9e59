"""Side-by-side trials: a task's N trials trained together on one device as one stacked model.

Every trial keeps the sequential recipe: its model is built right after seeding with its seed, as a
sequential trial's is (same classifier initialisation); its batches come from its own loader
shuffled by its own seed (same batches in the same order, batch 16); it has its own AdamW moments,
and the learning rate, the same schedule at the same step, is the same for all.

What is stacked: every parameter and buffer gets a leading trial dimension [N, ...]; one
`torch.func.vmap` of `torch.func.functional_call` runs the N forward passes at once, and the
backward pass of the summed losses gives each trial the gradient of its own loss (trials share no
parameter). AdamW is elementwise, so one AdamW over the stacked tensors is N AdamWs; weight decay
is grouped by the unstacked shape (matrices only) and gradient clipping uses each trial's own
global norm. On CUDA this turns N launch-bound batch-16 steps into one step N times as wide.

Dropout: vmap draws a different mask for every trial (`randomness="different"`) from one generator
seeded with the group's seeds, so masks differ across trials and a rerun of the same group draws
the same masks; they are not the masks a sequential run of the trial draws. Without dropout a
side-by-side trial equals its sequential run to float rounding (tests/test_glue_parallel.py).

Resume: a group is the unit of work. Its trials reach the results file together when it finishes; a
run killed mid-group reruns the group from its start, with the same seeds and so the same results.
A side-by-side trial's `time_s` (per epoch and in all) is its group's wall time.

Memory: N copies of the weights, gradients and AdamW moments, and N batches of activations. On
CUDA a group that runs out of memory is given up (logged) and its trials run one after another;
on CPU it runs only when an estimate of that memory fits in the available RAM.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from cramming.faults import fault_point
from cramming.glue import GlueConfig
from cramming.glue.batching import Collate, make_loader
from cramming.glue.tasks import TaskSpec
from cramming.glue.training import (
    TrialLog,
    compiles,
    make_optimizer,
    make_scheduler,
    seed_everything,
    task_loss,
    train_collate,
)
from cramming.gpu import GpuProfile
from cramming.optim.precision import autocast, effective_precision

log = logging.getLogger(__name__)

# Share of the available RAM a CPU group may plan to use (the estimate is rough; the rest is margin).
CPU_MEMORY_SHARE = 0.6


class DoesNotFit(Exception):
    """The group needs more memory than the device has; its trials run one after another instead."""


def wanted(gcfg: GlueConfig, profile: GpuProfile, trials: int) -> bool:
    """Whether a task's `trials` remaining trials run side by side.

    glue.parallel_trials=null: on CUDA unless the precision is fp16 (see below); on CPU not, where
    the stacked step measured no faster than trials one after another (docs/benchmarks.md).
    fp16 always runs trials one after another: its loss scaler skips the optimizer step of every
    stacked trial when one trial's gradients overflow, which would couple the trials.
    """
    if trials < 2 or gcfg.parallel_trials is False:
        return False
    if effective_precision(torch.device(profile.device), profile.precision) == "fp16":
        if gcfg.parallel_trials:
            log.info("glue.parallel_trials: fp16 loss scaling would couple stacked trials; running them one after another")
        return False
    return bool(gcfg.parallel_trials) or (gcfg.parallel_trials is None and profile.device == "cuda")


# ---------------------------------------------------------------------------------------------
# The stacked model
# ---------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """N models of one structure as stacked tensors [N, ...] and the structure without its tensors."""

    base: nn.Module
    """The model's modules on the meta device: what `functional_call` runs with a trial's tensors."""
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.params, **self.buffers}

    def trial(self, index: int) -> dict[str, torch.Tensor]:
        """Trial `index`'s parameters and buffers (views of the stacked tensors)."""
        return {name: t[index] for name, t in self.tensors().items()}

    @torch.no_grad()
    def module(self, index: int) -> nn.Module:
        """A standalone copy of trial `index` on the CPU (for export)."""
        model = copy.deepcopy(self.base).to_empty(device="cpu")
        stacked = self.tensors()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.copy_(stacked[name][index])
        return model.eval()


def build_stack(make_model: Callable[[], nn.Module], seeds: Sequence[int], device: torch.device,
                fits: Callable[[nn.Module], None] | None = None) -> Stack:
    """Build one model per seed (seeded as a sequential trial is) and copy it into the stack on `device`.

    Models are built one at a time, so besides the stack only one model is in memory. `fits` sees
    the first model and raises DoesNotFit when the whole group would not fit.
    """
    stack: Stack | None = None
    for i, seed in enumerate(seeds):
        seed_everything(seed)
        model = make_model()
        if stack is None:
            if fits is not None:
                fits(model)
            stack = Stack(copy.deepcopy(model).to("meta"),
                          {n: torch.empty((len(seeds), *p.shape), dtype=p.dtype, device=device) for n, p in model.named_parameters()},
                          {n: torch.empty((len(seeds), *b.shape), dtype=b.dtype, device=device) for n, b in model.named_buffers()})
        target = stack.tensors()
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                target[name][i].copy_(tensor)
        del model
    if stack is None:
        raise ValueError("build_stack needs at least one seed")
    for p in stack.params.values():
        p.requires_grad_()  # leaves: the backward pass of the stacked step fills their .grad
    return stack


class TrialView(nn.Module):
    """Trial `index` of a stack as an ordinary module: the shared structure run with that trial's tensors."""

    def __init__(self, stack: Stack, index: int) -> None:
        super().__init__()
        self.base = stack.base  # a submodule, so .eval() / .train() reach it
        self.stack, self.index = stack, index

    def forward(self, **inputs: torch.Tensor) -> Any:
        return functional_call(self.base, self.stack.trial(self.index), (), inputs)


def stacked_loss(base: nn.Module, regression: bool) -> Callable[..., torch.Tensor]:
    """(stacked tensors, input_ids, attention_mask [N, B, W], labels [N, B]) -> each trial's mean loss [N]."""

    def trial_loss(tensors: dict[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
        out = functional_call(base, tensors, (), {"input_ids": input_ids, "attention_mask": attention_mask})
        return task_loss(out["logits"], labels, regression)

    return vmap(trial_loss, randomness="different")


@torch.no_grad()
def clip_per_trial_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each trial's gradient (slice i of every stacked tensor) to a global norm of `max_norm`, as
    `torch.nn.utils.clip_grad_norm_` does for one model; returns each trial's norm before clipping [N].

    The norms of all trials' slices come from one foreach call and each trial is scaled by one more,
    so the clip costs a few kernel launches however many tensors the model has.
    """
    grads = [p.grad for p in params if p.grad is not None]
    trials = grads[0].shape[0]
    slices = [[g[i] for g in grads] for i in range(trials)]
    norms = torch.stack(torch._foreach_norm([s for trial in slices for s in trial])).view(trials, len(grads))
    total = torch.linalg.vector_norm(norms, dim=1)  # [N]
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for i, trial in enumerate(slices):
        torch._foreach_mul_(trial, coef[i])
    return total


@dataclass
class GroupTrainer:
    """The stacked trials' vmapped step, its compiled form, one AdamW over the stacked tensors and the
    schedule: `step` is one recipe step of every trial."""

    stack: Stack
    step_fn: Callable[..., torch.Tensor]
    fast: Callable[..., torch.Tensor]
    """The compiled `step_fn` (or itself): it takes full batches, whose bucketed widths are its static
    shapes; an epoch's smaller last batch runs through the eager `step_fn`."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gcfg: GlueConfig
    profile: GpuProfile

    @classmethod
    def build(cls, stack: Stack, gcfg: GlueConfig, profile: GpuProfile, total_steps: int,
              regression: bool) -> GroupTrainer:
        optimizer = make_optimizer(stack.params.values(), gcfg, torch.device(profile.device), stacked=1)
        step_fn = stacked_loss(stack.base, regression)
        fast = torch.compile(step_fn, dynamic=False, fullgraph=True) if compiles(profile) else step_fn
        return cls(stack, step_fn, fast, optimizer, make_scheduler(optimizer, gcfg, total_steps), gcfg, profile)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step of every trial on its own batch ([N, B, W]); returns the N losses, unsynced."""
        fn = self.fast if batch["input_ids"].shape[1] == self.gcfg.batch_size else self.step_fn
        with autocast(batch["input_ids"].device, self.profile.precision):
            losses = fn(self.stack.tensors(), batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # trial i's tensors get the gradient of loss i: the trials share nothing
        if self.gcfg.grad_clip is not None:
            clip_per_trial_(list(self.stack.params.values()), self.gcfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return losses


def group_seed(seeds: Sequence[int]) -> int:
    """The dropout generator's seed of a group: fixed by its trials' seeds, so a rerun draws the same masks."""
    digest = hashlib.sha256(("side-by-side:" + ",".join(str(s) for s in seeds)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def estimate_bytes(model: nn.Module, trials: int, batch_size: int, width: int) -> int:
    """Rough fp32 training memory of `trials` stacked copies of `model` at batch_size x width tokens.

    Per trial: weights, gradients and the two AdamW moments (4 x the parameters), plus activations
    of about 2 x s b h (34 + 5 a s / h) bytes per layer (Korthikanti et al. 2022's count for fp16
    activations, doubled for fp32).
    """
    params = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    hidden, layers, heads = (config.hidden_size, config.num_layers, config.num_heads) if config else (0, 0, 0)
    tokens = batch_size * width
    activations = 2 * tokens * layers * (34 * hidden + 5 * heads * width)
    return trials * (16 * params + activations)


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_memory_check(trials: int, gcfg: GlueConfig) -> Callable[[nn.Module], None]:
    """A `fits` check for build_stack on CPU, where running out of memory kills the process instead of raising."""

    def fits(model: nn.Module) -> None:
        need, available = estimate_bytes(model, trials, gcfg.batch_size, gcfg.max_seq_len), _available_ram()
        if available is not None and need > CPU_MEMORY_SHARE * available:
            raise DoesNotFit(f"about {need / 2**30:.1f} GiB needed, {available / 2**30:.1f} GiB of RAM available")

    return fits


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ---------------------------------------------------------------------------------------------
# Training a group
# ---------------------------------------------------------------------------------------------


@dataclass
class Group:
    """The trials of a finished group (results-file records, in seed order) and their stacked weights."""

    trials: list[dict[str, Any]]
    stack: Stack


def finetune_side_by_side(make_model: Callable[[], nn.Module], pad_id: int, spec: TaskSpec, train: Any,
                          dev: dict[str, Any], gcfg: GlueConfig, seeds: Sequence[int], profile: GpuProfile,
                          labels: Sequence[str]) -> Group | None:
    """Finetune one task's trials (one per seed) side by side; None when they do not fit in memory
    (logged), so that the caller runs them one after another. `train`/`dev` are encoded splits."""
    device = torch.device(profile.device)
    try:
        return _train_group(make_model, pad_id, spec, train, dev, gcfg, seeds, profile, labels)
    except DoesNotFit as err:
        reason = str(err)
    except RuntimeError as err:  # torch.OutOfMemoryError, or a compiler's wrapping of it
        if device.type != "cuda" or not _is_oom(err):
            raise
        reason = str(err).splitlines()[0]
    gc.collect()  # the failed group's tensors went with the exception's frames
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.warning("%s: %d trials side by side do not fit in %s memory (%s); running them one after another",
                spec.name, len(seeds), device.type.upper() if device.type == "cuda" else "CPU", reason)
    return None


def _train_group(make_model: Callable[[], nn.Module], pad_id: int, spec: TaskSpec, train: Any, dev: dict[str, Any],
                 gcfg: GlueConfig, seeds: Sequence[int], profile: GpuProfile, labels: Sequence[str]) -> Group:
    from cramming.glue.finetune import evaluate  # finetune imports this module

    device = torch.device(profile.device)
    regression = spec.kind == "regression"
    start = time.perf_counter()
    stack = build_stack(make_model, seeds, device, cpu_memory_check(len(seeds), gcfg) if device.type == "cpu" else None)
    collate = train_collate(pad_id, regression, gcfg, profile)
    loaders = [make_loader(train.input_ids, train.labels, gcfg.batch_size, list, True, s, gcfg.num_workers) for s in seeds]
    total_steps = gcfg.epochs * len(loaders[0])
    trainer = GroupTrainer.build(stack, gcfg, profile, total_steps, regression)
    logs = [TrialLog(seed, label, gcfg.epochs) for seed, label in zip(seeds, labels, strict=True)]
    torch.manual_seed(group_seed(seeds))
    for epoch in range(1, gcfg.epochs + 1):
        stack.base.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(len(seeds), device=device)
        bar = tqdm(zip(*loaders, strict=True), total=len(loaders[0]), leave=False, mininterval=1.0, dynamic_ncols=True,
                   desc=f"{spec.name} {len(seeds)} trials side by side, epoch {epoch}/{gcfg.epochs}")
        for group in bar:
            batch = {k: v.to(device, non_blocking=True) for k, v in collate.stack(group).items()}
            losses = trainer.step(batch)
            fault_point("glue.trial")
            loss_sum += losses.detach()
        train_losses = (loss_sum / max(1, len(loaders[0]))).tolist()
        seconds = time.perf_counter() - t0
        evaluated = gcfg.eval_every_epoch or epoch == gcfg.epochs
        eval_collate = Collate(pad_id, regression)
        for i, trial in enumerate(logs):
            scores = evaluate(TrialView(stack, i), spec, dev, gcfg.eval_batch_size, eval_collate, profile, device) if evaluated else None
            trial.end_epoch(epoch, train_losses[i], trainer.scheduler.get_last_lr()[0], seconds, scores)
    extra = {"mode": "side-by-side", "trials_together": len(seeds)}
    return Group([t.result(time.perf_counter() - start, total_steps, **extra) for t in logs], stack)
