"""Fault-injection hooks for the test suites, inert unless an environment variable selects them.

Production code calls these at the moments a test wants to break (a crash half-way through a
checkpoint write, a NaN loss at a given step), which timed kills and real divergence hit only by
luck. They live here, apart from config and I/O, so that no production module pulls in more than
this file for them. Unset, each call costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "CRAMMING_FAULT"
"""`<point>` (first hit), `<point>:<n>` (n-th hit) or `*:<n>` (the n-th hit of any point)."""
NAN_STEPS_ENV = "CRAMMING_INJECT_NAN_STEPS"
"""A comma-separated list of optimizer steps (0-based, as counted before the step) whose loss the
pretraining loop replaces by NaN."""

_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when `CRAMMING_FAULT` selects this point.

    The reliability suite (tests/reliability/) uses it to crash a stage at an exact moment, e.g.
    in the middle of a checkpoint write. `*:<n>` is a "random moment" drawn by the test.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point not in (name, "*"):
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_steps() -> frozenset[int]:
    """The optimizer steps `CRAMMING_INJECT_NAN_STEPS` selects (empty when unset); read once per run."""
    return frozenset(int(s) for s in os.environ.get(NAN_STEPS_ENV, "").split(",") if s.strip())
