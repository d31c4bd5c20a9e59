"""The whole pipeline as `make demo` runs it, at a smaller scale: data -> pretrain -> glue -> report.

Offline and GPU-free: the embedded corpus, a tiny model, the GLUE subsets shipped in
cramming/assets/glue_demo, and the report. Slow (about a minute on two idle cores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cramming.runs import read_metrics, read_results, read_summary

REPO = Path(__file__).resolve().parents[1]
GLUE_DEMO = REPO / "cramming" / "assets" / "glue_demo"
DATA = ["data=embedded", "data.vocab_size=1024", "data.max_documents=4000"]


def cram(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CRAMMING_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "cramming.cli", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"cram {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    common = ["gpu=cpu", f"paths.data_root={tmp_path / 'cache'}", f"paths.out_root={tmp_path / 'out'}", "run_name=run"]
    cram("data", *DATA, *common, cwd=tmp_path)
    cram("pretrain", *DATA, *common, "arch=tiny", "budget=25s", "train.log_interval=2",
         "gpu.micro_batch_size=16", "train.target_batch_size=64", cwd=tmp_path)
    run = tmp_path / "out" / "pretrain" / "run"
    summary = read_summary(run)
    assert summary["steps"] > 5 and summary["elapsed_s"] <= 25 + 3
    metrics = read_metrics(run)
    losses = [r["loss"] for r in metrics.records if r.get("loss") is not None]
    assert metrics.bad_lines == 0 and metrics.evals and losses[-1] < losses[0], losses

    cram("glue", f"ckpt={run / 'final'}", f"glue.data_dir={GLUE_DEMO}", "glue.tasks=[rte,sst2,stsb]",
         "glue.trials=2", "glue.epochs=1", "glue.max_train_examples=128", "glue.max_eval_examples=64", *common,
         cwd=tmp_path)
    results = read_results(tmp_path / "out" / "glue" / "run")
    for task in ("rte", "sst2", "stsb"):
        assert len(results["tasks"][task]["trials"]) == 2

    out = cram("report", str(run), str(tmp_path / "out" / "glue" / "run"), "--out", str(tmp_path / "report"),
               cwd=tmp_path)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "report.md" in out.stdout
    for needle in ("RTE", "SST-2", "STS-B", "published", "tokens"):
        assert needle in report, needle
    pngs = list((tmp_path / "report").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
