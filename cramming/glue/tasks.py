"""GLUE task specs and data loaders: official GLUE-download folders, the hub, and custom files.

Every loader returns a `TaskData`: the training split and one or more dev splits (MNLI has matched
and mismatched), each as parallel lists of first texts, optional second texts and labels (a class
index for classification, a float for regression). All rows are checked while reading (missing
fields, empty text, labels outside the task's set), so bad data stops the run before any training.

Official layout quirks: CoLA has no header; MRPC's header starts with a byte-order mark (read as
utf-8-sig); STS-B, QNLI, RTE (and MRPC) contain quote characters that are part of the text, so every
official file is read with quoting disabled (csv.QUOTE_NONE), as the GLUE reference loaders do.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args
from urllib.parse import urlparse

from cramming.errors import ConfigError, DataError

if TYPE_CHECKING:
    from cramming.glue import CustomTaskConfig

log = logging.getLogger(__name__)

GLUE_TASKS: tuple[str, ...] = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
EXCLUDED_TASKS: dict[str, str] = {
    "wnli": "WNLI is excluded, as in BERT and the Cramming paper: its dev set is adversarial to the "
    "train set and models score below the majority baseline",
    "ax": "the diagnostic set AX has no training data",
}
TaskKind = Literal["classification", "regression"]
"""classification: cross-entropy over the labels; regression: one output, MSE loss."""
FileFormat = Literal["tsv", "csv", "jsonl"]
"""How a custom task's files are parsed."""
METRIC_NAMES: dict[TaskKind, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "mcc"),
    "regression": ("pearson", "spearman"),
}
HUB_DATASET = "nyu-mll/glue"
OFFLINE_HINT = "no network: pass glue.data_dir=<folder in the official GLUE layout>"

Column = str | int


@dataclass(frozen=True)
class TaskSpec:
    """What a task is (labels, metrics, splits) and where its columns are in each source."""

    name: str
    """Lower-case task name used in configs and results."""
    kind: TaskKind
    labels: tuple[str, ...]
    """Label values in class-index order (the hub's order); empty for regression."""
    metrics: tuple[str, ...]
    """Metric names computed on every dev split (see metrics.METRICS)."""
    headline: str
    """The task's metric in the GLUE table."""
    dev_splits: tuple[str, ...] = ("dev",)
    """Names of the evaluation splits (MNLI: matched, mismatched)."""
    folder: str = ""
    """Official layout: the task's folder name (e.g. CoLA)."""
    train_file: str = "train.tsv"
    dev_files: tuple[str, ...] = ("dev.tsv",)
    """Official layout: file of each dev split, parallel to dev_splits."""
    text_columns: tuple[Column, ...] = ()
    """Official layout: header names (or indices for a header-less file) of the one or two texts."""
    label_column: Column = "label"
    header: bool = True
    hub_config: str = ""
    hub_text_columns: tuple[str, ...] = ()
    hub_dev_splits: tuple[str, ...] = ("validation",)
    file_format: FileFormat = "tsv"
    """Custom tasks: how to parse the files (official files are always TSV with quoting disabled)."""

    @property
    def num_labels(self) -> int:
        """Output units of the classifier (1 for regression)."""
        return 1 if self.kind == "regression" else len(self.labels)

    def metric_key(self, split: str, metric: str) -> str:
        """Flat key of one metric on one dev split in results ('accuracy', or 'matched_accuracy' for MNLI)."""
        return metric if len(self.dev_splits) == 1 else f"{split}_{metric}"

    def headline_keys(self) -> list[str]:
        """Keys of the task's table column(s)."""
        return [self.metric_key(s, self.headline) for s in self.dev_splits]


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASK_SPECS: dict[str, TaskSpec] = {
    "cola": TaskSpec(
        "cola", "classification", _BINARY, ("mcc", "accuracy"), "mcc", folder="CoLA",
        text_columns=(3,), label_column=1, header=False, hub_config="cola", hub_text_columns=("sentence",),
    ),
    "sst2": TaskSpec(
        "sst2", "classification", _BINARY, ("accuracy",), "accuracy", folder="SST-2",
        text_columns=("sentence",), hub_config="sst2", hub_text_columns=("sentence",),
    ),
    "mrpc": TaskSpec(
        "mrpc", "classification", _BINARY, ("f1", "accuracy"), "f1", folder="MRPC",
        text_columns=("#1 String", "#2 String"), label_column="Quality",
        hub_config="mrpc", hub_text_columns=("sentence1", "sentence2"),
    ),
    "stsb": TaskSpec(
        "stsb", "regression", (), ("pearson", "spearman"), "spearman", folder="STS-B",
        text_columns=("sentence1", "sentence2"), label_column="score",
        hub_config="stsb", hub_text_columns=("sentence1", "sentence2"),
    ),
    "qqp": TaskSpec(
        "qqp", "classification", _BINARY, ("f1", "accuracy"), "f1", folder="QQP",
        text_columns=("question1", "question2"), label_column="is_duplicate",
        hub_config="qqp", hub_text_columns=("question1", "question2"),
    ),
    "mnli": TaskSpec(
        "mnli", "classification", ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
        dev_splits=("matched", "mismatched"), folder="MNLI",
        dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
        text_columns=("sentence1", "sentence2"), label_column="gold_label",
        hub_config="mnli", hub_text_columns=("premise", "hypothesis"),
        hub_dev_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": TaskSpec(
        "qnli", "classification", _NLI2, ("accuracy",), "accuracy", folder="QNLI",
        text_columns=("question", "sentence"), hub_config="qnli", hub_text_columns=("question", "sentence"),
    ),
    "rte": TaskSpec(
        "rte", "classification", _NLI2, ("accuracy",), "accuracy", folder="RTE",
        text_columns=("sentence1", "sentence2"), hub_config="rte", hub_text_columns=("sentence1", "sentence2"),
    ),
}


def canonical_task_name(name: str) -> str:
    """'SST-2' -> 'sst2', 'STS-B' -> 'stsb', 'MNLI' -> 'mnli' (case and dashes do not matter)."""
    return str(name).strip().lower().replace("-", "").replace("_", "")


def validate_task_names(names: Sequence[str]) -> list[str]:
    """Canonical, de-duplicated task names; unknown or excluded names fail listing the valid ones."""
    out: list[str] = []
    for raw in names:
        name = canonical_task_name(raw)
        if name in EXCLUDED_TASKS:
            raise ConfigError(f"glue.tasks: '{raw}' is not run: {EXCLUDED_TASKS[name]}. Valid tasks: {', '.join(GLUE_TASKS)}")
        if name not in TASK_SPECS:
            raise ConfigError(
                f"glue.tasks: unknown task '{raw}'; valid tasks are: {', '.join(GLUE_TASKS)} "
                "(own data goes in glue.custom_tasks)"
            )
        if name not in out:
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# Loaded data
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split as parallel lists; `texts_b` is None for single-sentence tasks."""

    texts_a: list[str]
    texts_b: list[str] | None
    labels: list[int] | list[float]
    source: str
    """Where the rows came from (a file path or hub id), for messages."""
    skipped: int = 0
    """Bad rows skipped under glue.on_bad_row=skip."""

    def __len__(self) -> int:
        return len(self.labels)

    def subsample(self, n: int | None, seed: int = 0) -> Split:
        """A fixed random subset of n rows in their original order (the same for every trial)."""
        if n is None or n >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), n))
        return replace(
            self,
            texts_a=[self.texts_a[i] for i in keep],
            texts_b=None if self.texts_b is None else [self.texts_b[i] for i in keep],
            labels=[self.labels[i] for i in keep],  # type: ignore[misc]
        )


@dataclass
class TaskData:
    """A task's spec with its training split and dev split(s)."""

    spec: TaskSpec
    train: Split
    dev: dict[str, Split] = field(default_factory=dict)

    def subsample(self, max_train: int | None, max_eval: int | None) -> TaskData:
        return TaskData(self.spec, self.train.subsample(max_train), {k: v.subsample(max_eval) for k, v in self.dev.items()})


class _RowErrors:
    """Raise on the first bad row (on_bad_row=error) or count skipped ones (on_bad_row=skip)."""

    def __init__(self, on_bad_row: str) -> None:
        self.on_bad_row = on_bad_row
        self.skipped = 0

    def bad(self, where: str, what: str) -> None:
        if self.on_bad_row == "skip":
            self.skipped += 1
            return
        raise DataError(f"{where}: {what} (fix the file, or pass glue.on_bad_row=skip to skip such rows)")


def _parse_label(spec: TaskSpec, value: object) -> int | float | None:
    """Class index or float score; None when the value is not valid for the task."""
    text = str(value).strip()
    if spec.kind == "regression":
        try:
            score = float(text)
        except ValueError:
            return None
        return score if math.isfinite(score) else None
    try:
        return spec.labels.index(text)
    except ValueError:
        return None


def _label_problem(spec: TaskSpec, value: object) -> str:
    if spec.kind == "regression":
        return f"score {str(value)!r} is not a finite number"
    return f"label {str(value)!r} is not one of the task's labels {list(spec.labels)}"


def _rows_to_split(
    spec: TaskSpec, rows: Iterator[tuple[str, list[str] | None, object]], source: str, on_bad_row: str
) -> Split:
    """rows yields (location, texts or None if malformed, raw label)."""
    errors = _RowErrors(on_bad_row)
    two = len(spec.text_columns) == 2
    texts_a: list[str] = []
    texts_b: list[str] = []
    labels: list = []
    for where, texts, raw_label in rows:
        if texts is None:
            errors.bad(where, f"row has too few fields for columns {list(spec.text_columns)} + {spec.label_column!r}")
            continue
        if any(not t.strip() for t in texts):
            errors.bad(where, f"empty text in column(s) {list(spec.text_columns)}")
            continue
        label = _parse_label(spec, raw_label)
        if label is None:
            errors.bad(where, f"[{spec.name}] {_label_problem(spec, raw_label)}")
            continue
        texts_a.append(texts[0].strip())
        if two:
            texts_b.append(texts[1].strip())
        labels.append(label)
    if not labels:
        raise DataError(f"{source}: no usable rows for task {spec.name}")
    if errors.skipped:
        log.warning("%s: skipped %d bad row(s) (glue.on_bad_row=skip)", source, errors.skipped)
    return Split(texts_a, texts_b if two else None, labels, source, errors.skipped)


# ---------------------------------------------------------------------------------------------
# Delimited files (official layout and custom TSV/CSV)
# ---------------------------------------------------------------------------------------------


def _read_delimited(
    spec: TaskSpec, path: Path, *, delimiter: str, quoting: int, on_bad_row: str
) -> Split:
    """Read a header (or header-less, index-addressed) delimited file into a Split."""
    if not path.is_file():
        raise DataError(f"missing file {path} (task {spec.name})")
    # The csv module's default 128 KiB field limit is too small for some long texts.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # utf-8-sig drops MRPC's byte-order mark and is a no-op for files without one.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        columns = [*spec.text_columns, spec.label_column]
        if spec.header:
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path} is empty (task {spec.name})") from None
            index: list[int] = []
            for col in columns:
                if isinstance(col, int):
                    index.append(col)
                elif col in header:
                    index.append(header.index(col))
                else:
                    raise DataError(
                        f"{path}: no column {col!r} in the header {header} (task {spec.name} needs "
                        f"{[str(c) for c in columns]})"
                    )
        else:
            index = [int(c) for c in columns]
        need = max(index) + 1

        def rows() -> Iterator[tuple[str, list[str] | None, object]]:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line (e.g. a trailing one)
                if len(row) < need:
                    yield where, None, None
                    continue
                yield where, [row[i] for i in index[:-1]], row[index[-1]]

        return _rows_to_split(spec, rows(), str(path), on_bad_row)


def read_official_split(spec: TaskSpec, path: Path, on_bad_row: str = "error") -> Split:
    """Read one file of the official GLUE download layout (TSV, quoting disabled)."""
    return _read_delimited(spec, path, delimiter="\t", quoting=csv.QUOTE_NONE, on_bad_row=on_bad_row)


def load_local_task(spec: TaskSpec, data_dir: str | Path, on_bad_row: str = "error") -> TaskData:
    """Load a GLUE task from a folder in the official layout (<dir>/<Task>/train.tsv, dev.tsv ...)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"glue.data_dir={data_dir} is not a folder; it must hold the official GLUE layout (<dir>/CoLA/train.tsv ...)")
    files = [root / spec.folder / spec.train_file, *(root / spec.folder / f for f in spec.dev_files)]
    for path in files:
        if not path.is_file():
            raise DataError(
                f"glue.data_dir={data_dir} lacks {spec.folder}/{path.name} (needed for task {spec.name}); "
                f"expected the official GLUE layout {root}/{spec.folder}/{path.name}, or drop {spec.name} from glue.tasks"
            )
    train = read_official_split(spec, files[0], on_bad_row)
    dev = {name: read_official_split(spec, path, on_bad_row) for name, path in zip(spec.dev_splits, files[1:], strict=True)}
    return TaskData(spec, train, dev)


# ---------------------------------------------------------------------------------------------
# Hugging Face hub
# ---------------------------------------------------------------------------------------------


def _offline_requested() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection within `timeout` seconds."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub_task(spec: TaskSpec, on_bad_row: str = "error") -> TaskData:
    """Load a GLUE task from the hub dataset nyu-mll/glue (or the local `datasets` cache when
    HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1). Without network this fails at once, naming the fix."""
    # Probe first: without network `datasets` can spend minutes in retries before failing.
    if not _offline_requested() and not hub_reachable():
        raise DataError(f"cannot reach the Hugging Face hub for {HUB_DATASET}/{spec.hub_config}: {OFFLINE_HINT}")
    import datasets

    try:
        ds = datasets.load_dataset(HUB_DATASET, spec.hub_config)
    except Exception as err:  # network, cache and hub errors all mean the same to the user
        raise DataError(f"could not load {HUB_DATASET}/{spec.hub_config} ({type(err).__name__}: {err}); {OFFLINE_HINT}") from None

    def split(hub_split: str) -> Split:
        part = ds[hub_split]
        cols = [part[c] for c in spec.hub_text_columns]
        raw = part["label"]
        source = f"{HUB_DATASET}/{spec.hub_config}[{hub_split}]"

        def rows() -> Iterator[tuple[str, list[str] | None, object]]:
            for i, value in enumerate(raw):
                # Hub labels are class indices already; map back to names so one parser checks them.
                if spec.kind == "classification":
                    value = spec.labels[value] if isinstance(value, int) and 0 <= value < len(spec.labels) else value
                yield f"{source} row {i}", [str(c[i] or "") for c in cols], value

        return _rows_to_split(spec, rows(), source, on_bad_row)

    return TaskData(spec, split("train"), {n: split(h) for n, h in zip(spec.dev_splits, spec.hub_dev_splits, strict=True)})


# ---------------------------------------------------------------------------------------------
# Custom tasks
# ---------------------------------------------------------------------------------------------


def _custom_format(path: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in get_args(FileFormat):
        return suffix
    if suffix == "json":
        return "jsonl"
    raise ConfigError(f"cannot tell the format of {path} from its extension; "
                      f"set format: {'|'.join(get_args(FileFormat))} in the custom task")


def _read_jsonl(spec: TaskSpec, path: Path, on_bad_row: str) -> Split:
    if not path.is_file():
        raise DataError(f"missing file {path} (task {spec.name})")

    def rows() -> Iterator[tuple[str, list[str] | None, object]]:
        with open(path, encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err})") from None
                keys = [*spec.text_columns, spec.label_column]
                if not isinstance(obj, dict) or any(k not in obj or obj[k] is None for k in keys):
                    yield where, None, None
                    continue
                yield where, [str(obj[k]) for k in spec.text_columns], obj[spec.label_column]

    return _rows_to_split(spec, rows(), str(path), on_bad_row)


def _read_custom_file(spec: TaskSpec, path: Path, on_bad_row: str) -> Split:
    if spec.file_format == "jsonl":
        return _read_jsonl(spec, path, on_bad_row)
    if spec.file_format == "csv":
        return _read_delimited(spec, path, delimiter=",", quoting=csv.QUOTE_MINIMAL, on_bad_row=on_bad_row)
    return _read_delimited(spec, path, delimiter="\t", quoting=csv.QUOTE_NONE, on_bad_row=on_bad_row)


def _label_values(path: Path, fmt: str, column: str) -> list[str]:
    """Distinct raw label values of a custom file, to infer the label set."""
    values: set[str] = set()
    if fmt == "jsonl":
        with open(path, encoding="utf-8-sig") as fh:
            for line in fh:
                if line.strip():
                    obj = json.loads(line)
                    if isinstance(obj, dict) and obj.get(column) is not None:
                        values.add(str(obj[column]).strip())
    else:
        delimiter, quoting = ("\t", csv.QUOTE_NONE) if fmt == "tsv" else (",", csv.QUOTE_MINIMAL)
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
            if reader.fieldnames is None or column not in reader.fieldnames:
                raise DataError(f"{path}: no column {column!r} in the header {reader.fieldnames}")
            for row in reader:
                if row.get(column) is not None and row[column].strip():
                    values.add(row[column].strip())

    def key(v: str) -> tuple[int, float | str]:
        try:
            return (0, float(v))
        except ValueError:
            return (1, v)

    return sorted(values, key=key)


def custom_spec(task: CustomTaskConfig) -> TaskSpec:
    """The TaskSpec of a custom task; an unset label set is inferred from the training file."""
    fmt = _custom_format(task.train_file, task.format)
    labels: tuple[str, ...] = ()
    if task.kind == "classification":
        if task.labels is not None:
            labels = tuple(task.labels)
        else:
            path = Path(task.train_file).expanduser()
            if not path.is_file():
                raise DataError(f"glue.custom_tasks[{task.name}]: missing train_file {path}")
            labels = tuple(_label_values(path, fmt, task.label_column))
            if len(labels) < 2:
                raise DataError(f"glue.custom_tasks[{task.name}]: {path} has fewer than 2 distinct labels {list(labels)}")
        if task.metric == "f1" and len(labels) != 2:
            raise ConfigError(f"glue.custom_tasks[{task.name}]: metric f1 needs 2 labels, the file has {list(labels)}")
    metrics = (task.metric,) + tuple(m for m in METRIC_NAMES[task.kind] if m != task.metric and (m != "f1" or len(labels) == 2))
    return TaskSpec(
        task.name, task.kind, labels, metrics, task.metric, text_columns=tuple(task.text_columns),
        label_column=task.label_column, header=True, file_format=fmt,  # type: ignore[arg-type]
    )


def load_custom_task(task: CustomTaskConfig, on_bad_row: str = "error") -> TaskData:
    """Load a custom task's train and dev files."""
    spec = custom_spec(task)
    files = {"train": Path(task.train_file).expanduser(), "dev": Path(task.dev_file).expanduser()}
    for role, path in files.items():
        if not path.is_file():
            raise DataError(f"glue.custom_tasks[{task.name}]: missing {role}_file {path}")
    train = _read_custom_file(spec, files["train"], on_bad_row)
    dev = _read_custom_file(spec, files["dev"], on_bad_row)
    return TaskData(spec, train, {"dev": dev})


def load_task(name: str, data_dir: str | Path | None, on_bad_row: str = "error") -> TaskData:
    """Load a GLUE task from `data_dir` (official layout) or, when it is None, from the hub."""
    spec = TASK_SPECS[validate_task_names([name])[0]]
    if data_dir is not None:
        return load_local_task(spec, data_dir, on_bad_row)
    return load_hub_task(spec, on_bad_row)
