"""cramming.runs: the run folder's files round-trip, are read tolerantly, and the run lock holds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cramming import runs
from cramming.errors import CrammingError
from cramming.runs import RunFormatError, RunLock

# The reference checkpoint's published per-task dev scores (RECIPE.md), which average to 80.7.
PUBLISHED = {"mnli": {"matched_accuracy": 84.1, "mismatched_accuracy": 84.6}, "qqp": {"f1": 87.5},
             "qnli": {"accuracy": 90.2}, "sst2": {"accuracy": 92.0}, "cola": {"mcc": 53.3},
             "stsb": {"spearman": 87.4}, "mrpc": {"f1": 88.9}, "rte": {"accuracy": 58.5}}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- summary and results -------------------------------------------------------------------------


def test_summary_round_trip_and_tolerance(tmp_path: Path) -> None:
    assert runs.read_summary(tmp_path) == {}  # an unfinished run has none yet
    summary = {"steps": 40, "final_loss": 4.25, "mfu": None, "device": "cpu"}
    runs.write_summary(tmp_path, summary)
    assert runs.read_summary(tmp_path) == summary
    assert (tmp_path / runs.SUMMARY_FILE).read_text() == json.dumps(summary, indent=2)
    assert [p.name for p in tmp_path.iterdir()] == [runs.SUMMARY_FILE]  # no temporary file left behind
    (tmp_path / runs.SUMMARY_FILE).write_text("[1, 2]")
    assert runs.read_summary(tmp_path) == {}
    (tmp_path / runs.SUMMARY_FILE).write_text('{"steps": 4')
    with pytest.raises(RunFormatError, match=r"summary\.json is unreadable .*re-run the stage"):
        runs.read_summary(tmp_path)


def _glue_results(trials: int = 2) -> runs.GlueResults:
    """GLUE results as `cram glue` writes them: one task, `trials` trials (one side by side)."""
    epoch = runs.GlueEpoch(1, 0.69, 0.0, 1.5, {"accuracy": 55.0})
    trial = [runs.GlueTrial(s, {"accuracy": 55.0 + s}, [epoch, runs.GlueEpoch(2, 0.6, 0.0, 1.4)], [], 3.0, 6,
                            *(("side-by-side", 2) if s else ())) for s in range(trials)]
    task = runs.GlueTask("classification", False, "k1", ["0", "1"], ["accuracy"], ["accuracy"], {"train": "a.tsv"},
                         {"train": 40, "dev": 32}, 0, trial, {"accuracy": 55.5}, 55.5)
    model = runs.FinetunedModel("bert-base-uncased", "checkpoint", "ab" * 32, "transformers", "hub", "c" * 40,
                                "/cache/snap", {"model.safetensors": "ab" * 32}, "bert", "BertForSequenceClassification",
                                109_483_778, 512)
    tokenizer = runs.TokenizerRecord("bert-base-uncased", "BertTokenizer", 30522, "[CLS] A [SEP] B [SEP]",
                                     "[CLS] A [SEP]", 128, True, "cd" * 32)
    info = runs.GlueRunInfo(0, [0, 1], "cpu", "cpu", "fp32", "2.13", "5.0")
    return runs.GlueResults("key1", model, {"name": "bert-original", "lr": 2e-5}, info, tokenizer, {"rte": task},
                            "complete", runs.glue_block({"rte": {"accuracy": 55.5}}))


def test_results_round_trip_and_validation(tmp_path: Path) -> None:
    with pytest.raises(RunFormatError, match=r"results\.json is missing; run `cram glue`"):
        runs.read_results(tmp_path)
    results = _glue_results()
    runs.write_results(tmp_path, results)
    assert runs.read_glue_results(tmp_path) == results
    raw = runs.read_results(tmp_path)
    assert raw["tasks"]["rte"]["median"] == {"accuracy": 55.5} and raw["checkpoint"]["revision"] == "c" * 40
    trials = raw["tasks"]["rte"]["trials"]
    # Optional fields are left out while unset: an unevaluated epoch has no `dev`, a sequential trial no group size.
    assert "dev" not in trials[0]["epochs"][1] and "trials_together" not in trials[0]
    assert trials[1]["mode"] == "side-by-side" and trials[1]["trials_together"] == 2
    assert (tmp_path / runs.RESULTS_FILE).read_text().endswith("}\n")
    for bad in ('{"tasks": [1]}', "[]"):
        (tmp_path / runs.RESULTS_FILE).write_text(bad)
        with pytest.raises(RunFormatError, match="does not hold GLUE results"):
            runs.read_results(tmp_path)
    (tmp_path / runs.RESULTS_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(RunFormatError, match="is unreadable"):
        runs.read_results(tmp_path)


def test_run_kinds(tmp_path: Path) -> None:
    pre, glue, other = tmp_path / "pre", tmp_path / "glue", tmp_path / "other"
    for folder in (pre, glue, other):
        folder.mkdir()
    runs.write_summary(pre, {})
    runs.write_results(glue, _glue_results())
    (other / "notes.txt").write_text("x")
    assert [runs.is_pretrain_run(p) for p in (pre, glue, other)] == [True, False, False]
    assert [runs.is_glue_run(p) for p in (pre, glue, other)] == [False, True, False]
    with runs.MetricsWriter(other) as log:
        log.write({"step": 1})
    assert runs.is_pretrain_run(other)  # a run still in progress: a metrics log, no summary yet


def test_results_of_an_older_version_read_with_defaults_and_bad_records_are_named(tmp_path: Path) -> None:
    """A results file from before the model and tokenizer records (format 1) still resumes and reports;
    a record that lacks a required field is a RunFormatError naming it."""
    old = _glue_results().to_json()
    old["checkpoint"] = {"path": "outputs/pretrain/r/final", "kind": "checkpoint", "sha256": "ab" * 32}
    del old["tokenizer"], old["run"]["transformers"]
    old["extra_from_a_newer_version"] = 1
    (tmp_path / runs.RESULTS_FILE).write_text(json.dumps(old))
    read = runs.read_glue_results(tmp_path)
    assert read.checkpoint.format is None and read.checkpoint.weights == {} and read.tokenizer is None
    assert read.tasks["rte"].trials[1].trials_together == 2 and read.run.transformers is None
    del old["tasks"]["rte"]["trials"][0]["final"]
    (tmp_path / runs.RESULTS_FILE).write_text(json.dumps(old))
    with pytest.raises(RunFormatError, match="trial 0: .*final"):
        runs.read_glue_results(tmp_path)
    (tmp_path / runs.RESULTS_FILE).write_text(json.dumps({**old, "checkpoint": ["x"]}))
    with pytest.raises(RunFormatError, match="checkpoint: expected a mapping"):
        runs.read_glue_results(tmp_path)


# --- metrics.jsonl -------------------------------------------------------------------------------


def test_metrics_written_and_read_back_with_a_cut_last_line(tmp_path: Path) -> None:
    assert runs.read_metrics(tmp_path) == runs.Metrics()
    with runs.MetricsWriter(tmp_path) as log:
        log.write({"step": 1, "loss": 9.5, "elapsed_s": 1.0})
        log.write({"event": "eval", "step": 1, "val_loss": 9.9})
        # Flushed as written: a reader sees the records while the writer is still open.
        assert len(runs.read_metrics(tmp_path).records) == 1
        log.write({"event": "signal", "step": 1})
        log.write({"step": 2, "loss": 8.5, "elapsed_s": 2.0})
    with open(tmp_path / runs.METRICS_FILE, "a") as fh:
        fh.write('\n[1, 2]\n{"step": 3, "loss"')  # a blank line, a JSON non-object, a line cut by a crash
    metrics = runs.read_metrics(tmp_path)
    assert [r["step"] for r in metrics.records] == [1, 2]
    assert metrics.evals == [{"event": "eval", "step": 1, "val_loss": 9.9}]
    assert metrics.bad_lines == 2
    with pytest.raises(ValueError, match="closed"):
        log.write({"step": 4})


def test_resume_drops_records_after_the_checkpoint(tmp_path: Path) -> None:
    with runs.MetricsWriter(tmp_path) as log:
        for step in range(1, 11):
            log.write({"step": step, "loss": 10.0 - step})
            if step % 5 == 0:
                log.write({"event": "eval", "step": step, "val_loss": 11.0 - step})
    with open(tmp_path / runs.METRICS_FILE, "a") as fh:
        fh.write('{"step": 11, "lo')  # the killed run's last, cut line
    with runs.MetricsWriter(tmp_path, resumed_at=6) as log:
        log.write({"step": 7, "loss": 2.5})  # the resumed run redoes step 7
    metrics = runs.read_metrics(tmp_path)
    assert [r["step"] for r in metrics.records] == [1, 2, 3, 4, 5, 6, 7]
    assert metrics.records[-1]["loss"] == 2.5
    assert [r["step"] for r in metrics.evals] == [5] and metrics.bad_lines == 0
    # Without resume_at the log is only appended to.
    with runs.MetricsWriter(tmp_path) as log:
        log.write({"step": 8})
    assert len(runs.read_metrics(tmp_path).records) == 8


# --- data passes and the loss plot --------------------------------------------------------------


def _record(step: int, elapsed_s: float, tokens_seen: int, epochs: float | None) -> dict:
    record = {"step": step, "elapsed_s": elapsed_s, "loss": 7.0 - step / 100, "tokens_seen": tokens_seen}
    return record if epochs is None else {**record, "epochs": epochs}


def test_pass_starts_are_interpolated_where_epochs_cross_a_whole_number() -> None:
    # 1,600 tokens per pass. Epochs cross 1.0 a quarter of the way from step 10 to step 20, reach 2.0
    # exactly at step 30 (pass 3 starts there), and cross 3.0 and 4.0 between steps 30 and 50.
    records = [_record(10, 12.0, 1200, 0.75), _record(15, 16.0, 2000, None),  # old-style: skipped
               _record(20, 20.0, 2800, 1.75), _record(30, 30.0, 3200, 2.0), _record(50, 70.0, 6400, 4.0)]
    assert runs.pass_starts(records) == [
        runs.PassStart(2, 12.5, 1600.0, 14.0), runs.PassStart(3, 30.0, 3200.0, 30.0),
        runs.PassStart(4, 40.0, 4800.0, 50.0), runs.PassStart(5, 50.0, 6400.0, 70.0)]
    # A pass that ends before the first record is placed between the run's start and that record.
    assert runs.pass_starts([_record(4, 8.0, 2400, 2.0)]) == [runs.PassStart(2, 2.0, 1200.0, 4.0),
                                                               runs.PassStart(3, 4.0, 2400.0, 8.0)]
    assert runs.pass_starts(records[:1]) == []  # within the first pass
    assert runs.pass_starts([_record(s, s, 100 * s, None) for s in (1, 2)]) == []  # logs without `epochs`


def test_loss_plot_marks_the_data_passes(tmp_path: Path) -> None:
    passes = tmp_path / "passes"
    old = tmp_path / "old"
    for folder, epochs in ((passes, (0.75, 1.75, 2.0, 4.0)), (old, (None,) * 4)):
        folder.mkdir()
        with runs.MetricsWriter(folder) as log:
            for (step, elapsed, tokens), e in zip(((10, 12.0, 1200), (20, 20.0, 2800), (30, 30.0, 3200),
                                                   (50, 70.0, 6400)), epochs, strict=True):
                log.write(_record(step, elapsed, tokens, e))
            log.write({"event": "eval", "step": 50, "elapsed_s": 71.0, "val_loss": 6.6})
    images = [runs.plot_loss([("run", runs.read_metrics(f))], f / "loss.png") for f in (passes, old)]
    assert images == [passes / "loss.png", old / "loss.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 1000 for p in images)
    # The same curves: only the dotted pass lines (and their labels) make the images differ.
    assert images[0].read_bytes() != images[1].read_bytes()
    assert runs.plot_loss([("run", runs.Metrics())], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# --- the run's config ----------------------------------------------------------------------------


def test_run_config_resolved_where_it_can_be(tmp_path: Path) -> None:
    assert runs.read_run_config(tmp_path) == {}
    path = tmp_path / runs.RUN_CONFIG
    path.parent.mkdir()
    path.write_text(
        "experiment: {tiny: {arch: {num_layers: 4}}}\n"
        "arch: {hidden_size: 128, num_layers: '${oc.select:experiment.tiny.arch.num_layers,2}', "
        "sizes: ['${arch.hidden_size}', 7]}\n"
        "run_name: '${no_such_resolver:%Y}'\nlabel: 'h${arch.hidden_size}'\nckpt: null\n")
    cfg = runs.read_run_config(tmp_path)
    assert cfg["arch"] == {"hidden_size": 128, "num_layers": 4, "sizes": [128, 7]}
    assert cfg["label"] == "h128" and cfg["ckpt"] is None
    assert cfg["run_name"] == "${no_such_resolver:%Y}"  # unresolvable here: kept as written
    path.write_text("- a\n- b\n")
    assert runs.read_run_config(tmp_path) == {}
    path.write_text("arch: {hidden_size: [\n")
    with pytest.raises(RunFormatError, match="is not valid YAML"):
        runs.read_run_config(tmp_path)


# --- the run lock ----------------------------------------------------------------------------------


def test_pid_alive() -> None:
    assert runs.pid_alive(os.getpid())
    assert not runs.pid_alive(0) and not runs.pid_alive(-5)
    assert not runs.pid_alive(_dead_pid())


def test_lock_is_taken_and_released(tmp_path: Path) -> None:
    run_dir = tmp_path / "new" / "run"
    with RunLock(run_dir) as lock:
        assert json.loads((run_dir / runs.LOCK_FILE).read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
        assert lock.held
    assert not (run_dir / runs.LOCK_FILE).exists() and not lock.held
    lock.release()  # releasing twice is harmless


@pytest.mark.parametrize("content", [
    lambda: json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}),  # its owner has exited
    lambda: '{"pid": 12',  # its writer died mid-write
    lambda: json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),  # this process's own, left over
], ids=["dead-owner", "unreadable", "own-pid"])
def test_stale_lock_is_taken_over(tmp_path: Path, content) -> None:
    (tmp_path / runs.LOCK_FILE).write_text(content())
    with RunLock(tmp_path):
        assert json.loads((tmp_path / runs.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_held_by_a_live_process_or_another_host_is_refused(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / runs.LOCK_FILE).write_text(json.dumps({"pid": child.pid, "host": socket.gethostname()}))
        with pytest.raises(CrammingError, match=rf"in use by another run \(pid {child.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()
    (tmp_path / runs.LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere.example"}))
    with pytest.raises(CrammingError, match="on host elsewhere.example; if that run is dead, delete"):
        RunLock(tmp_path).acquire()  # a pid on another host cannot be checked from here


# --- GLUE columns --------------------------------------------------------------------------------


def test_glue_block_of_all_nine_columns_is_the_published_average() -> None:
    block = runs.glue_block(PUBLISHED)
    assert list(block["columns"]) == [label for label, _, _ in runs.GLUE_COLUMNS]
    assert round(block["average"], 1) == 80.7  # MNLI-m and MNLI-mm both counted (80.3 otherwise)
    assert block["mean_of_columns_run"] == block["average"] and "nine columns" in block["convention"]
    assert runs.glue_columns({"tasks": {}, "glue": block}) == (block["columns"], block["average"], block["average"])


def test_glue_columns_of_partial_results() -> None:
    partial = {"rte": {"accuracy": 55.0}, "sst2": {"accuracy": 81.0}, "cola": {"accuracy": 69.0}}
    columns, average, mean_run = runs.glue_scores(partial)
    assert columns["RTE"] == 55.0 and columns["SST-2"] == 81.0 and columns["CoLA"] is None
    assert average is None and mean_run == 68.0  # a partial mean is not a GLUE score
    # Results without a `glue` block (hand-made, or older): computed from the tasks' medians.
    results = {"tasks": {name: {"median": m} for name, m in partial.items()}}
    assert runs.glue_columns(results) == (columns, None, 68.0)
    assert runs.glue_columns({"tasks": {}}) == ({c: None for c, _, _ in runs.GLUE_COLUMNS}, None, None)
    # A stored block is read as written, non-numbers and NaN count as missing.
    stored = {"glue": {"columns": {"RTE": 50.0, "SST-2": float("nan"), "QQP": "n/a"}, "average": None,
                       "mean_of_columns_run": 50.0}}
    assert runs.glue_columns(stored)[1:] == (None, 50.0)
    assert runs.glue_columns({"glue": {"columns": {"RTE": 50.0, "CoLA": 30.0}}})[1:] == (None, 40.0)


def test_glue_tables_cover_the_glue_stage_tasks() -> None:
    # runs may not import the GLUE stage, so its tables of the tasks are checked against it here.
    from cramming.glue.tasks import GLUE_TASKS

    assert set(runs.GLUE_TRAIN_ROWS) == set(GLUE_TASKS) == {task for _, task, _ in runs.GLUE_COLUMNS}


def test_finite_float() -> None:
    assert [runs.finite_float(x) for x in (3, "2.5", None, True, "x", float("inf"), float("nan"), [1])] == \
        [3.0, 2.5, None, None, None, None, None, None]


def test_readers_import_no_stage_and_no_torch() -> None:
    code = ("import sys, cramming.report, cramming.experiment; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('cramming.train', 'cramming.glue', "
            "'cramming.data', 'cramming.model'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
