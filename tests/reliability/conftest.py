"""Shared fixtures of the reliability suite: a tiny prepared dataset, a subprocess runner, file
corruption helpers, and `outcome`, which records every injected fault's measured result.

Each test writes its records to `<results dir>/<test id>.json` when it finishes (status included),
and `scripts/reliability_report.py` turns those files into the table of docs/reliability.md. The
results directory is `outputs/reliability/` unless `CRAMMING_RELIABILITY_RESULTS` names another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_worker.py"
RESULTS_DIR = Path(os.environ.get("CRAMMING_RELIABILITY_RESULTS", REPO / "outputs" / "reliability"))

# The tiny dataset every training test uses: ~1.6k rows of 32 tokens, built in about a second.
TINY_DATA = dict(name="rel", source="embedded", embedded_files=["moby_dick"], max_chars=150_000, vocab_size=300,
                 seq_len=32, val_fraction=0.05, compression_threshold=1.0, shard_sequences=400)
TINY_ARCH = dict(name="rel-tiny", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=32)
TINY_GPU = dict(name="cpu", micro_batch_size=16, num_workers=0)
# Two micro-batches of 16 per optimizer step once the ramp is done.
TINY_TARGET_BATCH = 32


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: no progress bars, one thread (the CPU is shared), unbuffered."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRAMMING_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("CRAMMING_FAULT", None)
    env.update(extra)
    return env


def spawn(args: list[str], cwd: Path | None = None, fault: str | None = None) -> subprocess.Popen:
    """Start `python <args>` in its own session (so a test can signal its whole process group)."""
    env = child_env(**({"CRAMMING_FAULT": fault} if fault else {}))
    return subprocess.Popen([sys.executable, *args], cwd=cwd or REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def worker(command: str, payload: dict[str, Any], fault: str | None = None) -> subprocess.Popen:
    """Run one stage through tests/reliability/_worker.py (the Python API, without Hydra start-up)."""
    return spawn([str(WORKER), command, json.dumps(payload)], fault=fault)


def cram(args: list[str], cwd: Path, fault: str | None = None) -> subprocess.Popen:
    """Run the real `cram` CLI (Hydra) in a child process."""
    return spawn(["-m", "cramming.cli", *args], cwd=cwd, fault=fault)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(predicate, timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def flip_bit(path: Path, offset: int | None = None, bit: int = 0) -> int:
    """Flip one bit of `path` (in the middle by default); returns the byte offset."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset % len(data)
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))
    return offset


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# ---------------------------------------------------------------------------------------------
# Recording outcomes
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    fault: str
    """Row of the table (the fault), e.g. "SIGKILL of `cram data` while writing a shard"."""
    injected: str
    """How the fault was injected."""
    behaviour: str
    """What the system does about it (what the test checks)."""
    survived: bool
    """The re-run/resume completed with valid outputs, or the fault was detected and reported."""
    lost: float = 0.0
    """Amount of work or data lost (0 = nothing), in `unit`."""
    unit: str = ""
    bound: float | None = None
    """The promised upper bound on `lost`, in `unit` (e.g. one checkpoint interval)."""
    detail: str = ""


@dataclass
class Recorder:
    nodeid: str
    runs: list[Run] = field(default_factory=list)

    def add(self, fault: str, injected: str, behaviour: str, survived: bool, *, lost: float = 0.0, unit: str = "",
            bound: float | None = None, detail: str = "") -> None:
        self.runs.append(Run(fault, injected, behaviour, bool(survived), float(lost), unit, bound, detail))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def outcome(request):
    """Record one row per injected fault run: `outcome.add(fault, injected, behaviour, survived, lost=...)`.

    Runs are recorded as they happen, so a test that fails half-way still reports the runs before
    the failure, and its status marks the rows as failing in the generated table.
    """
    rec = Recorder(request.node.nodeid)
    yield rec
    call = getattr(request.node, "rep_call", None)
    status = "passed" if call is not None and call.passed else ("skipped" if call is not None and call.skipped else "failed")
    if status == "skipped" or not rec.runs:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-150:]
    slow = request.node.get_closest_marker("slow") is not None
    payload = {"nodeid": request.node.nodeid, "status": status, "slow": slow, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
               "runs": [asdict(r) for r in rec.runs]}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Data and a reference training run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The prepared tiny dataset (read-only: tests that corrupt it work on a copy)."""
    from cramming.data.prepare import DataConfig, prepare

    os.environ.setdefault("CRAMMING_NO_PROGRESS", "1")
    return prepare(DataConfig(**TINY_DATA), tmp_path_factory.mktemp("reldata"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads fight."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
