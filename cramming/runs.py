"""The run folder's files: every on-disk format of a run, written and read here only.

A pretraining run folder holds `metrics.jsonl` (one JSON record per line: training log records,
and `"event": "eval"` records with the held-out `val_loss`), `summary.json` (written once, at the
end), `.hydra/config.yaml` (the config as Hydra saved it) and `.lock` while a process owns it. A
GLUE run folder holds `results.json` (`GlueResults`: what was finetuned and with which tokenizer;
per task: trials, medians, headline score; the `glue` block with the table's columns and average)
and `results.md` (rendered from it by `cramming.report`).
docs/design.md describes the fields. The loss plot of the metrics log (`plot_loss`) is drawn here
too, so that the trainer's `loss.png` and `cram report`'s loss plots are one picture.

Stages write and read these files through this module, so none of them parses another's files by
hand. It imports no torch and no stage: the report reads runs without the training stack.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from cramming.errors import CrammingError
from cramming.fileio import write_atomic

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"
RESULTS_MD = "results.md"
RUN_CONFIG = ".hydra/config.yaml"
LOCK_FILE = ".lock"

_R = TypeVar("_R")


class RunFormatError(CrammingError):
    """A run folder's file is missing, unreadable or not in the format this module writes."""


# ---------------------------------------------------------------------------------------------
# The run lock
# ---------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory, so two runs never interleave writes into one folder.

    The lock file holds the owner's host and PID. A lock left behind by a dead process on this host
    is taken over; a live owner makes the second run fail with a message naming it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_owner()
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(me)
            self.held = True
            return self
        raise CrammingError(f"could not take the lock {self.path}; another process keeps recreating it")

    def _check_owner(self) -> None:
        """Raise if the lock's owner may still be running; return if the lock is stale."""
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            pid, host = -1, socket.gethostname()  # unreadable: a writer died mid-write
        if host != socket.gethostname():
            raise CrammingError(
                f"run directory {self.path.parent} is locked by pid {pid} on host {host}; "
                f"if that run is dead, delete {self.path}"
            ) from None
        if pid != os.getpid() and pid_alive(pid):
            raise CrammingError(
                f"run directory {self.path.parent} is in use by another run (pid {pid}); "
                f"wait for it to finish or choose another run_name"
            ) from None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------


@dataclass
class Metrics:
    """What a run's metrics log holds."""

    records: list[dict[str, Any]] = field(default_factory=list)
    """Training log records (no "event" key), in file order."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Held-out evaluation records (`"event": "eval"`, with `val_loss`)."""
    bad_lines: int = 0
    """Lines that were not a JSON object (e.g. the last line, cut by a crash)."""


def _parse_lines(path: Path) -> Iterator[dict[str, Any] | None]:
    """Each non-blank line of a JSON-lines file as a dict, or None where it is not a JSON object."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            yield None
            continue
        yield rec if isinstance(rec, dict) else None


def read_metrics(run_dir: str | Path) -> Metrics:
    """The run's metrics log, read tolerantly: a missing file is an empty log, bad lines are counted.

    Records with an event other than "eval" are neither training nor eval records and are skipped.
    """
    path = Path(run_dir) / METRICS_FILE
    metrics = Metrics()
    if not path.is_file():
        return metrics
    for rec in _parse_lines(path):
        if rec is None:
            metrics.bad_lines += 1
        elif rec.get("event") == "eval":
            metrics.evals.append(rec)
        elif rec.get("event") is None:
            metrics.records.append(rec)
    return metrics


class MetricsWriter:
    """Appends records to a run's metrics log, one JSON line each, flushed as written.

    `resumed_at`: the step of the checkpoint a resumed run continues from. Records of later steps
    describe steps that will be redone, so they are dropped (the log is rewritten atomically) and
    the resumed log reads as one run; lines that are not JSON go too.
    """

    def __init__(self, run_dir: str | Path, resumed_at: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        if resumed_at is not None and self.path.is_file():
            kept = [r for r in _parse_lines(self.path) if r is not None and r.get("step", 0) <= resumed_at]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} was closed")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the record being written

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Data passes and the loss plot (loss.png, and the report's loss plots)
# ---------------------------------------------------------------------------------------------


class Logged(Protocol):
    """A run's metrics log as a reader holds it: `Metrics`, or the report's pretraining run."""

    records: list[dict[str, Any]]
    evals: list[dict[str, Any]]


@dataclass(frozen=True)
class PassStart:
    """Where training began pass `number` over its data (2: the first revisit), interpolated
    between the two metrics records whose `epochs` straddle `number - 1`."""

    number: int
    step: float
    tokens_seen: float
    elapsed_s: float


_PASS_KEYS = ("step", "tokens_seen", "elapsed_s")

# Every run starts here; a pass that ends before the first log record (a small split) still shows.
_RUN_START = {"epochs": 0.0, "step": 0, "tokens_seen": 0, "elapsed_s": 0.0}


def pass_starts(records: Sequence[Mapping[str, Any]]) -> list[PassStart]:
    """Each new pass over the training split, from the training records' `epochs` (rows drawn / rows
    one pass holds): where it reaches a whole number k between two consecutive records, pass k + 1
    starts. Its step and elapsed time are linear interpolations between the records (its tokens are
    exact: epochs are proportional to tokens). Empty for logs written before records had `epochs`."""
    logged = [r for r in records if all(finite_float(r.get(k)) is not None for k in ("epochs", *_PASS_KEYS))]
    starts = []
    for before, after in itertools.pairwise([_RUN_START, *logged]):
        e0, e1 = float(before["epochs"]), float(after["epochs"])
        for k in range(math.floor(e0) + 1, math.floor(e1) + 1):
            f = (k - e0) / (e1 - e0)
            at = (before[key] + f * (after[key] - before[key]) for key in _PASS_KEYS)
            starts.append(PassStart(k + 1, *at))
    return starts


def time_axis(logs: Sequence[Logged]) -> tuple[float, str]:
    """(seconds per unit, unit) of a time axis that fits the longest of these runs."""
    times = (finite_float(r.get("elapsed_s")) for log in logs for r in [*log.records, *log.evals])
    longest = max((t or 0.0 for t in times), default=0.0)
    if longest > 3 * 3600:
        return 3600.0, "hours"
    # Runs of a few minutes (the demo, tests) read best in seconds: a 0-2 minute axis is too coarse.
    return (60.0, "minutes") if longest > 600 else (1.0, "seconds")


def time_series(records: Sequence[Mapping[str, Any]], key: str, scale: float) -> list[tuple[float, float]]:
    """(elapsed time / scale, value of `key`) of the records where both are finite numbers."""
    return [(r["elapsed_s"] / scale, r[key]) for r in records
            if finite_float(r.get("elapsed_s")) is not None and finite_float(r.get(key)) is not None]


def new_figure(rows: int = 1, height: float = 4.0) -> tuple[Figure, list[Axes]]:
    """A figure of `rows` stacked plots on an Agg canvas: no display and no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, height * rows))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


# More labels than this overlap on an 8-inch axis; the lines themselves are always drawn.
_MAX_PASS_LABELS = 20


def _mark_passes(ax: Axes, starts: list[PassStart], scale: float, color: str, legend: str) -> None:
    """A dotted line where each data pass starts: in the prepared (prevalence-sorted) order the
    training loss moves with the rows being read, and a revisit starts over at the easiest rows."""
    for i, start in enumerate(starts):
        x = start.elapsed_s / scale
        ax.axvline(x, color=color, linestyle=":", linewidth=1.2, label=legend if i == 0 else None)
        if len(starts) <= _MAX_PASS_LABELS:
            ax.text(x, 0.97, f"pass {start.number} starts", transform=ax.get_xaxis_transform(), rotation=90,
                    ha="right", va="top", fontsize="small", color=color,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})


def plot_loss(series: Sequence[tuple[str, Logged]], path: Path) -> Path | None:
    """Training MLM loss (lines), held-out loss (markers) and data-pass starts (dotted) against
    wall-clock time, of one run or several overlaid, into the image `path`; None (nothing written)
    when no run has a training loss."""
    series = [(label, log) for label, log in series
              if any(finite_float(r.get("loss")) is not None for r in log.records)]
    if not series:
        return None
    scale, unit = time_axis([log for _, log in series])
    many = len(series) > 1
    fig, (ax,) = new_figure()
    for label, log in series:
        line, = ax.plot(*zip(*time_series(log.records, "loss", scale), strict=True),
                        label=f"{label} (train)" if many else "train MLM loss")
        evals = time_series(log.evals, "val_loss", scale)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=line.get_color(),
                    label=f"{label} (held-out)" if many else "held-out MLM loss")
        _mark_passes(ax, pass_starts(log.records), scale, line.get_color(),
                     f"{label} (data pass starts)" if many else "data pass starts")
    ax.set_xlabel(f"wall-clock {unit}")
    ax.set_ylabel("MLM loss")
    ax.set_title("MLM loss vs. time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------------
# results.json's records: the GLUE stage writes them, its resume and the report read them
# ---------------------------------------------------------------------------------------------

GLUE_RESULTS_VERSION = 1
"""results.json's layout; a resume refuses a file of another version."""


def _known(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of `data` that are fields of the record `cls` (a file may hold more, written by a
    newer version); RunFormatError when `data` is not a mapping."""
    if not isinstance(data, Mapping):
        raise RunFormatError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _record(cls: type[_R], data: Mapping[str, Any], where: str, **nested: Any) -> _R:
    """`cls` built from `data`'s fields (nested records already converted in `nested`); RunFormatError
    when a field without a default is missing."""
    try:
        return cls(**{**_known(cls, data, where), **nested})
    except TypeError as err:
        raise RunFormatError(f"{where}: {err}") from None


def _json_of(record: Any, omit_none: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record's fields as JSON values, in field order; `omit_none` fields are left out while None."""
    return {f.name: getattr(record, f.name) for f in fields(record)
            if not (f.name in omit_none and getattr(record, f.name) is None)}


@dataclass
class GlueEpoch:
    """One finetuning epoch of a trial."""

    epoch: int
    train_loss: float
    """Mean training loss over the epoch's steps."""
    lr: float
    """Learning rate after the epoch's last step."""
    time_s: float
    dev: dict[str, float] | None = None
    """Dev scores in percent (the task's metric keys); None (left out of the file) when not evaluated."""

    def to_json(self) -> dict[str, Any]:
        return _json_of(self, omit_none=("dev",))


@dataclass
class GlueTrial:
    """One trial: one task, one seed. `final` is the LAST epoch's dev scores, never the best epoch's."""

    seed: int
    final: dict[str, float]
    epochs: list[GlueEpoch]
    notes: list[str]
    """Notes of the final evaluation (e.g. a constant prediction) and of the training loss."""
    time_s: float
    """Wall time of the trial (of its group, side by side)."""
    train_steps: int
    mode: str = "sequential"
    """How it ran: 'sequential' (one trial after another) or 'side-by-side' (stacked with others)."""
    trials_together: int | None = None
    """Side by side: how many trials its group stacked (left out of the file otherwise)."""
    unpadded: bool = False
    """Whether its token-wise work ran on the real tokens only (glue.unpadded); the scores are the same."""

    def to_json(self) -> dict[str, Any]:
        return {**_json_of(self, omit_none=("trials_together",)), "epochs": [e.to_json() for e in self.epochs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GlueTrial:
        epochs = [_record(GlueEpoch, e, f"epoch of trial {data.get('seed')}") for e in data.get("epochs") or []]
        return _record(cls, data, f"trial {data.get('seed')}", epochs=epochs)


@dataclass
class GlueTask:
    """A task's entry: what it is, the data it ran on, its trials and their medians."""

    kind: str
    custom: bool
    task_key: str
    """Hash of the task's spec and split sizes: a resume keeps a task's trials only when it matches."""
    labels: list[str]
    metrics: list[str]
    headline: list[str]
    """The metric keys whose mean is the task's score."""
    sources: dict[str, str]
    examples: dict[str, int]
    skipped_rows: int
    trials: list[GlueTrial] = field(default_factory=list)
    median: dict[str, float] = field(default_factory=dict)
    """Median over trials of each final metric."""
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {**_json_of(self), "trials": [t.to_json() for t in self.trials]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], name: str) -> GlueTask:
        trials = [GlueTrial.from_json(t) for t in _known(cls, data, f"task {name}").get("trials") or []]
        return _record(cls, data, f"task {name}", trials=trials)


@dataclass
class FinetunedModel:
    """What was finetuned (results.json's `checkpoint`): enough to name, fetch and verify it again."""

    path: str
    """As given in `ckpt`: a local folder, a hub id, or random-init."""
    kind: str
    """'checkpoint' or 'random-init'."""
    sha256: str
    """The run's identity of the model: sha256 of its weights file (several files: of their names and
    checksums), or of the arch config and tokenizer for random-init."""
    format: str | None = None
    """How it was loaded: 'crammed-bert' (an export of `cram pretrain`), 'transformers'
    (AutoModelForSequenceClassification) or 'random-init'."""
    origin: str | None = None
    """'local' (a folder) or 'hub' (fetched through the hub's cache); None for random-init."""
    revision: str | None = None
    """Hub commit the files came from; None for a local folder."""
    files: str | None = None
    """Folder the files were read from (the hub cache's snapshot folder for a hub id)."""
    weights: dict[str, str] = field(default_factory=dict)
    """Weights file name -> sha256."""
    model_type: str | None = None
    architecture: str | None = None
    """Class of the finetuned classifier."""
    parameters: int | None = None
    """Parameters of the classifier with a two-class head (a task's head adds (num_labels - 2) x
    its input width)."""
    max_length: int | None = None
    """The model's own limit on tokens per example."""
    remote_code: bool = False
    """Whether the checkpoint's own modelling code ran (glue.trust_remote_code)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinetunedModel:
        return _record(cls, data, "checkpoint")


@dataclass
class TokenizerRecord:
    """The tokenizer that encoded the examples (results.json's `tokenizer`)."""

    name_or_path: str
    tokenizer_class: str
    vocab_size: int
    """Tokens it can emit, added tokens included (at most the model's embedding rows)."""
    pair_format: str
    """A sentence pair as the model sees it, e.g. '[CLS] A [SEP] B [SEP]' or '<s> A </s> </s> B </s>'."""
    single_format: str
    max_length: int
    """Tokens per example after truncation (glue.max_seq_len), longest text first."""
    token_type_ids: bool
    """Whether segment ids reach the model (BERT-style) or not."""
    sha256: str | None = None
    """sha256 of its tokenizer.json, when it has one."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TokenizerRecord:
        return _record(cls, data, "tokenizer")


@dataclass
class GlueRunInfo:
    """Where and how the trials ran."""

    base_seed: int
    seeds: list[int]
    device: str
    gpu_profile: str
    precision: str
    """The precision the trials ran under (fp32 on the CPU whatever the profile says)."""
    torch: str
    transformers: str | None = None


@dataclass
class GlueResults:
    """A GLUE run's results.json."""

    resume_key: str
    """Hash of what changes a trial's outcome (the recipe, the model's identity, device, precision)."""
    checkpoint: FinetunedModel
    config: dict[str, Any]
    """The glue config as run."""
    run: GlueRunInfo
    tokenizer: TokenizerRecord | None = None
    tasks: dict[str, GlueTask] = field(default_factory=dict)
    status: str = "running"
    """'running' until every task is done, then 'complete'."""
    glue: dict[str, Any] = field(default_factory=dict)
    """The table's columns and the GLUE average (`glue_block`)."""
    format_version: int = GLUE_RESULTS_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "resume_key": self.resume_key, "status": self.status,
            "checkpoint": _json_of(self.checkpoint),
            "tokenizer": None if self.tokenizer is None else _json_of(self.tokenizer),
            "config": self.config, "run": _json_of(self.run),
            "tasks": {name: task.to_json() for name, task in self.tasks.items()}, "glue": self.glue,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GlueResults:
        tokenizer = data.get("tokenizer")
        return _record(cls, data, "results", checkpoint=FinetunedModel.from_json(data.get("checkpoint") or {}),
                       run=_record(GlueRunInfo, data.get("run") or {}, "run"),
                       tokenizer=None if tokenizer is None else TokenizerRecord.from_json(tokenizer),
                       tasks={name: GlueTask.from_json(t, name) for name, t in (data.get("tasks") or {}).items()})


# ---------------------------------------------------------------------------------------------
# summary.json, results.json
# ---------------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON file's content if it is an object, None if it is another JSON value."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFormatError(f"{path} is unreadable ({err}); re-run the stage that writes it") from None
    return data if isinstance(data, dict) else None


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write the run's summary atomically: readers see the whole file or none."""
    write_atomic(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2))


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's summary; {} while the run is unfinished (no file yet) or if it holds no object."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        return {}
    return _read_json_object(path) or {}


def write_results(out_dir: str | Path, results: GlueResults) -> None:
    """Write a GLUE run's results atomically (the reliability suite's fault point "glue.results"
    interrupts it half-way)."""
    write_atomic(Path(out_dir) / RESULTS_FILE, json.dumps(results.to_json(), indent=2) + "\n", fault="glue.results")


def read_results(out_dir: str | Path) -> dict[str, Any]:
    """A GLUE run's results; RunFormatError if the file is missing, unreadable or has no 'tasks' mapping."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise RunFormatError(f"{path} is missing; run `cram glue` to write it")
    results = _read_json_object(path)
    if results is None or not isinstance(results.get("tasks", {}), dict):
        raise RunFormatError(f"{path} does not hold GLUE results (no 'tasks' mapping)")
    return results


def read_glue_results(out_dir: str | Path) -> GlueResults:
    """A GLUE run's results as the records `cram glue` writes; RunFormatError also when a record lacks
    a field (a file written by hand or cut short)."""
    return GlueResults.from_json(read_results(out_dir))


def is_pretrain_run(path: str | Path) -> bool:
    """Whether `path` is a pretraining run folder (it has a metrics log or a summary)."""
    path = Path(path)
    return (path / METRICS_FILE).is_file() or (path / SUMMARY_FILE).is_file()


def is_glue_run(path: str | Path) -> bool:
    """Whether `path` is a GLUE run folder (it has results)."""
    return (Path(path) / RESULTS_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# The run's config
# ---------------------------------------------------------------------------------------------


def _resolve_each(node: Any) -> Any:
    """Plain containers of an OmegaConf node, each interpolation resolved where it can be.

    A value whose interpolation fails (e.g. Hydra's `${now:...}` without Hydra, or `${hydra:...}`
    outside a Hydra job) is kept as written; the others still resolve, so values a preset computes
    (`${oc.select:...}`) show as numbers.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    raw = OmegaConf.to_container(node, resolve=False)
    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        try:
            value = node[key]
        except Exception:  # an unresolvable interpolation: keep the text
            continue
        raw[key] = _resolve_each(value) if isinstance(value, (DictConfig, ListConfig)) else value
    return raw


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config (Hydra's saved copy) as plain containers, resolved where possible; {} if absent."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return {}
    from omegaconf import DictConfig, OmegaConf

    try:
        node = OmegaConf.load(path)
    except Exception as err:  # a broken YAML file is the user's; say so instead of a traceback
        raise RunFormatError(f"{path} is not valid YAML ({err})") from None
    return _resolve_each(node) if isinstance(node, DictConfig) else {}


# ---------------------------------------------------------------------------------------------
# The GLUE columns of results.json
# ---------------------------------------------------------------------------------------------

# Column order of the paper's GLUE table: (column label, task, metric key in that task's medians).
# The average is the plain mean of all nine (MNLI-m and MNLI-mm both counted, WNLI excluded), the
# Cramming paper's convention; cramming/glue/metrics.py explains it.
GLUE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("MNLI-m", "mnli", "matched_accuracy"),
    ("MNLI-mm", "mnli", "mismatched_accuracy"),
    ("QQP", "qqp", "f1"),
    ("QNLI", "qnli", "accuracy"),
    ("SST-2", "sst2", "accuracy"),
    ("CoLA", "cola", "mcc"),
    ("STS-B", "stsb", "spearman"),
    ("MRPC", "mrpc", "f1"),
    ("RTE", "rte", "accuracy"),
)

# Rows of each task's full official GLUE training set: the report flags runs on fewer rows (their
# scores are not comparable) and `cram bench glue` projects a full evaluation's time to them.
GLUE_TRAIN_ROWS: dict[str, int] = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "stsb": 5749, "qqp": 363846,
                                   "mnli": 392702, "qnli": 104743, "rte": 2490}

GLUE_CONVENTION = (
    "plain mean of the nine columns (MNLI-m and MNLI-mm both counted, WNLI excluded): accuracy for MNLI-m, "
    "MNLI-mm, QNLI, SST-2, RTE; F1 for QQP and MRPC; Spearman for STS-B; Matthews correlation for CoLA; each "
    "column is the median over trials of the final epoch's dev score. Set only when all nine columns ran."
)
"""How results.json's GLUE average is computed, stored beside it."""

GlueScores = tuple[dict[str, float | None], float | None, float | None]


def finite_float(x: Any) -> float | None:
    """A field read from a run file as a finite float; None when it is missing, null, a bool, not a
    number, NaN or infinite (files written by hand or by older versions may hold any of these)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def glue_scores(medians: Mapping[str, Mapping[str, Any]]) -> GlueScores:
    """(columns, GLUE average, mean of the columns that ran) from per-task median metrics.

    Columns are None where their task did not run; the average is None unless all nine ran (a
    partial mean is not a GLUE score), the mean of the columns that ran None if none did.
    """
    columns = {label: medians.get(task, {}).get(key) for label, task, key in GLUE_COLUMNS}
    present = [v for v in map(finite_float, columns.values()) if v is not None]
    mean_run = sum(present) / len(present) if present else None
    return columns, mean_run if len(present) == len(GLUE_COLUMNS) else None, mean_run


def glue_block(medians: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The `glue` entry of results.json for these per-task medians."""
    columns, average, mean_run = glue_scores(medians)
    return {"columns": columns, "average": average, "mean_of_columns_run": mean_run, "convention": GLUE_CONVENTION}


def glue_columns(results: Mapping[str, Any]) -> GlueScores:
    """(columns, GLUE average, mean of the columns that ran) of a GLUE run's results.

    From its `glue` block where it has one, else computed from the tasks' medians (results written
    before the block existed, or by hand).
    """
    glue = results.get("glue") or {}
    columns = glue.get("columns")
    if not isinstance(columns, dict):
        medians = {name: task.get("median") or {} for name, task in (results.get("tasks") or {}).items()}
        return glue_scores(medians)
    present = [v for v in (finite_float(columns.get(c)) for c, _, _ in GLUE_COLUMNS) if v is not None]
    average = glue.get("average")
    if average is None and "average" not in glue and len(present) == len(GLUE_COLUMNS):
        average = sum(present) / len(present)
    mean_run = glue.get("mean_of_columns_run", sum(present) / len(present) if present else None)
    return columns, finite_float(average), finite_float(mean_run)
