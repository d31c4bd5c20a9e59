"""GLUE scoring through the project's `evaluate` module, and the GLUE average's convention.

The metrics themselves live in one place, `glue_metric.py`, an `evaluate` module loaded by path
(`EVALUATE_MODULE`) with no network; it computes with scikit-learn and scipy and uses the keys of
evaluate's own glue metric. `score()` runs a task's dev predictions through it and reports the
task's metrics in percent, as GLUE tables do, under the project's metric names (`EVALUATE_KEYS`).
Undefined values (constant predictions or references for MCC and the correlations, no positive
prediction for F1) are 0.0, not NaN, with a note saying why: medians and averages stay defined and a
collapsed model scores "no correlation", which is what it has. evaluate keeps its copy of the module
under $HF_HOME (modules/, metrics/); set HF_HOME to move it.

GLUE average (the Cramming paper's convention, also the reference implementation's): one column per
entry of the paper's table, MNLI-m, MNLI-mm, QQP, QNLI, SST-2, CoLA, STS-B, MRPC, RTE, i.e. MNLI's
matched and mismatched accuracies are BOTH counted (nine columns, WNLI excluded), with QQP and MRPC
scored by F1, STS-B by Spearman correlation, CoLA by Matthews correlation and the rest by accuracy;
the average is the plain mean of the nine columns (computed by `cramming.runs.glue_block`, which
writes it into the results file's `glue` block). Check: the reference checkpoint's published
84.1, 84.6, 87.5, 90.2, 92.0, 53.3, 87.4, 88.9, 58.5 average to 80.7 this way (and to 80.3 if MNLI
were averaged first), which is the 80.7 it reports.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cramming.glue.tasks import GLUE_TASKS, TaskSpec

EVALUATE_MODULE: str = str(Path(__file__).with_name("glue_metric.py"))
"""Path of the GLUE metric's `evaluate` module: `evaluate.load(EVALUATE_MODULE, "mrpc")`."""

# The project's metric names (task specs, configs, the results file) -> the evaluate module's keys.
EVALUATE_KEYS: dict[str, str] = {
    "accuracy": "accuracy",
    "f1": "f1",
    "mcc": "matthews_correlation",
    "pearson": "pearson",
    "spearman": "spearmanr",
}

def evaluate_config(spec: TaskSpec) -> str:
    """The GLUE metric module's config for a task: its own name for a GLUE task, else by kind and labels."""
    if spec.name in GLUE_TASKS:
        return spec.name
    if spec.kind == "regression":
        return "regression"
    return "binary" if spec.num_labels == 2 else "multiclass"


def score(spec: TaskSpec, preds: Sequence, labels: Sequence) -> tuple[dict[str, float], list[str]]:
    """The task's metrics (`spec.metrics`) in percent through the evaluate module, plus notes on edge cases.

    The notes are the module's UndefinedMetricWarning messages; other warnings pass through.
    """
    import evaluate

    # Loaded per call (about 15 ms once cached), so no metric state is shared between callers.
    metric = evaluate.load(EVALUATE_MODULE, evaluate_config(spec), keep_in_memory=True)
    # The class of the copy evaluate imported from its cache, not of cramming.glue.glue_metric.
    undefined = sys.modules[type(metric).__module__].UndefinedMetricWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = metric.compute(predictions=np.asarray(preds), references=np.asarray(labels))
    notes = [str(w.message) for w in caught if issubclass(w.category, undefined)]
    for w in caught:
        if not issubclass(w.category, undefined):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return {name: 100.0 * result[EVALUATE_KEYS[name]] for name in spec.metrics}, notes


def median(values: Sequence[float]) -> float:
    """Median of trial scores (mean of the middle two for an even count)."""
    if not values:
        raise ValueError("median of no values")
    return float(np.median(np.asarray(values, dtype=np.float64)))
