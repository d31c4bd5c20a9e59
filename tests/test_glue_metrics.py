"""GLUE metrics against hand-computed values, their edge cases, and the GLUE average convention."""

from __future__ import annotations

import math

import pytest

from cramming.glue import metrics as M


def test_accuracy_hand_computed():
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == (0.5, None)


def test_f1_hand_computed():
    # preds 1 1 0 1 0 vs labels 1 0 0 1 1: TP=2, FP=1, FN=1 -> P=2/3, R=2/3, F1=2/3
    value, note = M.f1([1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert value == pytest.approx(2 / 3) and note is None


def test_f1_without_positive_predictions_is_zero_with_note():
    value, note = M.f1([0, 0, 0], [1, 0, 1])
    assert value == 0.0 and "no positive predictions" in note
    value, note = M.f1([0, 0], [0, 0])  # nothing positive anywhere: still defined, 0
    assert value == 0.0 and note


def test_mcc_hand_computed():
    # TP=2 TN=1 FP=1 FN=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    value, note = M.mcc([1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert value == pytest.approx(1 / 6) and note is None
    assert M.mcc([1, 0, 1, 0], [1, 0, 1, 0])[0] == pytest.approx(1.0)
    assert M.mcc([0, 1, 0, 1], [1, 0, 1, 0])[0] == pytest.approx(-1.0)


def test_mcc_constant_predictions_is_zero_not_nan():
    value, note = M.mcc([1, 1, 1, 1], [1, 0, 1, 0])
    assert value == 0.0 and "constant predictions" in note
    value, note = M.mcc([1, 0, 1, 0], [1, 1, 1, 1])
    assert value == 0.0 and "constant labels" in note


def test_pearson_and_spearman_hand_computed():
    preds, labels = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # Pearson: mean 2.5 both; cov sum = (-1.5)(-1.5) + (-.5)(.5) + (.5)(-.5) + (1.5)(1.5) = 4; var sums 5 -> 0.8
    assert M.pearson(preds, labels)[0] == pytest.approx(0.8)
    # Spearman on ranks (same as values here) with d = 0, 1, 1, 0: 1 - 6*2 / (4*15) = 0.8
    assert M.spearman(preds, labels)[0] == pytest.approx(0.8)
    # Spearman sees only order: a monotone transform of the predictions scores 1.0
    assert M.spearman([1.0, 10.0, 100.0, 1000.0], [0.1, 0.2, 0.3, 0.4])[0] == pytest.approx(1.0)
    # ties: ranks of [1, 1, 2] are [1.5, 1.5, 3] vs [1, 2, 3] -> Pearson of ranks = sqrt(3)/2
    assert M.spearman([1.0, 1.0, 2.0], [1.0, 2.0, 3.0])[0] == pytest.approx(math.sqrt(3) / 2)


@pytest.mark.parametrize("fn", [M.pearson, M.spearman])
def test_correlation_of_constant_predictions_is_zero_not_nan(fn):
    value, note = fn([2.5, 2.5, 2.5], [1.0, 2.0, 3.0])
    assert value == 0.0 and "constant predictions" in note
    value, note = fn([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])
    assert value == 0.0 and "constant labels" in note


def test_score_is_in_percent_with_notes():
    values, notes = M.score(["mcc", "accuracy"], [1, 1, 1, 1], [1, 0, 1, 0])
    assert values == {"mcc": 0.0, "accuracy": 50.0}
    assert notes and notes[0].startswith("mcc:")
    with pytest.raises(KeyError, match="unknown metric"):
        M.score(["bleu"], [1], [1])


def test_mismatched_or_empty_inputs_fail():
    with pytest.raises(ValueError):
        M.accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        M.accuracy([], [])


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
    columns = M.glue_columns(medians)
    assert list(columns) == ["MNLI-m", "MNLI-mm", "QQP", "QNLI", "SST-2", "CoLA", "STS-B", "MRPC", "RTE"]
    assert round(M.glue_average(columns), 1) == 80.7
    del medians["rte"]
    assert M.glue_average(M.glue_columns(medians)) is None  # a partial mean is not a GLUE score
