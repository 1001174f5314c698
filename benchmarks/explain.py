"""Benchmark: explaining N images against featurizing and classifying the same N images.

    .venv/bin/python benchmarks/explain.py --model results/ResNet50_multiclass_classification \
        --images PATH/TO/covid19-xray --limit 200 [--repeat 2] [--json out.json]

With a model saved by ``wrapper.sh run`` (its folder, or its ``results/<experiment>`` folder) and
image files (raw, any size and mode; the first ``--limit`` by sorted path), in one local
SparkContext with the project's Spark settings from ``config.yaml``:

0. warm-up (untimed): ``predict`` on a few of the images, so the Python workers have started,
   imported TensorFlow and built the model before anything is timed;
1. **featurize**: the model's featurizer alone (``KerasImageFeaturizer``, forced with a ``noop``
   write) on the N images already normalised (decoded, resized, cached by Spark beforehand);
2. **predict**: what ``wrapper.sh predict`` does after loading: normalise the files, featurize,
   classify, collect (:func:`xray.predict.predict_images`);
3. **explain**: what ``wrapper.sh explain`` does after loading: normalise, featurize with the
   feature maps, classify, class maps, collect, and write a ``.cam.npy`` and a ``.cam.png`` per
   image (:func:`xray.explain.explain_images`), into a temporary folder removed afterwards.

``--repeat N`` alternates N runs of 1-3 and keeps each one's best. Prints seconds and images/s of
each and the ratios explain / predict and explain / featurize. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(ROOT, "code")
if CODE not in sys.path:
    sys.path.insert(0, CODE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from xray.atomic import write_json_atomic  # noqa: E402
from xray.config import load_config  # noqa: E402
from xray.errors import UserError  # noqa: E402
from xray.explain import explain_images, output_names  # noqa: E402
from xray.predict import open_saved_model, predict_images  # noqa: E402

WARM_UP_IMAGES = 4


def _args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="saved model folder (or its results/<experiment> folder)")
    parser.add_argument("--images", required=True, help="an image folder (searched recursively)")
    parser.add_argument("--limit", type=int, default=200, help="images used: the first N by sorted path")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--json", help="write every figure to this JSON file")
    return parser.parse_args(argv)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _featurize(saved) -> float:
    """The featurizer stage alone on the normalised images (cached before the clock starts)."""
    featurizer = next(s for s in saved.model.stages if type(s).__name__ == "KerasImageFeaturizer")
    with saved.normalized(saved.paths) as (good, _):
        good.count()  # normalise and cache now: not part of the featurization time
        seconds = _timed(lambda: featurizer.transform(good).write.format("noop").mode("overwrite").save())
    return seconds


def measure(args: argparse.Namespace) -> dict:
    config = load_config(os.path.join(ROOT, "config.yaml"))
    saved = open_saved_model(config, args.model, args.images, [f"spark.master={args.master}"], log=lambda *_: None)
    saved.paths = saved.paths[: args.limit]
    n = len(saved.paths)
    quiet = lambda *_: None  # noqa: E731
    predict = lambda paths: predict_images(saved.spark, saved.model, paths, size=saved.size, mode=saved.mode,  # noqa: E731
                                           max_pixels=saved.max_pixels, log=quiet)
    predict(saved.paths[:WARM_UP_IMAGES])
    runs: dict[str, list[float]] = {"featurize": [], "predict": [], "explain": []}
    names = output_names(saved.paths, args.images)
    for _ in range(max(1, args.repeat)):
        runs["featurize"].append(_featurize(saved))
        runs["predict"].append(_timed(lambda: predict(saved.paths)))
        out = tempfile.mkdtemp(prefix="explain-bench-")
        try:
            runs["explain"].append(_timed(lambda: explain_images(saved, names, out, None, args.images, quiet)))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    best = {k: min(v) for k, v in runs.items()}
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "settings": {"model": saved.model_dir, "images": n, "master": args.master, "repeat": args.repeat,
                     "image_size": saved.size, "mode": saved.mode},
        "all_runs_seconds": runs,
        "seconds": best,
        "images_per_s": {k: n / v if v > 0 else None for k, v in best.items()},
        "ratio_explain_to_predict": best["explain"] / best["predict"],
        "ratio_explain_to_featurize": best["explain"] / best["featurize"],
    }


def main(argv=None) -> int:
    args = _args(argv)
    try:
        report = measure(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = report["settings"]["images"]
    print(f"{n} images, {report['settings']['master']}, best of {args.repeat}")
    print(f"{'step':<10} {'seconds':>8} {'images/s':>9}")
    for step, seconds in report["seconds"].items():
        print(f"{step:<10} {seconds:>8.1f} {report['images_per_s'][step]:>9.2f}")
    print(f"explain / predict {report['ratio_explain_to_predict']:.2f}; "
          f"explain / featurize {report['ratio_explain_to_featurize']:.2f}")
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
