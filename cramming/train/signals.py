"""SIGTERM and SIGINT during training: stop at the next optimizer step with a checkpoint.

`with StopSignals() as signals:` installs the handlers for the block and restores the previous
ones after it; the loop reads `signals.received` once per step. `blocked()` keeps both signals
from processes forked inside it (the DataLoader's workers), so that a signal sent to the whole
process group (Ctrl-C in a terminal, Slurm, `docker stop`) reaches only the trainer, which then
stops cleanly instead of losing a worker mid-batch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

_STOP = (signal.SIGTERM, signal.SIGINT)


def _main_thread() -> bool:
    # Python delivers signals to, and accepts handlers from, the main thread only.
    return threading.current_thread() is threading.main_thread()


class StopSignals:
    """A flag set by SIGTERM/SIGINT for the duration of a `with` block; a second Ctrl-C aborts at once.

    Outside the main thread (where handlers cannot be installed) the block changes nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        """The signal number received, or None."""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if _main_thread():
            for sig in _STOP:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Block SIGTERM/SIGINT in this thread for the block: processes forked inside it inherit the mask.

    (torch installs its own fatal SIGTERM handler in DataLoader workers; with the signals blocked
    they still exit with the loader or its parent.)
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(_STOP)) if _main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
