"""`pretrain()`: masked-language-model pretraining within a budget, as small functions over a `TrainState`.

Read top to bottom. `pretrain` holds the run's `with` blocks (run lock, signals, loader, run log)
and calls, in the order they happen:

- `setup`: data, model, optimizer, resume, and a probe step that compiles (counted in the budget);
- `start`: the start-of-run held-out loss and checkpoint, which size the budget's reserve;
- `train_steps`: until the budget is spent, plan a step from the budget's progress (`plan_step`),
  take it (`optimizer_step`: accumulation under autocast, clipping, a guarded AdamW step), then
  log, evaluate and checkpoint at their intervals (`after_step`);
- `finish`: the final phase inside the reserve (checkpoint, held-out loss unless the latest
  evaluation is of the same step, export, summary, plot).

`Setup` holds what is fixed for the run; `TrainState` the counters a checkpoint carries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf

from cramming.config import BudgetSpec, format_duration, parse_budget
from cramming.errors import ConfigError
from cramming.faults import fault_point, nan_steps
from cramming.gpu import GpuProfile
from cramming.model import bert
from cramming.optim import schedules
from cramming.optim.groups import build_optimizer
from cramming.optim.precision import autocast, grad_scaler
from cramming.runs import RunLock
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
    planned_tokens,
    probe_batch,
)
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
    micro: int
    """Sequences per micro-batch on each rank."""
    target: int
    """Sequences per optimizer step once the batch ramp is done."""
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


@dataclass
class Step:
    """One optimizer step's plan, all from the budget's progress at its start."""

    progress: float = 0.0
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
    budget: BudgetSpec | str = "1h",
    seed: int = 0,
    resume: bool = False,
    config_text: str | None = None,
) -> Path:
    """Pretrain `arch` on the prepared data in `data_dir`; returns `run_dir/final`.

    `budget` is a parsed or a written top-level `budget` (e.g. "90m", "300steps", "2.5Mtokens").
    With `resume`, continues from the newest checkpoint in `run_dir`. Raises `Interrupted` (with
    the exit code to use) when stopped by SIGTERM/SIGINT or by repeated non-finite steps, after
    writing a checkpoint.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    seed = train.seed if train.seed is not None else seed
    spec = budget if isinstance(budget, BudgetSpec) else parse_budget(budget)
    info = dist_utils.setup(gpu.device)
    run_budget = Budget(spec.kind, spec.amount, margin_s=train.reserve_margin_s)  # the clock starts here: setup counts
    try:
        with contextlib.ExitStack() as stack:
            if info.is_main:
                stack.enter_context(RunLock(run_dir))
            s, state = setup(train, arch, gpu, data_dir, run_dir, info, run_budget, seed=seed, resume=resume,
                             config_text=config_text)
            signals = stack.enter_context(StopSignals())
            batches = stack.enter_context(TrainBatches(
                s.data.train, s.micro, s.data.masker, shuffle=train.shuffle, seed=seed, num_workers=gpu.num_workers,
                rank=info.rank, world_size=info.world_size, start=state.micro_index,
                pin_memory=s.device.type == "cuda"))
            runlog = stack.enter_context(RunLog(run_dir, info.is_main, train.tensorboard, run_budget, s.device,
                                                state.step if resume else None, s.mfu_per_token))
            last_eval = start(s, state, runlog)
            passes = _data_passes(s)
            stop = train_steps(s, state, batches, runlog, signals, passes, last_eval)
            return finish(s, state, runlog, passes, stop, last_eval)
    finally:
        dist_utils.teardown(info)


def setup(train: TrainConfig, arch: bert.ModelConfig, gpu: GpuProfile, data_dir: Path, run_dir: Path,
          info: dist_utils.DistInfo, budget: Budget, *, seed: int, resume: bool,
          config_text: str | None) -> tuple[Setup, TrainState]:
    """Open the data, build (or restore) model, optimizer and scaler, and probe the first step."""
    data = open_data(data_dir, train)
    manifest, seq_len = data.manifest, data.seq_len
    arch = dataclasses.replace(arch, vocab_size=int(manifest["vocab_size"]))
    if getattr(arch, "max_seq_len", seq_len) < seq_len:
        raise ConfigError(f"arch.max_seq_len={arch.max_seq_len} is shorter than the data's seq_len={seq_len}")
    if config_text is None:
        config_text = OmegaConf.to_yaml({"train": dataclasses.asdict(train), "arch": dataclasses.asdict(arch),
                                         "gpu": dataclasses.asdict(gpu), "seed": seed,
                                         "budget": str(BudgetSpec(budget.kind, budget.total)),
                                         "data_dir": str(data_dir)})
    torch.manual_seed(seed + info.rank)
    random.seed(seed + info.rank)
    if gpu.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = info.device
    raw = bert.CrammedBertForMLM(arch).to(device)
    raw.train()
    flag = train.decay_norms_biases_embeddings
    optimizer = build_optimizer(raw, lr=train.lr, weight_decay=train.weight_decay, betas=train.betas, eps=train.eps,
                                device=device, fused=train.fused, decay_vectors=flag, decay_embeddings=flag)
    scaler = grad_scaler(device, gpu.precision)
    state = restore(run_dir, raw, optimizer, scaler, budget) if resume else TrainState()

    model: torch.nn.Module = raw
    # Row gradients for the tied embedding pay off in eager single-process training (CPU);
    # DDP rejects them and compiled graphs gain nothing (CrammedBertForMLM.use_sparse_embedding_grad).
    raw.use_sparse_embedding_grad(not gpu.compile and not info.enabled)
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device] if device.type == "cuda" else None)
    no_sync = model.no_sync if info.enabled else contextlib.nullcontext
    micro = gpu.micro_batch_size
    sample = probe_batch(manifest, data.masker, micro, seq_len)
    fwd, compile_path = _probe(model, raw, sample, device, gpu.precision, gpu.compile, train.compile_fallback,
                               micro, no_sync)
    log.info("model: %.1fM parameters, %s path, precision %s, device %s",
             sum(p.numel() for p in raw.parameters()) / 1e6, compile_path, gpu.precision, device)
    s = Setup(train=train, gpu=gpu, arch=arch, info=info, budget=budget, run_dir=run_dir, data_dir=data_dir,
              data=data, raw=raw, fwd=fwd, compile_path=compile_path, no_sync=no_sync, optimizer=optimizer,
              scaler=scaler, micro=micro, target=_target_batch(train, micro, info.world_size),
              mfu_per_token=_mfu_per_token(arch, train, gpu, data, info), seed=seed,
              config_text=config_text, resumed=resume, nan_steps=nan_steps())
    return s, state


def _target_batch(train: TrainConfig, micro: int, world_size: int) -> int:
    """train.target_batch_size in whole micro-batches x ranks (schedules.round_target_batch), said when it differs."""
    wanted = train.target_batch_size
    target = schedules.round_target_batch(wanted, micro, world_size)
    if target > wanted:
        log.warning("train.target_batch_size=%d is less than one micro-batch per rank (%d x %d rank(s)): every step "
                    "takes %d sequences; a smaller gpu.micro_batch_size gives a smaller batch", wanted, micro,
                    world_size, target)
    elif target < wanted:
        log.info("target batch: %d sequences, %d micro-batches of %d x %d rank(s) (train.target_batch_size=%d "
                 "rounded down)", target, target // (micro * world_size), micro, world_size, wanted)
    return target


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
    if s.info.is_main:
        state.elapsed_s = elapsed
        save(s.run_dir, s.raw, s.optimizer, s.scaler, state, s.config_text, s.train.keep_checkpoints,
             s.info.world_size)
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
        eval_cost = time.monotonic() - t0
        save_cost = checkpoint(s, state, s.budget.elapsed())
        state.final_cost_s = eval_cost + 2 * save_cost  # checkpoint + export
        s.budget.note_final_cost(state.final_cost_s)
        state.last_ckpt_s = state.last_eval_s = s.budget.elapsed()
    if s.budget.done(state.step, state.tokens):
        log.warning(
            "the budget is spent before the first step: setup took %s and the final phase (held-out "
            "loss, checkpoint, export) is expected to take %s; the run will end without training and "
            "overrun. Give a larger budget, or make the fixed costs smaller (train.eval_batches, a "
            "smaller arch on this device)", format_duration(s.budget.elapsed()), format_duration(state.final_cost_s))
    return last_eval


def _data_passes(s: Setup) -> DataPasses:
    """The pass counter over the training split; token and step budgets are checked for revisits now."""
    passes = DataPasses(len(s.data.train), s.micro, s.info.world_size, s.seq_len, s.info.is_main)
    planned = planned_tokens(s.budget, s.train, s.micro, s.target, s.info.world_size, s.seq_len)
    if planned is not None:
        passes.check(planned, f"this {s.budget.kind} budget draws")
    return passes


def _accumulation(s: Setup, progress: float) -> int:
    t = s.train
    return schedules.accumulation_steps(progress, s.micro, s.target, t.ramp_fraction, s.info.world_size,
                                        t.final_batch_size, t.final_batch_fraction)


def train_steps(s: Setup, state: TrainState, batches: TrainBatches, runlog: RunLog, signals: StopSignals,
                passes: DataPasses, last_eval: LastEval) -> Stop:
    """Optimizer steps until the budget is spent, a signal arrives or too many steps in a row are non-finite."""
    per_micro_s = 0.0  # smoothed seconds per micro-batch: sizes the next step for the deadline check
    step = Step()
    while True:
        accum = _accumulation(s, s.budget.progress(state.step, state.tokens))
        # Ranks agree on time and on signals received by any of them.
        elapsed, sig = dist_utils.agree(s.info, [s.budget.elapsed(), float(signals.received or 0)])
        if sig:
            return Stop("signal", step, int(sig))
        # Stop when the next step would not finish before the deadline's reserve.
        if s.budget.done(state.step, state.tokens, elapsed + per_micro_s * accum):
            return Stop("budget", step)
        step = plan_step(s, s.budget.progress(state.step, state.tokens, elapsed), accum)
        started = time.monotonic()
        optimizer_step(s, state, batches, runlog, step)
        # The first step (loader start-up) is left out of the smoothed time, and one slow step (a
        # busy host) cannot end the run early.
        per_micro = (time.monotonic() - started) / accum
        if state.step > 1 or s.resumed:
            per_micro_s = per_micro if not per_micro_s else 0.8 * per_micro_s + 0.2 * per_micro
        if state.nonfinite_run >= s.train.max_nonfinite_steps:
            return Stop("nonfinite", step)
        after_step(s, state, runlog, passes, step, last_eval)


def plan_step(s: Setup, progress: float, accum: int) -> Step:
    """The step's LR, kept tokens and batch at `progress` (random-LTD's LR may follow layer-tokens)."""
    ltd = s.train.random_ltd
    keep = None
    lr_progress = progress
    if ltd.enabled:
        keep = schedules.keep_tokens(progress, s.seq_len, ltd.start_keep, ltd.full_at_fraction, ltd.granularity)
        if ltd.layer_token_lr:
            lr_progress = schedules.layer_token_progress(progress, s.seq_len, int(s.arch.num_layers), ltd.start_keep,
                                                         ltd.full_at_fraction, ltd.granularity)
    lr = s.train.lr * schedules.lr_factor(lr_progress, s.train.lr_schedule, s.train.warmup_fraction)
    return Step(progress=progress, lr=lr, accum=accum, keep=keep, sequences=accum * s.micro * s.info.world_size)


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
        fault_point("train.step")  # mid-step: gradients accumulated, optimizer not stepped
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


def after_step(s: Setup, state: TrainState, runlog: RunLog, passes: DataPasses, step: Step,
               last_eval: LastEval) -> None:
    """A metrics record every train.log_interval steps (or log_interval_s seconds), the held-out
    loss (kept in `last_eval`) and a checkpoint at their intervals of budget time."""
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
    if t.eval_interval_minutes and elapsed - state.last_eval_s >= 60 * t.eval_interval_minutes:
        last_eval.step, last_eval.loss = state.step, held_out(s, state, runlog, elapsed)
        state.last_eval_s = elapsed
    if t.checkpoint_interval_minutes and elapsed - state.last_ckpt_s >= 60 * t.checkpoint_interval_minutes:
        state.last_ckpt_s = elapsed
        s.budget.note_final_cost(checkpoint(s, state, elapsed) * 2)


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
    """Write `final` (a transformers-style folder), atomically replacing any earlier one."""
    from cramming.model import export

    tmp = s.run_dir / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    export.save_pretrained(s.raw, tmp, s.data_dir / s.data.manifest["tokenizer"],
                           extra_config={"cramming_training": {**summary, "train": dataclasses.asdict(s.train)}})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
