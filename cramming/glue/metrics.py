"""GLUE metrics (scikit-learn / scipy) and the GLUE average.

Every metric function takes predictions and references and returns `(value, note)`: the value is a
plain float in the metric's natural range (accuracy and F1 in [0, 1], correlations in [-1, 1]) and
`note` is None or a short explanation of an edge case. Correlations are undefined when either side
is constant (e.g. a model that predicts one class everywhere); we return 0.0 with a note instead of
NaN, so medians and averages stay defined and a collapsed model scores "no correlation", which is
what it has. `score()` reports the task's metrics in percent, as GLUE tables do.

GLUE average (the Cramming paper's convention, also the reference implementation's): one column per
entry of the paper's table, MNLI-m, MNLI-mm, QQP, QNLI, SST-2, CoLA, STS-B, MRPC, RTE, i.e. MNLI's
matched and mismatched accuracies are BOTH counted (nine columns, WNLI excluded), with QQP and MRPC
scored by F1, STS-B by Spearman correlation, CoLA by Matthews correlation and the rest by accuracy;
the average is the plain mean of the nine columns. Check: the reference checkpoint's published
84.1, 84.6, 87.5, 90.2, 92.0, 53.3, 87.4, 88.9, 58.5 average to 80.7 this way (and to 80.3 if MNLI
were averaged first), which is the 80.7 it reports.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

MetricResult = tuple[float, str | None]

# Column order of the paper's GLUE table: (column label, task, metric key in that task's results).
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


# Published GLUE dev scores, copied from the project spec's summary of the Cramming paper
# (RECIPE.md, section 1, "GLUE"). Only the numbers stated there are filled in; the rest stay blank
# rather than being recalled from memory. Columns as in metrics.GLUE_COLUMNS plus "Avg".
PUBLISHED_ROWS: tuple[tuple[str, dict[str, float]], ...] = (
    ("published: BERT-base, original checkpoint (Cramming paper, GLUE dev)", {"Avg": 80.9}),
    ("published: crammed BERT, 1 day on one A6000 (Cramming paper v1, median of 5)", {"Avg": 78.6}),
    (
        "published: crammed BERT, reference repo's later checkpoint (best of 5)",
        {
            "MNLI-m": 84.1, "MNLI-mm": 84.6, "QQP": 87.5, "QNLI": 90.2, "SST-2": 92.0,
            "CoLA": 53.3, "STS-B": 87.4, "MRPC": 88.9, "RTE": 58.5, "Avg": 80.7,
        },
    ),
)


def _as_arrays(preds: Sequence, labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be 1-d and of equal length")
    if p.size == 0:
        raise ValueError("cannot score an empty evaluation set")
    return p, y


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> MetricResult:
    """Fraction of exact matches."""
    from sklearn.metrics import accuracy_score

    p, y = _as_arrays(preds, labels)
    return float(accuracy_score(y, p)), None


def f1(preds: Sequence[int], labels: Sequence[int]) -> MetricResult:
    """Binary F1 of the positive class (label index 1), as GLUE scores MRPC and QQP.

    With no positive prediction and no positive reference, precision and recall are undefined; the
    value is then 0.0 (scikit-learn's zero_division=0) and a note says why.
    """
    from sklearn.metrics import f1_score

    p, y = _as_arrays(preds, labels)
    note = None
    if not (p == 1).any():
        note = "no positive predictions: F1 is 0"
    value = f1_score(y, p, pos_label=1, average="binary", zero_division=0.0)
    return float(value), note


def mcc(preds: Sequence[int], labels: Sequence[int]) -> MetricResult:
    """Matthews correlation coefficient (CoLA). Constant predictions or references give 0.0."""
    from sklearn.metrics import matthews_corrcoef

    p, y = _as_arrays(preds, labels)
    if np.unique(p).size < 2 or np.unique(y).size < 2:
        side = "predictions" if np.unique(p).size < 2 else "labels"
        return 0.0, f"constant {side}: Matthews correlation is undefined, reported as 0"
    return float(matthews_corrcoef(y, p)), None


def _correlation(fn: Callable, name: str, preds: Sequence[float], labels: Sequence[float]) -> MetricResult:
    p, y = _as_arrays(preds, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        side = "predictions" if p.size < 2 or np.ptp(p) == 0 else "labels"
        return 0.0, f"constant {side}: {name} correlation is undefined, reported as 0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(p, y)[0])
    if math.isnan(value):
        return 0.0, f"{name} correlation is undefined (NaN), reported as 0"
    return value, None


def pearson(preds: Sequence[float], labels: Sequence[float]) -> MetricResult:
    """Pearson correlation (STS-B). Constant predictions or references give 0.0."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, "Pearson", preds, labels)


def spearman(preds: Sequence[float], labels: Sequence[float]) -> MetricResult:
    """Spearman rank correlation (STS-B headline). Constant predictions or references give 0.0."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, "Spearman", preds, labels)


METRICS: dict[str, Callable[[Sequence, Sequence], MetricResult]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def score(metric_names: Sequence[str], preds: Sequence, labels: Sequence) -> tuple[dict[str, float], list[str]]:
    """Compute the named metrics in percent (GLUE-table scale), plus notes on edge cases."""
    values: dict[str, float] = {}
    notes: list[str] = []
    for name in metric_names:
        if name not in METRICS:
            raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        value, note = METRICS[name](preds, labels)
        values[name] = 100.0 * value
        if note:
            notes.append(f"{name}: {note}")
    return values, notes


def median(values: Sequence[float]) -> float:
    """Median of trial scores (mean of the middle two for an even count)."""
    if not values:
        raise ValueError("median of no values")
    return float(np.median(np.asarray(values, dtype=np.float64)))


def glue_columns(task_scores: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """The nine table columns from per-task median metrics (None where a task was not run)."""
    out: dict[str, float | None] = {}
    for column, task, key in GLUE_COLUMNS:
        out[column] = task_scores.get(task, {}).get(key)
    return out


def glue_average(columns: Mapping[str, float | None]) -> float | None:
    """Mean of the nine GLUE columns; None unless every column is present (a partial mean is not GLUE)."""
    values = [columns.get(c) for c, _, _ in GLUE_COLUMNS]
    if any(v is None for v in values):
        return None
    return float(np.mean(np.asarray(values, dtype=np.float64)))
