"""`cram report` on synthetic run folders: tables carry the right values, plots are written, errors are clear."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cramming import report
from cramming.errors import CrammingError
from cramming.runs import GLUE_COLUMNS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_pretrain_run(path: Path, *, hidden: int = 256, final_loss: float = 4.1234, tokens: int = 12_345_678,
                      summary: bool = True, steps: int = 40, budget: str = "10m") -> Path:
    """A pretraining run folder as the trainer writes it (docs/design.md)."""
    (path / ".hydra").mkdir(parents=True)
    (path / "final").mkdir()
    (path / "final" / "model.safetensors").write_bytes(b"weights")
    (path / ".hydra" / "config.yaml").write_text(
        "gpu:\n  name: cpu\n  device: cpu\n  micro_batch_size: 8\n  precision: fp32\n  compile: false\n"
        f"arch:\n  name: demo\n  hidden_size: {hidden}\n  num_layers: 4\n  num_heads: 4\n  vocab_size: 8192\n"
        "data:\n  name: embedded\n  source: embedded\n  tokenizer: wordpiece\n  vocab_size: 8192\n  seq_len: 128\n"
        "train:\n  name: cramming\n  lr: 0.001\n  lr_schedule: one-cycle\n  mask_rate: 0.25\n"
        f"budget: {budget}\nseed: 0\nrun_name: ${{now:%Y-%m-%d}}\n"
    )
    lines = []
    for i in range(1, steps + 1):
        progress = i / steps
        lines.append(json.dumps({
            "step": i, "elapsed_s": 15.0 * i, "progress": progress,
            "loss": final_loss + 5.0 * (1 - progress), "lr": 1e-3 * min(progress, 1 - progress) * 2,
            "batch_size": 8 * (1 + i // 10), "tokens_seen": tokens * i // steps, "tokens_per_s": 2000.0 + i,
            "mfu": None, "skipped_steps": 0, "epochs": 1.25 * i / steps}))
        if i % 20 == 0:
            lines.append(json.dumps({"event": "eval", "step": i, "elapsed_s": 15.0 * i + 1, "progress": progress,
                                     "val_loss": final_loss + 0.3 + 4.0 * (1 - progress)}))
    lines.append('{"step": 41, "elapsed_s"')  # a line cut by a crash must not break the report
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary:
        (path / "summary.json").write_text(json.dumps({
            "budget_s": 600.0, "elapsed_s": 603.5, "steps": steps, "tokens_seen": tokens, "final_loss": final_loss,
            "val_loss": final_loss + 0.3, "tokens_per_s": 20456.7, "mfu": None, "device": "cpu",
            "gpu_profile": "cpu", "precision": "fp32", "compile": "eager", "skipped_steps": 0, "epochs": 2.5}))
    return path


def make_glue_run(path: Path, ckpt: Path | None = None, *, rte: float = 55.2, train_rows: int = 2490) -> Path:
    """A GLUE run folder with results.json as cramming.glue.finetune writes it (three tasks)."""
    path.mkdir(parents=True)

    def task(metrics: dict[str, list[float]], headline: list[str], train: int, dev: int) -> dict:
        trials = [{"seed": s, "final": {k: v[s] for k, v in metrics.items()}} for s in range(3)]
        median = {k: sorted(v)[1] for k, v in metrics.items()}
        return {"kind": "classification", "headline": headline, "examples": {"train": train, "dev": dev},
                "trials": trials, "median": median, "score": sum(median[h] for h in headline) / len(headline)}

    tasks = {
        "sst2": task({"accuracy": [80.1, 81.5, 79.9]}, ["accuracy"], 67349, 872),
        "cola": task({"mcc": [10.0, 12.5, 11.0], "accuracy": [69.0, 70.0, 69.5]}, ["mcc"], 8551, 1043),
        "rte": task({"accuracy": [rte - 1, rte, rte + 1]}, ["accuracy"], train_rows, 277),
    }
    columns = {c: None for c, _, _ in GLUE_COLUMNS}
    columns.update({"SST-2": 80.1, "CoLA": 11.0, "RTE": rte})
    results = {
        "format_version": 1, "status": "complete",
        "checkpoint": {"path": str(ckpt or "random-init"), "kind": "checkpoint", "sha256": "ab" * 32},
        "config": {"name": "cramming", "batch_size": 16, "lr": 4e-5, "schedule": "cosine", "epochs": 5,
                   "trials": 3, "max_train_examples": None, "max_eval_examples": None},
        "run": {"device": "cpu", "precision": "fp32"},
        "tasks": tasks,
        "glue": {"columns": columns, "average": None, "mean_of_columns_run": (80.1 + 11.0 + rte) / 3},
    }
    (path / "results.json").write_text(json.dumps(results, indent=2))
    (path / "results.md").write_text("# GLUE dev results\n")
    return path


def _png_ok(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_single_pretrain_run_report(tmp_path, capsys):
    run = make_pretrain_run(tmp_path / "run1")
    assert report.main([str(run)]) == 0
    md = (run / "report.md").read_text()
    # Values formatted into the tables.
    assert "12,345,678 (12.3M) | 2.50 |" in md  # tokens seen, then epochs (rows drawn / rows of one pass)
    assert "4.1234" in md and "4.4234" in md  # final and held-out MLM loss
    assert "20,457" in md  # tokens/s from summary.json
    assert "n/a (CPU)" in md  # MFU is null on CPU
    assert "10m (10m 00s)" in md and "10m 04s" in md and "100.6%" in md  # budget, elapsed, budget used
    assert "hidden_size=256" in md and "| arch | demo |" in md and "lr=0.001" in md
    assert "1 line(s) of metrics.jsonl were not JSON" in md
    assert "Training loss went from 8.9984 (first log step) to 4.1234" in md
    # Plots written, non-empty PNGs, referenced from the report.
    for png in ("loss_vs_time.png", "lr_batch_vs_time.png"):
        assert _png_ok(run / png), png
        assert f"]({png})" in md
    out = capsys.readouterr().out
    assert f"report: {(run / 'report.md').resolve()}" in out and "tokens 12,345,678" in out and "epochs 2.50" in out


def test_demo_folder_with_pretrain_and_glue(tmp_path):
    demo = tmp_path / "demo"
    pre = make_pretrain_run(demo / "pretrain")
    make_glue_run(demo / "glue", ckpt=pre / "final")
    out = tmp_path / "rep"
    report.main([str(demo), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert "## demo" in md and "GLUE (dev)" in md
    # Measured row: SST-2 80.1, CoLA 11.0, RTE 55.2; no GLUE average because six columns did not run.
    measured = next(line for line in md.splitlines() if line.startswith("| measured: demo"))
    cells = [c.strip() for c in measured.strip("|").split("|")]
    assert cells[5] == "80.1" and cells[6] == "11.0" and cells[9] == "55.2" and cells[10] == ""
    assert "mean of the columns that ran: 48.8" in md
    # Published rows beside it, labelled, numbers from RECIPE.md.
    published = [line for line in md.splitlines() if line.startswith("| published:")]
    assert len(published) == 3
    assert "| 84.1 | 84.6 | 87.5 | 90.2 | 92.0 | 53.3 | 87.4 | 88.9 | 58.5 | 80.7 |" in published[2]
    assert "80.9" in published[0] and "78.6" in published[1]
    # Per-task table and the pretraining part.
    assert "| rte | 2,490 | 277 | 3 | accuracy 55.20 | 55.2 |" in md
    assert "12,345,678" in md and _png_ok(out / "loss_vs_time.png")
    assert "not comparable" not in md  # full training sets: not a subset


def test_glue_subset_is_flagged(tmp_path):
    run = make_glue_run(tmp_path / "g", train_rows=1000)
    report.main([str(run)])
    md = (run / "report.md").read_text()
    assert "not comparable with the published full-GLUE rows" in md
    assert not (run / "loss_vs_time.png").exists()  # no pretraining data, no loss plot


def test_comparison_of_two_runs(tmp_path, capsys):
    a = make_pretrain_run(tmp_path / "a" / "pretrain", hidden=256, final_loss=3.5, tokens=1_000_000)
    b = make_pretrain_run(tmp_path / "b" / "pretrain", hidden=512, final_loss=2.75, tokens=2_000_000)
    make_glue_run(tmp_path / "b" / "glue", ckpt=b / "final", rte=60.0)
    out = tmp_path / "cmp"
    assert report.main([str(a.parent), str(b.parent), "--out", str(out), "--name", "hidden-size"]) == 0
    md = (out / "report.md").read_text()
    assert md.startswith("# Cramming report: hidden-size")
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| a ") or line.startswith("| b ")}
    assert "3.5000" in rows["a"] and "1,000,000 (1.0M) | 2.50 |" in rows["a"] and "| n/a |" in rows["a"]
    assert "2.7500" in rows["b"] and "2,000,000 (2.0M)" in rows["b"] and "50.4 (partial)" in rows["b"]
    # The ablated key is listed with both values; identical keys are not.
    assert "| arch.hidden_size | 256 | 512 |" in md and "arch.num_layers" not in md
    for png in ("loss_comparison.png", "lr_batch_comparison.png"):
        assert _png_ok(out / png) and f"]({png})" in md
    assert "### a" in md and "### b" in md
    summary = capsys.readouterr().out
    assert "  a | steps 40" in summary and "GLUE mean of tasks run 50.4" in summary


def test_same_folder_names_get_distinct_labels(tmp_path):
    a = make_pretrain_run(tmp_path / "x" / "run")
    b = make_pretrain_run(tmp_path / "y" / "run")
    runs = [*report.discover(a), *report.discover(b)]
    report._unique_labels(runs)
    assert [r.label for r in runs] == ["x/run", "y/run"]


def test_folder_of_runs_pairs_glue_with_its_checkpoint(tmp_path):
    root = tmp_path / "outputs"
    p1 = make_pretrain_run(root / "p1")
    p2 = make_pretrain_run(root / "p2")
    make_glue_run(root / "zz-glue-of-p1", ckpt=p1 / "final")
    runs = report.attach_glue(report.discover(root))
    assert [(r.label, r.glue is not None) for r in runs] == [("p1", True), ("p2", False)]
    assert p2 is not None


def test_runs_given_separately_are_paired(tmp_path):
    pre = make_pretrain_run(tmp_path / "outputs" / "pretrain" / "run")
    glue = make_glue_run(tmp_path / "outputs" / "glue" / "run", ckpt=pre / "final")
    path = report.build_report([pre, glue], out=tmp_path / "rep")
    md = path.read_text()
    assert "comparison" not in md.lower().split("\n")[0]  # one run, not two
    assert "### GLUE (dev)" in md


def test_unfinished_run_reports_from_metrics(tmp_path):
    run = make_pretrain_run(tmp_path / "live", summary=False, final_loss=4.0)
    report.main([str(run)])
    md = (run / "report.md").read_text()
    assert "No summary.json" in md
    assert "4.0000" in md  # last logged loss
    assert "4.3000" in md  # last eval record's held-out loss


def test_stats_fall_back_to_metrics_and_tolerate_missing_fields(tmp_path):
    run = make_pretrain_run(tmp_path / "r", summary=False)
    stats = report.pretrain_stats(report.read_pretrain(run))
    assert stats["steps"] == 40 and stats["budget_s"] == 600.0 and not stats["complete"]
    assert stats["epochs"] == 1.25  # the last record's
    assert math.isclose(stats["budget_used"], 600.0 / 600.0)
    assert report.fmt_tokens(None) == "n/a" and report.fmt_mfu(0.4123) == "41.2%"
    assert report.fmt_duration(3725) == "1h 02m 05s"


def _write_metrics(run: Path, epochs: list[float | None]) -> None:
    """A metrics log by hand: a record every 10 steps and 60 s, 40,000 tokens each, `epochs` per record."""
    records = [{"step": 10 * i, "elapsed_s": 60.0 * i, "loss": 6.0, "lr": 1e-3, "batch_size": 8,
                "tokens_seen": 40_000 * i, **({} if e is None else {"epochs": e})} for i, e in enumerate(epochs, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_names_the_data_pass_starts(tmp_path):
    run = make_pretrain_run(tmp_path / "passes", summary=False)
    _write_metrics(run, [0.4, 0.8, 1.2, 1.6, 2.0, 2.4, 2.8, 3.2])  # 100,000 tokens per pass
    md = report.build_report([run]).read_text()
    assert "Data passes: 3 new pass(es) over the training split (3.20 passes by the last log record)" in md
    # Passes 2 and 4 start half-way between two records, pass 3 at the record where epochs reach 2.0.
    assert "| pass 2 | 25 | 100,000 (100.0k) | 2m 30s |" in md
    assert "| pass 3 | 50 | 200,000 (200.0k) | 5m 00s |" in md
    assert "| pass 4 | 75 | 300,000 (300.0k) | 7m 30s |" in md
    assert _png_ok(run / "loss_vs_time.png") and "](loss_vs_time.png)" in md


def test_report_of_one_pass_and_of_a_log_without_epochs(tmp_path):
    one, old = make_pretrain_run(tmp_path / "one"), make_pretrain_run(tmp_path / "old")
    _write_metrics(one, [0.25, 0.5, 0.75])
    _write_metrics(old, [None, None])
    assert "Data passes: one pass, not revisited (0.75 of the training split" in report.build_report([one]).read_text()
    md = report.build_report([old]).read_text()
    assert "Data passes: not recorded (this metrics log predates the `epochs` field)." in md
    assert _png_ok(old / "loss_vs_time.png")


@pytest.mark.parametrize("make_bad", [
    lambda p: p / "does-not-exist",
    lambda p: (p / "empty").mkdir() or p / "empty",
    lambda p: (p / "file.txt").write_text("x") and p / "file.txt",
])
def test_bad_folders_raise_a_clear_error(tmp_path, make_bad):
    with pytest.raises(CrammingError, match="no such folder|not a run folder|is a file"):
        report.main([str(make_bad(tmp_path))])


def test_corrupt_results_json_is_a_user_error(tmp_path):
    bad = tmp_path / "g"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(CrammingError, match="results.json is unreadable"):
        report.main([str(bad)])


def test_cli_prints_error_without_traceback_and_runs_headless(tmp_path):
    env = {"PATH": "", "MPLBACKEND": "", "DISPLAY": ""}  # no display: the Agg canvas needs none
    done = subprocess.run([sys.executable, "-m", "cramming.cli", "report", str(tmp_path / "nope")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "no such folder" in done.stderr and "Traceback" not in done.stderr
    run = make_pretrain_run(tmp_path / "ok")
    done = subprocess.run([sys.executable, "-m", "cramming.cli", "report", str(run)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "report:" in done.stdout and _png_ok(run / "loss_vs_time.png")



def test_glue_tables_rendered_from_results(tmp_path):
    run = make_glue_run(tmp_path / "g", ckpt=tmp_path / "outputs" / "pretrain" / "run7" / "final")
    results = json.loads((run / "results.json").read_text())
    results["config"]["max_train_examples"] = 64
    results["tasks"]["cola"].update(custom=True)
    results["tasks"]["cola"]["trials"][0]["notes"] = ["constant predictions: MCC is 0.0"]
    (run / "results.json").write_text(json.dumps(results))
    md = report.write_glue_tables(run).read_text()
    assert md == (run / "results.md").read_text() and md.startswith("# GLUE dev results\n")
    assert "| measured: run7/final |  |  |  |  | 80.1 | 11.0 |  |  | 55.2 |  |" in md
    assert md.count("| published: ") == 3
    assert "| 84.1 | 84.6 | 87.5 | 90.2 | 92.0 | 53.3 | 87.4 | 88.9 | 58.5 | 80.7 |" in md
    assert "- SUBSAMPLED: at most 64 train / all dev examples per task" in md
    assert "mean of the columns that ran: 48.8" in md
    assert "### cola (custom): headline mcc" in md and "| 1 | 0 | 10.00 | 69.00 |" in md
    assert "| median |  | 11.00 | 69.50 |" in md and "Notes: constant predictions: MCC is 0.0" in md
    # Fields a hand-made results file lacks are shown as n/a, not a traceback.
    assert "No task results yet." in report.glue_markdown({"tasks": {}})


def test_glue_runs_side_by_side_with_what_each_finetuned(tmp_path):
    """`cram report` of two GLUE runs, the crammed model and a transformers checkpoint (each under its
    protocol): one table of their scores, one of their models, tokenizers and protocols."""
    from cramming.runs import FinetunedModel, TokenizerRecord

    crammed = make_glue_run(tmp_path / "crammed", ckpt=tmp_path / "pretrain" / "final", rte=55.0)
    bert = make_glue_run(tmp_path / "bert-base", rte=66.4)
    records = {
        crammed: (FinetunedModel(str(tmp_path / "pretrain" / "final"), "checkpoint", "ab" * 32, "crammed-bert", "local",
                                 model_type="crammed-bert", architecture="CrammedBertForSequenceClassification",
                                 parameters=119_000_000, max_length=128),
                  TokenizerRecord("final/tokenizer.json", "PreTrainedTokenizerFast", 32768, "[CLS] A [SEP] B [SEP]",
                                  "[CLS] A [SEP]", 128, False), {"name": "cramming"}),
        bert: (FinetunedModel("bert-base-uncased", "checkpoint", "cd" * 32, "transformers", "hub", "86b5e0934494bd15c9632b12f734a8a67f723594",
                              model_type="bert", architecture="BertForSequenceClassification", parameters=109_483_778,
                              max_length=512),
               TokenizerRecord("bert-base-uncased", "BertTokenizer", 30522, "[CLS] A [SEP] B [SEP]", "[CLS] A [SEP]", 128,
                               True), {"name": "bert-original", "batch_size": 32, "lr": 2e-5, "schedule": "linear"}),
    }
    for run, (model, tokenizer, protocol) in records.items():
        results = json.loads((run / "results.json").read_text())
        results["config"].update(protocol)
        results.update(checkpoint=dataclasses.asdict(model), tokenizer=dataclasses.asdict(tokenizer))
        (run / "results.json").write_text(json.dumps(results))
    md = report.build_report([crammed, bert], out=tmp_path / "rep").read_text()
    glue = md[md.index("## GLUE (dev)"):md.index("## Runs")]
    assert "| measured: crammed |" in glue and "| measured: bert-base |" in glue and "66.4" in glue
    models = glue[glue.index("What each row finetuned"):]
    rows = {line.split("|")[1].strip(): line for line in models.splitlines() if line.startswith("| measured: ")}
    assert "| crammed-bert | crammed-bert | 119,000,000 | `[CLS] A [SEP] B [SEP]` | glue=cramming: batch 16, lr 4e-05, " \
           "cosine, 5 epochs | 3 | n/a |" in rows["measured: crammed"]
    assert "`bert-base-uncased` @ 86b5e0934494 | transformers | bert | 109,483,778 |" in rows["measured: bert-base"]
    assert "glue=bert-original: batch 32, lr 2e-05, linear, 5 epochs" in rows["measured: bert-base"]
    single = report.write_glue_tables(bert).read_text()
    assert "- model: transformers bert (BertForSequenceClassification), 109,483,778 parameters with a two-class head, " \
           "at most 512 tokens; hub commit 86b5e0934494bd15c9632b12f734a8a67f723594" in single
    assert "- tokenizer: BertTokenizer, 30,522 tokens; a pair reads `[CLS] A [SEP] B [SEP]` with segment ids" in single
