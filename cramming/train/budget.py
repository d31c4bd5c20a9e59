"""The budget: how far along the run is, and when it must stop.

A time budget is wall-clock seconds from the start of `cram pretrain` until the final export is
written: compile, warm-up, evaluation and saving all count, as in the paper. The elapsed time is
carried across a resume (the time lost between the last checkpoint and a crash is not charged, as
the schedules restart from the checkpoint's state). Token and step budgets use the same code path
with a different measure of progress, for exact comparisons between recipes.

To end by the deadline, the run keeps a reserve: the measured cost of the final phase (held-out
evaluation, checkpoint, export) plus a margin, and stops training when elapsed + reserve reaches
the budget.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from cramming.config import BudgetKind


@dataclass
class Budget:
    """Progress and stopping for one run (one per process; ranks agree via the trainer)."""

    kind: BudgetKind
    """`time`, `tokens` or `steps`."""
    total: float
    """Seconds, tokens or optimizer steps."""
    elapsed_offset: float = 0.0
    """Seconds already spent before this process started (restored on resume)."""
    margin_s: float = 2.0
    """Fixed part of the final-phase reserve (plotting, summary, slack for estimate errors)."""
    clock: Callable[[], float] = time.monotonic
    """Time source; injectable for tests."""
    _start: float = field(default=0.0, init=False)
    _final_cost_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        kinds = typing.get_args(BudgetKind)
        if self.kind not in kinds:
            raise ValueError(f"budget kind must be one of {', '.join(kinds)}, got {self.kind!r}")
        if not self.total > 0:
            raise ValueError(f"budget amount must be positive, got {self.total}")
        self._start = self.clock()

    def elapsed(self) -> float:
        """Seconds spent on this run, across resumes."""
        return self.elapsed_offset + (self.clock() - self._start)

    def note_final_cost(self, seconds: float) -> None:
        """Record a measured (or estimated) cost of the final phase; the largest one is kept."""
        self._final_cost_s = max(self._final_cost_s, float(seconds))

    @property
    def reserve_s(self) -> float:
        """Seconds kept free before a time deadline for the final evaluation, checkpoint and export."""
        return self.margin_s + self._final_cost_s

    def progress(self, step: int, tokens: int, elapsed: float | None = None) -> float:
        """Fraction of the budget used, clamped to [0, 1]; every schedule is a function of this."""
        if self.kind == "time":
            used = self.elapsed() if elapsed is None else elapsed
        elif self.kind == "tokens":
            used = tokens
        else:
            used = step
        return min(1.0, max(0.0, used / self.total))

    def done(self, step: int, tokens: int, elapsed: float | None = None) -> bool:
        """Whether training must stop now to meet the budget (time: with the reserve kept free)."""
        if self.kind == "time":
            used = self.elapsed() if elapsed is None else elapsed
            return used + self.reserve_s >= self.total
        return self.progress(step, tokens) >= 1.0

    def remaining_s(self, elapsed: float | None = None) -> float | None:
        """Seconds left until a time deadline (None for token and step budgets)."""
        if self.kind != "time":
            return None
        used = self.elapsed() if elapsed is None else elapsed
        return max(0.0, self.total - used)
