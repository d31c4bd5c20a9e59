"""The batch plan: how many sequences an optimizer step takes at a point of the run.

One type owns everything that depends on the micro-batch, the number of ranks and the batch ramp,
so that the trainer, its data-pass counter and the budget's planning read the same numbers: a step
takes whole micro-batches on every rank (a *round* is one micro-batch on each rank), the target is
rounded down to whole rounds, and the ramp grows the batch from one round to the target.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    """Micro-batch, ranks, target and ramp of one run; every method is a pure function of progress."""

    micro: int
    """Sequences per micro-batch on each rank."""
    target: int
    """Sequences per optimizer step once the ramp is done: a whole number of rounds (see `build`)."""
    world_size: int = 1
    ramp_fraction: float = 0.0
    """The batch grows linearly from one round to the target over this fraction of the run (0 = no ramp)."""
    final_batch_size: int | None = None
    """A larger batch for the last `final_batch_fraction` of the run (the paper's C4 finding)."""
    final_batch_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.micro < 1 or self.world_size < 1:
            raise ValueError(f"micro-batch and world size must be >= 1, got {self.micro} and {self.world_size}")
        if self.target % self.per_round:
            raise ValueError(f"target {self.target} is not a whole number of rounds of {self.per_round}; use BatchPlan.build")

    @classmethod
    def build(cls, wanted_target: int, micro: int, world_size: int = 1, ramp_fraction: float = 0.0,
              final_batch_size: int | None = None, final_batch_fraction: float = 0.0) -> BatchPlan:
        """A plan whose target is `wanted_target` rounded down to whole rounds, and at least one round.

        The recipe's 4096 is 4032 = 42 x 96 with the rtx2080ti profile's micro-batch, the Cramming
        paper's figure for that card, and stays 4096 for micro-batches that divide it.
        """
        if micro < 1 or world_size < 1:
            raise ValueError(f"micro-batch and world size must be >= 1, got {micro} and {world_size}")
        per_round = micro * world_size
        target = max(per_round, wanted_target // per_round * per_round)
        return cls(micro, target, world_size, ramp_fraction, final_batch_size, final_batch_fraction)

    @property
    def per_round(self) -> int:
        """Sequences of one micro-batch on every rank: the unit every step is made of."""
        return self.micro * self.world_size

    @property
    def target_accumulation(self) -> int:
        """Micro-batches each rank accumulates at the target batch."""
        return self.target // self.per_round

    def batch_size(self, progress: float) -> int:
        """Sequences per step at `progress` before rounding to whole rounds: the linear ramp from one
        round to the target, or `final_batch_size` in the run's last `final_batch_fraction`."""
        p = min(1.0, max(0.0, float(progress)))
        start = self.per_round
        if self.final_batch_size and self.final_batch_fraction > 0 and p >= 1.0 - self.final_batch_fraction:
            return max(start, self.final_batch_size)
        if self.ramp_fraction <= 0 or p >= self.ramp_fraction:
            return self.target
        return max(start, int(start + (self.target - start) * p / self.ramp_fraction))

    def accumulation(self, progress: float) -> int:
        """Micro-batches each rank accumulates at `progress` (>= 1): the ramped batch in whole rounds,
        rounded to the nearest, so the target itself is met exactly."""
        return max(1, int(self.batch_size(progress) / self.per_round + 0.5))

    def sequences(self, accumulation: int) -> int:
        """Sequences over all ranks of a step that accumulates `accumulation` micro-batches per rank."""
        return accumulation * self.per_round

    def rows_per_pass(self, train_rows: int) -> int:
        """Rows one pass over a split of `train_rows` delivers: the loader drops the remainder that
        does not fill a round (corpus.shards), so the next pass starts after this many rows."""
        return train_rows // self.per_round * self.per_round
