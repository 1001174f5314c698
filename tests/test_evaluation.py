"""Metrics, checked against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from xray.evaluation import classification_metrics, confusion_matrix, roc_auc, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_roc_auc_by_hand():
    # Positives score 0.9, 0.4; negatives 0.8, 0.1: 3 of 4 pairs ordered right.
    assert roc_auc(np.array([0.9, 0.4, 0.8, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half.
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert roc_auc(np.array([0.2, 0.3]), np.array([1, 1])) is None


def test_binary_metrics():
    y_true = np.array([0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 1, 1, 1])
    prob = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    m = classification_metrics(y_true, y_pred, prob, ["Covid-19", "No_findings"])
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["per_class"]["Covid-19"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["No_findings"]["precision"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"]["rows_true_columns_predicted"] == [[2, 1], [0, 2]]
    assert m["roc"]["kind"] == "binary" and m["roc"]["auc"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    lo, hi = m["accuracy_ci95"]
    assert lo < 0.8 < hi


def test_multiclass_one_vs_rest_auc():
    y_true = np.array([0, 1, 2, 2])
    prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]])
    m = classification_metrics(y_true, prob.argmax(1), prob, ["a", "b", "c"])
    assert m["roc"]["kind"] == "one-vs-rest"
    assert m["roc"]["per_class"]["a"] == pytest.approx(1.0)
    # class b: positive 0.5 vs negatives 0.2, 0.6, 0.1 -> 2 of 3 pairs right.
    assert m["roc"]["per_class"]["b"] == pytest.approx(2 / 3)
    assert m["roc"]["macro_auc"] == pytest.approx(np.mean(list(m["roc"]["per_class"].values())))
