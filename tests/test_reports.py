"""Reports from hand-made metrics (no Spark, no backbone): the experiment's files, its result
lines, and the sweep's summary table as Markdown and CSV."""

from __future__ import annotations

import csv
import io
import os
import re

import numpy as np
import pytest

from xray import reports
from xray.evaluation import classification_metrics
from xray.predict import _snapshot
from xray.split import SplitRow


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


def test_experiment_reports_write_charts_and_the_snapshot_predict_reads(tmp_path):
    m, y_true, prob = _binary()
    written = reports.write_experiment_reports(str(tmp_path), m, y_true, prob)
    assert sorted(os.listdir(tmp_path)) == sorted(written.values())
    assert sorted(written.values()) == ["config.json", "confusion_matrix.png", "learning_curve.png", "roc.png"]
    # predict finds the training settings beside the model folder
    assert _snapshot(str(tmp_path / "model")) == {"experiment": m["experiment"], "settings": m["config"]}


def test_format_result_lines():
    m, _, _ = _binary()
    m = {**m, "reports": {"roc": "roc.png", "config": "config.json"},
         "cross_validation": {"folds": 3, "accuracy": {"mean": 0.8, "std": 0.05, "min": 0.75, "max": 0.85}}}
    lines = reports.format_result(m, "/r/x").splitlines()
    assert lines[0] == ("ResNet50_binary_classification: accuracy 0.714 (95% CI "
                        f"{m['accuracy_ci95'][0]:.3f}-{m['accuracy_ci95'][1]:.3f}) on 7 test images (40 train), "
                        "weights=random [random weights: NOT transfer learning]")
    assert lines[1] == "  recall Covid-19: 0.667 (precision 0.667, support 3)"
    assert lines[2] == "  recall No_findings: 0.750 (precision 0.750, support 4)"
    assert lines[3] == "  featurization: 50 images in 12.5 s, 4.0 images/s (this run); 0 from cache"
    assert lines[4] == "  cross-validation (3 folds of the training split): accuracy 0.800 ± 0.050 (min 0.750, max 0.850)"
    assert lines[5:] == ["  results: /r/x/metrics.json, model: /r/x/model", "  charts: /r/x/roc.png"]


def test_format_result_states_the_split_and_near_duplicates():
    m, _, _ = _binary()
    m = {**m, "split": {"groups": 12, "groups_train": 9, "groups_test": 3, "mixed_class_groups": 1, "group_pattern": "(x)"},
         "near_duplicates": {"threshold": 0.995, "pairs": 2}}
    lines = reports.format_result(m, "/r/x").splitlines()
    assert lines[4:6] == ["  split: 12 groups (by split.group_pattern), 9 train, 3 test; 1 with more than one class",
                          "  near-duplicate train-test pairs (standardised-feature cosine >= 0.995): 2"]


def test_a_trained_network_states_near_duplicates_n_a_and_its_validation_rows(tmp_path):
    m, _, _ = _binary()
    m = {**m, "method": "scratch", "near_duplicates": {"pairs": None, "reason": "no features"}}
    assert "  near-duplicate train-test pairs: n/a (no features)" in reports.format_result(m, "/r/x").splitlines()
    row = reports.summary_row("SmallCNN_binary_scratch", m)
    assert re.search(r"\| SmallCNN_binary_scratch \| ResNet50 \| binary \| scratch \|.* \| n/a \|",
                     reports.summary_markdown([row]))
    rows = [SplitRow("file:/d/a/1.png", "a", "a/1.png", False, 0), SplitRow("file:/d/a/2.png", "a", "a/2.png", False, 0),
            SplitRow("file:/d/a/3.png", "a", "a/3.png", True, -1)]
    reports.write_split_csv(str(tmp_path), rows, frozenset({"file:/d/a/2.png"}))
    assert [r["side"] for r in csv.DictReader(open(tmp_path / "split.csv", encoding="utf-8"))] == [
        "train", "validation", "test"]


def test_split_and_near_duplicate_csv_files(tmp_path):
    rows = [SplitRow("file:/d/a/00000001_000.png", "a", "00000001", False, 1),
            SplitRow("file:/d/b/x,y.png", "b", "b/x,y.png", True, -1)]
    assert reports.write_split_csv(str(tmp_path), rows) == "split.csv"
    table = list(csv.DictReader(open(tmp_path / "split.csv", encoding="utf-8")))
    assert table == [{"path": "file:/d/a/00000001_000.png", "class": "a", "group": "00000001", "side": "train", "fold": "1"},
                     {"path": "file:/d/b/x,y.png", "class": "b", "group": "b/x,y.png", "side": "test", "fold": "-1"}]
    pairs = [("file:/d/a/1.png", "file:/d/b/2.png", 0.99951234), ("file:/d/a/3.png", "file:/d/b/4.png", 1.0)]
    assert reports.write_near_duplicates_csv(str(tmp_path), pairs) == "near_duplicates.csv"
    listed = list(csv.DictReader(open(tmp_path / "near_duplicates.csv", encoding="utf-8")))
    assert [(r["train_path"], r["test_path"], float(r["similarity"])) for r in listed] == \
        [(a, b, round(sim, 6)) for a, b, sim in pairs]
    reports.write_near_duplicates_csv(str(tmp_path), [])
    assert (tmp_path / "near_duplicates.csv").read_text() == "train_path,test_path,similarity\n"


def _rows():
    b, _, _ = _binary()
    y3 = np.array([0, 1, 2, 2, 1, 0])
    p3 = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.0667
    mc = _metrics("ResNet50_multiclass_classification", ["Covid-19", "No_findings", "Pneumonia"], y3, p3.argmax(1), p3,
                  explanations=_explanations({"Covid-19": 0.81, "No_findings": 0.42, "Pneumonia": None}))
    cv = {"folds": 3, "accuracy": {"mean": 0.8, "std": 0.05, "min": 0.75, "max": 0.85}}
    grouped = {"split": {"group_pattern": r"^(\d{8})_", "groups": 646}, "near_duplicates": {"pairs": 3}}
    return [
        reports.summary_row(b["experiment"], {**b, "cross_validation": cv, **grouped}),
        reports.summary_row(mc["experiment"], {**mc, "split": {"group_pattern": None, "groups": 6},
                                               "near_duplicates": {"pairs": 0}}),
        {"experiment": "VGG16_binary_classification", "model": "VGG16", "task": "binary", "status": "failed",
         "recall": {}, "error": "weights for VGG16 unavailable offline"},
    ]


def _explanations(shares: dict) -> dict:
    """An ``explanations`` entry of metrics.json (xray.explain) with these border shares."""
    from xray.explain import border_warning

    per_class = {c: {"images": 4, "border_share": v, "peak_x": 0.5, "peak_y": 0.4} for c, v in shares.items()}
    return {"per_class": per_class, "border": 0.15, "border_area_share": 0.51, "sample_per_class": 16,
            "warning": border_warning(per_class, 0.7)}


def test_explanation_lines_and_warning():
    m, _, _ = _binary()
    lines = reports.format_result({**m, "explanations": _explanations({"Covid-19": 0.74, "No_findings": 0.5})}, "/r/x")
    lines = lines.splitlines()
    assert lines[4] == ("  evidence in the outer 15% of the image (share of positive map mass; even spread 0.51): "
                        "Covid-19 0.74, No_findings 0.50 (up to 16 test images per class)")
    assert lines[5].startswith("  WARNING: the evidence for Covid-19 sits mostly at the image border (Covid-19 74% ")
    assert "No_findings" not in lines[5]
    skipped = reports.format_result({**m, "explanations": {"skipped": "need pooling=avg"}}, "/r/x").splitlines()
    assert skipped[4] == "  class activation maps: none (need pooling=avg)"


def test_summary_table_markdown_and_csv():
    rows = _rows()
    table = list(csv.DictReader(io.StringIO(reports.summary_csv(rows))))
    assert [r["status"] for r in table] == ["ok", "ok", "failed"]
    assert float(table[0]["accuracy"]) == pytest.approx(5 / 7)
    assert float(table[0]["recall_Covid-19"]) == pytest.approx(2 / 3)
    assert table[0]["recall_Pneumonia"] == "" and table[1]["recall_Pneumonia"] != ""
    assert float(table[0]["cv_accuracy_mean"]) == 0.8 and table[1]["cv_folds"] == ""
    assert table[2]["error"] == "weights for VGG16 unavailable offline" and table[2]["accuracy"] == ""
    assert float(table[1]["border_share_Covid-19"]) == 0.81 and table[1]["border_share_Pneumonia"] == ""
    assert table[0]["border_share_Covid-19"] == ""  # no explanations in its metrics
    assert [(r["group_pattern"], r["groups"], r["near_duplicates"]) for r in table] == \
        [(r"^(\d{8})_", "646", "3"), ("", "6", "0"), ("", "", "")]

    md = reports.summary_markdown(rows)
    assert "| ResNet50_binary_classification | ResNet50 | binary | linear probe | 0.714 (" in md
    assert [r["method"] for r in table] == ["linear probe", "linear probe", ""]
    assert "0.800 ± 0.050 (3 folds)" in md
    assert "## Failed\n\n- VGG16_binary_classification: weights for VGG16 unavailable offline" in md
    assert "NOT transfer learning" in md
    assert "| border share Covid-19 | border share No_findings | border share Pneumonia |" in md
    assert re.search(r"\| ResNet50_multiclass_classification \|.*\| 0\.81 \| 0\.42 \|  \|", md)
    assert "- ResNet50_multiclass_classification: WARNING: the evidence for Covid-19 sits mostly" in md
    assert "| 7 | 646 (pattern) | 3 |" in md and "| 6 | 6 (per image) | 0 |" in md
    assert "- split groups: split.group_pattern `^(\\d{8})_` (each group on one side and in one fold): " \
           "ResNet50_binary_classification" in md
    assert "- split groups: one per image (no split.group_pattern): ResNet50_multiclass_classification" in md
    assert "near_duplicates.csv" in md


def test_failed_row_and_summary_files(tmp_path):
    rows = [*_rows()[:1], reports.failed_row("VGG19_binary_classification", "VGG19", "binary", "not run", None)]
    assert rows[1] == {"experiment": "VGG19_binary_classification", "model": "VGG19", "task": "binary",
                       "status": "not run", "recall": {}, "border_share": {}, "error": None}
    reports.write_summary(str(tmp_path), rows)
    assert sorted(os.listdir(tmp_path)) == ["summary.csv", "summary.md", "summary.png"]
    assert "## Not run\n\nThe sweep stopped before these: VGG19_binary_classification" in (tmp_path / "summary.md").read_text()
    table = list(csv.DictReader(open(tmp_path / "summary.csv", encoding="utf-8")))
    assert [(r["experiment"], r["status"]) for r in table] == [
        ("ResNet50_binary_classification", "ok"), ("VGG19_binary_classification", "not run")]
