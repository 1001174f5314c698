"""Command line: ``python -m xray <command>`` (``wrapper.sh`` sets up the environment and calls it).

Every error a user can fix prints one line on stderr (``error: ...``) and exits non-zero; no
Python traceback reaches the terminal for those.
"""

from __future__ import annotations

import argparse
import sys

from .config import load_config
from .errors import UserError, worker_error_message

DEFAULT_CONFIG = "config.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wrapper.sh",
        description="Transfer-learning experiments on chest X-rays with Spark ML and Keras backbones.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: config.yaml)")
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

    cluster = sub.add_parser("cluster", help="start or stop a local Spark standalone cluster")
    cluster.add_argument("action", choices=["start", "stop", "status"])
    cluster.add_argument("--workers", type=int, default=2)
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
    from .download import run_download
    from .reports import format_result
    from .resize import run_resize
    from .run import run_experiment
    from .training import is_trained, run_training

    exp = load_config(args.config).experiment(args.experiment, args.overrides)
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


def cmd_cluster(args) -> int:
    from .cluster import run_cluster

    return run_cluster(args.action, args.workers)


COMMANDS = {"list": cmd_list, "run": cmd_run, "sweep": cmd_sweep, "predict": cmd_predict, "cluster": cmd_cluster}


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once, also in logs
    try:
        args = _quiet_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - turn known errors from Spark workers into one line
        from imagefeaturizer.backbones import WeightsError

        if isinstance(exc, WeightsError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        message = worker_error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
