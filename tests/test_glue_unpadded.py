"""`cram glue` with unpadded trials (glue.unpadded): the same trials as padded batches, faster.

A crammed model's unpadded path is tested piece by piece in test_model_unpadded.py; here whole GLUE
runs on the shipped task subsets (cramming/assets/glue_demo) are compared: every trial's per-epoch
training losses and final dev scores with and without unpadding, with dropout on. A transformers
checkpoint with glue.unpadded=true is refused in test_glue_sources.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from wordpiece import tiny_glue_export

from cramming.errors import ConfigError
from cramming.glue import GlueConfig
from cramming.glue import finetune as F
from cramming.glue import metrics as M
from cramming.glue import parallel as P
from cramming.glue.sources import resolve_source
from cramming.gpu import GpuProfile
from cramming.model import bert

ASSETS = Path(F.__file__).resolve().parents[1] / "assets" / "glue_demo"
CPU = GpuProfile()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tsvs = [ASSETS / f"{task}/train.tsv" for task in ("CoLA", "RTE", "STS-B")]
    return tiny_glue_export(tmp_path_factory.mktemp("ckpt"), tsvs, rows=400, vocab_size=300)


@pytest.fixture
def unpad_calls(monkeypatch) -> dict[str, int]:
    """How often the model built an unpadded layout, in training and in evaluation."""
    calls = {"train": 0, "eval": 0}
    real = bert.unpad

    def counting(mask):
        calls["train" if torch.is_grad_enabled() else "eval"] += 1
        return real(mask)

    monkeypatch.setattr(bert, "unpad", counting)
    return calls


def _run(ckpt: Path, out: Path, **glue: object) -> dict:
    gcfg = GlueConfig(tasks=["cola", "rte", "stsb"], data_dir=str(ASSETS), max_train_examples=48, max_eval_examples=40,
                      epochs=2, trials=2, **glue)
    source = resolve_source(OmegaConf.create({"ckpt": str(ckpt)}), gcfg)
    out.mkdir()
    return F.run_glue(gcfg, source, out, CPU).to_json()


def test_unpadded_trials_equal_padded_ones(ckpt, tmp_path, unpad_calls, monkeypatch):
    predictions: list[np.ndarray] = []  # every evaluation's dev predictions, in order
    real_score = M.score

    def recording(spec, pred, labels):
        predictions.append(np.asarray(pred, dtype=np.float64))
        return real_score(spec, pred, labels)

    monkeypatch.setattr(M, "score", recording)
    padded = _run(ckpt, tmp_path / "padded", unpadded=False)
    assert unpad_calls == {"train": 0, "eval": 0}
    padded_predictions, predictions[:] = predictions[:], []
    unpadded = _run(ckpt, tmp_path / "unpadded", unpadded=True)
    # 3 tasks x 2 trials x 2 epochs x 3 steps of 16; dev: 40 rows in one batch of 128 per epoch
    assert unpad_calls == {"train": 36, "eval": 12}
    assert len(predictions) == len(padded_predictions) == 12
    for a, b in zip(padded_predictions, predictions, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for name, task in padded["tasks"].items():
        # The tiny random model predicts STS-B scores within ~1e-3 of each other, so its correlations
        # magnify differences of 1e-9 in the predictions (compared above) to ~1e-5 of the score.
        dev_rel = 1e-4 if name == "stsb" else 1e-5
        for a, b in zip(task["trials"], unpadded["tasks"][name]["trials"], strict=True):
            assert (a["unpadded"], b["unpadded"], a["seed"], a["mode"]) == (False, True, b["seed"], b["mode"])
            for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
                assert eb["train_loss"] == pytest.approx(ea["train_loss"], rel=1e-5), (name, a["seed"], ea["epoch"])
                assert eb["dev"] == pytest.approx(ea["dev"], rel=dev_rel, abs=1e-6), (name, a["seed"], ea["epoch"])
    # Scores that moved at all: a model that learned nothing would make the comparison empty.
    losses = {e["train_loss"] for t in padded["tasks"].values() for trial in t["trials"] for e in trial["epochs"]}
    assert len(losses) == 12
    assert padded["resume_key"] == unpadded["resume_key"]  # a run may resume the other way


def test_unpadded_is_the_default_where_steps_are_eager(ckpt, tmp_path, unpad_calls):
    gcfg = GlueConfig(tasks=["rte"], data_dir=str(ASSETS), max_train_examples=16, max_eval_examples=8, epochs=1, trials=1)
    source = resolve_source(OmegaConf.create({"ckpt": str(ckpt)}), gcfg)
    trial = F.run_glue(gcfg, source, tmp_path, CPU).tasks["rte"].trials[0]
    assert trial.unpadded and unpad_calls["train"] == 1


def test_when_trials_run_unpadded(ckpt):
    from cramming.glue.training import unpads

    source = resolve_source(OmegaConf.create({"ckpt": str(ckpt)}), GlueConfig(tasks=["rte"], data_dir=str(ASSETS)))
    model = source.make_model(2, 0.1)
    compiled = GpuProfile(name="gpu", device="cuda", compile=True)
    eager = GpuProfile(name="gpu", device="cuda", compile=False)
    expected = [(None, CPU, True), (None, eager, True), (None, compiled, False), (False, CPU, False),
                (True, compiled, True)]
    for setting, profile, want in expected:
        assert unpads(GlueConfig(unpadded=setting), profile, model) is want, (setting, profile)
    assert unpads(GlueConfig(unpadded=True), CPU, torch.nn.Linear(2, 2)) is False  # no unpadded path
    # unpadded=true keeps a task's trials one after another even on CUDA
    assert P.wanted(GlueConfig(), eager, 5) and not P.wanted(GlueConfig(unpadded=True), eager, 5)
    with pytest.raises(ConfigError, match="unpadded=true and parallel_trials=true cannot both hold"):
        GlueConfig(unpadded=True, parallel_trials=True)
