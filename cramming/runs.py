"""The run folder's files: every on-disk format of a run, written and read here only.

A pretraining run folder holds `metrics.jsonl` (one JSON record per line: training log records,
and `"event": "eval"` records with the held-out `val_loss`), `summary.json` (written once, at the
end), `.hydra/config.yaml` (the config as Hydra saved it) and `.lock` while a process owns it. A
GLUE run folder holds `results.json` (per task: trials, medians, headline score; the `glue` block
with the table's columns and average) and `results.md` (rendered from it by `cramming.report`).
docs/design.md describes the fields.

Stages write and read these files through this module, so none of them parses another's files by
hand. It imports no torch and no stage: the report reads runs without the training stack.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cramming.errors import CrammingError
from cramming.fileio import write_atomic

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"
RESULTS_MD = "results.md"
RUN_CONFIG = ".hydra/config.yaml"
LOCK_FILE = ".lock"


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


def write_results(out_dir: str | Path, results: dict[str, Any]) -> None:
    """Write a GLUE run's results atomically (the reliability suite's fault point "glue.results"
    interrupts it half-way)."""
    write_atomic(Path(out_dir) / RESULTS_FILE, json.dumps(results, indent=2) + "\n", fault="glue.results")


def read_results(out_dir: str | Path) -> dict[str, Any]:
    """A GLUE run's results; RunFormatError if the file is missing, unreadable or has no 'tasks' mapping."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise RunFormatError(f"{path} is missing; run `cram glue` to write it")
    results = _read_json_object(path)
    if results is None or not isinstance(results.get("tasks", {}), dict):
        raise RunFormatError(f"{path} does not hold GLUE results (no 'tasks' mapping)")
    return results


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
