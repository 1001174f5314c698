"""Charts from hand-made metrics (no Spark, no backbone): what each one shows, and that it is a PNG."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from test_reports import _binary, _metrics, _rows
from xray import charts


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
    fig = charts.confusion_matrix_chart(m, str(path))
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
    fig = charts.roc_chart(m, y_true, prob, str(tmp_path / "roc.png"))
    _is_png(tmp_path / "roc.png")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[1] == f"Covid-19 (positive class), AUC {m['roc']['auc']:.3f}"

    y3 = np.array([0, 1, 2, 2, 1, 0])
    p3 = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.5, 0.3, 0.2]])
    m3 = _metrics("VGG16_multiclass_classification", ["a", "b", "c"], y3, p3.argmax(1), p3)
    fig = charts.roc_chart(m3, y3, p3, str(tmp_path / "roc3.png"))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[1:] == [f"{c} vs rest, AUC {m3['roc']['per_class'][c]:.3f}" for c in "abc"]
    assert len(fig.axes[0].lines) == 4  # chance line + one curve per class


def test_learning_curve_notes_max_iter(tmp_path):
    m, _, _ = _binary()
    fig = charts.learning_curve_chart(m, str(tmp_path / "lc.png"))
    _is_png(tmp_path / "lc.png")
    line = fig.axes[0].lines[0]
    assert list(line.get_ydata()) == m["lr_objective_history"]
    assert "stopped at maxIter=3" in fig.axes[0].get_title()


def test_summary_chart(tmp_path):
    rows = _rows()
    fig = charts.summary_chart(rows, str(tmp_path / "summary.png"))
    width, height = _is_png(tmp_path / "summary.png")
    assert width > height * 0.8
    ax_acc, ax_auc = fig.axes
    assert [t.get_text() for t in ax_auc.get_xticklabels()] == ["ResNet50", "VGG16"]
    texts = _texts(fig)
    assert "0.71" in texts and texts.count("failed") == 2
    # a bar per finished experiment at its accuracy, its error bar spanning the Wilson interval
    bars = [p for p in ax_acc.patches if p.get_height() > 0 and p.get_fill()]
    assert sorted(round(b.get_height(), 6) for b in bars) == sorted(round(r["accuracy"], 6) for r in rows[:2])
    spans = sorted(tuple(round(float(y), 6) for y in segment[:, 1])
                   for c in ax_acc.containers if getattr(c, "errorbar", None)
                   for segment in c.errorbar.lines[2][0].get_segments())
    assert spans == sorted((round(r["ci95_low"], 6), round(r["ci95_high"], 6)) for r in rows[:2])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "binary" in legend and "multiclass" in legend
    assert any(t.startswith("binary: majority-class baseline 0.57") for t in legend)


def test_cam_overlay_png_and_gallery(tmp_path):
    image = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (40, 1))  # 40 x 50, a grey ramp
    cam = np.zeros((40, 50), np.float32)
    cam[5:15, 30:45] = 4.0  # hot at the top right
    overlay = charts.heat_overlay(image, cam)
    assert overlay.shape == (40, 50, 3) and overlay.dtype == np.uint8
    assert overlay[10, 40, 0] > overlay[10, 40, 2] and overlay[30, 10, 2] > overlay[30, 10, 0]  # red hot, blue cold
    charts.cam_png(image, cam, ["a/scan.png", "predicted X: X 0.9, Y 0.1"], (0.75, 0.25), str(tmp_path / "one.png"))
    width, height = _is_png(tmp_path / "one.png")
    assert width >= charts.CAM_PNG_MIN_SIDE and height > charts.CAM_PNG_MIN_SIDE * 40 / 50
    panels = [{"overlay": overlay, "label": f"true X\npredicted {p}", "correct": p == "X"} for p in "XXY"]
    fig = charts.cam_gallery_chart(panels, "gallery", str(tmp_path / "gallery.png"))
    _is_png(tmp_path / "gallery.png")
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["true X\npredicted X"] * 2 + ["true X\npredicted Y"]
    charts.cam_gallery_chart([], "nothing", str(tmp_path / "empty.png"))
    _is_png(tmp_path / "empty.png")
