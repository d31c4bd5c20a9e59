"""Checksums and crash-safe writes, shared by every stage that writes what a later run trusts."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from cramming.faults import fault_point


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks so shards of any size hash in bounded memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, fault: str | None = None) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of either.

    The bytes go to a temporary file in the same folder, are fsynced, and the file is renamed over
    `path`. On any error (a full disk, say) the temporary file is removed and the error re-raised.
    `fault` names a `fault_point` half-way through the write, for the reliability suite.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload[: len(payload) // 2])
            if fault:
                fh.flush()
                fault_point(fault)
            fh.write(payload[len(payload) // 2:])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
