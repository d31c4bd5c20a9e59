"""`cram glue` end to end on a tiny checkpoint: results files, custom tasks, export, resume, baselines,
and the errors a user meets before any training starts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from wordpiece import tiny_glue_export, train_wordpiece

from cramming import runs
from cramming.cli import main as cram_main
from cramming.report import write_glue_tables

REPO = Path(__file__).resolve().parents[1]
# RTE, MRPC and STS-B in the official GLUE layout: the subsets the project ships (real rows), so that
# these tests run in any clone, not only where ../shared/data/glue is.
GLUE_DIR = REPO / "cramming" / "assets" / "glue_demo"
LABELLED = REPO.parent / "shared" / "data" / "labelled"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny pretraining export (random weights) with a WordPiece tokenizer trained on RTE/MRPC text."""
    return tiny_glue_export(tmp_path_factory.mktemp("ckpt"), [GLUE_DIR / "RTE/train.tsv", GLUE_DIR / "MRPC/train.tsv"],
                            rows=800, vocab_size=400)


def cram_glue(tmp: Path, *overrides: str, monkeypatch, gpu: str = "cpu") -> int:
    """`cram glue` in this process (the same Hydra application the console script runs)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        cram_main(["glue", f"paths.out_root={tmp}", f"gpu={gpu}", *overrides])
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _results(tmp: Path, run: str) -> dict:
    return runs.read_results(tmp / "glue" / run)


QUICK = ["glue.epochs=1", "glue.max_train_examples=32", "glue.max_eval_examples=16"]


E2E = ["glue.tasks=[rte,mrpc]", f"glue.data_dir={GLUE_DIR}", "glue.max_train_examples=64",
       "glue.max_eval_examples=32", "glue.epochs=1", "glue.trials=2", "run_name=e2e"]


@pytest.mark.slow
def test_cram_glue_console_script(ckpt, tmp_path):
    """The same run as below through a fresh `python -m cramming.cli` process."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cramming.cli", "glue", f"ckpt={ckpt}", f"paths.out_root={tmp_path}", *E2E]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mrpc trial 2/2 (seed 1) epoch 1/1: train_loss" in out.stdout + out.stderr
    res = _results(tmp_path, "e2e")
    assert res["status"] == "complete" and set(res["tasks"]["mrpc"]["median"]) == {"f1", "accuracy"}
    assert (tmp_path / "glue" / "e2e" / runs.RESULTS_MD).is_file()  # rendered by the CLI after the stage


def test_cram_glue_end_to_end_rte_mrpc(ckpt, tmp_path, monkeypatch, capsys):
    assert cram_glue(tmp_path, f"ckpt={ckpt}", *E2E, monkeypatch=monkeypatch) == 0
    logs = "".join(capsys.readouterr())
    assert "rte trial 1/2 (seed 0) epoch 1/1: train_loss" in logs and "mrpc trial 2/2 (seed 1) epoch 1/1" in logs

    run = tmp_path / "glue" / "e2e"
    res = runs.read_results(run)
    assert res["status"] == "complete"
    assert res["checkpoint"]["sha256"] == hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert res["config"]["batch_size"] == 16 and res["config"]["lr"] == 4e-5 and res["config"]["trials"] == 2
    expected = {"rte": {"accuracy"}, "mrpc": {"f1", "accuracy"}}
    for task, keys in expected.items():
        entry = res["tasks"][task]
        assert entry["examples"] == {"train": 64, "dev": 32}
        assert [t["seed"] for t in entry["trials"]] == [0, 1]
        for trial in entry["trials"]:
            assert set(trial["final"]) == keys and trial["final"] == trial["epochs"][-1]["dev"]
            assert all(0.0 <= v <= 100.0 for v in trial["final"].values())
        assert set(entry["median"]) == keys
        assert entry["score"] == entry["median"][entry["headline"][0]]
    assert res["glue"]["columns"]["RTE"] == res["tasks"]["rte"]["median"]["accuracy"]
    assert res["glue"]["columns"]["MRPC"] == res["tasks"]["mrpc"]["median"]["f1"]
    assert res["glue"]["columns"]["CoLA"] is None and res["glue"]["average"] is None

    # The CLI renders the tables after the stage; the same rendering from the results file alone.
    assert (run / runs.RESULTS_MD).is_file()
    md = write_glue_tables(run).read_text()
    assert "| measured: " in md and md.count("| published: ") == 3
    assert "| 84.1 | 84.6 | 87.5 | 90.2 | 92.0 | 53.3 | 87.4 | 88.9 | 58.5 | 80.7 |" in md
    assert f"{res['glue']['columns']['MRPC']:.1f} | {res['glue']['columns']['RTE']:.1f} |" in md
    assert "SUBSAMPLED" in md and "### mrpc" in md


def test_custom_tsv_task_and_export(ckpt, tmp_path, monkeypatch):
    if not LABELLED.is_dir():
        pytest.skip(f"{LABELLED} is absent")
    lines = (LABELLED / "uci_sentences.tsv").read_text().splitlines()
    (tmp_path / "train.tsv").write_text("\n".join([lines[0], *lines[1::60]]) + "\n")  # 50 rows, all sources
    (tmp_path / "dev.tsv").write_text("\n".join([lines[0], *lines[2::100]]) + "\n")  # 30 rows
    spec = (f"[{{name: uci, train_file: {tmp_path / 'train.tsv'}, dev_file: {tmp_path / 'dev.tsv'}, "
            "text_columns: [sentence], label_column: label, metric: mcc}]")
    code = cram_glue(tmp_path, f"ckpt={ckpt}", "glue.tasks=[]", f"glue.custom_tasks={spec}", "glue.trials=1",
                     "glue.export_finetuned=true", "run_name=custom", *QUICK, monkeypatch=monkeypatch)
    assert code == 0
    res = _results(tmp_path, "custom")
    entry = res["tasks"]["uci"]
    assert entry["custom"] and entry["headline"] == ["mcc"] and set(entry["median"]) == {"mcc", "accuracy", "f1"}
    assert entry["examples"] == {"train": 32, "dev": 16}
    assert all(v is None for v in res["glue"]["columns"].values())
    assert "### uci (custom)" in write_glue_tables(tmp_path / "glue" / "custom").read_text()

    from cramming.model import load_model

    exported = tmp_path / "glue" / "custom" / "finetuned" / "uci"
    config = json.loads((exported / "config.json").read_text())
    assert config["finetuned_task"] == "uci" and config["id2label"] == {"0": "0", "1": "1"}
    model = load_model(exported, head="classification")
    assert model.num_labels == 2


def test_resume_skips_completed_trials(ckpt, tmp_path, monkeypatch):
    args = [f"ckpt={ckpt}", "glue.tasks=[rte]", f"glue.data_dir={GLUE_DIR}", "run_name=resume", *QUICK]
    assert cram_glue(tmp_path, *args, "glue.trials=1", monkeypatch=monkeypatch) == 0
    first = _results(tmp_path, "resume")["tasks"]["rte"]["trials"]
    assert len(first) == 1

    # Same folder, same config, more trials: trial 1 is reused as is, only trial 2 runs.
    assert cram_glue(tmp_path, *args, "glue.trials=2", monkeypatch=monkeypatch) == 0
    second = _results(tmp_path, "resume")["tasks"]["rte"]["trials"]
    assert [t["seed"] for t in second] == [0, 1]
    assert second[0] == first[0]  # identical record, timings included: it was not re-run

    # A different recipe in the same folder would mix results: refused, nothing overwritten.
    assert cram_glue(tmp_path, *args, "glue.trials=2", "glue.lr=1e-4", monkeypatch=monkeypatch) == 2
    assert _results(tmp_path, "resume")["tasks"]["rte"]["trials"] == second


def test_random_init_baseline(ckpt, tmp_path, monkeypatch):
    args = ["ckpt=random-init", "glue.tasks=[mrpc]", f"glue.data_dir={GLUE_DIR}", "glue.trials=1", "run_name=rand",
            "arch.hidden_size=32", "arch.num_layers=1", "arch.num_heads=2", "arch.intermediate_size=64", *QUICK]
    assert cram_glue(tmp_path, *args, monkeypatch=monkeypatch) == 2  # no tokenizer given
    assert cram_glue(tmp_path, *args, f"glue.tokenizer={ckpt}", monkeypatch=monkeypatch) == 0
    res = _results(tmp_path, "rand")
    assert res["checkpoint"]["kind"] == "random-init" and set(res["tasks"]["mrpc"]["median"]) == {"f1", "accuracy"}


def test_encoding_pairs_and_truncation(ckpt):
    from cramming.glue.encoding import encode_with_cls_sep as encode_split
    from cramming.glue.tasks import Split
    from cramming.model import load_tokenizer

    tok = load_tokenizer(ckpt)
    cls, sep = tok.convert_tokens_to_ids("[CLS]"), tok.convert_tokens_to_ids("[SEP]")
    a, b = "the man said it", "a woman " * 200
    enc = encode_split(tok, Split([a], [b], [0], "x"), 16)
    ids = enc.input_ids[0]
    a_ids = tok(a, add_special_tokens=False)["input_ids"]
    assert len(ids) == 16 and ids[0] == cls and ids[-1] == sep
    assert ids[1 : 1 + len(a_ids)] == a_ids and ids[1 + len(a_ids)] == sep  # the short text is kept whole
    single = encode_split(tok, Split([b], None, [1], "x"), 8).input_ids[0]
    assert len(single) == 8 and single[0] == cls and single[-1] == sep and single.count(sep) == 1


def test_errors_before_training(ckpt, tmp_path, monkeypatch, capsys):
    base = ["glue.tasks=[rte]", f"glue.data_dir={GLUE_DIR}", *QUICK]
    assert cram_glue(tmp_path, *base, monkeypatch=monkeypatch) == 2
    assert "ckpt is required" in capsys.readouterr().err

    assert cram_glue(tmp_path, f"ckpt={tmp_path / 'nowhere'}", *base, monkeypatch=monkeypatch) == 2
    assert "is not a folder" in capsys.readouterr().err

    no_weights = tmp_path / "no_weights"
    shutil.copytree(ckpt, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert cram_glue(tmp_path, f"ckpt={no_weights}", *base, monkeypatch=monkeypatch) == 2
    assert "lacks model.safetensors" in capsys.readouterr().err

    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(ckpt, other_vocab)
    train_wordpiece(["some other text entirely", "with another vocabulary"] * 50, 120, other_vocab / "tokenizer.json")
    assert cram_glue(tmp_path, f"ckpt={other_vocab}", *base, monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert "tokenizer has" in err and "does not belong to this checkpoint" in err

    assert cram_glue(tmp_path, f"ckpt={ckpt}", "glue.tasks=[rte,wnli]", monkeypatch=monkeypatch) == 2
    assert "WNLI is excluded" in capsys.readouterr().err
    assert cram_glue(tmp_path, f"ckpt={ckpt}", "glue.tasks=[qnli]", f"glue.data_dir={GLUE_DIR}",
                     monkeypatch=monkeypatch) == 2
    assert "lacks QNLI/train.tsv" in capsys.readouterr().err
    # Nothing was trained: no results were written by any of these runs.
    assert not list(tmp_path.glob(f"glue/*/{runs.RESULTS_FILE}"))


def test_mnli_matched_mismatched_and_stsb_regression(ckpt, tmp_path, monkeypatch):
    from test_glue_tasks import _write_mnli

    data = tmp_path / "glue_data"
    _write_mnli(data)
    (data / "STS-B").symlink_to(GLUE_DIR / "STS-B")
    args = [f"ckpt={ckpt}", "glue.tasks=[mnli,stsb]", f"glue.data_dir={data}", "glue.trials=2", "run_name=mm", *QUICK]
    assert cram_glue(tmp_path, *args, monkeypatch=monkeypatch) == 0
    res = _results(tmp_path, "mm")
    mnli = res["tasks"]["mnli"]
    assert set(mnli["median"]) == {"matched_accuracy", "mismatched_accuracy"}
    assert mnli["examples"] == {"train": 3, "matched": 2, "mismatched": 2}
    assert res["glue"]["columns"]["MNLI-m"] == mnli["median"]["matched_accuracy"]
    assert res["glue"]["columns"]["MNLI-mm"] == mnli["median"]["mismatched_accuracy"]
    stsb = res["tasks"]["stsb"]
    assert set(stsb["median"]) == {"pearson", "spearman"} and stsb["headline"] == ["spearman"]
    assert res["glue"]["columns"]["STS-B"] == stsb["median"]["spearman"]
    assert all(-100.0 <= v <= 100.0 for t in stsb["trials"] for v in t["final"].values())


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_precisions(tmp_path, monkeypatch, precision):
    """Autocast per profile (bf16; fp16 with loss scaling) on the GPU, with data made here so the
    test needs neither ../shared nor the hub."""
    from test_glue_tasks import _write_mnli

    from cramming.model import ModelConfig, build_model, save_pretrained

    words = "the a cat dog sat ran big small red blue house tree it is was not".split()
    tok = train_wordpiece([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20, 200, tmp_path / "tok.json")
    from tokenizers import Tokenizer

    config = ModelConfig(vocab_size=Tokenizer.from_file(str(tok)).get_vocab_size(), hidden_size=64, num_layers=2,
                         num_heads=2, intermediate_size=128)
    ckpt = save_pretrained(build_model(config, "mlm"), tmp_path / "final", tok)
    _write_mnli(tmp_path / "data")
    code = cram_glue(tmp_path, f"ckpt={ckpt}", f"gpu.precision={precision}", "glue.tasks=[mnli]",
                     f"glue.data_dir={tmp_path / 'data'}", "glue.trials=2", "glue.epochs=2", "run_name=gpu",
                     monkeypatch=monkeypatch, gpu="auto")
    assert code == 0
    res = _results(tmp_path, "gpu")
    assert res["run"]["device"] == "cuda" and res["run"]["precision"] == precision
    trials = res["tasks"]["mnli"]["trials"]
    assert len(trials) == 2 and all(__import__("math").isfinite(e["train_loss"]) for t in trials for e in t["epochs"])

