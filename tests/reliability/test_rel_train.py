"""`cram pretrain` under faults: SIGKILL mid-step and mid-checkpoint, signals, the lock, disk full,
corrupted checkpoints. Resumed runs are compared with an uninterrupted run of the same step budget."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_ARCH,
    TINY_DATA,
    TINY_GPU,
    TINY_TARGET_BATCH,
    cram,
    finish,
    flip_bit,
    truncate,
    wait_for,
    worker,
)
from omegaconf import OmegaConf

from cramming.config import parse_budget
from cramming.errors import CheckpointError, CrammingError
from cramming.gpu import GpuProfile
from cramming.model.bert import ModelConfig
from cramming.train import checkpoint as ckpt_mod
from cramming.train.checkpoint import latest_checkpoint, load_checkpoint
from cramming.train.config import TrainConfig
from cramming.train.loop import pretrain

STEPS = 20
INTERVAL_MIN = 0.003  # a checkpoint every 0.18 s: several per run


def train_cfg(**kw) -> dict:
    return {**dict(target_batch_size=TINY_TARGET_BATCH, checkpoint_interval_minutes=INTERVAL_MIN, log_interval=1,
                   eval_batches=2, reserve_margin_s=0.5, keep_checkpoints=2), **kw}


def run_inproc(run_dir: Path, data_dir: Path, resume: bool = False, budget: str = f"{STEPS}steps", **kw) -> Path:
    return pretrain(TrainConfig(**train_cfg(**kw)), ModelConfig(**TINY_ARCH), GpuProfile(**TINY_GPU), data_dir, run_dir,
                    budget=parse_budget(budget), resume=resume)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if r.get("event") != "eval"]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted run of the same step budget."""
    run_dir = tmp_path_factory.mktemp("ref")
    run_inproc(run_dir, tiny_data)
    return run_dir


def _compare(run_dir: Path, reference: Path) -> dict:
    """The resumed run against the reference: steps, tokens, per-step LR and batch size, weights."""
    from safetensors.torch import load_file

    a, b = json.loads((reference / "summary.json").read_text()), json.loads((run_dir / "summary.json").read_text())
    ra = {r["step"]: r for r in train_records(reference)}
    rb = {r["step"]: r for r in train_records(run_dir)}
    assert sorted(rb) == list(range(1, STEPS + 1)), "metrics after the checkpoint were not dropped/redone once"
    assert b["steps"] == a["steps"] == STEPS and b["tokens_seen"] == a["tokens_seen"]
    for s in ra:
        assert (rb[s]["lr"], rb[s]["batch_size"], rb[s]["tokens_seen"]) == (ra[s]["lr"], ra[s]["batch_size"],
                                                                           ra[s]["tokens_seen"]), s
    elapsed = [rb[s]["elapsed_s"] for s in sorted(rb)]
    assert elapsed == sorted(elapsed), "the budget clock went backwards across the resume"
    wa, wb = load_file(reference / "final" / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    return {"max_weight_diff": max(float((wa[k] - wb[k]).abs().max()) for k in wa)}


# The n-th checkpoint write: the 1st is the start-of-run checkpoint and the last is the final one,
# so the 2nd always happens (an interval checkpoint, or the final one on a machine fast enough to
# finish the 20 steps within one interval); a 3rd depends on the machine's speed.
KILL_POINTS = {
    "train.step:9": ("mid-step (9th micro-batch: gradients accumulated, optimizer not stepped)", "mid-step"),
    "ckpt.write:2": ("mid-checkpoint-write (weights written, state.pt/meta.json not)", "mid-checkpoint-write"),
    "ckpt.rename:2": ("checkpoint complete in its temporary folder, not yet renamed", "mid-checkpoint-write"),
    "ckpt.latest:2": ("checkpoint renamed, latest.json not yet updated", "mid-checkpoint-write"),
}


@pytest.mark.parametrize("point", [p if p in ("train.step:9", "ckpt.write:2") else pytest.param(p, marks=pytest.mark.slow)
                                   for p in KILL_POINTS])
def test_sigkill_then_resume_matches_uninterrupted(point, tiny_data, reference, tmp_path, outcome) -> None:
    run_dir = tmp_path / "run"
    code, out = finish(worker("pretrain", {"run_dir": str(run_dir), "data_dir": str(tiny_data), "train": train_cfg(),
                                           "budget": f"{STEPS}steps"}, fault=point))
    assert code == -9, f"fault point {point} not reached:\n{out}"
    done = train_records(run_dir)
    killed_elapsed = max((r["elapsed_s"] for r in done), default=0.0)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and not ckpt.name.startswith(".")
    counters = torch.load(ckpt / "state.pt", weights_only=True)["counters"]
    run_inproc(run_dir, tiny_data, resume=True)
    cmp = _compare(run_dir, reference)
    step_s = max((b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train_records(reference), train_records(reference)[1:],
                                                                     strict=False)), default=0.0)
    lost = max(0.0, killed_elapsed - counters["elapsed_s"])
    bound = 60 * INTERVAL_MIN + 2 * step_s + 0.5
    assert lost <= bound, (lost, bound)
    what, row = KILL_POINTS[point]
    outcome.add(f"SIGKILL of `cram pretrain` {row}", f"CRAMMING_FAULT={point}: {what}",
                "resume loads the newest complete checkpoint (verified sha256; temporary folders are never taken "
                "for checkpoints); same final step count, tokens, per-step LR and batch size as an uninterrupted "
                "run; the budget clock continues", True, lost=lost, unit="s of training", bound=bound,
                detail=f"resumed from step {counters['step']}; max |weight diff| vs uninterrupted {cmp['max_weight_diff']:.3g}")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_sigkill_at_random_time_then_resume(seed, tiny_data, reference, tmp_path, outcome) -> None:
    import random

    run_dir = tmp_path / "run"
    proc = worker("pretrain", {"run_dir": str(run_dir), "data_dir": str(tiny_data), "train": train_cfg(),
                               "budget": "400steps"})
    wait_for(lambda: latest_checkpoint(run_dir) is not None, 120, "the first checkpoint")
    time.sleep(random.Random(seed).uniform(0.5, 6.0))
    proc.kill()
    finish(proc)
    killed_elapsed = max((r["elapsed_s"] for r in train_records(run_dir)), default=0.0)
    counters = torch.load(latest_checkpoint(run_dir) / "state.pt", weights_only=True)["counters"]
    run_inproc(run_dir, tiny_data, resume=True, budget="400steps")
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = sorted(r["step"] for r in train_records(run_dir))
    lost = max(0.0, killed_elapsed - counters["elapsed_s"])
    ok = summary["steps"] == 400 and steps == list(range(1, 401)) and lost <= 60 * INTERVAL_MIN + 1.0
    outcome.add("SIGKILL of `cram pretrain` at a random time", "SIGKILL 0.5-6 s (seeded) after the first checkpoint",
                "resume completes the 400-step budget with one metrics record per step", ok, lost=lost,
                unit="s of training", bound=60 * INTERVAL_MIN + 1.0, detail=f"seed {seed}: resumed from step {counters['step']}")
    assert ok


def test_lock_refuses_second_run_then_sigterm_checkpoints(tiny_data, tmp_path, outcome) -> None:
    run_dir = tmp_path / "run"
    proc = worker("pretrain", {"run_dir": str(run_dir), "data_dir": str(tiny_data),
                               "train": train_cfg(checkpoint_interval_minutes=5.0), "budget": "100ksteps"})
    wait_for(lambda: len(train_records(run_dir)) >= 3, 90, "3 steps")
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(CrammingError, match="in use by another run"):
        run_inproc(run_dir, tiny_data)
    assert (run_dir / "metrics.jsonl").read_bytes().startswith(before), "the refused run touched the metrics"
    outcome.add("Two runs on one run directory", "a second `pretrain` into the folder of a live run",
                "the second refuses with 'in use by another run (pid N)' before writing anything; the first continues",
                True)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    step = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    ok = code == 0 and "received SIGTERM: checkpoint written" in out and step >= 3 and not (run_dir / ".lock").exists()
    outcome.add("SIGTERM during pretraining", "SIGTERM to the training process",
                "checkpoint at the next step boundary, message with the resume command, exit 0, lock released", ok,
                detail=f"exit {code}, checkpoint at step {step}")
    assert ok, out


def test_ctrl_c_through_the_cli_checkpoints_and_exits_130(tiny_data, tmp_path, outcome) -> None:
    data_args = [f"data.{k}={json.dumps(v) if isinstance(v, list) else v}".replace('"', "") for k, v in TINY_DATA.items()]
    args = ["pretrain", "gpu=cpu", "gpu.micro_batch_size=16", f"train.target_batch_size={TINY_TARGET_BATCH}",
            "gpu.num_workers=0", "arch=tiny",
            *data_args, f"paths.data_root={tiny_data.parent}", f"paths.out_root={tmp_path}/out", "run_name=r",
            "budget=10m", "train.log_interval=1"]
    run_dir = tmp_path / "out" / "pretrain" / "r"
    proc = cram(args, tmp_path)
    wait_for(lambda: len(train_records(run_dir)) >= 2 or proc.poll() is not None, 120, "2 steps")
    assert proc.poll() is None, proc.communicate()[0]
    import os

    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    code, out = finish(proc)
    ok = code == 130 and "received SIGINT: checkpoint written" in out and f"resume={run_dir}" in out
    ok = ok and latest_checkpoint(run_dir) is not None and "Traceback" not in out
    outcome.add("Ctrl-C (SIGINT) during `cram pretrain`", "SIGINT to the CLI's process group",
                "checkpoint, message 'received SIGINT: checkpoint written ... resume=<dir>', exit 130", ok,
                detail=f"exit {code}")
    assert ok, out


def test_disk_full_while_writing_a_checkpoint(tiny_data, tmp_path, monkeypatch, outcome) -> None:
    calls = [0]
    real_save = torch.save

    def full_save(obj, path, *a, **kw):
        calls[0] += 1
        if calls[0] == 3:  # the start-of-run checkpoint and one more succeed
            with open(path, "wb") as fh:
                fh.write(b"\0" * 100)  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_save)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:
        run_inproc(run_dir, tiny_data, budget="200steps")
    monkeypatch.undo()
    msg = str(err.value)
    assert "No space left on device" in msg and "is intact" in msg and "resume" in msg, msg
    ckpt = latest_checkpoint(run_dir)
    state, _ = load_checkpoint(ckpt, __import__("cramming.model.bert", fromlist=["x"]).CrammedBertForMLM(
        ModelConfig(**{**TINY_ARCH, "vocab_size": 300})))
    assert not list((run_dir / "checkpoints").glob(".tmp-*")) and not (run_dir / ".lock").exists()
    run_inproc(run_dir, tiny_data, resume=True, budget="200steps")  # and the run can go on
    ok = json.loads((run_dir / "summary.json").read_text())["steps"] == 200
    outcome.add("Disk full while writing a checkpoint", "torch.save in checkpoint.py writes 100 bytes then raises "
                "OSError(ENOSPC) on the 3rd checkpoint", "CheckpointError 'could not write checkpoint ...: No space "
                "left on device; the previous checkpoint ... is intact ... resume'; partial folder removed; the "
                "previous checkpoint verifies and the run resumes to completion", ok,
                detail=f"previous checkpoint {ckpt.name} (step {state['counters']['step']}) loaded")
    assert ok


CKPT_CORRUPTIONS = {
    "model.safetensors truncated": ("model.safetensors", lambda p: truncate(p, 0.5)),
    "model.safetensors bit flip": ("model.safetensors", lambda p: flip_bit(p)),
    "state.pt bit flip": ("state.pt", lambda p: flip_bit(p)),
    "state.pt truncated": ("state.pt", lambda p: truncate(p, 0.3)),
    "config.yaml truncated": ("config.yaml", lambda p: truncate(p, 0.4)),
    "meta.json truncated": ("meta.json", lambda p: truncate(p, 0.5)),
    "meta.json non-UTF-8 byte": ("meta.json", lambda p: flip_bit(p, 5, 7)),
}


@pytest.mark.parametrize("case", list(CKPT_CORRUPTIONS))
def test_corrupted_checkpoint_is_refused_on_resume(case, reference, tmp_path, outcome) -> None:
    from cramming.train.trainer import load_job

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpt = latest_checkpoint(run_dir)
    fname, damage = CKPT_CORRUPTIONS[case]
    damage(ckpt / fname)
    with pytest.raises(CheckpointError) as err:
        load_job(OmegaConf.create({"resume": str(run_dir)}))
    assert str(ckpt / fname) in str(err.value), str(err.value)
    outcome.add(f"Corrupt checkpoint: {case.split()[0]}", f"{case} in the newest checkpoint, then "
                "`cram pretrain resume=<dir>`", "CheckpointError naming the file (sha256 in meta.json, verified "
                "before config.yaml is parsed or any weights load); nothing is loaded", True, detail=case)


def test_corrupt_latest_pointer(reference, tmp_path, outcome) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "checkpoints" / "latest.json").write_bytes(b'{"dir": "step-000\xff')
    with pytest.raises(CheckpointError, match="latest.json is corrupt"):
        latest_checkpoint(run_dir)
    outcome.add("Corrupt checkpoint: latest.json", "latest.json truncated with a non-UTF-8 byte",
                "CheckpointError naming latest.json and how to fall back", True)
