"""``wrapper.sh sweep [pattern]``: run the matching experiments and summarise them side by side.

Every matching experiment (``job: experiment`` entries; all ten by default) runs in this process
and its SparkSession: featurization one experiment after the other, in config order, each image
once per backbone; the fits and reports of up to :data:`HEAD_THREADS` experiments alongside. A
failing experiment is recorded with a one-line reason and the others still run. After each
experiment ``results/summary.md``, ``results/summary.csv`` and ``results/summary.png`` are
rewritten (atomically), so an interrupted sweep keeps what it finished. Exit code 0 when every
experiment succeeded, 1 otherwise.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import os
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from imagefeaturizer.backbones import WeightsError

from . import reports
from .config import Config, ConfigError, parse_set
from .errors import UserError, worker_error_message

SUMMARY_MD, SUMMARY_CSV = "summary.md", "summary.csv"
ERROR_LOG = "error.log"
DEFAULT_PATTERN = "*_classification"
HEAD_THREADS = 2  # experiments splitting, fitting and reporting at once (featurization: one at a time)


def matching(config: Config, pattern: str) -> list[str]:
    """Experiment names (``job: experiment``) matching the shell-style ``pattern``, config order."""
    default_job = config.defaults.get("job", "experiment")
    names = [n for n in config.names if config.entries[n].get("job", default_job) == "experiment"]
    found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not found:
        raise ConfigError(f"no experiment matches {pattern!r}: expected a pattern over {', '.join(names)}")
    return found


def _user_fixable(exc: BaseException) -> bool:
    return isinstance(exc, (UserError, WeightsError)) or worker_error_message(exc) is not None


def one_line(exc: BaseException) -> str:
    """The reason of a failure, as one line."""
    if isinstance(exc, (UserError, WeightsError)):
        return str(exc)
    message = worker_error_message(exc)
    if message:
        return message
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _auc(m: dict) -> float | None:
    roc = m.get("roc", {})
    return roc.get("auc") if roc.get("kind") == "binary" else roc.get("macro_auc")


def summary_row(name: str, m: dict) -> dict[str, Any]:
    """One summary row of a finished experiment's metrics."""
    cv = m.get("cross_validation") or {}
    supports = [v["support"] for v in m["per_class"].values()]
    return {
        "experiment": name,
        "model": m["model"],
        "task": m["task"],
        "status": "ok",
        "accuracy": m["accuracy"],
        "ci95_low": m["accuracy_ci95"][0],
        "ci95_high": m["accuracy_ci95"][1],
        "balanced_accuracy": m["balanced_accuracy"],
        "recall": {c: v["recall"] for c, v in m["per_class"].items()},
        "auc": _auc(m),
        "majority_baseline": max(supports) / sum(supports) if sum(supports) else None,
        "cv_folds": cv.get("folds"),
        "cv_accuracy_mean": (cv.get("accuracy") or {}).get("mean"),
        "cv_accuracy_std": (cv.get("accuracy") or {}).get("std"),
        "n_train": m["n_train"],
        "n_test": m["n_test"],
        "weights": m["weights"],
        "featurization_seconds": m["featurization_seconds"],
        "images_featurized": m["images_featurized"],
        "images_from_cache": m["images_from_cache"],
        "images_per_second": m["images_per_second"],
        "images_per_second_source": m["images_per_second_source"],
        "data_warning": m.get("data_warning"),
        "error": None,
    }


def failed_row(name: str, config: Config, status: str, reason: str | None) -> dict[str, Any]:
    entry = {**config.defaults, **config.entries[name]}
    return {"experiment": name, "model": entry.get("model"), "task": entry.get("task"), "status": status,
            "recall": {}, "error": reason}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_csv(rows: list[dict]) -> str:
    """A row per experiment; recall columns for the union of the classes."""
    classes = list(dict.fromkeys(c for r in rows for c in r.get("recall", {})))
    columns = ["experiment", "model", "task", "status", "accuracy", "ci95_low", "ci95_high", "balanced_accuracy",
               *(f"recall_{c}" for c in classes), "auc", "majority_baseline", "cv_folds", "cv_accuracy_mean",
               "cv_accuracy_std", "n_train", "n_test", "weights", "featurization_seconds", "images_featurized",
               "images_from_cache", "images_per_second", "images_per_second_source", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = {**r, **{f"recall_{c}": v for c, v in r.get("recall", {}).items()}}
        writer.writerow({k: ("" if flat.get(k) is None else flat.get(k)) for k in columns})
    return buf.getvalue()


def summary_markdown(rows: list[dict]) -> str:
    """The human summary: one table row per experiment, then failures and notes."""
    classes = list(dict.fromkeys(c for r in rows for c in r.get("recall", {})))
    head = ["experiment", "model", "task", "accuracy (95% CI)", *(f"recall {c}" for c in classes), "AUC",
            "cv accuracy", "test n", "featurization s", "images/s"]
    lines = ["# Sweep summary", "",
             "Test accuracy with its 95% Wilson interval on the held-out split; AUC is binary (positive class: the "
             "first class of the task) or the macro mean of one-vs-rest AUCs; cv accuracy is mean ± std over the "
             "folds of the training split when cv_folds > 1.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["experiment"], _fmt(r["model"]), _fmt(r["task"]), r["status"].upper()] + [""] * (len(head) - 4)
        else:
            cv = (f"{r['cv_accuracy_mean']:.3f} ± {r['cv_accuracy_std']:.3f} ({r['cv_folds']} folds)"
                  if r.get("cv_accuracy_mean") is not None else "")
            rate = r.get("images_per_second")
            cells = [r["experiment"], r["model"], r["task"],
                     f"{r['accuracy']:.3f} ({r['ci95_low']:.3f}-{r['ci95_high']:.3f})",
                     *(_fmt(r["recall"].get(c)) for c in classes), _fmt(r["auc"]), cv, str(r["n_test"]),
                     f"{r['featurization_seconds']:.1f}",
                     f"{rate:.1f}" + (" (cached)" if r["images_per_second_source"] == "cache" else "") if rate else ""]
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
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Per experiment: results/<experiment>/metrics.json, confusion_matrix.png, roc.png, "
              "learning_curve.png, config.json; chart of this table: summary.png.", ""]
    return "\n".join(lines)


def write_summary(results_root: str, rows: list[dict]) -> None:
    """summary.md, summary.csv and summary.png under ``results_root``, each atomically."""
    reports.write_text_atomic(os.path.join(results_root, SUMMARY_MD), summary_markdown(rows))
    reports.write_text_atomic(os.path.join(results_root, SUMMARY_CSV), summary_csv(rows))
    reports.summary_chart(rows, os.path.join(results_root, reports.SUMMARY_CHART))


def _results_root(config: Config, names: list[str], overrides: list[str]) -> str:
    for name in names:
        try:
            exp = config.experiment(name, overrides)
        except ConfigError:
            continue
        return exp.path(exp["results_dir"])
    return os.path.join(os.path.dirname(os.path.abspath(config.path)), config.defaults.get("results_dir", "results"))


def _feature_key(exp) -> tuple:
    """What makes two experiments' features the same: backbone, weights, pooling, images, cache."""
    ds = exp["dataset"]
    return (exp.model, exp["weights"], exp["pooling"], exp.resized_dir, ds["image_size"], ds["mode"],
            exp["max_image_pixels"], exp["handleInvalid"], exp.cache_dir)


def _later_classes(config: Config, names: list[str], overrides: list[str]) -> list[list[str]]:
    """Per experiment, the classes of later experiments with the same features: featurized in its pass.

    So the sweep makes one featurization pass per backbone over the union of its tasks' images;
    the later experiments read the feature cache.
    """
    keys = []
    for name in names:
        try:
            exp = config.experiment(name, overrides)
            keys.append((_feature_key(exp), list(exp.classes)))
        except Exception:  # noqa: BLE001 - a broken entry fails on its own turn, with its message
            keys.append((None, []))
    return [sorted({c for key, classes in keys[i + 1:] if key == keys[i][0] and key is not None for c in classes})
            for i in range(len(names))]


def run_sweep(config: Config, pattern: str = DEFAULT_PATTERN, overrides: list[str] | tuple[str, ...] = (),
              log: Callable[[str], object] = print) -> int:
    """Run every experiment matching ``pattern``; returns 0 if all succeeded, else 1.

    This thread prepares the experiments in config order (checks and featurization: one Spark
    job at a time over every core); each prepared experiment's split, fit, evaluation and reports
    run on one of :data:`HEAD_THREADS` threads meanwhile. Their small Spark jobs queue behind a
    running featurization job (Spark's FIFO scheduler) and take the cores it leaves idle.
    """
    from .cli import format_result
    from .experiment import fit_and_report, prepare_features

    overrides = list(overrides)
    for assignment in overrides:
        parse_set(assignment)  # a wrong --set fails once, before any experiment runs
    names = matching(config, pattern)
    root = _results_root(config, names, overrides)
    rows = [failed_row(n, config, "not run", None) for n in names]
    log(f"sweep: {len(names)} experiment(s): {', '.join(names)}")
    later = _later_classes(config, names, overrides)
    lock = threading.Lock()  # rows, the summary files and the log lines of a result

    def record(i: int, name: str, metrics: dict | None, exc: BaseException | None, results_dir: str | None) -> None:
        with lock:
            if exc is None:
                rows[i] = summary_row(name, metrics)
                stale_log = os.path.join(results_dir, ERROR_LOG)
                if os.path.exists(stale_log):
                    os.unlink(stale_log)
                log(format_result(metrics, results_dir))
            else:
                reason = one_line(exc)
                if not _user_fixable(exc):
                    path = os.path.join(root, name, ERROR_LOG)
                    reports.write_text_atomic(path, "".join(traceback.format_exception(exc)))
                    reason += f" (traceback in {path})"
                rows[i] = failed_row(name, config, "failed", reason)
                log(f"FAILED {name}: {reason}")
            write_summary(root, rows)

    def head(i: int, name: str, prepared) -> None:
        try:
            metrics = fit_and_report(prepared, log=lambda line: log(f"[{name}] {line}"))
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the other experiments
            record(i, name, None, exc, None)
        else:
            record(i, name, metrics, None, prepared.exp.results_dir)

    with ThreadPoolExecutor(max_workers=HEAD_THREADS, thread_name_prefix="xray-sweep") as pool:
        pending = []
        try:
            for i, name in enumerate(names):
                log(f"[{i + 1}/{len(names)}] {name}")
                try:
                    exp = config.experiment(name, overrides)
                    prepared = prepare_features(exp, log=log, also_classes=later[i])
                except Exception as exc:  # noqa: BLE001 - one failure must not lose the other experiments
                    record(i, name, None, exc, None)
                    continue
                pending.append(pool.submit(head, i, name, prepared))
        except BaseException:  # e.g. Ctrl-C: experiments not started yet are not started
            for future in pending:
                future.cancel()
            raise
    failed = [r["experiment"] for r in rows if r["status"] != "ok"]
    log(f"summary: {os.path.join(root, SUMMARY_MD)}, {os.path.join(root, SUMMARY_CSV)}, "
        f"{os.path.join(root, reports.SUMMARY_CHART)}")
    if failed:
        log(f"{len(failed)} of {len(names)} experiment(s) failed: {', '.join(failed)}")
        return 1
    return 0
