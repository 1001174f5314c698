"""Command line: ``python -m xray [--config FILE] <command>`` (``wrapper.sh`` sets up the environment and calls it).

Every failure prints one line on stderr (``error: ...``) and exits non-zero: 2 for what the user
can fix (also when raised inside a Spark worker), 1 for anything else, 130 after Ctrl-C. No
traceback reaches the terminal: the commands that start Spark write a log file
(``<results_dir>/logs/<command>-<time>-<pid>.log``: the JVM's output, the Python workers' stderr,
the traceback of an unexpected error), and the error line names it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import traceback

from imagefeaturizer.backbones import WeightsError
from imagefeaturizer.engines import EngineError

from . import session
from .config import load_config, parse_set
from .errors import LOG_FOLDER, UserError, one_line, user_message

DEFAULT_CONFIG = "config.yaml"
KEEP_LOGS = 20  # the newest log files kept; older ones go when a new one starts
_LOG_NAME = re.compile(r"^[a-z]+-\d{8}-\d{6}-\d+\.log$")  # <command>-<date>-<time>-<pid>.log
CALLER_CWD = "XRAY_CALLER_CWD"  # set by wrapper.sh: the folder it was called from
CONFIG_ENV = "XRAY_CONFIG"  # the config file when --config is not given (wrapper.sh's --config sets it)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wrapper.sh",
        description="Transfer-learning experiments on chest X-rays with Spark ML and Keras backbones.",
    )
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG,
                        help="config file (default: config.yaml, or $XRAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    sub.add_parser("list", help="list the experiments, one a line")

    run = sub.add_parser("run", help="run one named experiment (or job) from the config")
    run.add_argument("experiment")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key for this run (repeatable), e.g. --set weights=random")

    sweep = sub.add_parser("sweep", help="run the matching experiments and write results/summary.*")
    sweep.add_argument("pattern", nargs="?", default="*_classification",
                       help="shell-style pattern of experiment names (default: all ten)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    predict = sub.add_parser("predict", help="classify new images with a saved model")
    predict.add_argument("model", help="experiment name (uses results/<experiment>/model) or a saved model folder")
    predict.add_argument("images", help="an image file or a folder of images")
    predict.add_argument("--output", help="CSV to write (default: predictions.csv beside the model)")
    predict.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ui = sub.add_parser("mlflow-ui", help="open the MLflow UI on the tracking store (tracking.uri)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    explain = sub.add_parser("explain", help="class activation maps of new images with a saved model")
    explain.add_argument("model", help="experiment name (uses results/<experiment>/model) or a saved model folder")
    explain.add_argument("images", help="an image file or a folder of images")
    explain.add_argument("--output", help="folder to write into (default: explanations/ beside the model)")
    explain.add_argument("--class", dest="class_name", metavar="NAME",
                         help="show this class's map (default: each image's predicted class)")
    explain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    cluster = sub.add_parser("cluster", help="start or stop a local Spark standalone cluster")
    cluster.add_argument("action", choices=["start", "stop", "status"])
    cluster.add_argument("--workers", type=int, default=2)
    for command in sub.choices.values():  # --config also after the command, for every command
        command.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: config.yaml)")
    return parser


class _ArgumentError(UserError):
    pass


def _quiet_parser() -> argparse.ArgumentParser:
    parser = _parser()

    def fail(message):
        parser.print_usage(sys.stderr)
        raise _ArgumentError(message)

    parser.error = fail  # type: ignore[method-assign]
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no public hook
        for sub in action.choices.values():
            sub.error = fail  # type: ignore[method-assign]
    return parser


def cmd_list(args) -> int:
    for name in load_config(args.config).names:
        print(name)
    return 0


def cmd_run(args) -> int:
    exp = load_config(args.config).experiment(args.experiment, args.overrides)  # its errors before Spark's imports

    from .download import run_download
    from .reports import format_result
    from .resize import run_resize
    from .run import run_experiment
    from .training import is_trained, run_training

    if exp.job == "resize":
        run_resize(exp)
        return 0
    if exp.job == "download":
        run_download(exp)
        return 0
    metrics = run_training(exp) if is_trained(exp) else run_experiment(exp)
    print(format_result(metrics, exp.results_dir))
    return 0


def cmd_sweep(args) -> int:
    from .sweep import run_sweep

    return run_sweep(load_config(args.config), args.pattern, args.overrides)


def cmd_predict(args) -> int:
    from .predict import run_predict

    return run_predict(load_config(args.config), args.model, args.images, args.output, args.overrides)


def cmd_mlflow_ui(args) -> int:
    from .tracking import run_ui

    config = load_config(args.config)
    exp = config.experiment(config.names[0], args.overrides)  # tracking.* lives in the defaults
    return run_ui(exp.settings, exp.base_dir, args.port)


def cmd_explain(args) -> int:
    from .explain import run_explain

    return run_explain(load_config(args.config), args.model, args.images, args.output, args.class_name, args.overrides)


def cmd_cluster(args) -> int:
    from .cluster import run_cluster

    return run_cluster(args.action, args.workers)


COMMANDS = {"list": cmd_list, "run": cmd_run, "sweep": cmd_sweep, "predict": cmd_predict, "explain": cmd_explain,
            "cluster": cmd_cluster, "mlflow-ui": cmd_mlflow_ui}


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once, also in logs
    with session.interrupts_stop_spark():
        try:
            return _main(argv)
        except KeyboardInterrupt:  # a second Ctrl-C while the first one is reported
            return 130


def _main(argv: list[str] | None) -> int:
    log = None
    try:
        args = _quiet_parser().parse_args(argv)
        args.config = _caller_path(args.config)
        log = _start_log(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return _interrupted(log)
    except Exception as exc:  # noqa: BLE001 - one line on the terminal, the details in the log
        if session.interrupted():  # an error while Ctrl-C stopped Spark is the interruption's
            return _interrupted(log)
        if isinstance(exc, (UserError, WeightsError, EngineError)):  # found here, before or without Spark: no details
            print(f"error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)
        return _failed(exc, log)
    finally:
        _stop_log(log)


def _caller_path(path: str) -> str:
    """``--config`` relative to the folder wrapper.sh was called from (it runs from the project's)."""
    caller = os.environ.get(CALLER_CWD)
    if path == DEFAULT_CONFIG or os.path.isabs(path) or not caller:
        return path
    return os.path.join(caller, path)


def _interrupted(log: str | None) -> int:
    where = f"; log: {log}" if log and os.path.exists(log) else ""
    print(f"error: interrupted: Spark jobs cancelled and the session stopped; what was finished is kept "
          f"(feature cache, resized images, earlier results): run the same command again to continue{where}",
          file=sys.stderr)
    return 130


def _failed(exc: Exception, log: str | None) -> int:
    """One line for any other error; its traceback goes to the log (to the terminal without one)."""
    if log is None:
        raise exc
    try:
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n{time.strftime('%Y-%m-%d %H:%M:%S')} error:\n{''.join(traceback.format_exception(exc))}")
    except OSError as write_error:
        raise exc from write_error  # no log to point at: the traceback is the only record
    message = user_message(exc)
    if message is not None:  # a known error raised inside a Spark worker
        print(f"error: {message} (details: {log})", file=sys.stderr)
        return 2
    print(f"error: {one_line(exc)} (traceback: {log})", file=sys.stderr)
    return 1


def _start_log(args) -> str | None:
    """The log file of a command that may start Spark (those with --set), in ``<results_dir>/logs``;
    Python's logging (Py4J's included) goes there too. Created on first write."""
    if not hasattr(args, "overrides"):
        return None
    config = load_config(args.config)
    results = config.defaults.get("results_dir", "results")
    for assignment in args.overrides:
        key, value = parse_set(assignment)
        results = str(value) if key == ["results_dir"] else results
    folder = os.path.join(os.path.dirname(os.path.abspath(config.path)), os.path.expanduser(results), LOG_FOLDER)
    _prune_logs(folder)
    path = os.path.join(folder, f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    handler = _LogFileHandler(path, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)  # before any library's logging.basicConfig: no stderr handler
    logging.captureWarnings(True)  # Python warnings too (PySpark warns with the Java stack trace)
    session.log_to(path)
    return path


class _LogFileHandler(logging.FileHandler):
    """A FileHandler that makes the log's folder on its first record (no empty logs/ otherwise)."""

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


def _prune_logs(folder: str) -> None:
    """Keep the newest :data:`KEEP_LOGS` command logs (and any written in the last hour); other
    files there (a sweep's ``<experiment>-error.log``) stay."""
    try:
        logs = sorted((os.path.join(folder, n) for n in os.listdir(folder) if _LOG_NAME.match(n)),
                      key=os.path.getmtime, reverse=True)
    except OSError:
        return
    for path in logs[KEEP_LOGS:]:
        try:
            if time.time() - os.path.getmtime(path) > 3600:
                os.unlink(path)
        except OSError:
            pass


def _stop_log(log: str | None) -> None:
    if log is None:
        return
    session.log_to(None)
    logging.captureWarnings(False)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename == log]:
        root.removeHandler(handler)
        handler.close()


if __name__ == "__main__":
    raise SystemExit(main())
