"""Atomic checkpoints of everything needed to continue a run (the run lock is cramming.runs.RunLock).

Layout under `<run_dir>/checkpoints/`:

    step-00001234/model.safetensors   the un-compiled module's weights (tied tensors stored once)
    step-00001234/state.pt            optimizer, scaler, counters, data position, RNG states
                                      (torch.save of tensors and plain values; loaded with
                                      weights_only=True, so a crafted pickle is refused)
    step-00001234/config.yaml         the resolved config of the run
    step-00001234/meta.json           written last: step, elapsed, sha256 of each file above
    latest.json                       {"dir": "step-00001234"}, replaced atomically

A checkpoint is first written to a hidden temporary folder, each file fsynced, then the folder is
renamed into place and `latest.json` replaced: a crash at any moment leaves the previous complete
checkpoint untouched and never exposes a partial one. Loading verifies every sha256 and names the
file that fails.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from cramming.errors import CheckpointError
from cramming.faults import fault_point
from cramming.fileio import fsync_dir, sha256_file, write_atomic
from cramming.runs import pid_alive

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
META = "meta.json"
FORMAT_VERSION = 1


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    state: dict[str, Any],
    config_text: str,
    step: int,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and return its folder; older ones beyond `keep` are pruned.

    `state` holds tensors and plain Python values only (optimizer/scaler state dicts, counters,
    RNG states as tensors or lists), so it loads with `weights_only=True`.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        fault_point("ckpt.write")  # weights written, state and meta.json not yet
        torch.save(state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_text)
        files = {}
        for fname in ("model.safetensors", "state.pt", "config.yaml"):
            _fsync_file(tmp / fname)
            files[fname] = sha256_file(tmp / fname)
        meta = {"format_version": FORMAT_VERSION, "step": step, "elapsed_s": state.get("elapsed_s"),
                "files": files, "written_at": time.time()}
        with open(tmp / META, "w") as handle:
            json.dump(meta, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(tmp)
        fault_point("ckpt.rename")  # complete in the temporary folder, not yet renamed
        if final.exists():
            # Same step saved twice (e.g. a signal right after the final save): the existing one is
            # complete (it has a meta.json, or it would not have been renamed), so keep it.
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
            fsync_dir(root)
    except OSError as err:
        # Disk full, quota, I/O error: the partial folder goes, the previous checkpoint (and
        # latest.json naming it) is untouched, so say that rather than show a raw traceback.
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failed(root, name, err)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("ckpt.latest")  # renamed, latest.json still names the previous checkpoint
    try:
        write_atomic(root / LATEST, json.dumps({"dir": name, "step": step}).encode())
    except OSError as err:
        # latest.json still names the previous checkpoint; `latest_checkpoint` also finds the
        # complete new folder, so either one is a valid resume point.
        raise CheckpointError(_write_failed(root, name, err)) from None
    _prune(root, keep, protect=name)
    return final


def _write_failed(root: Path, name: str, err: OSError) -> str:
    previous = latest_checkpoint(root.parent)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return (f"could not write checkpoint {root / name}: {err.strerror or err} (errno {err.errno}); {kept}. "
            f"Free disk space in {root} and resume with `cram pretrain resume={root.parent}`")


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check that `ckpt_dir` is complete and every file matches its sha256 in meta.json; returns meta.

    Raises CheckpointError naming the file that is missing, altered or unreadable.
    """
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        items = list(files.items())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path} is missing: {ckpt_dir} is not a complete checkpoint") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # incl. UnicodeDecodeError
        raise CheckpointError(f"{meta_path} is corrupt ({err})") from None
    for fname, digest in items:
        path = ckpt_dir / str(fname)
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt (sha256 mismatch); an older checkpoint may remain in "
                f"{ckpt_dir.parent}"
            )
    return meta


def _prune(root: Path, keep: int, protect: str) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a process killed mid-write
        pid = stale.name.split("-")[-2] if stale.name.count("-") >= 3 else ""
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None if it has none."""
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if pointer.is_file():
        try:
            target = root / json.loads(pointer.read_text())["dir"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{pointer} is corrupt ({err}); delete it to fall back to the newest step-* folder") from None
        if (target / META).is_file():
            return target
    candidates = sorted(p for p in root.glob("step-*") if (p / META).is_file())
    return candidates[-1] if candidates else None


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module) -> tuple[dict[str, Any], str]:
    """Verify and load a checkpoint: weights into `model`; returns (state, config_text).

    Raises CheckpointError naming the file when anything is missing, altered or unreadable.
    """
    ckpt_dir = Path(ckpt_dir)
    meta = verify_checkpoint(ckpt_dir)
    missing = {"model.safetensors", "state.pt", "config.yaml"} - set(meta["files"])
    if missing:  # a meta.json that hashes fewer files would let an unhashed file through
        raise CheckpointError(f"{ckpt_dir / META} does not cover {', '.join(sorted(missing))}: not a valid checkpoint")
    try:
        load_model(model, str(ckpt_dir / "model.safetensors"), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"cannot load weights from {ckpt_dir / 'model.safetensors'}: {err}") from None
    try:
        state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # an UnpicklingError for anything but tensors and plain values
        raise CheckpointError(f"cannot load {ckpt_dir / 'state.pt'} safely: {err}") from None
    return state, (ckpt_dir / "config.yaml").read_text()
