"""`pretrain()`: masked-language-model pretraining within a budget, as small functions over a `TrainState`.

Read top to bottom. `pretrain` holds the run's `with` blocks (run lock, signals, loader, run log)
and calls, in the order they happen:

- `setup`: data, model, optimizer, a probe step that compiles (counted in the budget), then resume;
- `start`: the start-of-run held-out loss and checkpoint, which size the budget's reserve;
- `train_steps`: until the budget is spent, the ranks `agree` on a `Clock`, from which alone the
  next step is planned (`plan_step`: its micro-batches, cut to what still fits, and its LR) and the
  interval evaluation and checkpoint are decided (`interval_duties`); the step is taken
  (`optimizer_step`: accumulation under autocast, clipping, a guarded AdamW step) and logged;
- `finish`: the final phase inside the reserve (checkpoint, held-out loss unless the latest
  evaluation is of the same step, export, summary, plot).

`Setup` holds what is fixed for the run; `TrainState` the counters a checkpoint carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf

from cramming import faults
from cramming.card import provenance
from cramming.config import BudgetSpec, format_duration
from cramming.errors import ConfigError
from cramming.gpu import GpuProfile
from cramming.model import bert
from cramming.model.export import save_pretrained
from cramming.optim import schedules
from cramming.optim.batch_plan import BatchPlan
from cramming.optim.groups import build_optimizer
from cramming.optim.precision import autocast, grad_scaler
from cramming.runs import RunLock
from cramming.trackers import open_trackers
from cramming.train import distributed as dist_utils
from cramming.train.budget import Budget
from cramming.train.config import TrainConfig
from cramming.train.inputs import (
    DataPasses,
    TrainBatches,
    TrainData,
    heldout_batches,
    model_kwargs,
    open_data,
    probe_batch,
)
from cramming.train.microbatch import resolve_micro_batch, with_micro_batch
from cramming.train.runlog import RunLog
from cramming.train.signals import StopSignals
from cramming.train.state import TrainState, restore, save

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Training stopped early on a signal or on repeated non-finite steps (a checkpoint was written)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Setup:
    """What `setup` built: fixed for the whole run."""

    train: TrainConfig
    gpu: GpuProfile
    arch: bert.ModelConfig
    """The architecture with the data's vocabulary size."""
    info: dist_utils.DistInfo
    budget: Budget
    run_dir: Path
    data_dir: Path
    data: TrainData
    raw: torch.nn.Module
    """The un-compiled, unwrapped model: checkpoints, export and evaluation use it."""
    fwd: torch.nn.Module
    """What the training steps call: the compiled and/or DDP-wrapped model, or `raw`."""
    compile_path: str
    """`compiled` or `eager`."""
    no_sync: Callable[[], contextlib.AbstractContextManager]
    """DDP's no_sync (gradients are all-reduced on the last micro-batch only); a no-op otherwise."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plan: BatchPlan
    """Micro-batch, ranks, target batch and ramp."""
    planned: list[int] | None
    """Every step's micro-batches per rank of a token or step budget (None for time budgets)."""
    planned_layer_tokens: int | None
    """Layer-tokens a token or step budget will compute (random-LTD's LayerToken LR is their share consumed)."""
    mfu_per_token: float | None
    seed: int
    config_text: str
    resumed: bool
    nan_steps: frozenset[int]
    """Steps whose loss is made NaN (fault injection, cramming.faults; empty in normal use)."""

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def micro(self) -> int:
        return self.plan.micro


@dataclass
class Step:
    """One optimizer step's plan, all from the budget's progress at its start."""

    progress: float = 0.0
    """The budget's progress when the step ends (its LR is read there; its batch at its start)."""
    lr: float = 0.0
    accum: int = 0
    """Micro-batches each rank accumulates."""
    keep: int | None = None
    """Tokens kept in the middle layers (random-LTD), None without it."""
    sequences: int = 0
    """Sequences over all ranks."""


@dataclass
class LastEval:
    """The latest held-out evaluation of this run's process: the final phase reuses its loss when no
    step was taken since (the weights are the same), rather than spend the reserve repeating it."""

    step: int | None = None
    """The step it was taken at; None before the first one (e.g. in a resumed run)."""
    loss: float | None = None
    """Its loss; None on ranks other than the main one."""
    cost_s: float = 0.0
    """Seconds it took (0 when not measured by this process)."""


@dataclass
class Stop:
    """Why `train_steps` ended, and the last step it planned."""

    reason: Literal["budget", "signal", "nonfinite"]
    step: Step
    signum: int = 0


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def pretrain(
    train: TrainConfig,
    arch: bert.ModelConfig,
    gpu: GpuProfile,
    data_dir: str | Path,
    run_dir: str | Path,
    *,
    budget: BudgetSpec,
    seed: int = 0,
    resume: bool = False,
    config_text: str | None = None,
) -> Path:
    """Pretrain `arch` on the prepared data in `data_dir` within `budget`; returns `run_dir/final`.

    `budget` is the parsed top-level `budget` (cramming.config.parse_budget: "90m", "300steps",
    "2.5Mtokens"). With `resume`, continues from the newest checkpoint in `run_dir`. Raises
    `Interrupted` (with the exit code to use) when stopped by SIGTERM/SIGINT or by repeated
    non-finite steps, after writing a checkpoint.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    info = dist_utils.setup(gpu.device, run_dir=run_dir)
    # The clock starts here: setup counts.
    run_budget = Budget(budget, margin_s=train.reserve_margin_s, clock=_budget_clock())
    try:
        with contextlib.ExitStack() as stack:
            if info.is_main:
                stack.enter_context(RunLock(run_dir))
            # Opened before setup, so that a tracker that cannot start (a bad URI, say) stops the run
            # before its setup is spent; closed last, with the run's status.
            trackers = stack.enter_context(open_trackers(train.report_to if info.is_main else [], run_dir,
                                                         stage="pretrain", resumed=resume))
            s, state = setup(train, arch, gpu, data_dir, run_dir, info, run_budget, seed=seed, resume=resume,
                             config_text=config_text)
            signals = stack.enter_context(StopSignals())
            batches = stack.enter_context(TrainBatches(
                s.data.train, s.micro, s.data.masker, shuffle=train.shuffle, seed=seed, num_workers=gpu.num_workers,
                rank=info.rank, world_size=info.world_size, start=state.micro_index,
                pin_memory=s.device.type == "cuda"))
            runlog = stack.enter_context(RunLog(run_dir, info.is_main, trackers, run_budget, s.device,
                                                state.step if resume else None, s.mfu_per_token, s.config_text))
            last_eval = start(s, state, runlog)
            passes = _data_passes(s)
            stop = train_steps(s, state, batches, runlog, signals, passes, last_eval)
            return finish(s, state, runlog, passes, stop, last_eval)
    finally:
        dist_utils.teardown(info)


def _budget_clock() -> Callable[[], float]:
    """The budget's time source: time.monotonic, or one running `faults.clock_skew_s()` ahead after
    its first reading (a rank whose clock disagrees with the others', for the multi-process tests)."""
    skew = faults.clock_skew_s()
    if not skew:
        return time.monotonic
    first: list[float] = []

    def skewed() -> float:
        now = time.monotonic()
        if not first:
            first.append(now)
            return now
        return now + skew

    return skewed


def setup(train: TrainConfig, arch: bert.ModelConfig, gpu: GpuProfile, data_dir: Path, run_dir: Path,
          info: dist_utils.DistInfo, budget: Budget, *, seed: int, resume: bool,
          config_text: str | None) -> tuple[Setup, TrainState]:
    """Open the data, build model, optimizer and scaler, probe the first step, then restore a resumed
    run's state (after the probe, so that nothing draws from the restored random states before the
    next step)."""
    data = open_data(data_dir, train)
    manifest, seq_len = data.manifest, data.seq_len
    arch = dataclasses.replace(arch, vocab_size=int(manifest["vocab_size"]))
    if getattr(arch, "max_seq_len", seq_len) < seq_len:
        raise ConfigError(f"arch.max_seq_len={arch.max_seq_len} is shorter than the data's seq_len={seq_len}")
    if config_text is None:
        config_text = OmegaConf.to_yaml({"train": dataclasses.asdict(train), "arch": dataclasses.asdict(arch),
                                         "gpu": dataclasses.asdict(gpu), "seed": seed, "budget": str(budget.spec),
                                         "data_dir": str(data_dir)})
    torch.manual_seed(seed + info.rank)
    random.seed(seed + info.rank)
    if gpu.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = info.device
    raw = bert.CrammedBertForMLM(arch).to(device)
    raw.train()
    optimizer = build_optimizer(raw, lr=train.lr, weight_decay=train.weight_decay, betas=train.betas, eps=train.eps,
                                device=device, fused=train.fused, decay_vectors=train.decay_norms_biases,
                                decay_embeddings=train.decay_embeddings)
    scaler = grad_scaler(device, gpu.precision)

    model: torch.nn.Module = raw
    # Row gradients for the tied embedding pay off in eager single-process training (CPU);
    # DDP rejects them and compiled graphs gain nothing (CrammedBertForMLM.use_sparse_embedding_grad).
    raw.use_sparse_embedding_grad(not gpu.compile and not info.enabled)
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device] if device.type == "cuda" else None)
    no_sync = model.no_sync if info.enabled else contextlib.nullcontext
    if gpu.micro_batch_size == "auto":  # probed (or cached) now; saved as a number, so a resume keeps it
        gpu = resolve_micro_batch(gpu, raw, optimizer, data, arch, info, train.target_batch_size)
        config_text = with_micro_batch(config_text, gpu.micro_batch_size)
    plan = _batch_plan(train, gpu, info.world_size)
    sample = probe_batch(manifest, data.masker, plan.micro, seq_len)
    fwd, compile_path = _probe(model, raw, sample, device, gpu.precision, gpu.compile, train.compile_fallback,
                               plan.micro, no_sync)
    state = restore(run_dir, raw, optimizer, scaler, budget, info.rank) if resume else TrainState()
    log.info("model: %.1fM parameters, %s path, precision %s, device %s",
             sum(p.numel() for p in raw.parameters()) / 1e6, compile_path, gpu.precision, device)
    planned = budget.planned_accumulations(plan, seq_len)
    s = Setup(train=train, gpu=gpu, arch=arch, info=info, budget=budget, run_dir=run_dir, data_dir=data_dir,
              data=data, raw=raw, fwd=fwd, compile_path=compile_path, no_sync=no_sync, optimizer=optimizer,
              scaler=scaler, plan=plan, planned=planned,
              planned_layer_tokens=_planned_layer_tokens(train, arch, budget, plan, planned, seq_len),
              mfu_per_token=_mfu_per_token(arch, train, gpu, data, info), seed=seed,
              config_text=config_text, resumed=resume, nan_steps=faults.nan_steps())
    return s, state


def _batch_plan(train: TrainConfig, gpu: GpuProfile, world_size: int) -> BatchPlan:
    """The run's batch plan: train.target_batch_size (capped by the profile's max_target_batch_size)
    in whole micro-batches x ranks, said when it differs from what was asked."""
    wanted = gpu.capped_target(train.target_batch_size)
    if wanted < train.target_batch_size:
        log.info("target batch capped at %d sequences by gpu=%s (train.target_batch_size=%d; "
                 "gpu.max_target_batch_size=null lifts the cap)", wanted, gpu.name, train.target_batch_size)
    micro = gpu.micro_batch_size
    plan = BatchPlan.build(wanted, micro, world_size, train.ramp_fraction, train.final_batch_size,
                           train.final_batch_fraction)
    if plan.target > wanted:
        log.warning("train.target_batch_size=%d is less than one micro-batch per rank (%d x %d rank(s)): every step "
                    "takes %d sequences; a smaller gpu.micro_batch_size gives a smaller batch", wanted, micro,
                    world_size, plan.target)
    elif plan.target < wanted:
        log.info("target batch: %d sequences, %d micro-batches of %d x %d rank(s) (%d rounded down)",
                 plan.target, plan.target_accumulation, micro, world_size, wanted)
    return plan


def _keep_tokens(train: TrainConfig, progress: float, seq_len: int) -> int | None:
    """Tokens random-LTD keeps in the middle layers at `progress`; None without random-LTD."""
    ltd = train.random_ltd
    if not ltd.enabled:
        return None
    return schedules.keep_tokens(progress, seq_len, ltd.start_keep, ltd.full_at_fraction, ltd.granularity)


def _planned_layer_tokens(train: TrainConfig, arch: bert.ModelConfig, budget: Budget, plan: BatchPlan,
                          planned: list[int] | None, seq_len: int) -> int | None:
    """Layer-tokens every planned step of a token or step budget computes, summed: the total that
    random-LTD's LayerToken LR measures its progress against (None when it does not apply)."""
    if planned is None or not (train.random_ltd.enabled and train.random_ltd.layer_token_lr):
        return None
    total = tokens = 0
    for step, accumulation in enumerate(planned):
        sequences = plan.sequences(accumulation)
        keep = _keep_tokens(train, budget.progress(step, tokens), seq_len)
        total += schedules.layer_tokens(sequences, keep, seq_len, int(arch.num_layers))
        tokens += sequences * seq_len
    return total


def _mfu_per_token(arch: bert.ModelConfig, train: TrainConfig, gpu: GpuProfile, data: TrainData,
                   info: dist_utils.DistInfo) -> float | None:
    """MFU = tokens/s x this: counted FLOPs per token over the peak of every GPU in the run (None off CUDA)."""
    if info.device.type != "cuda" or not gpu.peak_tflops:
        return None
    seq_len = data.seq_len
    num_masked = data.masker.num_targets(seq_len) if train.fixed_count else round(train.mask_rate * seq_len)
    flops_per_seq = bert.training_flops_per_sequence(arch, seq_len, num_masked, fixed_positions=train.fixed_count)
    return flops_per_seq / seq_len / (gpu.peak_tflops * 1e12 * info.world_size)


def _probe(model: torch.nn.Module, raw: torch.nn.Module, sample: dict[str, torch.Tensor], device: torch.device,
           precision: str, want_compile: bool, allow_fallback: bool, micro_batch_size: int,
           no_sync: Callable[[], contextlib.AbstractContextManager]) -> tuple[torch.nn.Module, str]:
    """Run one forward/backward on a synthetic micro-batch: compiles (counted in the budget) and
    turns a failed compile into eager mode and an out-of-memory into an actionable message."""
    candidates = [("compiled", torch.compile(model)), ("eager", model)] if want_compile else [("eager", model)]
    for path, candidate in candidates:
        try:
            with no_sync(), autocast(device, precision):
                loss = candidate(**model_kwargs(raw, sample, device))["loss"]
            loss.backward()
            raw.zero_grad(set_to_none=True)
            return candidate, path
        except torch.OutOfMemoryError:
            raise ConfigError(
                f"CUDA out of memory on the first micro-batch of {micro_batch_size} sequences: set a smaller "
                f"gpu.micro_batch_size (e.g. gpu.micro_batch_size={max(1, micro_batch_size // 2)}); the target "
                "batch is reached by accumulating more micro-batches"
            ) from None
        except Exception as err:
            raw.zero_grad(set_to_none=True)
            if path != "compiled" or not allow_fallback:
                raise
            log.warning("torch.compile failed (%s: %s); continuing in eager mode", type(err).__name__, str(err)[:300])
            torch._dynamo.reset()
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Evaluation and checkpoints (every rank calls these; rank 0 does the work)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
             precision: str) -> float:
    """The model's mean MLM loss over `batches`, in eval mode."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    count = 0
    for batch in batches:
        with autocast(device, precision):
            total += model(**model_kwargs(model, batch, device))["loss"].float()
        count += 1
    model.train(was_training)
    return float(total.item() / count)


def held_out(s: Setup, state: TrainState, runlog: RunLog, elapsed: float) -> float | None:
    """The held-out MLM loss over the first train.eval_batches val micro-batches (fixed masks), recorded
    as an `eval` record; None on ranks other than the main one."""
    val = None
    if s.info.is_main:
        batches = heldout_batches(s.data.val, s.micro, s.data.eval_masker, s.train.eval_batches, s.seed)
        val = evaluate(s.raw, batches, s.device, s.gpu.precision)
        runlog.record({"event": "eval", "step": state.step, "elapsed_s": round(elapsed, 3),
                       "progress": s.budget.progress(state.step, state.tokens, elapsed), "val_loss": val})
    dist_utils.barrier(s.info)
    return val


def checkpoint(s: Setup, state: TrainState, elapsed: float) -> float:
    """Write a resume checkpoint at budget time `elapsed`; returns the seconds it took."""
    started = time.monotonic()
    state.elapsed_s = elapsed
    save(s.run_dir, s.raw, s.optimizer, s.scaler, state, s.config_text, s.train.keep_checkpoints, s.info)
    dist_utils.barrier(s.info)
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# Start, steps, finish
# ---------------------------------------------------------------------------------------------


def start(s: Setup, state: TrainState, runlog: RunLog) -> LastEval:
    """A fresh run's held-out loss and checkpoint before the first step: a baseline, a resume point,
    and a measurement of the final phase's cost that sizes the budget's reserve. Returns that evaluation."""
    last_eval = LastEval()
    if not s.resumed:
        t0 = time.monotonic()
        last_eval = LastEval(state.step, held_out(s, state, runlog, s.budget.elapsed()))
        last_eval.cost_s = eval_cost = time.monotonic() - t0
        save_cost = checkpoint(s, state, s.budget.elapsed())
        # Ranks agree on the cost (checkpoint + export) and the time, which later intervals count from.
        elapsed, state.final_cost_s = dist_utils.agree(s.info, [s.budget.elapsed(), eval_cost + 2 * save_cost])
        s.budget.note_final_cost(state.final_cost_s)
        state.last_ckpt_s = state.last_eval_s = elapsed
        state.last_eval_progress = s.budget.progress(state.step, state.tokens, elapsed)
    if s.budget.done(state.step, state.tokens):
        log.warning(
            "the budget is spent before the first step: setup took %s and the final phase (held-out "
            "loss, checkpoint, export) is expected to take %s; the run will end without training and "
            "overrun. Give a larger budget, or make the fixed costs smaller (train.eval_batches, a "
            "smaller arch on this device)", format_duration(s.budget.elapsed()), format_duration(state.final_cost_s))
    return last_eval


def _data_passes(s: Setup) -> DataPasses:
    """The pass counter over the training split; token and step budgets are checked for revisits now."""
    passes = DataPasses(s.plan.rows_per_pass(len(s.data.train)), s.seq_len, s.info.is_main)
    if s.planned is not None:
        passes.check(s.plan.sequences(sum(s.planned)) * s.seq_len, f"this {s.budget.kind} budget draws")
    return passes


@dataclass
class Clock:
    """What the ranks agreed on before a step: every decision about the step (its size, LR, whether
    it runs, evaluation and checkpoint before it) is taken from these, so all ranks take the same."""

    elapsed: float
    """Budget seconds: the largest of the ranks' clocks."""
    signal: int
    """A stop signal any rank received (0 = none)."""
    per_micro_s: float
    """Seconds per micro-batch (the slowest rank's smoothed estimate; 0 until measured)."""
    eval_s: float
    """Seconds the latest held-out evaluation took (the slowest rank's; 0 until measured)."""


class Pace:
    """Smoothed seconds per micro-batch, which sizes the last step to fit the deadline, and the cost
    of the latest held-out evaluation. The first step of a process (loader start-up, allocator
    warm-up) is left out, and one slow step (a busy host) moves the estimate by a fifth only."""

    def __init__(self, first_step: int, eval_s: float = 0.0) -> None:
        self.first_step = first_step
        self.per_micro_s = 0.0
        self.eval_s = eval_s

    def observe(self, seconds: float, accumulation: int, step: int) -> None:
        if step <= self.first_step + 1:
            return
        per_micro = seconds / accumulation
        self.per_micro_s = per_micro if not self.per_micro_s else 0.8 * self.per_micro_s + 0.2 * per_micro


def agree(s: Setup, signals: StopSignals, pace: Pace) -> Clock:
    """The ranks' common view before a step (one small all-reduce): the latest clock, any signal,
    the slowest pace and the largest final-phase cost, which each rank's budget adopts."""
    elapsed, sig, per_micro_s, final_cost, eval_s = dist_utils.agree(
        s.info, [s.budget.elapsed(), float(signals.received or 0), pace.per_micro_s, s.budget.final_cost_s,
                 pace.eval_s])
    s.budget.note_final_cost(final_cost)
    return Clock(elapsed, int(sig), per_micro_s, eval_s)


def train_steps(s: Setup, state: TrainState, batches: TrainBatches, runlog: RunLog, signals: StopSignals,
                passes: DataPasses, last_eval: LastEval) -> Stop:
    """Optimizer steps until the budget is spent, a signal arrives or too many steps in a row are non-finite."""
    pace = Pace(state.step, last_eval.cost_s)
    step = Step()
    warned = s.budget.kind == "steps"  # a step budget says how many steps it wants
    while True:
        clock = agree(s, signals, pace)
        if clock.signal:
            return Stop("signal", step, clock.signal)
        planned = plan_step(s, state, clock)
        if planned is None:
            faults.trace("stop", reason="budget", step=state.step)
            return Stop("budget", step)
        if interval_duties(s, state, runlog, clock, last_eval, pace):
            continue  # they took time: agree again before planning the step
        if not warned and (s.budget.kind == "tokens" or (clock.per_micro_s and step.progress >= 0.1)):
            warned = _warn_few_steps(s, state, clock)  # a time budget: from the pace of the first 10%
        step = planned
        started = time.monotonic()
        with dist_utils.guard(s.info, "a training step"):  # DDP's gradient all-reduce: a lost rank is named
            optimizer_step(s, state, batches, runlog, step)
        pace.observe(time.monotonic() - started, step.accum, state.step)
        faults.trace("step", step=state.step, accum=step.accum, micro_index=state.micro_index, tokens=state.tokens,
                     lr=step.lr)
        if state.nonfinite_run >= s.train.max_nonfinite_steps:
            return Stop("nonfinite", step)
        log_step(s, state, runlog, passes, step)


def plan_step(s: Setup, state: TrainState, clock: Clock) -> Step | None:
    """The next step's batch, kept tokens and LR; None when the budget has no room for another step.

    The batch ramp and MSLG read the progress at the step's start; the LR the progress at its end
    (when its update lands), so the last step's LR is at (or, for a time budget, within the
    estimate's error of) the schedule's end. random-LTD's LayerToken LR reads the share of the
    run's layer-tokens consumed by then, for token and step budgets; under a time budget compute
    per second is what is constant, so the time fraction is that share.
    """
    b, plan = s.budget, s.plan
    accum = b.next_accumulation(plan, state.step, state.tokens, s.seq_len, clock.elapsed, clock.per_micro_s)
    if accum == 0:
        return None
    keep = _keep_tokens(s.train, b.progress(state.step, state.tokens, clock.elapsed), s.seq_len)
    sequences = plan.sequences(accum)
    progress = lr_progress = b.progress_after(plan, accum, state.step, state.tokens, s.seq_len, clock.elapsed,
                                              clock.per_micro_s)
    if s.planned_layer_tokens:
        layers = int(s.arch.num_layers)
        consumed = state.tokens * layers - state.layer_tokens_saved  # every layer-token computed so far
        consumed += schedules.layer_tokens(sequences, keep, s.seq_len, layers)
        lr_progress = min(1.0, consumed / s.planned_layer_tokens)
    lr = s.train.lr * schedules.lr_factor(lr_progress, s.train.lr_schedule, s.train.warmup_fraction)
    return Step(progress=progress, lr=lr, accum=accum, keep=keep, sequences=sequences)


def _warn_few_steps(s: Setup, state: TrainState, clock: Clock) -> bool:
    """Warn (once; returns True when decided) when the budget allows fewer than ~20 optimizer steps at
    the target batch, naming the train.target_batch_size that would give ~100: the one-cycle
    schedule needs steps to rise and fall."""
    plan = s.plan
    if s.budget.kind == "tokens":
        rounds_left = (s.budget.total - state.tokens) / (plan.per_round * s.seq_len)
    else:
        rounds_left = (s.budget.training_end_s() - clock.elapsed) / clock.per_micro_s
    steps = state.step + rounds_left / plan.target_accumulation
    if steps < 20:
        suggested = plan.per_round * max(1, int(rounds_left / 100))
        log.warning("this %s budget allows about %.0f optimizer steps at the target batch of %d sequences: too few "
                    "for the LR schedule to rise and fall. train.target_batch_size=%d gives about 100",
                    s.budget.kind, steps, plan.target, suggested)
    return True


def optimizer_step(s: Setup, state: TrainState, batches: TrainBatches, runlog: RunLog, step: Step) -> None:
    """Forward/backward over `step.accum` micro-batches under autocast (DDP syncs gradients on the
    last one only), clip, and a guarded optimizer step that skips (and counts) a non-finite loss or
    gradient norm."""
    for group in s.optimizer.param_groups:
        group["lr"] = step.lr
    drops = step.keep is not None and step.keep < s.seq_len
    step_loss = torch.zeros((), device=s.device)
    for i in range(step.accum):
        batch = next(batches)
        state.micro_index += 1
        kwargs = model_kwargs(s.raw, batch, s.device)
        if drops:
            kwargs["keep_tokens"] = step.keep
        sync = contextlib.nullcontext() if i == step.accum - 1 else s.no_sync()
        with sync, autocast(s.device, s.gpu.precision):
            loss = s.fwd(**kwargs)["loss"]
            if state.step in s.nan_steps:
                loss = loss * float("nan")
        step_loss += loss.detach().float() / step.accum
        s.scaler.scale(loss / step.accum).backward()
        faults.fault_point("train.step")  # mid-step: gradients accumulated, optimizer not stepped
    state.tokens += step.sequences * s.seq_len
    if drops:
        state.layer_tokens_saved += step.sequences * max(0, int(s.arch.num_layers) - 2) * (s.seq_len - step.keep)

    s.scaler.unscale_(s.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(s.raw.parameters(), s.train.grad_clip or math.inf)
    # One host sync per optimizer step (not per micro-batch), the same one GradScaler makes.
    finite = bool(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
    if finite:
        s.scaler.step(s.optimizer)
        state.nonfinite_run = 0
    else:
        state.skipped += 1
        state.nonfinite_run += 1
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    runlog.add_step(step_loss if finite else None, step.sequences * s.seq_len)


def log_step(s: Setup, state: TrainState, runlog: RunLog, passes: DataPasses, step: Step) -> None:
    """A metrics record every train.log_interval steps (or log_interval_s seconds), else a progress
    bar tick. Local to each process (only the main one writes): nothing here changes what a step computes."""
    t = s.train
    elapsed = s.budget.elapsed()
    since_log = time.monotonic() - runlog.clock
    logged = state.step % t.log_interval == 0 or bool(t.log_interval_s and since_log >= t.log_interval_s)
    if logged:
        runlog.log_step(state, elapsed, step.progress, step.lr, step.sequences, step.keep, t.random_ltd.enabled,
                        passes.epochs(state.tokens))
    else:
        runlog.tick(s.budget.progress(state.step, state.tokens, elapsed), elapsed)
    if not passes.checked:
        passes.observe(s.budget, state.tokens, elapsed, logged)


def interval_duties(s: Setup, state: TrainState, runlog: RunLog, clock: Clock, last_eval: LastEval,
                    pace: Pace) -> bool:
    """The held-out loss (kept in `last_eval`) and a checkpoint when their intervals have passed, decided
    from the agreed clock so that every rank joins them; returns whether either ran."""
    t = s.train
    progress = s.budget.progress(state.step, state.tokens, clock.elapsed)
    since_eval = clock.elapsed - state.last_eval_s
    if t.eval_interval_minutes is not None:
        eval_due = bool(t.eval_interval_minutes) and since_eval >= 60 * t.eval_interval_minutes
    else:
        # Every eval_fraction of the run; under a time budget evaluation may take at most a tenth of
        # the time (short CPU runs, where 20 evaluations would cost more than the training between them).
        cheap = s.budget.kind != "time" or since_eval >= 10 * clock.eval_s
        eval_due = bool(t.eval_fraction) and progress - state.last_eval_progress >= t.eval_fraction - 1e-9 and cheap
    ckpt_due = bool(t.checkpoint_interval_minutes) and (
        clock.elapsed - state.last_ckpt_s >= 60 * t.checkpoint_interval_minutes)
    evaluates = eval_due and last_eval.step != state.step  # the same weights are not scored twice
    if eval_due:
        state.last_eval_s, state.last_eval_progress = clock.elapsed, progress
    if evaluates:
        started = time.monotonic()
        last_eval.step, last_eval.loss = state.step, held_out(s, state, runlog, clock.elapsed)
        pace.eval_s = time.monotonic() - started
    if ckpt_due:
        state.last_ckpt_s = clock.elapsed
        s.budget.note_final_cost(checkpoint(s, state, clock.elapsed) * 2)
    return evaluates or ckpt_due


def finish(s: Setup, state: TrainState, runlog: RunLog, passes: DataPasses, stop: Stop, last_eval: LastEval) -> Path:
    """The final phase: a checkpoint always; then, unless interrupted, the held-out loss, the export
    to `run_dir/final`, the run's summary and the loss plot. Returns the export's folder."""
    step = stop.step
    if state.step > 0:  # the steps since the last record
        runlog.log_step(state, s.budget.elapsed(), step.progress, step.lr, step.sequences, step.keep,
                        s.train.random_ltd.enabled, passes.epochs(state.tokens))
    runlog.close_bar()
    checkpoint(s, state, s.budget.elapsed())
    if stop.reason == "signal":
        name = signal.Signals(stop.signum).name
        raise Interrupted(f"received {name}: checkpoint written at step {state.step}; continue with "
                          f"`cram pretrain resume={s.run_dir}`", 130 if stop.signum == signal.SIGINT else 0)
    if stop.reason == "nonfinite":
        raise Interrupted(
            f"stopped after {state.nonfinite_run} non-finite steps in a row at step {state.step} (lr {step.lr:.2e}); "
            f"a checkpoint was written. Lower train.lr, raise train.warmup_fraction, or use gpu.precision=bf16/fp32",
            3)
    # The step is the same on every rank, so all of them take (or skip) held_out's barrier together.
    if last_eval.step == state.step:  # no step since the latest evaluation: its loss is the model's
        val_loss = last_eval.loss
    else:
        val_loss = held_out(s, state, runlog, s.budget.elapsed())
    final = s.run_dir / "final"
    if s.info.is_main:
        summary = _summary(s, state, passes, runlog.final_loss(), val_loss)
        _export(s, final, summary)
        runlog.plot()
        summary["elapsed_s"] = round(s.budget.elapsed(), 3)
        summary["overrun_s"] = round(summary["elapsed_s"] - s.budget.total, 3) if s.budget.kind == "time" else None
        runlog.write_summary(summary)
        log.info("done: %d steps, %d tokens, val loss %s, %s elapsed; export in %s", state.step, state.tokens,
                 val_loss, format_duration(summary["elapsed_s"]), final)
    dist_utils.barrier(s.info)
    return final


def _summary(s: Setup, state: TrainState, passes: DataPasses, final_loss: float | None,
             val_loss: float | None) -> dict[str, Any]:
    """The run summary's content (its elapsed_s and overrun_s are filled in once the export is written)."""
    tokens_per_s = state.tokens / max(s.budget.elapsed(), 1e-9)
    time_budget = s.budget.kind == "time"
    return {
        "budget_kind": s.budget.kind, "budget_s": s.budget.total if time_budget else None,
        "budget_amount": s.budget.total, "elapsed_s": None, "steps": state.step, "tokens_seen": state.tokens,
        "final_loss": final_loss, "val_loss": val_loss, "tokens_per_s": round(tokens_per_s, 1),
        "mfu": tokens_per_s * s.mfu_per_token if s.mfu_per_token else None,
        "device": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "cpu",
        "gpu_profile": s.gpu.name, "precision": s.gpu.precision, "compile": s.compile_path,
        "skipped_steps": state.skipped, "layer_tokens_saved": state.layer_tokens_saved,
        "world_size": s.info.world_size, "train_recipe": s.train.name, "arch": getattr(s.arch, "name", None),
        "data_config_hash": s.data.manifest.get("config_hash"),
        "epochs": passes.epochs(state.tokens), "rows_drawn": state.tokens // s.seq_len, "rows_per_epoch": passes.rows,
    }


def _export(s: Setup, final: Path, summary: dict[str, Any]) -> None:
    """Write `final` (a transformers-style folder; save_pretrained replaces an earlier one atomically)."""
    facts = provenance(s.data.manifest, s.run_dir, s.plan.micro, s.plan.target, s.budget.elapsed())  # for its card
    save_pretrained(s.raw, final, s.data_dir / s.data.manifest["tokenizer"],
                    extra_config={"cramming_training": {**summary, "train": dataclasses.asdict(s.train), **facts}})
