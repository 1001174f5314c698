"""Metrics, checked against values worked out by hand and against Spark's own on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest

from xray.evaluation import auc, classification_metrics, confusion_matrix, roc_auc, spread, wilson_interval


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


def test_auc_and_spread():
    assert auc({"roc": {"kind": "binary", "auc": 0.8}}) == 0.8
    assert auc({"roc": {"kind": "one-vs-rest", "per_class": {}, "macro_auc": 0.7}}) == 0.7
    assert auc({"roc": {"kind": "one-vs-rest", "per_class": {}, "macro_auc": None}}) is None
    s = spread([0.5, None, 0.7, 0.9])
    assert s == pytest.approx({"mean": 0.7, "std": 0.2, "min": 0.5, "max": 0.9, "n_folds": 3})
    assert spread([0.4])["std"] == 0.0 and spread([None]) is None


def _predictions(n: int, k: int, seed: int):
    """Noisy predictions with tied scores: labels, predicted labels, probabilities (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + 1.2 * np.eye(k)[y_true]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    prob = np.round(prob, 2)  # ties between scores, as a small test set has
    return y_true, prob.argmax(axis=1), prob


@pytest.mark.parametrize("k", [2, 3])
def test_metrics_agree_with_spark_on_the_same_predictions(spark, k):
    from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator

    y_true, y_pred, prob = _predictions(200, k, seed=k)
    classes = [f"c{i}" for i in range(k)]
    m = classification_metrics(y_true, y_pred, prob, classes)
    rows = [(float(t), float(p), *map(float, ps)) for t, p, ps in zip(y_true, y_pred, prob)]
    df = spark.createDataFrame(rows, ["label", "prediction", *(f"p{i}" for i in range(k))]).cache()

    def multiclass(metric: str, label: int = 0) -> float:
        return MulticlassClassificationEvaluator(metricName=metric, metricLabel=float(label)).evaluate(df)

    def spark_auc(i: int) -> float:  # one-vs-rest: class i against the others, scored by its probability
        one = df.selectExpr(f"p{i} AS score", f"CAST(label = {i} AS DOUBLE) AS positive")
        return BinaryClassificationEvaluator(rawPredictionCol="score", labelCol="positive").evaluate(one)

    assert m["accuracy"] == pytest.approx(multiclass("accuracy"))
    recalls = [multiclass("recallByLabel", i) for i in range(k)]
    for i, name in enumerate(classes):
        ours = m["per_class"][name]
        assert ours["precision"] == pytest.approx(multiclass("precisionByLabel", i))
        assert ours["recall"] == pytest.approx(recalls[i])
        assert ours["f1"] == pytest.approx(multiclass("fMeasureByLabel", i))
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    if k == 2:
        assert m["roc"]["auc"] == pytest.approx(spark_auc(0))
    else:
        aucs = [spark_auc(i) for i in range(k)]
        assert [m["roc"]["per_class"][c] for c in classes] == pytest.approx(aucs)
        assert m["roc"]["macro_auc"] == pytest.approx(np.mean(aucs))
    df.unpersist()
