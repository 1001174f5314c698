"""Metrics from test-set predictions: plain numpy, no Spark, so every number can be checked
(tests/test_evaluation.py checks them against Spark's own evaluators on the same predictions)."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0% and 100%)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true.astype(int), y_pred.astype(int)), 1)
    return cm


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates), thresholds from high to low, ties grouped."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positives = scores[order], positives[order].astype(bool)
    distinct = np.r_[np.where(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(positives)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = positives.sum(), (~positives).sum()
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.r_[0.0, np.zeros(len(tps))]
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.r_[0.0, np.zeros(len(fps))]
    return fpr, tpr


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve; None when the test set holds only one class."""
    positives = positives.astype(bool)
    if positives.all() or not positives.any():
        return None
    fpr, tpr = roc_curve(scores, positives)
    return float(np.trapezoid(tpr, fpr))


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> dict:
    """Accuracy with its 95% interval, per-class precision/recall/F1/support, confusion matrix, AUC.

    ``y_true``/``y_pred`` are class indices into ``classes``; ``probabilities`` is (n, k).
    AUC is binary (positive class: the first class of the task) for two classes and
    one-vs-rest per class (with their macro mean) for more.
    """
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float).reshape(len(y_true), len(classes))
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    n = int(cm.sum())
    correct = int(np.trace(cm))
    per_class = {}
    recalls = []
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        support = int(cm[i].sum())
        predicted = int(cm[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if support:
            recalls.append(recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    auc_per_class = {name: roc_auc(probabilities[:, i], y_true == i) for i, name in enumerate(classes)}
    known = [v for v in auc_per_class.values() if v is not None]
    if k == 2:
        roc = {"kind": "binary", "positive_class": classes[0], "auc": auc_per_class[classes[0]]}
    else:
        roc = {
            "kind": "one-vs-rest",
            "per_class": auc_per_class,
            "macro_auc": float(np.mean(known)) if len(known) == k else None,
        }
    return {
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "n_test": n,
        "per_class": per_class,
        "confusion_matrix": {"labels": list(classes), "rows_true_columns_predicted": cm.tolist()},
        "roc": roc,
    }


def auc(m: dict) -> float | None:
    """The AUC of a metrics dict (of :func:`classification_metrics`): binary, or the macro
    one-vs-rest AUC for more classes; None when it is not defined."""
    roc = m.get("roc", {})
    return roc.get("auc") if roc.get("kind") == "binary" else roc.get("macro_auc")


def spread(values: list[float | None]) -> dict | None:
    """Mean, standard deviation (ddof=1), min and max of the known values (None: no value known)."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    arr = np.asarray(known, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n_folds": len(known),
    }
