"""What a resume checkpoint carries, and how the loop writes and restores it.

`TrainState` is the run's counters; with the model, the optimizer and scaler state and the RNG
states it is everything needed to continue a run as if it had not stopped (the data position is
`micro_index`, the schedules follow from `elapsed_s`, `tokens` and `step`). On disk the counters
are the plain dict `state.pt["counters"]` (cramming.train.checkpoint writes the files atomically).

The RNG states are per rank (`state.pt["rng"]`, a list indexed by rank): each rank draws its own
random choices (random-LTD's kept tokens), and a resume must give each rank back its own, not
rank 0's to all of them, which would make every rank choose alike from then on.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cramming.config import format_duration
from cramming.errors import CheckpointError, CrammingError
from cramming.train.budget import Budget
from cramming.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cramming.train.distributed import DistInfo, gather_objects

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The counters a checkpoint carries; everything else of the loop is derived from them."""

    step: int = 0
    """Optimizer steps taken (skipped ones included)."""
    micro_index: int = 0
    """Micro-batches this rank has drawn: the loader resumes at this index."""
    tokens: int = 0
    """Tokens trained on, over all ranks."""
    elapsed_s: float = 0.0
    """Budget seconds used, as of the latest checkpoint."""
    skipped: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient norm."""
    nonfinite_run: int = 0
    """Non-finite steps in a row up to the latest step."""
    layer_tokens_saved: int = 0
    """Layer-tokens random-LTD did not compute, over all ranks."""
    final_cost_s: float = 0.0
    """Measured cost of the final phase (held-out loss, checkpoint, export): the budget's reserve."""
    last_ckpt_s: float = 0.0
    """Budget seconds at the latest interval checkpoint."""
    last_eval_s: float = 0.0
    """Budget seconds at the latest held-out evaluation."""
    last_eval_progress: float = 0.0
    """The budget's progress at the latest held-out evaluation (train.eval_fraction counts from it)."""

    def counters(self) -> dict[str, Any]:
        """The on-disk form: a plain dict of ints and floats."""
        return dataclasses.asdict(self)

    @classmethod
    def from_counters(cls, counters: dict[str, Any], where: Path) -> TrainState:
        try:
            return cls(**counters)
        except TypeError as err:
            raise CheckpointError(f"{where / 'state.pt'} holds counters this version does not know ({err})") from None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore_rng(saved: dict[str, Any] | list[dict[str, Any]], rank: int, ckpt: Path) -> None:
    """Give this rank its own saved RNG states.

    A checkpoint of an older version holds one dict (rank 0's), and one of a job with fewer ranks
    holds fewer states than there are ranks now: a rank without its own draws new states, seeded
    from a saved rank's and its own rank number, so that the ranks still choose differently from
    each other and a repeated resume chooses as the first did.
    """
    states = saved if isinstance(saved, list) else [saved]
    if rank < len(states):
        _set_rng_state(states[rank])
        return
    base = rank % len(states)
    log.warning("%s holds the random states of %d rank(s): rank %d draws new ones, seeded from rank %d's and its "
                "rank, so its random choices do not continue the saved run's", ckpt, len(states), rank, base)
    _set_rng_state(states[base])
    seed = int(torch.randint(2**62, ())) + rank
    torch.manual_seed(seed)  # CUDA devices too
    random.seed(seed)


def save(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
         state: TrainState, config_text: str, keep: int, info: DistInfo) -> None:
    """Write a resume checkpoint of `model` (the un-compiled module) and everything else it needs.

    Every rank calls this: the ranks' RNG states are gathered, and rank 0 writes them with the rest.
    """
    rng = gather_objects(info, _rng_state())
    if not info.is_main:
        return
    saved = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "counters": state.counters(),
             "rng": rng, "world_size": info.world_size}
    save_checkpoint(run_dir, model, saved, config_text, state.step, keep=keep)


def restore(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            budget: Budget, rank: int) -> TrainState:
    """Load the newest checkpoint of `run_dir` into model, optimizer, scaler, this rank's RNGs and budget;
    returns its counters."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CrammingError(f"resume: {run_dir} has no complete checkpoint under {run_dir / 'checkpoints'}")
    saved, _ = load_checkpoint(ckpt, model)
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    state = TrainState.from_counters(saved["counters"], ckpt)
    _restore_rng(saved["rng"], rank, ckpt)
    budget.elapsed_offset = state.elapsed_s
    budget.note_final_cost(state.final_cost_s)
    log.warning("resuming %s from %s: step %d, %s of budget used", run_dir, ckpt.name, state.step,
                format_duration(state.elapsed_s))
    return state
