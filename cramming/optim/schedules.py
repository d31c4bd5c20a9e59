"""Training schedules as pure functions of progress.

`progress` is the fraction of the budget used, in [0, 1]: elapsed / budget for a time budget,
tokens_seen / tokens or step / steps of a token or step budget (or step / total_steps when a
finetuning run counts steps). Every schedule is a plain function of it (or of layer-tokens, which
are themselves a function of it), so a schedule ends exactly at the deadline whatever the hardware
speed, is trivially testable, and survives a resume: restoring the elapsed time restores the
schedules. `lambda_lr` turns one into a per-step `torch.optim.lr_scheduler.LambdaLR`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LrSchedule = Literal["one-cycle", "linear", "cosine", "constant"]
"""The names `lr_factor` takes (and `train.lr_schedule` accepts)."""


def _clamp(progress: float) -> float:
    return min(1.0, max(0.0, float(progress)))


def _decay_position(p: float, w: float) -> float:
    """Where clamped progress `p` (at or past the warmup `w`) sits in the decay: 0 at the peak, 1
    at the deadline. A warmup of the whole budget decays at the deadline itself."""
    return 1.0 if w >= 1.0 else (p - w) / (1.0 - w)


def one_cycle(progress: float, warmup_fraction: float) -> float:
    """The triangle of the Cramming paper: linear from 0 up to the peak at `warmup_fraction`, then
    linear down to exactly 0 at progress 1. It is also original BERT's linear warmup and decay."""
    p, w = _clamp(progress), _clamp(warmup_fraction)
    return p / w if p < w else 1.0 - _decay_position(p, w)


def warmup_cosine(progress: float, warmup_fraction: float) -> float:
    """Linear warmup over `warmup_fraction`, then half a cosine from the peak down to 0 at progress 1.

    With progress = step / total_steps and warmup_fraction = warmup_steps / total_steps this is
    transformers' `get_cosine_schedule_with_warmup` (one half-cycle) for steps 0..total_steps.
    """
    p, w = _clamp(progress), _clamp(warmup_fraction)
    return p / w if p < w else 0.5 * (1.0 + math.cos(math.pi * _decay_position(p, w)))


def warmup_constant(progress: float, warmup_fraction: float) -> float:
    """Linear warmup over `warmup_fraction`, then the peak until the end (does not reach 0)."""
    p, w = _clamp(progress), _clamp(warmup_fraction)
    return p / w if p < w else 1.0


# `linear` and `one-cycle` are the same shape: the recipes quote it differently (one-cycle peaks
# midway, BERT warms up over a small fraction).
LR_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "one-cycle": one_cycle, "linear": one_cycle, "cosine": warmup_cosine, "constant": warmup_constant,
}


def lr_factor(progress: float, schedule: str, warmup_fraction: float) -> float:
    """Multiplier of the peak learning rate at `progress`, in [0, 1], for a schedule of LR_SCHEDULES."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    return LR_SCHEDULES[schedule](progress, warmup_fraction)


def lambda_lr(optimizer: Optimizer, factor: Callable[[float], float], total_steps: int) -> LambdaLR:
    """A per-step scheduler whose LR at step s is the peak times `factor(s / total_steps)`.

    For a run that counts optimizer steps (GLUE): e.g.
    `lambda_lr(opt, functools.partial(warmup_cosine, warmup_fraction=warmup / total), total)`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return LambdaLR(optimizer, lambda step: factor(step / total_steps))


def round_target_batch(target_batch_size: int, micro_batch_size: int, world_size: int = 1) -> int:
    """The batch an optimizer step reaches for a configured target: the largest whole number of
    micro-batches x ranks not above `target_batch_size`, and at least one micro-batch per rank.

    The recipe's 4096 is 4032 = 42 x 96 with the rtx2080ti profile's micro-batch, the Cramming
    paper's figure for that card, and stays 4096 for micro-batches that divide it.
    """
    if micro_batch_size < 1 or world_size < 1:
        raise ValueError(f"micro_batch_size and world_size must be >= 1, got {micro_batch_size} and {world_size}")
    per_step = micro_batch_size * world_size
    return max(per_step, target_batch_size // per_step * per_step)


def batch_size(
    progress: float,
    micro_batch_size: int,
    target_batch_size: int,
    ramp_fraction: float,
    world_size: int = 1,
    final_batch_size: int | None = None,
    final_batch_fraction: float = 0.0,
) -> int:
    """Global batch (sequences per optimizer step) at `progress`, before rounding to micro-batches.

    Ramps linearly from one micro-batch per rank to `target_batch_size` over the first
    `ramp_fraction` of the budget (0 = no ramp). With `final_batch_size`, the last
    `final_batch_fraction` of the budget uses that larger batch (the paper's C4 finding).
    """
    p = _clamp(progress)
    start = micro_batch_size * world_size
    if final_batch_size and final_batch_fraction > 0 and p >= 1.0 - final_batch_fraction:
        return max(start, final_batch_size)
    if ramp_fraction <= 0 or p >= ramp_fraction:
        return max(start, target_batch_size)
    return max(start, int(start + (target_batch_size - start) * p / ramp_fraction))


def accumulation_steps(
    progress: float,
    micro_batch_size: int,
    target_batch_size: int,
    ramp_fraction: float,
    world_size: int = 1,
    final_batch_size: int | None = None,
    final_batch_fraction: float = 0.0,
) -> int:
    """Micro-batches each rank accumulates per optimizer step at `progress` (>= 1).

    The ramped global batch divided by the micro-batches all ranks process together, rounded to
    the nearest whole number, so the target is met exactly when it is a multiple of
    micro_batch_size * world_size (as `round_target_batch` makes it: 4032 = 42 x 96 on rtx2080ti).
    """
    per_step = micro_batch_size * world_size
    wanted = batch_size(progress, micro_batch_size, target_batch_size, ramp_fraction, world_size,
                        final_batch_size, final_batch_fraction)
    return max(1, int(wanted / per_step + 0.5))


def keep_tokens(progress: float, seq_len: int, start_keep: int, full_at_fraction: float, granularity: int) -> int:
    """Tokens kept per sequence in each middle layer under MSLG (random-LTD).

    Monotonic sequence-length growth: from `start_keep` up in steps of `granularity`, linearly in
    progress, reaching `seq_len` (no dropping) at `full_at_fraction` and staying there.
    """
    p = _clamp(progress)
    start = min(max(1, start_keep), seq_len)
    if full_at_fraction <= 0 or p >= full_at_fraction:
        return seq_len
    grown = (seq_len - start) * p / full_at_fraction
    steps = int(grown // max(1, granularity))
    return min(seq_len, start + steps * max(1, granularity))


def _mslg_segments(seq_len: int, start_keep: int, full_at_fraction: float, granularity: int) -> list[tuple[float, float, int]]:
    """The piecewise-constant MSLG schedule as (from, to, keep) intervals of progress covering [0, 1]."""
    start = min(max(1, start_keep), seq_len)
    g = max(1, granularity)
    if full_at_fraction <= 0 or start >= seq_len:
        return [(0.0, 1.0, seq_len)]
    segments = []
    lo, keep = 0.0, start
    while keep < seq_len:
        # keep_tokens() steps up when (seq_len - start) * p / full_at reaches the next multiple of g.
        j = (keep - start) // g + 1
        hi = min(full_at_fraction, j * g * full_at_fraction / (seq_len - start))
        segments.append((lo, hi, keep))
        lo, keep = hi, min(seq_len, start + j * g)
    segments.append((lo, 1.0, seq_len))
    return [(a, b, k) for a, b, k in segments if b > a]


def layer_token_fraction(keep: int, seq_len: int, num_layers: int) -> float:
    """Share of the full layer-tokens a sequence costs when middle layers keep `keep` tokens.

    random-LTD drops tokens in every layer but the first and the last.
    """
    if num_layers <= 2:
        return 1.0
    return (2 * seq_len + (num_layers - 2) * keep) / (num_layers * seq_len)


def layer_token_progress(
    progress: float, seq_len: int, num_layers: int, start_keep: int, full_at_fraction: float, granularity: int
) -> float:
    """Fraction of the run's layer-tokens consumed by `progress` under MSLG (LayerToken LR).

    The LayerToken schedule of random-LTD drives warmup and decay by layer-tokens consumed instead
    of by data seen, so the LR does not run ahead while layers see fewer tokens. With data consumed
    uniformly in progress (exact for token and step budgets), layer-tokens up to p are the integral
    of layer_token_fraction(keep_tokens(s)) over [0, p]; this returns that integral over its value
    at 1. It is 0 at 0, 1 at 1, and <= progress (dropping is heaviest early).
    """
    p = _clamp(progress)
    total = done = 0.0
    for lo, hi, keep in _mslg_segments(seq_len, start_keep, full_at_fraction, granularity):
        rate = layer_token_fraction(keep, seq_len, num_layers)
        total += (hi - lo) * rate
        done += max(0.0, min(hi, p) - lo) * rate
    return done / total if total > 0 else p
