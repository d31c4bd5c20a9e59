"""Pretraining helps: `scripts/transfer.py`'s whole comparison on the real GLUE files (slow suite).

One `cram pretrain` run on the embedded corpus (8000 steps of the small model, the regime measured in
docs/experiments.md, "Transfer, shown on the CPU"), then CoLA, STS-B and RTE finetuned from it and from
random weights with the same settings and seeds. On the shared 2-core machine it takes 30-40 minutes.
"""

from __future__ import annotations

import json

import pytest
from script_loader import load_script

# The held-out rows' unigram cross-entropy at vocabulary 8192 (token frequencies of the train rows),
# measured in docs/experiments.md: a model that only learned token frequencies scores about this.
UNIGRAM_CROSS_ENTROPY = 6.68


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_pretrained_model_beats_random_weights_on_glue(shared_dir, tmp_path, monkeypatch):
    glue = shared_dir / "data" / "glue"
    needed = [glue / task / "train.tsv" for task in ("CoLA", "STS-B", "RTE")]
    if not all(f.is_file() for f in needed):
        pytest.skip(f"the GLUE training files {', '.join(map(str, needed))} are not all there")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as measured: one thread per process
    monkeypatch.setenv("CRAMMING_NO_PROGRESS", "1")
    assert load_script("transfer").main(["--out", str(tmp_path), "--glue-dir", str(glue)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    step, loss = summary["val_loss"][-1]
    assert step == 8000 and loss < UNIGRAM_CROSS_ENTROPY - 1.0, "pretraining did not leave the unigram plateau"
    pretrained, random_init = summary["models"]["pretrained"], summary["models"]["random-init"]
    assert set(pretrained["per_task"]) == {"cola", "stsb", "rte"} and len(pretrained["per_seed"]) == 3
    assert summary["separated"], (pretrained["per_seed"], random_init["per_seed"])
    assert summary["gap"] > max(pretrained["spread"], random_init["spread"]), summary["gap"]
    assert summary["win"]
