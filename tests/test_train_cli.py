"""`cram pretrain` end to end through the CLI (Hydra): files, log lines, the missing-data message,
SIGTERM to the whole process group (as a terminal, Slurm or `docker stop` sends it) and
`resume=<run_dir>`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DATA = ["data.embedded_files=[moby_dick]", "data.max_chars=200000", "data.vocab_size=300", "data.seq_len=32",
        "data.compression_threshold=1.0"]
GPU = ["gpu=cpu", "gpu.micro_batch_size=16", "gpu.target_batch_size=64", "arch=tiny"]


def _cram(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CRAMMING_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "cramming.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)


def test_missing_data_names_the_command(tmp_path) -> None:
    proc = _cram(["pretrain", *GPU, *DATA, f"paths.data_root={tmp_path}/data", f"paths.out_root={tmp_path}/out"], tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "is not prepared" in out and "cram data data=embedded data.embedded_files=[moby_dick]" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_cli_sigterm_then_resume(tmp_path) -> None:
    common = [*GPU, *DATA, f"paths.data_root={tmp_path}/data", f"paths.out_root={tmp_path}/out", "run_name=r",
              "train.log_interval=1", "train.prepare_data=true"]
    run_dir = tmp_path / "out" / "pretrain" / "r"
    proc = _cram(["pretrain", "budget=40s", *common], tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, DataLoader workers included
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "received SIGTERM: checkpoint written" in out and f"resume={run_dir}" in out
    steps_before = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    assert steps_before >= 3

    proc = _cram(["pretrain", f"resume={run_dir}"], tmp_path)  # the saved config is used
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "finished; model exported to" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] > steps_before and summary["elapsed_s"] <= 40 + 1.5
    assert summary["arch"] == "tiny" and summary["train_recipe"] == "cramming"
    for name in ("final/model.safetensors", "final/config.json", "final/tokenizer.json", "loss.png", "metrics.jsonl",
                 ".hydra/config.yaml"):
        assert (run_dir / name).is_file(), name
    assert "pretraining tiny/cramming" in (run_dir / "pretrain.log").read_text()
