"""Metrics (section 7 of docs/method.md) against values worked out by hand, and their invariants."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysdpb.metrics import METRICS, accuracy, compute_metrics, exact_match, f1, macro_f1, matthews

SETTINGS = settings(max_examples=int(os.environ.get("RAYSDPB_HYPOTHESIS_EXAMPLES", 60)), deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow])


def confusion(tp: int, fp: int, fn: int, tn: int) -> tuple[list[int], list[int]]:
    """(predictions, labels) with the given binary confusion matrix (positive class 1)."""
    pairs = [(1, 1)] * tp + [(1, 0)] * fp + [(0, 1)] * fn + [(0, 0)] * tn
    return [p for p, _ in pairs], [y for _, y in pairs]


def test_symmetric_confusion_matrix_by_hand():
    # TP=3 FP=1 FN=1 TN=3: accuracy 6/8; precision = recall = 3/4 so F1 = 3/4;
    # MCC = (3*3 - 1*1) / sqrt(4*4*4*4) = 8/16
    preds, labels = confusion(3, 1, 1, 3)
    assert accuracy(preds, labels) == pytest.approx(0.75)
    assert f1(preds, labels) == pytest.approx(0.75)
    assert matthews(preds, labels) == pytest.approx(0.5)


def test_asymmetric_confusion_matrix_by_hand():
    # TP=2 FP=1 FN=2 TN=5: accuracy 7/10; F1 = 2TP / (2TP + FP + FN) = 4/7;
    # MCC = (2*5 - 1*2) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 8 / sqrt(3*4*6*7)
    preds, labels = confusion(2, 1, 2, 5)
    assert accuracy(preds, labels) == pytest.approx(0.7)
    assert f1(preds, labels) == pytest.approx(4 / 7)
    assert matthews(preds, labels) == pytest.approx(8 / math.sqrt(504))
    # binary macro-F1 averages the F1 of class 1 (4/7) and of class 0 (TP0=5, FP0=2, FN0=1: 10/13)
    assert macro_f1(preds, labels) == pytest.approx((4 / 7 + 10 / 13) / 2)


def test_macro_f1_three_classes_by_hand():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # class 0: TP 2, FP 0, FN 1 -> 4/5; class 1: TP 1, FP 1, FN 1 -> 1/2; class 2: TP 1, FP 1, FN 0 -> 2/3
    assert macro_f1(preds, labels) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # f1 is the F1 of class 1 alone: TP 1, FP 1 (predicted 1, label 2), FN 1 (label 1, predicted 2) -> 1/2
    assert f1(preds, labels) == pytest.approx(1 / 2)


def test_degenerate_cases_are_zero_not_nan():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ill-defined" warnings either
        assert matthews([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0   # constant prediction
        assert matthews([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0   # constant label
        assert f1([0, 0, 0], [0, 0, 0]) == 0.0               # class 1 never predicted nor true
        assert f1([0, 0, 0], [1, 0, 1]) == 0.0               # class 1 never predicted
    assert accuracy([0, 0, 0], [0, 0, 0]) == 1.0


def test_exact_match():
    assert exact_match(["18", None, "3", " C "], ["18", "7", "4", "C"]) == pytest.approx(0.5)
    assert exact_match([None, None], ["1", "2"]) == 0.0
    assert exact_match(["2.5"], ["2.50"]) == 0.0  # extraction canonicalises numbers; this compares strings


def test_compute_metrics_keys_and_types():
    preds, labels = confusion(3, 1, 1, 3)
    scores = compute_metrics(("matthews", "accuracy", "f1"), np.array(preds), np.array(labels))
    assert list(scores) == ["matthews", "accuracy", "f1"]
    assert all(type(v) is float for v in scores.values())
    assert scores == {"matthews": pytest.approx(0.5), "accuracy": pytest.approx(0.75), "f1": pytest.approx(0.75)}
    assert compute_metrics(["exact_match"], ["1", None], ["1", "2"]) == {"exact_match": 0.5}
    assert set(METRICS) == {"accuracy", "f1", "macro_f1", "matthews", "exact_match"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown metric.*'bleu'.*allowed: accuracy"):
        compute_metrics(["accuracy", "bleu"], [0], [0])
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no predictions"):
        macro_f1([], [])
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        exact_match(["1"], ["1", "2"])


CLASS_IDS = st.integers(min_value=2, max_value=4).flatmap(
    lambda k: st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=40))


@SETTINGS
@given(pairs=CLASS_IDS)
def test_invariants(pairs):
    preds = [p for p, _ in pairs]
    labels = [y for _, y in pairs]
    scores = compute_metrics(list(METRICS)[:4], preds, labels)
    assert all(math.isfinite(v) for v in scores.values())
    assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["f1"] <= 1.0 and 0.0 <= scores["macro_f1"] <= 1.0
    assert -1.0 <= scores["matthews"] <= 1.0
    assert scores["accuracy"] == pytest.approx(sum(p == y for p, y in pairs) / len(pairs))
    # the order of the samples does not matter
    order = np.random.default_rng(len(pairs)).permutation(len(pairs))
    assert compute_metrics(list(METRICS)[:4], np.array(preds)[order], np.array(labels)[order]) == pytest.approx(scores)
    # perfect predictions
    assert accuracy(labels, labels) == 1.0 and macro_f1(labels, labels) == 1.0
    assert matthews(labels, labels) == (1.0 if len(set(labels)) > 1 else 0.0)
    # exact match of the ids as strings is accuracy
    assert exact_match([str(p) for p in preds], [str(y) for y in labels]) == pytest.approx(scores["accuracy"])


@SETTINGS
@given(pairs=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=40))
def test_binary_invariants(pairs):
    preds = [p for p, _ in pairs]
    labels = [y for _, y in pairs]
    # inverting the prediction negates MCC; swapping predictions and labels keeps MCC and F1
    assert matthews([1 - p for p in preds], labels) == pytest.approx(-matthews(preds, labels), abs=1e-12)
    assert matthews(labels, preds) == pytest.approx(matthews(preds, labels))
    assert f1(labels, preds) == pytest.approx(f1(preds, labels))
    # F1 of class 1 from its definition
    tp = sum(p == y == 1 for p, y in pairs)
    fp_fn = sum(p != y for p, y in pairs)
    assert f1(preds, labels) == pytest.approx(2 * tp / (2 * tp + fp_fn) if tp + fp_fn else 0.0)
