"""The budget: how far along the run is, how big the next step may be, and when training ends.

A time budget is wall-clock seconds from the start of `cram pretrain` until the final export is
written: compile, warm-up, evaluation and saving all count, as in the paper. The elapsed time is
carried across a resume (the time lost between the last checkpoint and a crash is not charged, as
the schedules restart from the checkpoint's state). Token and step budgets use the same code path
with a different measure of progress, for exact comparisons between recipes.

Training ends before the deadline by a reserve: the measured cost of the final phase (held-out
evaluation, checkpoint, export) plus a margin. Progress is measured against the moment training
ends, not against the deadline, so the schedules (LR, batch ramp, MSLG) reach their end when the
last step does: for a time budget it is elapsed / (budget - reserve), for tokens and steps the
share of them used. The last step is cut to what still fits (`next_accumulation`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cramming.config import BudgetKind, BudgetSpec
from cramming.optim.batch_plan import BatchPlan


@dataclass
class Budget:
    """Progress and stopping for one run (one per process; ranks agree via the loop)."""

    spec: BudgetSpec
    """What the budget counts and how much of it (the parsed top-level `budget`)."""
    margin_s: float = 2.0
    """Fixed part of the final-phase reserve (plotting, summary, slack for estimate errors)."""
    elapsed_offset: float = 0.0
    """Seconds already spent before this process started (restored on resume)."""
    clock: Callable[[], float] = time.monotonic
    """Time source; injectable for tests."""
    final_cost_s: float = field(default=0.0, init=False)
    """The largest measured (or estimated) cost of the final phase so far."""
    _start: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._start = self.clock()

    @property
    def kind(self) -> BudgetKind:
        return self.spec.kind

    @property
    def total(self) -> float:
        """Seconds, tokens or optimizer steps."""
        return self.spec.amount

    def elapsed(self) -> float:
        """Seconds spent on this run, across resumes."""
        return self.elapsed_offset + (self.clock() - self._start)

    def note_final_cost(self, seconds: float) -> None:
        """Record a measured (or estimated) cost of the final phase; the largest one is kept."""
        self.final_cost_s = max(self.final_cost_s, float(seconds))

    @property
    def reserve_s(self) -> float:
        """Seconds kept free before a time deadline for the final evaluation, checkpoint and export."""
        return self.margin_s + self.final_cost_s

    def training_end_s(self) -> float:
        """Budget seconds at which a time budget's training ends: the deadline less the reserve."""
        return self.total - self.reserve_s

    def progress(self, step: int, tokens: int, elapsed: float | None = None) -> float:
        """Fraction of the training part of the budget used, in [0, 1]; every schedule is a function of it."""
        if self.kind == "time":
            used = self.elapsed() if elapsed is None else elapsed
            end = self.training_end_s()
            return min(1.0, max(0.0, used / end)) if end > 0 else 1.0
        used = tokens if self.kind == "tokens" else step
        return min(1.0, max(0.0, used / self.total))

    def done(self, step: int, tokens: int, elapsed: float | None = None) -> bool:
        """Whether training has used its part of the budget (time: the reserve is all that is left)."""
        return self.progress(step, tokens, elapsed) >= 1.0

    def remaining_s(self, elapsed: float | None = None) -> float | None:
        """Seconds left until a time deadline (None for token and step budgets)."""
        if self.kind != "time":
            return None
        used = self.elapsed() if elapsed is None else elapsed
        return max(0.0, self.total - used)

    def next_accumulation(self, plan: BatchPlan, step: int, tokens: int, seq_len: int, elapsed: float = 0.0,
                          per_micro_s: float = 0.0) -> int:
        """Micro-batches per rank of the next step: the plan's at the current progress, cut to what is
        left of the budget; 0 when training is over.

        Time: as many micro-batches as fit before training ends at `per_micro_s` each (rounded to
        the nearest, so the last step ends as close to the end as the estimate allows); unknown
        before the first timed step. Tokens: no more rounds than the tokens left need. Steps: the
        plan's until the last step.
        """
        if self.done(step, tokens, elapsed):
            return 0
        wanted = plan.accumulation(self.progress(step, tokens, elapsed))
        if self.kind == "time" and per_micro_s > 0:
            return min(wanted, int((self.training_end_s() - elapsed) / per_micro_s + 0.5))
        if self.kind == "tokens":
            return min(wanted, math.ceil((self.total - tokens) / (plan.per_round * seq_len)))
        return wanted

    def progress_after(self, plan: BatchPlan, accumulation: int, step: int, tokens: int, seq_len: int,
                       elapsed: float = 0.0, per_micro_s: float = 0.0) -> float:
        """Progress when a step of `accumulation` micro-batches per rank, starting now, ends: the
        moment its update lands, where the step's LR is read (so the last step's LR is ~0)."""
        return self.progress(step + 1, tokens + plan.sequences(accumulation) * seq_len,
                             elapsed + accumulation * per_micro_s)

    def planned_accumulations(self, plan: BatchPlan, seq_len: int) -> list[int] | None:
        """Every step's micro-batches per rank for a token or step budget, known before the first
        step (the same rule the loop follows); None for a time budget."""
        if self.kind == "time":
            return None
        steps: list[int] = []
        tokens = 0
        while accumulation := self.next_accumulation(plan, len(steps), tokens, seq_len):
            steps.append(accumulation)
            tokens += plan.sequences(accumulation) * seq_len
        return steps
