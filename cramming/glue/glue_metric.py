"""The GLUE metric as an `evaluate` module: the one implementation of every GLUE score in cramming.

    import evaluate, cramming.glue.metrics
    glue = evaluate.load(cramming.glue.metrics.EVALUATE_MODULE, "mrpc")
    glue.compute(predictions=[1, 0, 1], references=[1, 1, 1])  # {'accuracy': 0.667, 'f1': 0.8}

It loads with no network (HF_EVALUATE_OFFLINE=1 / HF_HUB_OFFLINE=1 are fine): evaluate copies this file
into its module cache ($HF_MODULES_CACHE, default $HF_HOME/modules) and imports the copy, so the file
imports nothing from cramming, only numpy, scipy, scikit-learn, datasets and evaluate. `cram glue`
scores through the same `evaluate.load` (cramming.glue.metrics.score).

Configs and keys follow evaluate's own `glue` metric: cola, sst2, mrpc, stsb, qqp, mnli,
mnli_matched, mnli_mismatched, qnli, rte, wnli, with the keys `accuracy`, `f1`, `pearson`,
`spearmanr` and `matthews_correlation`, as fractions (accuracy and F1 in [0, 1], correlations in
[-1, 1]). Differences: cola also returns `accuracy` (cram glue reports it beside MCC), and three
configs serve the custom tasks of `cram glue`: `binary` (accuracy, f1, matthews_correlation),
`multiclass` (accuracy, matthews_correlation) and `regression` (pearson, spearmanr). F1 is the
binary F1 of label 1; predictions and references are class indices, or floats for stsb/regression.

Undefined values are reported as 0.0, never NaN, so medians and averages over trials stay defined
and a collapsed model scores "no correlation", which is what it has: Matthews, Pearson and Spearman
correlations when the predictions or the references are constant (or, for the correlations, NaN or
fewer than two), and F1 when nothing is predicted positive. Each such case also emits an
`UndefinedMetricWarning` saying why (cram glue keeps these as the trial's notes).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import datasets

# `import evaluate`, not `from evaluate import Metric`: evaluate.load takes the first EvaluationModule
# subclass in this module's namespace as the metric, and an imported `Metric` would be that class.
import evaluate
import numpy as np
from scipy.stats import pearsonr
from scipy.stats import spearmanr as scipy_spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1")
_CORRELATIONS = ("pearson", "spearmanr")

CONFIG_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation", "accuracy"),
    "sst2": _ACC,
    "mrpc": _ACC_F1,
    "stsb": _CORRELATIONS,
    "qqp": _ACC_F1,
    "mnli": _ACC,
    "mnli_matched": _ACC,
    "mnli_mismatched": _ACC,
    "qnli": _ACC,
    "rte": _ACC,
    "wnli": _ACC,
    "binary": ("accuracy", "f1", "matthews_correlation"),
    "multiclass": ("accuracy", "matthews_correlation"),
    "regression": _CORRELATIONS,
}
"""The keys each config returns."""

REGRESSION_CONFIGS = frozenset({"stsb", "regression"})
"""Configs whose predictions and references are floats (the rest take class indices)."""


class UndefinedMetricWarning(RuntimeWarning):
    """A metric is undefined on these inputs (e.g. constant predictions) and is reported as 0.0."""


def _undefined(message: str) -> float:
    warnings.warn(message, UndefinedMetricWarning, stacklevel=2)
    return 0.0


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(accuracy_score(references, predictions))


def f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE scores MRPC and QQP; 0.0 with no positive prediction."""
    if not (predictions == 1).any():
        return _undefined("f1: no positive predictions, F1 reported as 0")
    return float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0.0))


def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation coefficient (CoLA); 0.0 when either side holds a single class."""
    # The denominator is zero exactly when one side has a single class.
    for side, values in (("predictions", predictions), ("references", references)):
        if np.unique(values).size < 2:
            return _undefined(f"matthews_correlation: constant {side}, Matthews correlation reported as 0")
    return float(matthews_corrcoef(references, predictions))


def _correlation(fn: Callable, key: str, predictions: np.ndarray, references: np.ndarray) -> float:
    for side, values in (("predictions", predictions), ("references", references)):
        if values.size < 2 or np.ptp(values) == 0:
            return _undefined(f"{key}: constant {side}, correlation reported as 0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN inputs: handled below
        value = float(fn(predictions, references)[0])
    if math.isnan(value):
        return _undefined(f"{key}: correlation is NaN (NaN inputs), reported as 0")
    return value


def pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    """Pearson correlation (STS-B); 0.0 when either side is constant."""
    return _correlation(pearsonr, "pearson", predictions, references)


def spearmanr(predictions: np.ndarray, references: np.ndarray) -> float:
    """Spearman rank correlation (STS-B's GLUE column); 0.0 when either side is constant."""
    return _correlation(scipy_spearmanr, "spearmanr", predictions, references)


_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}


def _check_config(config_name: str) -> None:
    if config_name not in CONFIG_METRICS:
        raise ValueError(
            f"unknown GLUE metric config {config_name!r}; pass one of: {', '.join(CONFIG_METRICS)}, "
            "e.g. evaluate.load(cramming.glue.metrics.EVALUATE_MODULE, 'mrpc')"
        )


def glue_scores(config_name: str, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The config's metrics on 1-d predictions and references of equal, non-zero length."""
    _check_config(config_name)
    dtype = np.float64 if config_name in REGRESSION_CONFIGS else np.int64
    p, y = np.asarray(predictions, dtype=dtype), np.asarray(references, dtype=dtype)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and references {y.shape} must be 1-d and of equal length")
    if p.size == 0:
        raise ValueError("cannot score an empty evaluation set")
    return {key: _FUNCTIONS[key](p, y) for key in CONFIG_METRICS[config_name]}


class GlueMetric(evaluate.Metric):
    """GLUE scores for one task (the config name); see the module docstring."""

    def _info(self) -> evaluate.MetricInfo:
        _check_config(self.config_name)
        value = datasets.Value("float64" if self.config_name in REGRESSION_CONFIGS else "int64")
        return evaluate.MetricInfo(
            description="GLUE task metrics (accuracy, binary F1, Matthews, Pearson, Spearman) with "
            "scikit-learn and scipy; undefined correlations and F1 are reported as 0.0.",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for Natural "
            "Language Understanding, ICLR 2019.",
            inputs_description="predictions, references: class indices (floats for stsb/regression).",
            # No `format`: datasets' numpy format would hand floats over as float32.
            features=datasets.Features({"predictions": value, "references": value}),
            reference_urls=["https://gluebenchmark.com/"],
        )

    def _compute(self, predictions: list, references: list) -> dict[str, float]:
        return glue_scores(self.config_name, predictions, references)
