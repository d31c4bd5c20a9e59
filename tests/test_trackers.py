"""Experiment trackers (train.report_to, and the API the GLUE stage calls): what each one receives.

The fast tests run W&B and MLflow as stand-in modules that record their calls (CI installs neither)
and TensorBoard for real when it is installed (the dev extra has it); the slow ones run W&B offline
and MLflow on a local file store for real (the `wandb` and `mlflow` extras)."""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict
from test_train_loop import records, tiny_arch, tiny_data, train_cfg

from cramming import trackers
from cramming.config import parse_budget, to_dataclass
from cramming.errors import ConfigError
from cramming.gpu import GpuProfile
from cramming.runs import GlueResults, GlueRunInfo, GlueTask, GlueTrial
from cramming.train.config import TrainConfig
from cramming.train.loop import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")
GPU = GpuProfile(name="cpu", micro_batch_size=16, num_workers=0)
RECORD_KEYS = {"loss", "lr", "batch_size", "tokens_seen", "tokens_per_s", "epochs", "progress", "elapsed_s"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data"))


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # what importlib.util.find_spec reads
    module.__dict__.update(attrs)
    return module


class FakeWandbRun:
    def __init__(self, calls: list, **init) -> None:
        self.calls, self.summary = calls, {}
        self.config = types.SimpleNamespace(update=lambda c, allow_val_change: calls.append(("config", c)))
        calls.append(("init", init))

    def log(self, values, step):
        self.calls.append(("log", step, values))

    def finish(self, exit_code):
        self.calls.append(("finish", exit_code, dict(self.summary)))


class FakeMlflowClient:
    calls: list = []

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        self.calls.append(("experiment", name))
        return "1"

    def create_run(self, experiment_id, run_name, tags):
        self.calls.append(("run", run_name, tags))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    def log_batch(self, run_id, metrics=(), params=()):
        if params:
            self.calls.append(("params", {p.key: p.value for p in params}))
        if metrics:
            self.calls.append(("metrics", metrics[0].step, {m.key: m.value for m in metrics}))

    def log_text(self, run_id, text, name):
        self.calls.append(("artifact", name, text))

    def log_dict(self, run_id, data, name):
        self.calls.append(("artifact", name, data))

    def set_terminated(self, run_id, status):
        self.calls.append(("end", status))


@pytest.fixture
def fakes(monkeypatch) -> dict[str, list]:
    """Stand-in `wandb` and `mlflow` modules; their calls, by tracker."""
    wandb_calls: list = []
    FakeMlflowClient.calls = []
    entity = lambda *fields: lambda *a: types.SimpleNamespace(**dict(zip(fields, a, strict=True)))  # noqa: E731
    monkeypatch.setitem(sys.modules, "wandb", _module("wandb", init=lambda **kw: FakeWandbRun(wandb_calls, **kw)))
    monkeypatch.setitem(sys.modules, "mlflow", _module("mlflow"))
    monkeypatch.setitem(sys.modules, "mlflow.tracking", _module("mlflow.tracking", MlflowClient=FakeMlflowClient))
    monkeypatch.setitem(sys.modules, "mlflow.entities", _module(
        "mlflow.entities", Param=entity("key", "value"), Metric=entity("key", "value", "timestamp", "step")))
    return {"wandb": wandb_calls, "mlflow": FakeMlflowClient.calls}


def test_a_named_tracker_that_is_not_installed_stops_the_run_before_it_starts(monkeypatch, tmp_path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from cramming.config import CONFIG_DIR
    from cramming.train.trainer import load_job

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["train.report_to=[tensorboard,wandb]", "gpu=cpu"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    # load_job is the first thing `cram pretrain` does (cramming.pipeline): before data, model or clock.
    with pytest.raises(ConfigError, match=r"train.report_to names wandb, which is not installed: run `pip install wandb`"):
        load_job(cfg)


def test_unknown_tracker_and_the_moved_tensorboard_key(tmp_path) -> None:
    from cramming.train.trainer import upgrade_saved_config

    with pytest.raises(ConfigError, match=r"train.report_to\[0\]='neptune' must be one of 'tensorboard', 'wandb', 'mlflow'"):
        to_dataclass(TrainConfig, {"report_to": ["neptune"]}, "train")
    with pytest.raises(ConfigError, match=r"train.report_to=\['neptune'\] may name only: tensorboard, wandb, mlflow"):
        TrainConfig(report_to=["neptune"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"train.tensorboard moved: use train.report_to=\[tensorboard\]"):
        to_dataclass(TrainConfig, {"tensorboard": True}, "train")
    for flag, names in ((True, ["tensorboard"]), (False, [])):  # runs saved with the old flag resume with it
        saved = upgrade_saved_config(OmegaConf.create({"train": {"tensorboard": flag}}))
        assert to_dataclass(TrainConfig, saved.train, "train").report_to == names


def test_pretrain_reports_config_records_and_summary_to_every_tracker(data_dir, tmp_path, fakes) -> None:
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    pretrain(train_cfg(report_to=["tensorboard", "wandb", "mlflow"]), tiny_arch(), GPU, data_dir, run_dir,
             budget=parse_budget("4steps"))
    logged = [r for r in records(run_dir) if r.get("event") != "eval"]
    evals = [r for r in records(run_dir) if r.get("event") == "eval"]

    wandb = fakes["wandb"]
    assert wandb[0][0] == "init" and wandb[0][1]["name"] == "run" and wandb[0][1]["job_type"] == "pretrain"
    (config,) = [c[1] for c in wandb if c[0] == "config"]  # once, resolved
    assert config["train"]["report_to"] == ["tensorboard", "wandb", "mlflow"] and config["gpu"]["micro_batch_size"] == 16
    logs = [c for c in wandb if c[0] == "log"]
    assert [(step, v["loss"]) for _, step, v in logs if "loss" in v] == [(r["step"], r["loss"]) for r in logged]
    assert RECORD_KEYS <= set(next(v for _, _, v in logs if "loss" in v))
    assert [v["val_loss"] for _, _, v in logs if "val_loss" in v] == [r["val_loss"] for r in evals]
    finish = wandb[-1]
    assert finish[0] == "finish" and finish[1] == 0 and finish[2]["steps"] == 4 and "val_loss" in finish[2]

    mlflow = fakes["mlflow"]
    assert mlflow[0] == ("experiment", "cramming") and mlflow[1][1] == "run"
    params = next(c[1] for c in mlflow if c[0] == "params")
    assert params["train.lr"] == "0.001" and params["arch.hidden_size"] == "32"
    assert {c[1] for c in mlflow if c[0] == "artifact"} == {"config.yaml", "summary.yaml"}
    metrics = [c for c in mlflow if c[0] == "metrics"]
    assert [(s, v["loss"]) for _, s, v in metrics if "loss" in v] == [(r["step"], r["loss"]) for r in logged]
    assert any("summary/val_loss" in v for _, _, v in metrics) and mlflow[-1] == ("end", "FINISHED")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / trackers.TENSORBOARD_DIR)).Reload()
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [(r["step"], round(r["loss"], 5)) for r in logged]
    assert len(events.Scalars("val_loss")) == len(evals) and RECORD_KEYS <= set(events.Tags()["scalars"])


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(data_dir, tmp_path, fakes, monkeypatch, caplog) -> None:
    def broken(self, values, step):
        raise ConnectionError("the server went away")

    monkeypatch.setattr(FakeWandbRun, "log", broken)
    with caplog.at_level(logging.WARNING, logger="cramming.trackers"):
        pretrain(train_cfg(report_to=["wandb", "mlflow"]), tiny_arch(), GPU, data_dir, tmp_path / "run",
                 budget=parse_budget("3steps"))
    dropped = [r.getMessage() for r in caplog.records if "tracker wandb failed" in r.getMessage()]
    assert len(dropped) == 1 and "ConnectionError" in dropped[0]
    assert fakes["mlflow"][-1] == ("end", "FINISHED") and (tmp_path / "run" / "final").is_dir()


def _glue_results() -> GlueResults:
    trials = [GlueTrial(seed, {"accuracy": acc}, [], [], 1.0, 10) for seed, acc in ((0, 55.0), (1, 60.0), (2, 58.0))]
    task = GlueTask("classification", False, "k", ["a", "b"], ["accuracy"], ["accuracy"], {}, {}, 0, trials,
                    {"accuracy": 58.0}, 58.0)
    results = GlueResults("key", None, {}, GlueRunInfo(0, [0, 1, 2], "cpu", "cpu", "fp32", "2"),  # type: ignore[arg-type]
                          tasks={"rte": task}, status="complete")
    results.glue = {"columns": {"RTE": 58.0, "SST-2": None}, "average": None, "mean_of_columns_run": 58.0}
    return results


def test_glue_api_logs_trials_medians_and_the_table(tmp_path, fakes) -> None:
    """The calls the GLUE stage makes (cramming.glue.finetune wires them): per trial, per task, at the end."""
    results = _glue_results()
    with trackers.open_trackers(["wandb", "mlflow"], tmp_path / "glue-run", stage="glue", key="glue.report_to",
                                config={"glue": {"lr": 4e-5, "tasks": ["rte"]}}) as tracked:
        for trial in results.tasks["rte"].trials:
            tracked.log_glue_trial("rte", trial)
        tracked.log_glue_task("rte", results.tasks["rte"])
        tracked.log_glue_summary(results)
    wandb = fakes["wandb"]
    assert wandb[0][1]["job_type"] == "glue" and ("config", {"glue": {"lr": 4e-5, "tasks": ["rte"]}}) in wandb
    logs = [(step, values) for kind, step, values in (c for c in wandb if c[0] == "log")]
    assert logs == [(1, {"glue/rte/seed_0/accuracy": 55.0}), (2, {"glue/rte/seed_1/accuracy": 60.0}),
                    (3, {"glue/rte/seed_2/accuracy": 58.0}), (4, {"glue/rte/median/accuracy": 58.0, "glue/rte/score": 58.0})]
    assert wandb[-1][2]["glue/RTE"] == 58.0 and wandb[-1][2]["glue/average"] is None
    assert ("end", "FINISHED") == fakes["mlflow"][-1]


def test_cram_glue_reports_to_the_named_trackers(tmp_path, fakes, monkeypatch) -> None:
    # glue.report_to wired into the stage: the config once, each trial's and task's scores, the summary.
    from wordpiece import tiny_glue_export

    from cramming import runs
    from cramming.cli import main as cram_main

    glue_dir = Path(__file__).resolve().parents[1] / "cramming" / "assets" / "glue_demo"
    (tmp_path / "ckpt").mkdir()
    ckpt = tiny_glue_export(tmp_path / "ckpt", [glue_dir / "RTE/train.tsv"], rows=400, vocab_size=300)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        code = cram_main(["glue", f"paths.out_root={tmp_path}", "gpu=cpu", f"ckpt={ckpt}", "glue.tasks=[rte]",
                          f"glue.data_dir={glue_dir}", "glue.trials=2", "glue.epochs=1", "glue.max_train_examples=32",
                          "glue.max_eval_examples=16", "glue.report_to=[wandb]", "run_name=tracked"])
    except SystemExit as stop:  # Hydra exits on an error
        code = stop.code
    assert not code
    res = runs.read_results(tmp_path / "glue" / "tracked")
    calls = fakes["wandb"]
    logged = {k: v for call in calls if call[0] == "log" for k, v in call[2].items()}
    for trial in res["tasks"]["rte"]["trials"]:
        assert logged[f"glue/rte/seed_{trial['seed']}/accuracy"] == trial["final"]["accuracy"]
    assert logged["glue/rte/median/accuracy"] == res["tasks"]["rte"]["median"]["accuracy"]
    assert any(call[0] == "config" and call[1]["glue"]["report_to"] == ["wandb"] for call in calls)
    assert calls[-1][0] == "finish" and calls[-1][1] == 0 and calls[-1][2]["glue/RTE"] == res["glue"]["columns"]["RTE"]


def test_a_stage_that_fails_ends_its_tracker_runs_failed(tmp_path, fakes) -> None:
    with pytest.raises(RuntimeError), trackers.open_trackers(["wandb", "mlflow"], tmp_path / "r", stage="glue"):
        raise RuntimeError("boom")
    assert fakes["wandb"][-1][1] == 1 and fakes["mlflow"][-1] == ("end", "FAILED")


# ---------------------------------------------------------------------------------------------
# The real libraries (pip install "cramming[trackers]")
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_offline_for_real(data_dir, tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    pretrain(train_cfg(report_to=["wandb"]), tiny_arch(), GPU, data_dir, run_dir, budget=parse_budget("3steps"))
    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # W&B's offline log is a binary record stream; the keys of what was logged appear in it as text.
    content = log_file.read_bytes()
    for key in (b"tokens_per_s", b"val_loss", b"epochs", b"tokens_seen", b"report_to", b"mask_rate"):
        assert key in content, key


@pytest.mark.slow
def test_mlflow_file_store_for_real(data_dir, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a plain folder
    run_dir = tmp_path / "run"
    pretrain(train_cfg(report_to=["mlflow"]), tiny_arch(), GPU, data_dir, run_dir, budget=parse_budget("4steps"))
    with trackers.open_trackers(["mlflow"], tmp_path / "glue", stage="glue", config={"glue": {"lr": 4e-5}}) as tracked:
        results = _glue_results()
        for trial in results.tasks["rte"].trials:
            tracked.log_glue_trial("rte", trial)
        tracked.log_glue_task("rte", results.tasks["rte"])
        tracked.log_glue_summary(results)

    client = MlflowClient()
    experiment = client.get_experiment_by_name("cramming")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    pre, glue = runs["run"], runs["glue"]
    assert pre.info.status == "FINISHED" and pre.data.params["train.report_to"] == "['mlflow']"
    logged = [r for r in records(run_dir) if r.get("event") != "eval"]
    history = client.get_metric_history(pre.info.run_id, "loss")
    assert sorted((m.step, round(m.value, 5)) for m in history) == [(r["step"], round(r["loss"], 5)) for r in logged]
    assert pre.data.metrics["summary/steps"] == 4 and "val_loss" in pre.data.metrics
    assert {a.path for a in client.list_artifacts(pre.info.run_id)} == {"config.yaml", "summary.yaml"}
    assert glue.data.metrics["glue/rte/median/accuracy"] == 58.0 and glue.data.tags["cramming.stage"] == "glue"
