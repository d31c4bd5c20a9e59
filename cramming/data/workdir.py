"""The resumable build folder of `cram data` and the lock that lets one process build it.

A build runs in `<data_root>/<name>-<hash>.partial/`. Each phase appends to its files and, after
every unit of work (a batch of documents spooled or encoded, a shard written), commits its
progress to `progress.json`: counts, file sizes and what comes next. A killed build leaves the
folder behind; the same command reopens it, cuts every file back to its committed size and
continues after the last committed unit. Per-unit commits replace `progress.json` atomically
without an fsync (they survive a killed process, whose writes the kernel still holds); the end of
each phase is fsynced.

`BuildLock` (an `flock` on `<name>-<hash>.lock` beside the folders) makes concurrent `cram data`
runs of one config (several runs of a sweep starting together) build it once: the others wait,
then find the finished folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

from cramming.errors import DataError
from cramming.fileio import write_atomic

log = logging.getLogger(__name__)

# Bumped when the files or progress records of a partial build change meaning: an older
# partial folder is then started over instead of being misread.
WORK_FORMAT = 1
PROGRESS = "progress.json"


class StaleWork(DataError):
    """A partial build's files do not match its committed progress (e.g. after a power cut)."""


class BuildInterrupted(DataError):
    """A build stopped for a reason outside its input (a dropped connection, a killed worker): its
    committed progress is good and is kept for the next run to continue."""


class WorkDir:
    """`progress.json` and the files of a partial build; `key` must match for its work to be reused."""

    def __init__(self, path: Path, key: dict[str, Any]) -> None:
        self.path = Path(path)
        self.key = {"work_format": WORK_FORMAT, **key}
        self.progress: dict[str, Any] = self._load()
        self._clock: dict[str, tuple[float, float]] = {}

    def _load(self) -> dict[str, Any]:
        file = self.path / PROGRESS
        if file.is_file():
            try:
                progress = json.loads(file.read_text())
            except (OSError, ValueError):
                progress = None
            if isinstance(progress, dict) and progress.get("key") == self.key:
                return progress
            log.warning("starting %s over: its progress belongs to another source, config or version", self.path)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        return {"key": self.key, "phases": {}}

    @property
    def resumed(self) -> bool:
        """True when an earlier run committed work here."""
        return bool(self.progress["phases"])

    def done(self, phase: str) -> bool:
        return bool(self.progress["phases"].get(phase, {}).get("done"))

    def begin(self, phase: str) -> dict[str, Any]:
        """The committed state of `phase` (empty if none) and the start of its clock in this run."""
        state = dict(self.progress["phases"].get(phase, {}))
        self._clock[phase] = (time.perf_counter(), float(state.get("elapsed_s", 0.0)))
        return state

    def commit(self, phase: str, state: dict[str, Any], *, done: bool = False) -> None:
        """Record `state` as the progress of `phase` (its time so far added); `done` makes it durable."""
        start, before = self._clock.get(phase, (time.perf_counter(), 0.0))
        state = {**state, "elapsed_s": round(before + time.perf_counter() - start, 3), "done": done}
        self.progress["phases"][phase] = state
        text = json.dumps(self.progress)
        if done:
            write_atomic(self.path / PROGRESS, text)
            return
        tmp = self.path / f".{PROGRESS}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.path / PROGRESS)

    def state(self, phase: str) -> dict[str, Any]:
        return self.progress["phases"][phase]

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def open_append(path: Path, size: int) -> IO[bytes]:
    """`path` opened for appending after its first `size` bytes (the committed part; 0 = a new file)."""
    if size == 0:
        return open(path, "wb")  # noqa: SIM115
    have = path.stat().st_size if path.is_file() else -1
    if have < size:
        raise StaleWork(f"{path} has {have} bytes, its committed progress says {size}")
    fh = open(path, "r+b")  # noqa: SIM115
    fh.truncate(size)
    fh.seek(size)
    return fh


def sync_file(path: Path) -> None:
    """fsync a file written through a memory map (its dirty pages are the file's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def close_durably(fh: IO[bytes]) -> None:
    """Flush, fsync and close a phase's file at the end of the phase."""
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


class BuildLock:
    """An exclusive `flock` on `path`, waited for, held while one process builds a dataset.

    The kernel drops the lock when its holder dies, so a killed build never blocks the next one.
    The file is removed on release; a waiter that then gets the lock on the removed file sees
    that the path now names another file (or none) and tries again.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                log.warning("waiting for pid %s, which is preparing the same data (lock %s)", owner, self.path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: nobody can take a lock on it meanwhile
        os.close(self._fd)
        self._fd = None
