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

Any model whose forward `vmap` can run stacks: the crammed model, and transformers models, whose
attention-mask builder is swapped for one that never branches on the mask's values (see
`_vmappable`). A model that still branches on its inputs' values is given up like a group that does
not fit (logged), and its trials run one after another.
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

from cramming.glue import GlueConfig
from cramming.glue.encoding import Encoded
from cramming.glue.epochs import DevSets, Trials, run_epochs
from cramming.glue.tasks import TaskSpec
from cramming.glue.training import (
    TrialLog,
    compiles,
    make_optimizer,
    make_scheduler,
    model_inputs,
    seed_everything,
    task_loss,
    train_collate,
)
from cramming.gpu import GpuProfile
from cramming.optim.precision import autocast, effective_precision
from cramming.runs import GlueTrial

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
    if trials < 2 or gcfg.parallel_trials is False or gcfg.unpadded:  # unpadded=true: one after another
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
    attention: str | None = None
    """A transformers model's own attention implementation, swapped in `base` for stacking and given
    back to the copies `module` makes."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.params, **self.buffers}

    def trial(self, index: int) -> dict[str, torch.Tensor]:
        """Trial `index`'s parameters and buffers (views of the stacked tensors)."""
        return {name: t[index] for name, t in self.tensors().items()}

    @torch.no_grad()
    def module(self, index: int) -> nn.Module:
        """A standalone copy of trial `index` on the CPU (for export)."""
        model = copy.deepcopy(self.base).to_empty(device="cpu")
        if self.attention is not None:
            model.set_attn_implementation(self.attention)
        stacked = self.tensors()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.copy_(stacked[name][index])
        return model.eval()


STACKED_ATTENTION = "cramming_stacked"


def _vmappable(base: nn.Module) -> str | None:
    """Make a transformers model's forward runnable under vmap; returns the attention implementation it
    had (None: not a transformers model on sdpa attention, left as it is).

    transformers' sdpa mask builder skips an all-ones padding mask after testing `mask.all()`, a branch
    on a tensor's value that vmap cannot take. The same sdpa attention under a builder that always
    builds the mask computes the same function; it is registered under its own name.
    """
    if getattr(getattr(base, "config", None), "_attn_implementation", None) != "sdpa":
        return None
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def always_build(*args: Any, **kwargs: Any) -> Any:
        return sdpa_mask(*args, **{**kwargs, "allow_is_bidirectional_skip": False})

    AttentionInterface.register(STACKED_ATTENTION, sdpa_attention_forward)
    AttentionMaskInterface.register(STACKED_ATTENTION, always_build)
    base.set_attn_implementation(STACKED_ATTENTION)
    return "sdpa"


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
            base = copy.deepcopy(model).to("meta")
            stack = Stack(base,
                          {n: torch.empty((len(seeds), *p.shape), dtype=p.dtype, device=device) for n, p in model.named_parameters()},
                          {n: torch.empty((len(seeds), *b.shape), dtype=b.dtype, device=device) for n, b in model.named_buffers()},
                          _vmappable(base))
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
    """(stacked tensors, model inputs [N, B, W] by name, labels [N, B]) -> each trial's mean loss [N]."""

    def trial_loss(tensors: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                   labels: torch.Tensor) -> torch.Tensor:
        out = functional_call(base, tensors, (), inputs)
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
            losses = fn(self.stack.tensors(), model_inputs(batch), batch["labels"])
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
    # The crammed config's names, else transformers' (an unknown shape counts no activations).
    hidden = getattr(config, "hidden_size", 0)
    layers = getattr(config, "num_layers", None) or getattr(config, "num_hidden_layers", 0)
    heads = getattr(config, "num_heads", None) or getattr(config, "num_attention_heads", 0)
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

    trials: list[GlueTrial]
    stack: Stack


def finetune_side_by_side(make_model: Callable[[], nn.Module], pad_id: int, spec: TaskSpec, train: Encoded,
                          dev: dict[str, Encoded], gcfg: GlueConfig, seeds: Sequence[int], profile: GpuProfile,
                          labels: Sequence[str]) -> Group | None:
    """Finetune one task's trials (one per seed) side by side; None when they do not fit in memory or
    the model cannot be stacked (logged), so that the caller runs them one after another."""
    device = torch.device(profile.device)
    try:
        return _train_group(make_model, pad_id, spec, train, dev, gcfg, seeds, profile, labels)
    except DoesNotFit as err:
        reason = f"do not fit in {'CUDA' if device.type == 'cuda' else 'CPU'} memory ({err})"
    except RuntimeError as err:  # torch.OutOfMemoryError, or a compiler's wrapping of it
        if device.type == "cuda" and _is_oom(err):
            reason = f"do not fit in CUDA memory ({str(err).splitlines()[0]})"
        elif "vmap" in str(err):
            reason = f"cannot be stacked: the model's forward branches on its inputs' values ({str(err).splitlines()[0]})"
        else:
            raise
    gc.collect()  # the failed group's tensors went with the exception's frames
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.warning("%s: %d trials side by side %s; running them one after another", spec.name, len(seeds), reason)
    return None


def _train_group(make_model: Callable[[], nn.Module], pad_id: int, spec: TaskSpec, train: Encoded,
                 dev: dict[str, Encoded], gcfg: GlueConfig, seeds: Sequence[int], profile: GpuProfile,
                 labels: Sequence[str]) -> Group:
    device = torch.device(profile.device)
    regression = spec.kind == "regression"
    start = time.perf_counter()
    stack = build_stack(make_model, seeds, device, cpu_memory_check(len(seeds), gcfg) if device.type == "cpu" else None)
    collate = train_collate(pad_id, regression, gcfg, compiles(profile))
    # One loader per trial, shuffled by its own seed: a trial's batches are its sequential run's.
    loaders = [train.loader(gcfg.batch_size, list, True, s, gcfg.num_workers) for s in seeds]
    total_steps = gcfg.epochs * len(loaders[0])
    trials = Trials(GroupTrainer.build(stack, gcfg, profile, total_steps, regression),
                    lambda: (collate.stack(group) for group in zip(*loaders, strict=True)), len(loaders[0]),
                    [TrialView(stack, i) for i in range(len(seeds))],
                    [TrialLog(seed, label, gcfg.epochs) for seed, label in zip(seeds, labels, strict=True)])
    torch.manual_seed(group_seed(seeds))
    run_epochs(trials, DevSets.of(spec, dev, pad_id, gcfg, profile), gcfg, f"{spec.name} {len(seeds)} trials side by side,")
    seconds = time.perf_counter() - start
    return Group([t.result(seconds, total_steps, "side-by-side", len(seeds)) for t in trials.logs], stack)
