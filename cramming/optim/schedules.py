"""Training schedules as pure functions of progress.

`progress` is the fraction of the run's training used, in [0, 1]: for pretraining, elapsed time
over the time at which training ends (the budget less its final-phase reserve), or tokens_seen /
tokens or step / steps of a token or step budget (cramming.train.budget); step / total_steps when
a finetuning run counts steps. Every schedule is a plain function of it, so a schedule ends
exactly when training does whatever the hardware speed, is trivially testable, and survives a
resume: restoring the elapsed time restores the schedules. `lambda_lr` turns one into a per-step
`torch.optim.lr_scheduler.LambdaLR`. The batch ramp is cramming.optim.batch_plan.
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


def layer_tokens(sequences: int, keep: int | None, seq_len: int, num_layers: int) -> int:
    """Layer-tokens a step computes: `sequences` rows through every layer, of which random-LTD's
    middle layers (all but the first and the last) see `keep` tokens each (None = all of them).

    The LayerToken LR of random-LTD is driven by these, consumed over planned, instead of by data seen.
    """
    if keep is None or num_layers <= 2:
        return sequences * seq_len * num_layers
    return sequences * (2 * seq_len + (num_layers - 2) * min(keep, seq_len))
