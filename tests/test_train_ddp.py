"""Several ranks on CPU: torchrun with gloo, two processes of the tiny model (tests/ddp_worker.py).

Each launch runs under a hard timeout, past which each rank prints its stacks and exits and the
test fails as a hang. What must hold:

- a rank whose budget clock runs ahead does not make the ranks disagree (at a batch-ramp boundary,
  at the deadline): the same steps on both, one export, no hang;
- a rank killed mid-run makes the other stop with `RankLost` naming it and `resume=`, and resuming
  finishes the run;
- after a resume each rank draws its own random-LTD choices (its own RNG states were saved).

Then single-process tests of the fault hooks, the rank-loss guard and the per-rank RNG format.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_loop import tiny_data

from cramming import faults
from cramming.train import distributed as dist_utils
from cramming.train import state as state_mod
from cramming.train.checkpoint import latest_checkpoint, save_checkpoint
from cramming.train.distributed import DistInfo, RankLost

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ddp_worker.py"
HARD_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(payload: dict, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run the worker on 2 ranks; returns (exit status, output, seconds). A launch still running after
    HARD_TIMEOUT_S is a hang: the ranks end themselves (printing their stacks), torchrun is killed if it
    lingers, and the test fails."""
    payload = {**payload, "hard_timeout_s": HARD_TIMEOUT_S}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(WORKER), json.dumps(payload)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=REPO,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=HARD_TIMEOUT_S + 30)  # + torchrun's grace period for the ranks
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    seconds = time.monotonic() - started
    if seconds >= HARD_TIMEOUT_S:
        pytest.fail(f"hang: the 2-rank job ran for {seconds:.0f} s (limit {HARD_TIMEOUT_S} s)\n{out[-6000:]}")
    return proc.returncode, out, seconds


def trace(folder: Path, rank: int, event: str) -> list[dict]:
    path = folder / f"rank{rank}.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [{k: v for k, v in e.items() if k != "event"} for e in events if e["event"] == event]


def _payload(run_dir: Path, data_dir: Path, budget: str, **extra) -> dict:
    return {"run_dir": str(run_dir), "data_dir": str(data_dir), "budget": budget, **extra}


# --- two ranks under torchrun -------------------------------------------------------------------


def test_a_rank_with_a_skewed_clock_takes_the_same_steps_and_one_export(data_dir, tmp_path) -> None:
    traces, run = tmp_path / "trace", tmp_path / "run"
    traces.mkdir()
    # Rank 1's clock runs 2 s ahead: alone it would cross the ramp's boundaries (1 to 4 micro-batches
    # per rank), the interval checkpoints and the deadline before rank 0 does. (Agreeing on the latest
    # clock, both may start past the first boundaries.)
    train = {"target_batch_size": 128, "ramp_fraction": 0.6, "checkpoint_interval_minutes": 0.02}
    code, out, _ = torchrun(_payload(run, data_dir, "9s", train=train),
                            {faults.CLOCK_SKEW_ENV: "1:2", faults.TRACE_DIR_ENV: str(traces)})
    assert code == 0, out
    steps = [trace(traces, rank, "step") for rank in (0, 1)]
    assert steps[0] and steps[0] == steps[1], out  # step, accumulation, micro-batches, tokens and LR
    assert len({s["accum"] for s in steps[0]}) >= 2, steps[0]  # the ramp crossed a boundary
    stops = [trace(traces, rank, "stop") for rank in (0, 1)]
    assert stops[0] == stops[1] == [{"reason": "budget", "step": steps[0][-1]["step"]}], stops
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps[0][-1]["step"] and summary["world_size"] == 2
    assert (run / "final" / "model.safetensors").is_file() and not list(run.glob(".final.tmp-*"))


def test_a_killed_rank_ends_the_job_with_rank_lost_and_resume_finishes_it(data_dir, tmp_path) -> None:
    run = tmp_path / "run"
    # Two micro-batches per step: rank 1 dies after the first one of step 15, rank 0 in the second
    # one's backward, in DDP's gradient all-reduce.
    train = {"ramp_fraction": 0.0, "checkpoint_interval_minutes": 0.001}
    payload = _payload(run, data_dir, "24steps", train=train)
    code, out, seconds = torchrun(payload, {faults.FAULT_ENV: "train.step:29", faults.FAULT_RANK_ENV: "1"})
    # Rank 0 stopped by itself with the error (torchrun's SIGTERM only sets the stop flag, and its
    # SIGKILL, 30 s later, would leave no message).
    assert code != 0, out
    assert "rank 0 of 2 lost rank 1" in out and f"`cram pretrain resume={run}`" in out, out
    assert seconds < 60, out
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) > 0 and not (run / "final").exists()
    code, out, _ = torchrun({**payload, "resume": True})
    assert code == 0, out
    assert f"from {ckpt.name}" in out  # the resume notice
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["world_size"] == 2
    assert (run / "final" / "model.safetensors").is_file()


def test_each_rank_resumes_with_its_own_random_ltd_choices(data_dir, tmp_path) -> None:
    run = tmp_path / "run"
    ltd = {"enabled": True, "start_keep": 8, "full_at_fraction": 1.0, "granularity": 8}
    payload = _payload(run, data_dir, "4steps", arch={"num_layers": 3}, train={"random_ltd": ltd}, record_ltd=True)
    # The run stops after 4 steps (with its final checkpoint); a resume with 8 steps continues it.
    for budget, resume, folder in (("4steps", False, "first"), ("8steps", True, "resumed")):
        traces = tmp_path / folder
        traces.mkdir()
        code, out, _ = torchrun({**payload, "budget": budget, "resume": resume}, {faults.TRACE_DIR_ENV: str(traces)})
        assert code == 0, out
        kept = [[e["kept"] for e in trace(traces, rank, "ltd")] for rank in (0, 1)]
        assert kept[0], folder
        # The ranks draw as often and in the same shapes: equal draws mean equal RNG states.
        assert all(a != b for a, b in zip(*kept, strict=True)), f"{folder}: ranks 0 and 1 drew the same kept tokens"


# --- single process: hooks, guard, RNG states ----------------------------------------------------


def test_fault_hooks_select_a_rank(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    assert faults.clock_skew_s() == 0.0
    monkeypatch.setenv(faults.CLOCK_SKEW_ENV, "1:2.5")
    assert faults.clock_skew_s() == 2.5
    monkeypatch.setenv(faults.CLOCK_SKEW_ENV, "0:2.5")
    assert faults.clock_skew_s() == 0.0
    # The kill spares the ranks it does not name.
    monkeypatch.setenv(faults.FAULT_ENV, "test.point")
    monkeypatch.setenv(faults.FAULT_RANK_ENV, "0")
    faults.fault_point("test.point")
    faults.trace("step", step=1)  # unset: nothing written anywhere
    monkeypatch.setenv(faults.TRACE_DIR_ENV, str(tmp_path))
    faults.trace("step", step=1, accum=2)
    faults.trace("stop", reason="budget", step=1)
    lines = (tmp_path / "rank1.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"event": "step", "step": 1, "accum": 2},
                                                   {"event": "stop", "reason": "budget", "step": 1}]


GLOO_CLOSED = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[127.0.0.1]:4242. This is typically caused by a remote worker crashing.")


def test_guard_turns_a_lost_peer_into_rank_lost(tmp_path) -> None:
    info = DistInfo(rank=0, world_size=2, timeout_s=30, run_dir=tmp_path)
    with pytest.raises(RankLost) as lost, dist_utils.guard(info, "a barrier"):
        raise RuntimeError(GLOO_CLOSED)
    assert str(lost.value) == (
        "rank 0 of 2 lost rank 1 during a barrier: it crashed, was killed or did not answer within 30 s (Connection "
        "closed by peer [127.0.0.1]:4242). The launcher's log names the rank that failed first. Training since the "
        f"last checkpoint is lost; continue from that checkpoint with `cram pretrain resume={tmp_path}`")
    with pytest.raises(RankLost, match="rank 2 of 4 lost another rank during"), \
            dist_utils.guard(DistInfo(rank=2, world_size=4), "a step"):
        raise torch.distributed.DistBackendError("NCCL communicator was aborted")
    # Other errors (a model bug inside the guarded backward) and a single process pass through.
    for where, err in ((info, RuntimeError("shape mismatch")), (DistInfo(), RuntimeError(GLOO_CLOSED))):
        with pytest.raises(RuntimeError) as raised, dist_utils.guard(where, "a step"):
            raise err
        assert raised.value is err


def test_single_process_collectives_pass_values_through() -> None:
    info = dist_utils.setup("cpu", timeout_s=5.0)
    assert not info.enabled and info.timeout_s == 5.0
    assert dist_utils.gather_objects(info, {"a": 1}) == [{"a": 1}]
    assert dist_utils.agree(info, [1.0, 2.0]) == [1.0, 2.0]


def _parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)


def _draws() -> tuple[list[float], float]:
    """What the torch and Python RNGs draw next."""
    return torch.rand(3).tolist(), random.random()


def _seeded_state(seed: int) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    return state_mod._rng_state()


def _restore(run_dir: Path, rank: int) -> tuple[list[float], float]:
    from cramming.config import parse_budget
    from cramming.train.budget import Budget

    torch.manual_seed(999)  # whatever the process held before
    random.seed(999)
    state_mod.restore(run_dir, *_parts(), Budget(parse_budget("10steps")), rank)
    return _draws()


def test_each_rank_restores_its_own_rng_states(tmp_path, monkeypatch) -> None:
    parts = _parts()
    other = _seeded_state(11)
    _seeded_state(10)
    # As with 2 ranks: rank 0's own states and rank 1's (seed 11), gathered.
    monkeypatch.setattr(state_mod, "gather_objects", lambda info, mine: [mine, other])
    state_mod.save(tmp_path, *parts, state_mod.TrainState(step=3), "cfg: 1\n", 2, DistInfo(rank=0, world_size=2))
    saved = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=True)
    assert isinstance(saved["rng"], list) and len(saved["rng"]) == 2 and saved["world_size"] == 2
    _seeded_state(10)
    rank0 = _draws()
    _seeded_state(11)
    rank1 = _draws()
    assert _restore(tmp_path, 0) == rank0 and _restore(tmp_path, 1) == rank1
    # A rank the checkpoint has no states for (the job grew) draws new ones: its own, every time.
    rank2 = _restore(tmp_path, 2)
    assert rank2 not in (rank0, rank1) and _restore(tmp_path, 2) == rank2


def test_a_checkpoint_with_one_rng_state_restores_rank_0_and_reseeds_the_others(tmp_path, caplog) -> None:
    # The format before per-rank states: one dict, rank 0's.
    model, optimizer, scaler = _parts()
    saved = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "counters": state_mod.TrainState(step=5).counters(), "rng": _seeded_state(7), "world_size": 2}
    save_checkpoint(tmp_path, model, saved, "cfg: 1\n", 5)
    _seeded_state(7)
    rank0 = _draws()
    with caplog.at_level("WARNING", logger="cramming.train.state"):
        assert _restore(tmp_path, 0) == rank0
        assert not [r for r in caplog.records if "draws new ones" in r.getMessage()]
        rank1 = _restore(tmp_path, 1)
    assert rank1 != rank0 and _restore(tmp_path, 1) == rank1  # distinct from rank 0's, and repeatable
    assert any("holds the random states of 1 rank(s): rank 1 draws new ones" in r.getMessage() for r in caplog.records)
