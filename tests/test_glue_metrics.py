"""The GLUE metric's evaluate module against direct scikit-learn/scipy calls, its edge cases, its offline
loading, the scoring of `cram glue` through it, and the GLUE average convention."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import evaluate
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from cramming import runs
from cramming.glue import CustomTaskConfig
from cramming.glue import metrics as M
from cramming.glue.glue_metric import CONFIG_METRICS
from cramming.glue.tasks import METRIC_NAMES, TASK_SPECS, custom_spec

# The configs and keys of evaluate's own hub metric "glue" (its hans config aside).
EVALUATE_GLUE_CONFIGS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_matched", "mnli_mismatched",
                         "qnli", "rte", "wnli")
EVALUATE_GLUE_KEYS = {"accuracy", "f1", "pearson", "spearmanr", "matthews_correlation"}


@pytest.fixture(scope="module", autouse=True)
def evaluate_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """evaluate's module and metric caches in a temporary folder rather than ~/.cache/huggingface
    (evaluate.config is read when a module is loaded, so patching it is enough in this process)."""
    root = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate.config, "HF_MODULES_CACHE", root / "modules")
        mp.setattr(evaluate.config, "HF_METRICS_CACHE", root / "metrics")
        yield root


def compute(config: str, preds, refs) -> dict[str, float]:
    return evaluate.load(M.EVALUATE_MODULE, config, keep_in_memory=True).compute(predictions=preds, references=refs)


def compute_undefined(config: str, preds, refs) -> tuple[dict[str, float], list[str]]:
    """compute(), plus the messages of the UndefinedMetricWarnings it emitted (and no other warning)."""
    metric = evaluate.load(M.EVALUATE_MODULE, config, keep_in_memory=True)
    undefined = sys.modules[type(metric).__module__].UndefinedMetricWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = metric.compute(predictions=preds, references=refs)
    assert all(issubclass(w.category, undefined) for w in caught), [str(w.message) for w in caught]
    return result, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------
# The evaluate module: configs, keys, and numbers against scikit-learn / scipy
# ---------------------------------------------------------------------------------------------

def test_every_config_loads_as_an_evaluate_metric_with_the_glue_keys(evaluate_cache: Path):
    assert set(EVALUATE_GLUE_CONFIGS) <= set(CONFIG_METRICS)
    assert Path(M.EVALUATE_MODULE).is_file() and Path(M.EVALUATE_MODULE).parent == Path(M.__file__).parent
    for config, keys in CONFIG_METRICS.items():
        metric = evaluate.load(M.EVALUATE_MODULE, config)
        assert isinstance(metric, evaluate.Metric) and metric.config_name == config
        regression = config in ("stsb", "regression")
        preds, refs = ([0.1, 0.5, 0.2, 0.9], [0.0, 1.0, 0.5, 0.7]) if regression else ([1, 0, 1, 1], [1, 0, 0, 1])
        result = metric.compute(predictions=preds, references=refs)
        assert tuple(result) == keys and set(keys) <= EVALUATE_GLUE_KEYS
        assert all(isinstance(v, float) for v in result.values())
    # the copy evaluate imports lives in the cache folder, not beside the package
    assert list((evaluate_cache / "modules").rglob("glue_metric.py"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [7, 200])
def test_classification_numbers_equal_scikit_learn(seed: int, n: int):
    rng = np.random.default_rng(seed)
    preds, refs = rng.integers(0, 2, n), rng.integers(0, 2, n)
    preds[:2], refs[:2] = [0, 1], [1, 0]  # both classes on both sides
    result = compute("binary", preds, refs)
    assert result["accuracy"] == pytest.approx(accuracy_score(refs, preds), rel=1e-12)
    assert result["f1"] == pytest.approx(f1_score(refs, preds), rel=1e-12)
    assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs, preds), rel=1e-12)
    assert compute("mrpc", preds, refs) == {"accuracy": result["accuracy"], "f1": result["f1"]}
    assert compute("cola", preds, refs) == {"matthews_correlation": result["matthews_correlation"],
                                            "accuracy": result["accuracy"]}
    preds3, refs3 = rng.integers(0, 3, n), rng.integers(0, 3, n)
    preds3[:3], refs3[:3] = [0, 1, 2], [2, 0, 1]
    multi = compute("multiclass", preds3, refs3)
    assert multi["accuracy"] == pytest.approx(accuracy_score(refs3, preds3), rel=1e-12)
    assert multi["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs3, preds3), rel=1e-12)
    assert compute("mnli", preds3, refs3) == {"accuracy": multi["accuracy"]}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_numbers_equal_scipy(seed: int):
    rng = np.random.default_rng(seed)
    refs = rng.uniform(0, 5, 300)
    preds = refs + rng.normal(0, 1.5, 300)
    preds[:20] = np.round(preds[:20])  # some ties for the ranks
    result = compute("stsb", preds, refs)
    assert result["pearson"] == pytest.approx(float(pearsonr(preds, refs)[0]), rel=1e-12)
    assert result["spearmanr"] == pytest.approx(float(spearmanr(preds, refs)[0]), rel=1e-12)
    assert compute("regression", preds, refs) == result


def test_hand_computed_values():
    # preds 1 1 0 1 0 vs refs 1 0 0 1 1: TP=2 FP=1 FN=1 TN=1 -> F1 = 2/3, MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    result = compute("binary", [1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert result == pytest.approx({"accuracy": 0.6, "f1": 2 / 3, "matthews_correlation": 1 / 6})
    assert compute("cola", [0, 1, 0, 1], [1, 0, 1, 0])["matthews_correlation"] == pytest.approx(-1.0)
    # Pearson: deviations (-1.5 -.5 .5 1.5) vs (-1.5 .5 -.5 1.5) -> 4 / 5; Spearman (same ranks) likewise
    assert compute("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx({"pearson": 0.8, "spearmanr": 0.8})
    # ranks of [1, 1, 2] are [1.5, 1.5, 3] vs [1, 2, 3] -> Spearman sqrt(3)/2; a monotone map scores 1
    assert compute("stsb", [1.0, 1.0, 2.0], [1.0, 2.0, 3.0])["spearmanr"] == pytest.approx(math.sqrt(3) / 2)
    assert compute("stsb", [1.0, 10.0, 100.0, 1e3], [0.1, 0.2, 0.3, 0.4])["spearmanr"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Edge cases: undefined values are 0.0 (never NaN) with an UndefinedMetricWarning
# ---------------------------------------------------------------------------------------------

def test_mcc_with_a_single_predicted_class_is_zero_like_scikit_learn():
    preds, refs = [1, 1, 1, 1], [1, 0, 1, 0]
    result, notes = compute_undefined("cola", preds, refs)
    assert result == {"matthews_correlation": 0.0, "accuracy": 0.5}
    assert result["matthews_correlation"] == matthews_corrcoef(refs, preds)  # scikit-learn's 0.0 too
    assert len(notes) == 1 and "constant predictions" in notes[0]


def test_one_class_in_the_references():
    preds, refs = [1, 0, 1, 0], [1, 1, 1, 1]
    result, notes = compute_undefined("binary", preds, refs)
    assert result["accuracy"] == accuracy_score(refs, preds) == 0.5
    assert result["f1"] == pytest.approx(f1_score(refs, preds))  # F1 is defined: P=1, R=1/2
    assert result["matthews_correlation"] == 0.0 == matthews_corrcoef(refs, preds)
    assert len(notes) == 1 and "constant references" in notes[0]
    # positives predicted but none in the references: scikit-learn's F1 is 0 (recall undefined)
    result, notes = compute_undefined("mrpc", [1, 1, 0], [0, 0, 0])
    assert result["f1"] == 0.0 == f1_score([0, 0, 0], [1, 1, 0], zero_division=0.0) and not notes


def test_f1_without_positive_predictions_is_zero_with_a_warning():
    result, notes = compute_undefined("mrpc", [0, 0, 0, 0], [1, 0, 1, 0])
    assert result == {"accuracy": 0.5, "f1": 0.0} and len(notes) == 1 and "no positive predictions" in notes[0]
    result, notes = compute_undefined("mrpc", [1, 1, 1, 1], [1, 0, 1, 0])  # constant but positive: defined
    assert result["f1"] == pytest.approx(f1_score([1, 0, 1, 0], [1, 1, 1, 1])) and not notes


@pytest.mark.parametrize(("preds", "refs", "why"), [
    ([2.5, 2.5, 2.5], [1.0, 2.0, 3.0], "constant predictions"),
    ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0], "constant references"),
    ([1.0], [2.0], "constant predictions"),  # one example: no correlation either
    ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], "NaN"),  # a diverged regression head
])
def test_correlations_of_constant_or_nan_input_are_zero_not_nan(preds, refs, why):
    result, notes = compute_undefined("stsb", preds, refs)
    assert result == {"pearson": 0.0, "spearmanr": 0.0}
    assert len(notes) == 2 and all(why in n for n in notes)
    if len(preds) > 1 and why != "NaN":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert math.isnan(pearsonr(preds, refs)[0])  # what scipy itself returns: we report 0.0


def test_bad_inputs_and_configs_fail_clearly():
    with pytest.raises(ValueError, match="empty"):
        compute("sst2", [], [])
    with pytest.raises(ValueError, match="Mismatch"):
        compute("sst2", [1, 0], [1])
    with pytest.raises(ValueError, match="unknown GLUE metric config 'default'.*mrpc"):
        evaluate.load(M.EVALUATE_MODULE)
    with pytest.raises(ValueError, match="unknown GLUE metric config 'squad'"):
        evaluate.load(M.EVALUATE_MODULE, "squad")


# ---------------------------------------------------------------------------------------------
# cram glue's scoring goes through the module
# ---------------------------------------------------------------------------------------------

def _custom(kind: str, metric: str, labels: list[str] | None) -> CustomTaskConfig:
    return CustomTaskConfig(name="mine", train_file="train.tsv", dev_file="dev.tsv", text_columns=["a"],
                            label_column="y", kind=kind, metric=metric, labels=labels)


def test_every_task_and_custom_kind_scores_its_metrics_in_percent():
    configs = [(spec, name) for name, spec in TASK_SPECS.items()] + [
        (custom_spec(_custom("classification", "f1", ["no", "yes"])), "binary"),
        (custom_spec(_custom("classification", "mcc", ["a", "b", "c"])), "multiclass"),
        (custom_spec(_custom("regression", "spearman", None)), "regression"),
    ]
    assert {name for names in METRIC_NAMES.values() for name in names} == set(M.EVALUATE_KEYS)
    rng = np.random.default_rng(0)
    for spec, config in configs:
        assert M.evaluate_config(spec) == config
        if spec.kind == "regression":
            preds, refs = rng.uniform(0, 5, 50), rng.uniform(0, 5, 50)
        else:
            preds, refs = rng.integers(0, spec.num_labels, 50), rng.integers(0, spec.num_labels, 50)
        values, notes = M.score(spec, preds, refs)
        expected = compute(config, preds, refs)
        assert list(values) == list(spec.metrics) and not notes
        for name, value in values.items():
            assert value == pytest.approx(100.0 * expected[M.EVALUATE_KEYS[name]], rel=1e-12)


def test_score_keeps_undefined_metric_warnings_as_notes():
    values, notes = M.score(TASK_SPECS["cola"], np.ones(4, dtype=np.int64), np.array([1, 0, 1, 0]))
    assert values == {"mcc": 0.0, "accuracy": 50.0}
    assert notes == ["matthews_correlation: constant predictions, Matthews correlation reported as 0"]
    values, notes = M.score(TASK_SPECS["stsb"], np.full(3, 2.5), np.array([1.0, 2.0, 3.0]))
    assert values == {"pearson": 0.0, "spearman": 0.0} and len(notes) == 2


def _refuse_network(*args, **kwargs):
    raise OSError("network access while loading the GLUE metric")


def test_loads_with_the_network_cut_and_writes_only_its_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # evaluate writes its module copy and metric folder under the caches only: not in the working
    # folder, not beside the module file (here a copy in its own folder, next to the package's own).
    import huggingface_hub.constants

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _refuse_network)
    monkeypatch.setattr(socket, "create_connection", _refuse_network)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse_network)
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache, cwd, pkg = tmp_path / "hf", tmp_path / "cwd", tmp_path / "pkg"
    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", cache / "modules")
    monkeypatch.setattr(evaluate.config, "HF_METRICS_CACHE", cache / "metrics")
    cwd.mkdir()
    pkg.mkdir()
    monkeypatch.chdir(cwd)
    shutil.copy(M.EVALUATE_MODULE, pkg / "glue_metric.py")
    for path in (M.EVALUATE_MODULE, str(pkg / "glue_metric.py")):
        result = evaluate.load(path, "mrpc").compute(predictions=[1, 0, 1], references=[1, 1, 1])
        assert result == pytest.approx({"accuracy": 2 / 3, "f1": 0.8})
    assert not any(cwd.iterdir()) and [p.name for p in pkg.iterdir()] == ["glue_metric.py"]
    assert {p.name for p in cache.iterdir()} == {"modules", "metrics"}
    assert len(list((cache / "modules").rglob("glue_metric.py"))) == 1  # same content: one copy


@pytest.mark.slow
def test_loads_in_a_fresh_process_with_the_offline_switches_set(tmp_path: Path):
    # The user's view: HF_EVALUATE_OFFLINE=1 HF_HUB_OFFLINE=1 and HF_HOME set, nothing else; slow
    # only because a fresh `import evaluate` imports transformers' pipelines (seconds).
    hf_home = tmp_path / "hf"
    script = textwrap.dedent("""
        import json, sys
        import cramming.glue.metrics as M
        assert "evaluate" not in sys.modules, "importing the metrics must stay light (cram report)"
        import evaluate
        glue = evaluate.load(M.EVALUATE_MODULE, "mrpc")
        print(json.dumps(glue.compute(predictions=[1, 0, 1], references=[1, 1, 1])))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_EVALUATE_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == pytest.approx({"accuracy": 2 / 3, "f1": 0.8})
    assert {p.name for p in hf_home.iterdir()} == {"modules", "metrics"}


# ---------------------------------------------------------------------------------------------
# Trial medians and the GLUE average
# ---------------------------------------------------------------------------------------------

def test_median_of_trials():
    assert M.median([3.0, 1.0, 2.0]) == 2.0
    assert M.median([1.0, 2.0, 3.0, 10.0]) == 2.5


def test_glue_average_matches_the_published_reference_row():
    # The reference checkpoint's published per-task scores average to its published 80.7 only
    # when MNLI-m and MNLI-mm are both counted (nine columns); that is the convention implemented.
    medians = {
        "mnli": {"matched_accuracy": 84.1, "mismatched_accuracy": 84.6}, "qqp": {"f1": 87.5, "accuracy": 90.0},
        "qnli": {"accuracy": 90.2}, "sst2": {"accuracy": 92.0}, "cola": {"mcc": 53.3, "accuracy": 80.0},
        "stsb": {"spearman": 87.4, "pearson": 88.0}, "mrpc": {"f1": 88.9, "accuracy": 85.0}, "rte": {"accuracy": 58.5},
    }
    glue = runs.glue_block(medians)
    assert list(glue["columns"]) == ["MNLI-m", "MNLI-mm", "QQP", "QNLI", "SST-2", "CoLA", "STS-B", "MRPC", "RTE"]
    assert round(glue["average"], 1) == 80.7
    del medians["rte"]
    partial = runs.glue_block(medians)
    assert partial["average"] is None  # a partial mean is not a GLUE score
    assert partial["mean_of_columns_run"] == pytest.approx((84.1 + 84.6 + 87.5 + 90.2 + 92.0 + 53.3 + 87.4 + 88.9) / 8)
