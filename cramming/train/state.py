"""What a resume checkpoint carries, and how the loop writes and restores it.

`TrainState` is the run's counters; with the model, the optimizer and scaler state and the RNG
states it is everything needed to continue a run as if it had not stopped (the data position is
`micro_index`, the schedules follow from `elapsed_s`, `tokens` and `step`). On disk the counters
are the plain dict `state.pt["counters"]` (cramming.train.checkpoint writes the files atomically).
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


def save(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
         state: TrainState, config_text: str, keep: int, world_size: int) -> None:
    """Write a resume checkpoint of `model` (the un-compiled module) and everything else it needs."""
    saved = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "counters": state.counters(),
             "rng": _rng_state(), "world_size": world_size}
    save_checkpoint(run_dir, model, saved, config_text, state.step, keep=keep)


def restore(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            budget: Budget) -> TrainState:
    """Load the newest checkpoint of `run_dir` into model, optimizer, scaler, RNGs and budget; returns its counters."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CrammingError(f"resume: {run_dir} has no complete checkpoint under {run_dir / 'checkpoints'}")
    saved, _ = load_checkpoint(ckpt, model)
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    state = TrainState.from_counters(saved["counters"], ckpt)
    _set_rng_state(saved["rng"])
    budget.elapsed_offset = state.elapsed_s
    budget.note_final_cost(state.final_cost_s)
    log.warning("resuming %s from %s: step %d, %s of budget used", run_dir, ckpt.name, state.step,
                format_duration(state.elapsed_s))
    return state
