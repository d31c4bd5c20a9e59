"""Fault-injection hooks for the test suites, inert unless an environment variable selects them.

Production code calls these at the moments a test wants to break (a crash half-way through a
checkpoint write, a NaN loss at a given step), which timed kills and real divergence hit only by
luck. They live here, apart from config and I/O, so that no production module pulls in more than
this file for them. Unset, each call costs one environment lookup.

Under torchrun each process is one rank (the `RANK` variable, 0 without torchrun): the clock skew
and the kill can pick one rank, and traces go to one file per rank, so a test can compare what the
ranks did step by step.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

FAULT_ENV = "CRAMMING_FAULT"
"""`<point>` (first hit), `<point>:<n>` (n-th hit) or `*:<n>` (the n-th hit of any point)."""
FAULT_RANK_ENV = "CRAMMING_FAULT_RANK"
"""With `CRAMMING_FAULT`, only the process of this rank is killed (every rank when unset)."""
CLOCK_SKEW_ENV = "CRAMMING_FAULT_CLOCK_SKEW"
"""`<rank>:<seconds>`: that rank's budget clock runs this many seconds ahead of the others'."""
TRACE_DIR_ENV = "CRAMMING_TRACE_DIR"
"""A folder: every rank appends its trace events to `rank<RANK>.jsonl` there."""
NAN_STEPS_ENV = "CRAMMING_INJECT_NAN_STEPS"
"""A comma-separated list of optimizer steps (0-based, as counted before the step) whose loss the
pretraining loop replaces by NaN."""

_fault_hits: dict[str, int] = {}


def _rank() -> str:
    return os.environ.get("RANK", "0")


def _this_rank(selected: str | None) -> bool:
    """Whether `selected` (a rank number, or None for every rank) is this process's rank."""
    return selected is None or selected.strip() == _rank()


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when `CRAMMING_FAULT` selects this point.

    The reliability suite (tests/reliability/) uses it to crash a stage at an exact moment, e.g.
    in the middle of a checkpoint write. `*:<n>` is a "random moment" drawn by the test. With
    `CRAMMING_FAULT_RANK`, one rank of a multi-process run dies and the others must notice.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point not in (name, "*") or not _this_rank(os.environ.get(FAULT_RANK_ENV)):
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def clock_skew_s() -> float:
    """Seconds to add to this process's budget clock: those of `CRAMMING_FAULT_CLOCK_SKEW` when it
    names this rank, else 0.0. Skewing one rank tests that the ranks agree on time rather than
    each trusting its own clock (at a batch-ramp boundary, at the deadline)."""
    spec = os.environ.get(CLOCK_SKEW_ENV)
    if not spec:
        return 0.0
    rank, _, seconds = spec.partition(":")
    return float(seconds) if _this_rank(rank) else 0.0


def trace(event: str, **fields: Any) -> None:
    """Append `{"event": event, **fields}` as one JSON line to `$CRAMMING_TRACE_DIR/rank<RANK>.jsonl`.

    The multi-process tests read these to check that the ranks took the same steps; written and
    closed line by line, so a killed rank's trace is complete up to its last event.
    """
    folder = os.environ.get(TRACE_DIR_ENV)
    if not folder:
        return
    with open(Path(folder) / f"rank{_rank()}.jsonl", "a") as handle:
        handle.write(json.dumps({"event": event, **fields}) + "\n")


def nan_steps() -> frozenset[int]:
    """The optimizer steps `CRAMMING_INJECT_NAN_STEPS` selects (empty when unset); read once per run."""
    return frozenset(int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip())
