"""Benchmark: the inference engines, single-process and in the Spark featurizer, against plain Keras.

    .venv/bin/python benchmarks/engines.py --data PATH/TO/covid19-xray [--models ResNet50,VGG16] [--images 256]
    .venv/bin/python benchmarks/engines.py --data PATH/TO/covid19-xray --app-run ResNet50_multiclass_classification

Per backbone, on the same images, each side in a fresh process of its own (``--sides``):

- ``keras``: plain Keras as a careful user writes it: import TensorFlow, build the backbone with
  Keras' own constructor (``pooling="avg"``), one ``tf.function`` with a free batch dimension,
  the backbone's ``preprocess_input``, and decoding overlapped with the model by a thread that
  reads, decodes and resizes the next batches (the project's decoder); TensorFlow's default threads.
- ``openvino``: the same loop with the OpenVINO engine (the exported model, every core, no
  TensorFlow in the process).
- ``spark-tensorflow``, ``spark-openvino``: ``KerasImageFeaturizer`` with that engine over
  ``binaryFile`` in a new local-mode application on every core (``--master``), the project's
  Spark settings, forced by a ``noop`` write.

Every process runs two passes over the images. **cold**: from the parent's spawning the process to
the end of the first pass: interpreter start, imports, model build or load, for Spark the JVM and
the Python workers, and every image. **warm**: the second pass alone (everything loaded and
running). Exports (``openvino``) are made before any timing, into the model cache, and reported
separately. ``--rounds`` (3) runs every side once per round, alternating (A B C D A B C D ...);
the figures are min / median / max over the rounds, ratios from medians. ``--app-run EXPERIMENT``
runs the app itself instead (``python -m xray run``, default settings, an empty feature cache)
and sets its ``images_per_second`` (from its metrics.json) against plain Keras cold on the same
resized images. Targets (issue 14), printed beside the ratios: the featurizer with the default
engine at least 1.3x plain Keras cold for ResNet50, Xception and InceptionV3, at least 1.0x for
VGG16/VGG19, and at least 0.9x the fastest single-process engine. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# featurize puts code/ on sys.path (and quiets TensorFlow's C++ log) when imported.
from featurize import CODE, ROOT, BenchmarkError, _glob_escape, _table, list_images, spark_settings  # noqa: E402
from imagefeaturizer import backbones  # noqa: E402
from imagefeaturizer.images import InvalidImageError, decode_to_pil, resize_pil  # noqa: E402

SIDES = ("keras", "openvino", "spark-tensorflow", "spark-openvino")
TARGET_KERAS = {"ResNet50": 1.3, "Xception": 1.3, "InceptionV3": 1.3, "VGG16": 1.0, "VGG19": 1.0}
TARGET_FASTEST = 0.9
DEFAULT_MODEL_CACHE = os.path.join(ROOT, "cache", "models")


# --------------------------------------------------------------------------- inside a side's process


def prefetched_batches(paths: list[str], size: int, batch_size: int, depth: int = 2) -> Iterator[np.ndarray]:
    """uint8 batches (n, size, size, 3), read, decoded and resized by a thread while the model runs."""
    ready: queue.Queue = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for first in range(0, len(paths), batch_size):
                arrays = []
                for path in paths[first : first + batch_size]:
                    with open(path, "rb") as f:
                        image = resize_pil(decode_to_pil(f.read(), origin=path), (size, size))
                    arrays.append(np.asarray(image, dtype=np.uint8))
                ready.put(np.stack(arrays))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(exc)
            return
        ready.put(None)

    threading.Thread(target=produce, name="decode", daemon=True).start()
    while (item := ready.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def _two_passes(run_pass, images: int) -> dict[str, Any]:
    """Run ``run_pass`` (returns images done) twice: the end of the first (wall clock) and the second's seconds."""
    done = run_pass()
    first_end = time.time()
    start = time.perf_counter()
    again = run_pass()
    warm = time.perf_counter() - start
    if done != images or again != images:
        raise BenchmarkError(f"a pass featurized {done} and {again} of {images} images")
    return {"images": done, "first_pass_end": first_end, "warm_seconds": warm}


def side_keras(model_name: str, weights: str, batch_size: int, paths: list[str], **_: Any) -> dict[str, Any]:
    import tensorflow as tf

    backbone = backbones.get_backbone(model_name)
    model = backbones.build_model(backbone, backbones.resolve_weights(backbone, weights), "avg")
    size = backbone.input_size
    spec = [tf.TensorSpec((None, size, size, 3), tf.float32)]
    predict = tf.function(lambda x: model(x, training=False), input_signature=spec, autograph=False)
    ready = time.time()

    def run_pass() -> int:
        done = 0
        for batch in prefetched_batches(paths, size, batch_size):
            done += predict(backbone.preprocess_input(batch.astype(np.float32))).numpy().shape[0]
        return done

    return {**_two_passes(run_pass, len(paths)), "model_ready": ready,
            "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU"}


def side_engine(model_name: str, batch_size: int, paths: list[str], engine: str, source: str,
                **_: Any) -> dict[str, Any]:
    from imagefeaturizer.engines import create_engine

    runner = create_engine(engine, model_name, source, "avg")
    ready = time.time()
    size = runner.backbone.input_size

    def run_pass() -> int:
        return sum(runner.run(batch).shape[0] for batch in prefetched_batches(paths, size, batch_size))

    return {**_two_passes(run_pass, len(paths)), "model_ready": ready, "device": runner.device,
            "tensorflow_imported": "tensorflow" in sys.modules}


def side_spark(model_name: str, weights: str, batch_size: int, paths: list[str], engine: str, master: str,
               conf: list[str], model_cache: str, **_: Any) -> dict[str, Any]:
    from imagefeaturizer.featurizer import KerasImageFeaturizer
    from xray.session import spark_session

    spark = spark_session(spark_settings(master, conf))
    featurizer = KerasImageFeaturizer(inputCol="content", outputCol="features", modelName=model_name,
                                      weights=weights, batchSize=batch_size, engine=engine, modelCacheDir=model_cache)
    plan = featurizer.resolveEngine(spark)
    files = [_glob_escape(p) for p in paths]

    def run_pass() -> int:
        df = spark.read.format("binaryFile").load(files)
        featurizer.transform(df).select("path", "features").write.format("noop").mode("overwrite").save()
        return len(paths)  # a failed image fails the job (handleInvalid=error)

    result = {**_two_passes(run_pass, len(paths)), "engine": plan.as_dict(), "master": spark.sparkContext.master,
              "partitions": spark.read.format("binaryFile").load(files).rdd.getNumPartitions()}
    spark.stop()
    return result


def child_main(args: argparse.Namespace) -> int:
    with open(args.paths_file, encoding="utf-8") as f:
        paths = json.load(f)
    side = args.child
    common = dict(model_name=args.models[0], weights=args.weights, batch_size=args.batch_size, paths=paths,
                  master=args.master, conf=args.conf, model_cache=args.model_cache, source=args.source)
    if side == "keras":
        result = side_keras(**common)
    elif side.startswith("spark-"):
        result = side_spark(engine=side.removeprefix("spark-"), **common)
    else:
        result = side_engine(engine=side, **common)
    with open(args.result_file, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


# --------------------------------------------------------------------------- the parent


def run_side(args: argparse.Namespace, side: str, model_name: str, paths: list[str], source: str | None) -> dict:
    """One side in a fresh process; its cold and warm images/s."""
    with tempfile.TemporaryDirectory(prefix="engines-bench-") as tmp:
        listing, result_file = os.path.join(tmp, "paths.json"), os.path.join(tmp, "result.json")
        with open(listing, "w", encoding="utf-8") as f:
            json.dump(paths, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--models", model_name,
               "--weights", args.weights, "--batch-size", str(args.batch_size), "--master", args.master,
               "--model-cache", args.model_cache, "--paths-file", listing, "--result-file", result_file,
               "--source", source or "", *[x for c in args.conf for x in ("--conf", c)]]
        load = os.getloadavg()[0]
        spawned = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise BenchmarkError(f"{side} on {model_name} failed: {lines[-1] if lines else proc.returncode}")
        with open(result_file, encoding="utf-8") as f:
            result = json.load(f)
    cold = result["first_pass_end"] - spawned
    return {**result, "cold_seconds": cold, "cold_images_per_s": result["images"] / cold,
            "ready_seconds": result["model_ready"] - spawned if "model_ready" in result else None,
            "warm_images_per_s": result["images"] / result["warm_seconds"], "load_average": load}


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def exports_for(args: argparse.Namespace, model_name: str, sides: list[str]) -> dict[str, dict]:
    """The exported model of each exported engine the sides use, made before any timing."""
    from imagefeaturizer.engines import engine_class
    from imagefeaturizer.export import exported_model

    out = {}
    weights_path = backbones.resolve_weights(model_name, args.weights)
    sha = backbones.file_sha256(weights_path) if weights_path else None
    for engine in sorted({s.removeprefix("spark-") for s in sides if s != "keras"}):
        if engine_class(engine).exported:
            model = exported_model(model_name, weights_path, sha, engine, args.model_cache, log=print)
            out[engine] = {"source": model.files[0], "exported_now": model.exported_now,
                           "export_seconds": model.export_seconds if model.exported_now else None}
    return out


def measure_backbone(args: argparse.Namespace, model_name: str, paths: list[str]) -> dict[str, Any]:
    exports = exports_for(args, model_name, args.sides)
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    for round_ in range(1, args.rounds + 1):
        for side in args.sides:  # alternated: every side sees the machine of every round
            source = exports.get(side, {}).get("source")
            run = run_side(args, side, model_name, paths, source)
            runs[side].append(run)
            print(f"{model_name} round {round_}/{args.rounds} {side}: cold {run['cold_images_per_s']:.2f} images/s, "
                  f"warm {run['warm_images_per_s']:.2f} (load {run['load_average']:.1f})", flush=True)
    summary = {side: {"cold": spread([r["cold_images_per_s"] for r in rs]),
                      "warm": spread([r["warm_images_per_s"] for r in rs])} for side, rs in runs.items()}
    return {"model": model_name, "images": len(paths), "exports": exports, "summary": summary,
            "ratios": ratios(summary, model_name, args.default_side), "runs": runs}


def ratios(summary: dict, model_name: str, default_side: str) -> dict[str, Any]:
    """Medians of the featurizer with the default engine against plain Keras and the fastest
    single-process side, cold and warm, with the targets."""
    if default_side not in summary:
        return {}
    singles = [s for s in summary if not s.startswith("spark-")]
    out: dict[str, Any] = {"default_side": default_side}
    for kind in ("cold", "warm"):
        ours = summary[default_side][kind]["median"]
        if "keras" in summary:
            out[f"vs_keras_{kind}"] = ours / summary["keras"][kind]["median"]
        if singles:
            fastest = max(singles, key=lambda s: summary[s][kind]["median"])
            out[f"vs_fastest_single_{kind}"] = ours / summary[fastest][kind]["median"]
            out[f"fastest_single_{kind}"] = fastest
    out["target_vs_keras"], out["target_vs_fastest_single"] = TARGET_KERAS.get(model_name), TARGET_FASTEST
    return out


# --------------------------------------------------------------------------- the app's own run


def run_app(experiment: str, overrides: list[str]) -> dict[str, Any]:
    """``python -m xray run EXPERIMENT --set ...`` in its own process; its metrics.json."""
    cmd = [sys.executable, "-m", "xray", "--config", os.path.join(ROOT, "config.yaml"), "run", experiment,
           *[x for o in overrides for x in ("--set", o)]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (CODE, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise BenchmarkError(f"run {experiment} failed: {lines[-1] if lines else proc.returncode}")
    results = next(o.split("=", 1)[1] for o in overrides if o.startswith("results_dir="))
    with open(os.path.join(results, experiment, "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


def app_run_check(args: argparse.Namespace) -> dict[str, Any]:
    """The app's run of ``--app-run`` (empty feature cache) against plain Keras cold on its images."""
    from xray.config import load_config
    from xray.data import list_images as list_class

    out = os.path.join(ROOT, "benchmarks", "out", "engines")
    overrides = [f"dataset.raw_dir={os.path.abspath(args.data)}", f"dataset.resized_dir={out}/resized",
                 f"results_dir={out}/results", f"weights={args.weights}", *args.set]
    exp = load_config(os.path.join(ROOT, "config.yaml")).experiment(args.app_run, overrides)
    app, keras = [], []
    for round_ in range(1, args.rounds + 1):
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="features-", dir=out) as cache:  # every image featurized
            metrics = run_app(args.app_run, [*overrides, f"cache_dir={cache}"])
        app.append({k: metrics[k] for k in ("images_per_second", "images_featurized", "featurization_seconds", "engine")})
        paths = sorted(p for c in exp.classes for p in list_class(os.path.join(exp.resized_dir, c)))
        keras.append(run_side(args, "keras", exp.model, paths, None))
        print(f"{args.app_run} round {round_}/{args.rounds}: run {app[-1]['images_per_second']:.2f} images/s "
              f"({metrics['engine'].get('engine')}), plain Keras cold {keras[-1]['cold_images_per_s']:.2f} "
              f"on {len(paths)} images", flush=True)
    run_rate, keras_rate = spread([a["images_per_second"] for a in app]), spread([k["cold_images_per_s"] for k in keras])
    return {"experiment": args.app_run, "model": exp.model, "images": len(paths), "run": run_rate,
            "keras_cold": keras_rate, "ratio": run_rate["median"] / keras_rate["median"],
            "target": TARGET_KERAS.get(exp.model), "runs": {"app": app, "keras": keras}}


# --------------------------------------------------------------------------- output and main


def _mmm(s: dict[str, float] | None) -> str:
    return "n/a" if s is None else f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"


def print_tables(report: dict[str, Any]) -> None:
    rows = []
    for r in report["results"]:
        for side, s in r["summary"].items():
            rows.append((r["model"], side, str(r["images"]), _mmm(s["cold"]), _mmm(s["warm"])))
    _table(("backbone", "side", "images", "cold img/s min / median / max", "warm img/s min / median / max"), rows)
    print()
    ratio_rows = []
    for r in report["results"]:
        q = r["ratios"]
        if not q:
            continue
        ratio_rows.append((r["model"], q["default_side"], f"{q.get('vs_keras_cold', float('nan')):.2f}",
                           f"{q.get('vs_keras_warm', float('nan')):.2f}", f"{q['target_vs_keras']}",
                           f"{q.get('vs_fastest_single_cold', float('nan')):.2f} ({q.get('fastest_single_cold')})",
                           f"{q.get('vs_fastest_single_warm', float('nan')):.2f} ({q.get('fastest_single_warm')})",
                           f"{q['target_vs_fastest_single']}"))
    if ratio_rows:
        _table(("backbone", "featurizer", "x keras cold", "x keras warm", "target", "x fastest single cold",
                "x fastest single warm", "target"), ratio_rows)
        print("ratios of medians; cold: from process start (imports, model build or load, JVM, workers) to the "
              "last image; warm: a second pass in the same process; exports excluded (see 'exports')")


def print_app_check(check: dict[str, Any]) -> None:
    _table(("experiment", "images", "run img/s min / median / max", "plain Keras cold img/s min / median / max",
            "ratio", "target"),
           [(check["experiment"], str(check["images"]), _mmm(check["run"]), _mmm(check["keras_cold"]),
             f"{check['ratio']:.2f}", str(check["target"]))])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Engines single-process and in the Spark featurizer against "
                                                 "plain Keras, cold and warm, on the same images.")
    parser.add_argument("--data", help="folder of images (any depth), e.g. the shared covid19-xray set")
    parser.add_argument("--models", default=",".join(backbones.BACKBONES), help="comma-separated backbones")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    parser.add_argument("--images", type=int, default=0, help="first N images by sorted path (0: all)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--weights", default=backbones.RANDOM, help="random (default), imagenet or a weights file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark setting")
    parser.add_argument("--model-cache", default=DEFAULT_MODEL_CACHE, help="exported models (default cache/models)")
    parser.add_argument("--app-run", metavar="EXPERIMENT", help="time the app's run of EXPERIMENT against plain Keras")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for --app-run")
    parser.add_argument("--json", help="write every figure to this JSON file")
    for internal in ("--child", "--paths-file", "--result-file", "--source"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if args.child:
        return args
    if not args.data:
        parser.error("--data is required")
    unknown = [s for s in args.sides if s not in SIDES]
    if unknown or args.images < 0 or args.rounds < 1 or args.batch_size < 1:
        raise BenchmarkError(f"--sides takes {', '.join(SIDES)}; --images >= 0, --rounds and --batch-size > 0")
    for name in args.models:
        try:
            backbones.resolve_weights(name, args.weights)  # fail before any timing
        except (ValueError, backbones.WeightsError) as exc:
            raise BenchmarkError(str(exc)) from None
    return args


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from imagefeaturizer.engines import choose_auto
    from xray.atomic import write_json_atomic

    paths = list_images(args.data, args.images)
    args.default_side = f"spark-{choose_auto()[0]}"
    report: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: getattr(args, k) for k in ("data", "models", "sides", "rounds", "weights", "batch_size",
                                                   "master", "conf", "app_run")},
        "results": [],
    }
    if args.app_run:
        report["app_check"] = app_run_check(args)
    else:
        print(f"{len(paths)} images from {args.data}; backbones: {', '.join(args.models)}", flush=True)
        for name in args.models:
            report["results"].append(measure_backbone(args, name, paths))
            if args.json:  # after every backbone: a run cut short keeps what it measured
                write_json_atomic(args.json, report)
    if args.json:
        write_json_atomic(args.json, report)
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.child:
            return child_main(args)
        report = benchmark(args)
    except (BenchmarkError, InvalidImageError, backbones.WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    if "app_check" in report:
        print_app_check(report["app_check"])
    else:
        print_tables(report)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
