"""Charts and summary tables from hand-made metrics: no Spark, no backbone."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from xray import reports
from xray.evaluation import classification_metrics
from xray.sweep import summary_csv, summary_markdown, summary_row


def _metrics(name: str, classes: list[str], y_true, y_pred, prob, **extra) -> dict:
    m = classification_metrics(np.array(y_true), np.array(y_pred), np.array(prob), classes)
    return {
        "experiment": name, "model": name.split("_")[0], "task": "binary" if len(classes) == 2 else "multiclass",
        "classes": classes, "weights": "random", "transfer_learning": False, "n_train": 40,
        "featurization_seconds": 12.5, "images_featurized": 50, "images_from_cache": 0, "images_per_second": 4.0,
        "images_per_second_source": "this run", "lr_iterations": 3, "lr_objective_history": [0.69, 0.4, 0.31],
        "config": {"classifier": {"maxIter": 3, "tol": 1e-6, "regParam": 0.01}}, **m, **extra,
    }


def _binary() -> tuple[dict, np.ndarray, np.ndarray]:
    y_true = np.array([0, 0, 0, 1, 1, 1, 1])
    prob = np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    return _metrics("ResNet50_binary_classification", ["Covid-19", "No_findings"], y_true, prob.argmax(1), prob), y_true, prob


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _is_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 5  # something was drawn
    return im.size


def test_confusion_matrix_chart_shows_counts_and_row_shares(tmp_path):
    m, _, _ = _binary()
    path = tmp_path / "cm.png"
    fig = reports.confusion_matrix_chart(m, str(path))
    _is_png(path)
    # rows true, columns predicted: [[2, 1], [1, 3]]
    assert _texts(fig)[:4] == ["2\n67%", "1\n33%", "1\n25%", "3\n75%"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Covid-19", "No_findings"]
    assert ax.get_xlabel() == "Predicted class" and ax.get_ylabel() == "True class"
    assert "ResNet50_binary_classification" in ax.get_title() and "NOT transfer learning" in ax.get_title()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_roc_chart_binary_and_one_vs_rest(tmp_path):
    m, y_true, prob = _binary()
    fig = reports.roc_chart(m, y_true, prob, str(tmp_path / "roc.png"))
    _is_png(tmp_path / "roc.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[1] == f"Covid-19 (positive class), AUC {m['roc']['auc']:.3f}"

    y3 = np.array([0, 1, 2, 2, 1, 0])
    p3 = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.5, 0.3, 0.2]])
    m3 = _metrics("VGG16_multiclass_classification", ["a", "b", "c"], y3, p3.argmax(1), p3)
    fig = reports.roc_chart(m3, y3, p3, str(tmp_path / "roc3.png"))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[1:] == [f"{c} vs rest, AUC {m3['roc']['per_class'][c]:.3f}" for c in "abc"]
    assert len(fig.axes[0].lines) == 4  # chance line + one curve per class


def test_learning_curve_notes_max_iter(tmp_path):
    m, _, _ = _binary()
    fig = reports.learning_curve_chart(m, str(tmp_path / "lc.png"))
    _is_png(tmp_path / "lc.png")
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == m["lr_objective_history"]
    assert "stopped at maxIter=3" in fig.axes[0].get_title()


def test_experiment_reports_write_charts_and_config_snapshot(tmp_path):
    m, y_true, prob = _binary()
    written = reports.write_experiment_reports(str(tmp_path), m, y_true, prob)
    assert sorted(os.listdir(tmp_path)) == sorted(written.values())
    import json

    snapshot = json.loads((tmp_path / "config.json").read_text())
    assert snapshot == {"experiment": m["experiment"], "classes": m["classes"], "settings": m["config"]}


def _rows():
    b, _, _ = _binary()
    y3 = np.array([0, 1, 2, 2, 1, 0])
    p3 = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.0667
    mc = _metrics("ResNet50_multiclass_classification", ["Covid-19", "No_findings", "Pneumonia"], y3, p3.argmax(1), p3)
    cv = {"folds": 3, "accuracy": {"mean": 0.8, "std": 0.05, "min": 0.75, "max": 0.85}}
    return [
        summary_row(b["experiment"], {**b, "cross_validation": cv}),
        summary_row(mc["experiment"], mc),
        {"experiment": "VGG16_binary_classification", "model": "VGG16", "task": "binary", "status": "failed",
         "recall": {}, "error": "weights for VGG16 unavailable offline"},
    ]


def test_summary_table_csv_and_chart(tmp_path):
    rows = _rows()
    table = list(csv.DictReader(io.StringIO(summary_csv(rows))))
    assert [r["status"] for r in table] == ["ok", "ok", "failed"]
    assert float(table[0]["accuracy"]) == pytest.approx(5 / 7)
    assert float(table[0]["recall_Covid-19"]) == pytest.approx(2 / 3)
    assert table[0]["recall_Pneumonia"] == "" and table[1]["recall_Pneumonia"] != ""
    assert float(table[0]["cv_accuracy_mean"]) == 0.8 and table[1]["cv_folds"] == ""
    assert table[2]["error"] == "weights for VGG16 unavailable offline" and table[2]["accuracy"] == ""

    md = summary_markdown(rows)
    assert "| ResNet50_binary_classification | ResNet50 | binary | 0.714 (" in md
    assert "0.800 ± 0.050 (3 folds)" in md
    assert "## Failed\n\n- VGG16_binary_classification: weights for VGG16 unavailable offline" in md
    assert "NOT transfer learning" in md

    fig = reports.summary_chart(rows, str(tmp_path / "summary.png"))
    width, height = _is_png(tmp_path / "summary.png")
    assert width > height * 0.8
    ax_acc, ax_auc = fig.axes
    assert [t.get_text() for t in ax_auc.get_xticklabels()] == ["ResNet50", "VGG16"]
    texts = _texts(fig)
    assert "0.71" in texts and texts.count("failed") == 2
    # error bars are the Wilson interval of each accuracy
    bars = [p for p in ax_acc.patches if p.get_height() > 0 and p.get_fill()]
    assert sorted(round(b.get_height(), 6) for b in bars) == sorted(round(r["accuracy"], 6) for r in rows[:2])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "binary" in legend and "multiclass" in legend
    assert any(t.startswith("binary: majority-class baseline 0.57") for t in legend)


def test_write_text_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "out" / "a.md"
    reports.write_text_atomic(str(path), "one\n")
    reports.write_text_atomic(str(path), "two\n")
    assert path.read_text() == "two\n"
    assert os.listdir(tmp_path / "out") == ["a.md"]
