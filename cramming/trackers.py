"""Experiment trackers: where a stage reports besides its run folder (`train.report_to`, and the GLUE
stage's list), through each tracker's own library.

Every tracker receives the same four things: the resolved config once (`log_config`), every record
the stage logs (`log`: numbers only, at the record's step), the final summary (`log_summary`), and
the run's end with its status (`close`). The adapters are small on purpose:

- tensorboard: scalars in `<run_dir>/tb` (torch.utils.tensorboard); the config and the summary as text.
- wandb: one run (project `$WANDB_PROJECT`, default `cramming`; `WANDB_MODE=offline` works as usual);
  the config as the run's config, records with `run.log`, the summary into `run.summary`.
- mlflow: one run (experiment `$MLFLOW_EXPERIMENT_NAME`, default `cramming`, at `$MLFLOW_TRACKING_URI`);
  the config flattened into params and as the artifact config.yaml, records as metrics, the summary's
  numbers as `summary/<key>` metrics and the whole of it as the artifact summary.yaml.

A tracker that is named but not installed stops the stage before it starts (`require_installed`). Once
a run is open, a tracker that fails to log (a dropped connection, say) is dropped with a warning: a
tracker must never end a training run that its run folder still records.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cramming.errors import ConfigError
from cramming.runs import GlueResults, GlueTask, GlueTrial

log = logging.getLogger(__name__)

TrackerName = Literal["tensorboard", "wandb", "mlflow"]
# The module each tracker imports, and what installs it (also: pip install "cramming[trackers]").
MODULES: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
DEFAULT_PROJECT = "cramming"
TENSORBOARD_DIR = "tb"


def require_installed(names: Sequence[str], key: str = "train.report_to") -> None:
    """Raise ConfigError, before a stage does any work, when a named tracker's package is missing."""
    missing = [n for n in dict.fromkeys(names) if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        raise ConfigError(f"{key} names {', '.join(missing)}, which is not installed: run "
                          f"`pip install {' '.join(INSTALL[n] for n in missing)}` (or `pip install \"cramming[trackers]\"`), "
                          f"or leave {'them' if len(missing) > 1 else 'it'} out of {key}")


@dataclass(frozen=True)
class RunInfo:
    """What a tracker names its run by."""

    run_dir: Path
    stage: str
    """`pretrain` or `glue`: W&B's job type, a tag elsewhere."""
    resumed: bool = False

    @property
    def name(self) -> str:
        return self.run_dir.name


class Tracker(Protocol):
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log(self, values: Mapping[str, float], step: int) -> None: ...
    def log_summary(self, summary: Mapping[str, Any]) -> None: ...
    def close(self, status: str) -> None: ...


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries a tracker can plot: ints and floats (bools, None and text left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml(data: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False)


class TensorBoard:
    def __init__(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.run_dir / TENSORBOARD_DIR))
        self.step = 0

    def log_config(self, config: Mapping[str, Any]) -> None:
        # Indented by four spaces: TensorBoard renders text as markdown, so this keeps the YAML a code block.
        self.writer.add_text("config", "    " + _yaml(config).replace("\n", "\n    "))

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.step = step

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self.writer.add_text("summary", "    " + _yaml(summary).replace("\n", "\n    "), self.step)

    def close(self, status: str) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run: RunInfo) -> None:
        import wandb

        run_dir = run.run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run.name,
                              dir=str(run_dir), job_type=run.stage, tags=[run.stage, *(["resumed"] if run.resumed else [])],
                              notes=f"cramming run folder: {run_dir}")

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(summary))

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MLflow:
    # MLflow refuses longer parameter values; the whole config is also logged as config.yaml.
    MAX_PARAM_CHARS = 500

    def __init__(self, run: RunInfo) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # $MLFLOW_TRACKING_URI, as every MLflow client
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        tags = {"cramming.stage": run.stage, "cramming.run_dir": str(run.run_dir.resolve()),
                "cramming.resumed": str(run.resumed).lower()}
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[: self.MAX_PARAM_CHARS]) for k, v in _flatten(config).items()]
        self.client.log_batch(self.run_id, params=params)
        self.client.log_text(self.run_id, _yaml(config), "config.yaml")

    def log(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        self.client.log_dict(self.run_id, dict(summary), "summary.yaml")
        numbers = {f"summary/{k}": v for k, v in _numbers(summary).items() if math.isfinite(v)}
        if numbers:
            self.log(numbers, 0)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The trackers of one stage's run, as a `with` block: each call goes to every one of them. Leaving
    the block ends their runs: FINISHED, KILLED on Ctrl-C, FAILED on any other exception."""

    def __init__(self, trackers: dict[str, Tracker]) -> None:
        self.trackers = trackers
        self.step = 0
        """The latest step logged: records without a step of their own (GLUE's) go one past it."""

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def _each(self, what: str, *args: Any) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, what)(*args)
            except Exception as err:  # a tracker's failure must not end the run its folder records
                log.warning("tracker %s failed (%s: %s); the run goes on without it", name, type(err).__name__, err)
                del self.trackers[name]

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved config, once."""
        self._each("log_config", config)

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """One record's numbers at `step` (None: one past the latest step logged)."""
        numbers = _numbers({k: v for k, v in values.items() if k != "step"})
        self.step = self.step + 1 if step is None else max(self.step, step)
        if numbers:
            self._each("log", numbers, self.step if step is None else step)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The run's final summary."""
        self._each("log_summary", summary)

    def close(self, status: str = "FINISHED") -> None:
        self._each("close", status)
        self.trackers = {}

    # GLUE: per-trial and per-task scores (percent), and the run's GLUE columns.

    def log_glue_trial(self, task: str, trial: GlueTrial) -> None:
        """A trial's final-epoch dev scores, as glue/<task>/seed_<seed>/<metric>."""
        self.log({f"glue/{task}/seed_{trial.seed}/{k}": v for k, v in trial.final.items()})

    def log_glue_task(self, task: str, entry: GlueTask) -> None:
        """A task's medians over its trials and its score, as glue/<task>/median/<metric> and glue/<task>/score."""
        self.log({**{f"glue/{task}/median/{k}": v for k, v in entry.median.items()}, f"glue/{task}/score": entry.score})

    def log_glue_summary(self, results: GlueResults) -> None:
        """The GLUE columns and average of a finished run, as the summary (glue/<column>, glue/average)."""
        columns = results.glue.get("columns") or {}
        self.log_summary({**{f"glue/{k}": v for k, v in columns.items()}, "glue/average": results.glue.get("average"),
                          "glue/mean_of_columns_run": results.glue.get("mean_of_columns_run"), "status": results.status})


def open_trackers(names: Sequence[str], run_dir: str | Path, *, stage: str, resumed: bool = False,
                  config: Mapping[str, Any] | None = None, key: str = "train.report_to") -> Trackers:
    """Open a run in each named tracker (none: a Trackers that does nothing); with `config`, log it.

    `key` names the setting in messages. A tracker that fails to open closes the ones already open and
    raises: better now than after hours of training.
    """
    require_installed(names, key)
    run = RunInfo(Path(run_dir), stage, resumed)
    trackers = Trackers({})
    try:
        for name in dict.fromkeys(names):
            trackers.trackers[name] = TRACKERS[name](run)
    except BaseException:
        trackers.close("FAILED")
        raise
    if config is not None:
        trackers.log_config(config)
    return trackers
