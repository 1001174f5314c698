"""What experiments and sweeps report besides the model: the files and lines people read.

Per experiment: the charts (:mod:`xray.charts`), ``config.json`` (the settings the model was
trained with; ``predict`` reads it), ``split.csv`` and ``near_duplicates.csv`` and the result
lines printed at the end; every writer takes the folder to write into. Per sweep:
``summary.md``, ``summary.csv`` and ``summary.png``, one row per experiment. Every file is
written atomically.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import numpy as np

from .atomic import write_json_atomic, write_text_atomic
from .charts import confusion_matrix_chart, learning_curve_chart, roc_chart, summary_chart
from .evaluation import auc

CONFUSION_MATRIX, ROC, LEARNING_CURVE, CONFIG = "confusion_matrix.png", "roc.png", "learning_curve.png", "config.json"
SPLIT_CSV, NEAR_DUPLICATES_CSV = "split.csv", "near_duplicates.csv"
SUMMARY_MD, SUMMARY_CSV, SUMMARY_CHART = "summary.md", "summary.csv", "summary.png"
PROBES = ("linear probe", "tuned probe")  # methods that featurize (the others train a network)


# --------------------------------------------------------------------------- one experiment


def write_experiment_reports(results_dir: str, m: dict, y_true: np.ndarray, probability: np.ndarray) -> dict[str, str]:
    """Charts and the config snapshot of one experiment; returns {what: file name}."""
    confusion_matrix_chart(m, os.path.join(results_dir, CONFUSION_MATRIX))
    roc_chart(m, y_true, probability, os.path.join(results_dir, ROC))
    learning_curve_chart(m, os.path.join(results_dir, LEARNING_CURVE))
    snapshot = {"experiment": m["experiment"], "classes": m["classes"], "settings": m.get("config", {})}
    write_json_atomic(os.path.join(results_dir, CONFIG), snapshot)
    return {"confusion_matrix": CONFUSION_MATRIX, "roc": ROC, "learning_curve": LEARNING_CURVE, "config": CONFIG}


def _csv_text(columns: list[str], rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def write_split_csv(folder: str, rows, validation: frozenset[str] = frozenset()) -> str:
    """``split.csv`` in ``folder``: path, class, group, side (train/test; ``validation`` for the
    training rows of a trained network that only validate) and cross-validation fold (-1 on test
    rows) of every image (:class:`xray.split.SplitRow`); returns the file name."""
    write_text_atomic(os.path.join(folder, SPLIT_CSV), _csv_text(
        ["path", "class", "group", "side", "fold"],
        ((r.path, r.label, r.group, "validation" if r.path in validation else r.side, r.fold) for r in rows)))
    return SPLIT_CSV


def write_near_duplicates_csv(folder: str, pairs: list[tuple[str, str, float]]) -> str:
    """``near_duplicates.csv`` in ``folder``: (train path, test path, similarity), one pair a row,
    most similar first (a header only when there are none); returns the file name."""
    write_text_atomic(os.path.join(folder, NEAR_DUPLICATES_CSV), _csv_text(
        ["train_path", "test_path", "similarity"], ((a, b, f"{sim:.6f}") for a, b, sim in pairs)))
    return NEAR_DUPLICATES_CSV


def format_result(m: dict, results_dir: str) -> str:
    """What a finished experiment prints: accuracy, recall per class, featurization, where the files are."""
    lo, hi = m["accuracy_ci95"]
    lines = [
        f"{m['experiment']}: accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {m['n_test']} test images"
        f" ({m['n_train']} train), weights={m['weights']}"
        + ("" if m["transfer_learning"] else " [trained from scratch: NOT transfer learning]"
           if m.get("method") == "scratch" else " [random weights: NOT transfer learning]"),
    ]
    for cls, v in m["per_class"].items():
        lines.append(f"  recall {cls}: {v['recall']:.3f} (precision {v['precision']:.3f}, support {v['support']})")
    rate = m.get("images_per_second")
    if m.get("training"):
        lines.append(training_line(m))
    else:
        lines.append(
            f"  featurization: {m['images_featurized']} images in {m['featurization_seconds']:.1f} s"
            + (f", {rate:.1f} images/s ({m['images_per_second_source']})" if rate else "")
            + f"; {m['images_from_cache']} from cache"
        )
    if m.get("tuning"):
        t = m["tuning"]
        lines.append(f"  tuned head: chose {t['chosen']} by {t['metric']} (mean {t['chosen_mean']:.4f} ± "
                     f"{t['chosen_std']:.4f}) of {len(t['candidates'])} candidates x {t['folds']} folds in "
                     f"{t['seconds']:.1f} s")
    cv = m.get("cross_validation")
    if cv:
        acc = cv["accuracy"]
        lines.append(f"  cross-validation ({cv['folds']} folds of the training split): accuracy {acc['mean']:.3f}"
                     f" ± {acc['std']:.3f} (min {acc['min']:.3f}, max {acc['max']:.3f})")
    lines += _explanation_lines(m.get("explanations") or {}) + _split_lines(m)
    lines.append(f"  results: {os.path.join(results_dir, 'metrics.json')}, model: {os.path.join(results_dir, 'model')}")
    if m.get("reports"):
        lines.append(f"  charts: {', '.join(os.path.join(results_dir, f) for f in m['reports'].values() if f.endswith('.png'))}")
    return "\n".join(lines)


def _split_lines(m: dict) -> list[str]:
    """The split's groups and the near-duplicate train-test pairs (n/a for a trained network)."""
    split, near, lines = m.get("split") or {}, m.get("near_duplicates"), []
    if "groups" in split:
        how = "by split.group_pattern" if split.get("group_pattern") else "one per image"
        lines.append(f"  split: {split['groups']} groups ({how}), {split['groups_train']} train, {split['groups_test']} "
                     f"test; {split['mixed_class_groups']} with more than one class")
    if near is not None and near.get("pairs") is None:
        lines.append(f"  near-duplicate train-test pairs: n/a ({near['reason']})")
    elif near is not None:
        lines.append(f"  near-duplicate train-test pairs (standardised-feature cosine >= {near['threshold']}): {near['pairs']}")
    return lines


def training_line(m: dict) -> str:
    """The line of a trained network: what was trained, the chosen epoch, the speed."""
    t = m["training"]
    chosen = next(e for e in t["epochs"] if e["epoch"] == t["chosen_epoch"])
    return (f"  training ({m['method']}): {t['n_fit']} images, {len(t['epochs'])} epoch(s) in {len(t['stages'])} "
            f"stage(s), chosen epoch {t['chosen_epoch']} (validation loss {chosen['val_loss']:.4f}, accuracy "
            f"{chosen['val_accuracy']:.3f} on {t['n_validation']} images), {t['images_per_second']} images/s")


def _explanation_lines(e: dict) -> list[str]:
    """Where the evidence of each class lies (class activation maps), or why there are no maps."""
    if "skipped" in e:
        return [f"  class activation maps: none ({e['skipped']})"]
    if not e.get("per_class"):
        return []
    shares = ", ".join(f"{c} {v['border_share']:.2f}" for c, v in e["per_class"].items() if v["border_share"] is not None)
    lines = [f"  evidence in the outer {e['border']:.0%} of the image (share of positive map mass; even spread "
             f"{e['border_area_share']:.2f}): {shares} (up to {e['sample_per_class']} test images per class)"]
    return lines + ([f"  {e['warning']}"] if e.get("warning") else [])


# --------------------------------------------------------------------------- a sweep


def summary_row(name: str, m: dict) -> dict[str, Any]:
    """One summary row of a finished experiment's metrics."""
    cv = m.get("cross_validation") or {}
    split = m.get("split") or {}
    supports = [v["support"] for v in m["per_class"].values()]
    return {
        "experiment": name,
        "model": m["model"],
        "task": m["task"],
        "method": m.get("method", "linear probe"),
        "status": "ok",
        "accuracy": m["accuracy"],
        "ci95_low": m["accuracy_ci95"][0],
        "ci95_high": m["accuracy_ci95"][1],
        "balanced_accuracy": m["balanced_accuracy"],
        "recall": {c: v["recall"] for c, v in m["per_class"].items()},
        "border_share": {c: v["border_share"] for c, v in ((m.get("explanations") or {}).get("per_class") or {}).items()},
        "auc": auc(m),
        "majority_baseline": max(supports) / sum(supports) if sum(supports) else None,
        "cv_folds": cv.get("folds"),
        "cv_accuracy_mean": (cv.get("accuracy") or {}).get("mean"),
        "cv_accuracy_std": (cv.get("accuracy") or {}).get("std"),
        "n_train": m["n_train"],
        "n_test": m["n_test"],
        "group_pattern": split.get("group_pattern"),
        "groups": split.get("groups"),
        "near_duplicates": (m.get("near_duplicates") or {}).get("pairs"),
        "weights": m["weights"],
        "featurization_seconds": m["featurization_seconds"],
        "images_featurized": m["images_featurized"],
        "images_from_cache": m["images_from_cache"],
        "images_per_second": m["images_per_second"],
        "images_per_second_source": m["images_per_second_source"],
        "data_warning": m.get("data_warning"),
        "explanations_warning": (m.get("explanations") or {}).get("warning"),
        "error": None,
    }


def failed_row(name: str, model: str | None, task: str | None, status: str, reason: str | None) -> dict[str, Any]:
    """The summary row of an experiment that failed (or has not run yet)."""
    return {"experiment": name, "model": model, "task": task, "status": status, "recall": {}, "border_share": {},
            "error": reason}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_csv(rows: list[dict]) -> str:
    """A row per experiment; recall columns for the union of the classes."""
    classes = list(dict.fromkeys(c for r in rows for c in r.get("recall", {})))
    columns = ["experiment", "model", "task", "method", "status", "accuracy", "ci95_low", "ci95_high", "balanced_accuracy",
               *(f"recall_{c}" for c in classes), "auc", "majority_baseline", "cv_folds", "cv_accuracy_mean",
               "cv_accuracy_std", "n_train", "n_test", "group_pattern", "groups", "near_duplicates", "weights",
               "featurization_seconds", "images_featurized", "images_from_cache", "images_per_second",
               "images_per_second_source",
               *(f"border_share_{c}" for c in classes), "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = {**r, **{f"recall_{c}": v for c, v in r.get("recall", {}).items()},
                **{f"border_share_{c}": v for c, v in (r.get("border_share") or {}).items()}}
        writer.writerow({k: ("" if flat.get(k) is None else flat.get(k)) for k in columns})
    return buf.getvalue()


def summary_markdown(rows: list[dict]) -> str:
    """The human summary: one table row per experiment, then failures and notes."""
    classes = list(dict.fromkeys(c for r in rows for c in r.get("recall", {})))
    head = ["experiment", "model", "task", "method", "accuracy (95% CI)", *(f"recall {c}" for c in classes), "AUC",
            "cv accuracy", "test n", "groups", "near-dups", "featurization s", "images/s",
            *(f"border share {c}" for c in classes)]
    lines = ["# Sweep summary", "",
             "Test accuracy with its 95% Wilson interval on the held-out split; AUC is binary (positive class: the "
             "first class of the task) or the macro mean of one-vs-rest AUCs; cv accuracy is mean ± std over the "
             "folds of the training split when cv_folds > 1; groups: the split's groups (each on one side); near-dups: "
             "train-test pairs of near-duplicate images (n/a: a trained network has no features to compare). Method: "
             "linear probe (frozen backbone + LogisticRegression), tuned probe (its settings chosen by "
             "cross-validation on the training split), fine-tune (the backbone trained with a new head), scratch "
             "(SmallCNN); trained networks featurize nothing (their training speed is in metrics.json). Border "
             "share: of each class's class activation map, the share of positive mass in the outer 15% of the image "
             "(mean over a sample of test images of the class; evenly spread evidence gives 0.51; high values point "
             "to a shortcut at the image border; linear probes only).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["experiment"], _fmt(r["model"]), _fmt(r["task"]), _fmt(r.get("method")),
                     r["status"].upper()] + [""] * (len(head) - 5)
        else:
            cv = (f"{r['cv_accuracy_mean']:.3f} ± {r['cv_accuracy_std']:.3f} ({r['cv_folds']} folds)"
                  if r.get("cv_accuracy_mean") is not None else "")
            rate = r.get("images_per_second")
            cells = [r["experiment"], r["model"], r["task"], _fmt(r.get("method")),
                     f"{r['accuracy']:.3f} ({r['ci95_low']:.3f}-{r['ci95_high']:.3f})",
                     *(_fmt(r["recall"].get(c)) for c in classes), _fmt(r["auc"]), cv, str(r["n_test"]),
                     _groups_cell(r), _near_cell(r),
                     f"{r['featurization_seconds']:.1f}" if r.get("method") in PROBES else "",
                     f"{rate:.1f}" + (" (cached)" if r["images_per_second_source"] == "cache" else "") if rate else "",
                     *(_fmt((r.get("border_share") or {}).get(c), 2) for c in classes)]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    pending = [r for r in rows if r["status"] == "not run"]
    if failed:
        lines += ["", "## Failed", ""] + [f"- {r['experiment']}: {r['error']}" for r in failed]
    if pending:
        lines += ["", "## Not run", "", "The sweep stopped before these: " + ", ".join(r["experiment"] for r in pending)]
    notes = []
    if any(r.get("weights") == "random" for r in rows):
        notes.append("weights=random: features come from untrained backbones; this is NOT transfer learning.")
    for warning in dict.fromkeys(r["data_warning"] for r in rows if r.get("data_warning")):
        notes.append(warning)
    notes += [f"{r['experiment']}: {r['explanations_warning']}" for r in rows if r.get("explanations_warning")]
    notes += _split_notes(rows)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Per experiment: results/<experiment>/metrics.json, confusion_matrix.png, roc.png, "
              "learning_curve.png, cam_gallery.png, config.json, split.csv, near_duplicates.csv; chart of this table: summary.png.", ""]
    return "\n".join(lines)


def _near_cell(r: dict) -> str:
    """Near-duplicate pairs, or n/a for a trained network (no features to compare)."""
    if r.get("method") not in PROBES:
        return "n/a"
    return _fmt(r.get("near_duplicates"))


def _groups_cell(r: dict) -> str:
    """The split's groups: their number, and whether split.group_pattern made them."""
    if r.get("groups") is None:
        return ""
    return f"{r['groups']}" + (" (pattern)" if r.get("group_pattern") else " (per image)")


def _split_notes(rows: list[dict]) -> list[str]:
    """The group setting of the experiments, and a word on near-duplicates."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("groups") is not None]
    notes = []
    for pattern in dict.fromkeys(r.get("group_pattern") for r in ok):
        names = ", ".join(r["experiment"] for r in ok if r.get("group_pattern") == pattern)
        notes.append(f"split groups: split.group_pattern `{pattern}` (each group on one side and in one fold): {names}"
                     if pattern else f"split groups: one per image (no split.group_pattern): {names}")
    if any(r.get("near_duplicates") for r in ok):
        notes.append("near-dups: train-test pairs of images with almost the same features (listed in "
                     "results/<experiment>/near_duplicates.csv): test accuracy may count images seen in training.")
    return notes


def write_summary(results_root: str, rows: list[dict]) -> None:
    """summary.md, summary.csv and summary.png under ``results_root``, each atomically."""
    write_text_atomic(os.path.join(results_root, SUMMARY_MD), summary_markdown(rows))
    write_text_atomic(os.path.join(results_root, SUMMARY_CSV), summary_csv(rows))
    summary_chart(rows, os.path.join(results_root, SUMMARY_CHART))
