"""``wrapper.sh sweep [pattern]``: run the matching experiments and summarise them side by side.

Every matching experiment (``job: experiment`` entries; all ten by default) runs in this process
and its SparkSession: featurization one experiment after the other, in config order, each image
once per backbone; the fits and reports of up to :data:`HEAD_THREADS` experiments alongside. A
failing experiment is recorded with a one-line reason and the others still run. After each
experiment ``results/summary.md``, ``results/summary.csv`` and ``results/summary.png`` are
rewritten (atomically), so an interrupted sweep keeps what it finished. Experiments that train a
network (``train: finetune|scratch``) featurize nothing: each trains in its turn, on this thread.
Exit code 0 when every experiment succeeded, 1 otherwise.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from . import reports, tracking
from .atomic import write_text_atomic
from .config import Config, ConfigError, parse_set
from .errors import LOG_FOLDER, one_line, user_message
from .run import fit_and_report, prepare_features
from .session import interrupted
from .training import is_trained, run_training

ERROR_LOG = "{experiment}-error.log"  # in results/logs/: the traceback of an unexpected failure
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
            keys.append((None if is_trained(exp) else _feature_key(exp), list(exp.classes)))
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
    overrides = list(overrides)
    for assignment in overrides:
        parse_set(assignment)  # a wrong --set fails once, before any experiment runs
    names = matching(config, pattern)
    board = _Board(config, names, _results_root(config, names, overrides), log)
    log(f"sweep: {len(names)} experiment(s): {', '.join(names)}")
    with tracking.sweep_run(*_tracking_settings(config, names, overrides), pattern, names) as finish:  # MLflow parent run
        code = _run_all(config, names, overrides, board, log)
        finish(board.root, code == 0)
    return code


def _tracking_settings(config: Config, names: list[str], overrides: list[str]) -> tuple[dict, str]:
    """The settings (of the first experiment that builds) that say where the MLflow parent run goes."""
    for name in names:
        try:
            exp = config.experiment(name, overrides)
        except ConfigError:
            continue
        return exp.settings, exp.base_dir
    return {}, os.path.dirname(os.path.abspath(config.path))


def _run_all(config: Config, names: list[str], overrides: list[str], board: "_Board", log) -> int:
    later = _later_classes(config, names, overrides)
    with ThreadPoolExecutor(max_workers=HEAD_THREADS, thread_name_prefix="xray-sweep") as pool:
        pending = []
        try:
            for i, name in enumerate(names):
                log(f"[{i + 1}/{len(names)}] {name}")
                try:
                    exp = config.experiment(name, overrides)
                    if is_trained(exp):  # trains on every core, in this thread; fits queued so far go on
                        board.succeeded(i, run_training(exp, log=log), exp.results_dir)
                        continue
                    prepared = prepare_features(exp, log=log, also_classes=later[i])
                except Exception as exc:  # noqa: BLE001 - one failure must not lose the other experiments
                    if interrupted():
                        raise  # Ctrl-C: this error is the interruption's, not the experiment's
                    board.failed(i, exc)
                    continue
                pending.append((pool.submit(_fit_and_record, board, i, prepared), prepared))
        except BaseException:  # e.g. Ctrl-C: experiments not started yet are not started
            for future, prepared in pending:
                if future.cancel():
                    prepared.discard()  # its staging folder: results/<experiment> stays as it was
            raise
    return board.finish()


def _fit_and_record(board: "_Board", i: int, prepared) -> None:
    """On a fitting thread: the second half of one experiment, its result onto the board."""
    name = board.names[i]
    try:
        metrics = fit_and_report(prepared, log=lambda line: board.log(f"[{name}] {line}"))
    except Exception as exc:  # noqa: BLE001 - one failure must not lose the other experiments
        board.failed(i, exc)
    else:
        board.succeeded(i, metrics, prepared.exp.results_dir)


class _Board:
    """The sweep's rows, rewritten to the summary files after each result (from any thread)."""

    def __init__(self, config: Config, names: list[str], root: str, log: Callable[[str], object]) -> None:
        self.names, self.root, self.log = names, root, log
        self.entries = [{**config.defaults, **config.entries[n]} for n in names]
        self.rows = [self._failed_row(i, "not run", None) for i in range(len(names))]
        self._lock = threading.Lock()  # rows, the summary files and the log lines of a result

    def _failed_row(self, i: int, status: str, reason: str | None) -> dict[str, Any]:
        entry = self.entries[i]
        return reports.failed_row(self.names[i], entry.get("model"), entry.get("task"), status, reason)

    def succeeded(self, i: int, metrics: dict, results_dir: str) -> None:
        with self._lock:
            self.rows[i] = reports.summary_row(self.names[i], metrics)
            stale_log = self._error_log(i)
            if os.path.exists(stale_log):
                os.unlink(stale_log)
            self.log(reports.format_result(metrics, results_dir))
            reports.write_summary(self.root, self.rows)

    def failed(self, i: int, exc: BaseException) -> None:
        if interrupted():
            return  # Ctrl-C stopped Spark under it: not the experiment's failure, its row stays "not run"
        name = self.names[i]
        with self._lock:
            reason = one_line(exc)
            if user_message(exc) is None:
                path = self._error_log(i)
                write_text_atomic(path, "".join(traceback.format_exception(exc)))
                reason += f" (traceback in {path})"
            self.rows[i] = self._failed_row(i, "failed", reason)
            self.log(f"FAILED {name}: {reason}")
            reports.write_summary(self.root, self.rows)

    def _error_log(self, i: int) -> str:
        """Outside the experiment's results folder, which holds one whole run (or nothing)."""
        return os.path.join(self.root, LOG_FOLDER, ERROR_LOG.format(experiment=self.names[i]))

    def finish(self) -> int:
        """The closing lines; 0 when every experiment succeeded, else 1."""
        failed = [r["experiment"] for r in self.rows if r["status"] != "ok"]
        self.log(f"summary: {os.path.join(self.root, reports.SUMMARY_MD)}, "
                 f"{os.path.join(self.root, reports.SUMMARY_CSV)}, {os.path.join(self.root, reports.SUMMARY_CHART)}")
        if failed:
            self.log(f"{len(failed)} of {len(self.names)} experiment(s) failed: {', '.join(failed)}")
            return 1
        return 0
