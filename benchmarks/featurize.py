"""Benchmark: the Spark featurizer against plain single-process Keras, on the same images.

    .venv/bin/python benchmarks/featurize.py --data PATH/TO/covid19-xray

For each backbone, on every image under ``--data`` (or the first ``--images`` by sorted path):

- **Keras**: one plain Python process (a child of this one, so its memory is its own) imports
  TensorFlow, builds the backbone, then reads, decodes and resizes each image with the project's
  decoder, applies the backbone's ``preprocess_input`` and calls ``model.predict_on_batch`` in
  batches; TensorFlow's default threads (every core). Timed end to end (import, build, every
  image); the predict loop alone (after the build) is reported too.
- **Spark**: ``KerasImageFeaturizer`` over ``binaryFile`` in a fresh local-mode SparkContext
  using every core (``--master``), with the project's Spark settings from ``config.yaml``; the
  job is forced with a ``noop`` write. Timed from reading the files to the end of the job, so it
  includes starting the Python workers, importing TensorFlow and building the model in each
  (``--engine``, default ``auto``: with OpenVINO, importing it and loading the exported model;
  an export is made before the timed job, into the model cache).
  The JVM is warm (a long-running application's is): before the timed context, a throwaway one
  reads the same files through a trivial pandas UDF. ``--warm`` times the job again with warm
  Python workers.
- **decode + resize** alone, on one core, to show it is not the bottleneck.

Prints images/s for both, two ratios (Spark / Keras end to end: both import TensorFlow and build
the model in the timed span, the target's measure; Spark / Keras' predict loop alone: the
stricter one), images per CPU-second, and peak memory of
the Keras process, of the driver (Python process and JVM) and of the Spark Python workers. Memory
and CPU are read from ``/proc`` (Linux); elsewhere they show as ``n/a``. ``--repeat`` alternates
runs and keeps each side's best; ``--json`` writes every figure. ``--weights random`` (default)
runs at the speed of ImageNet weights. How to read the figures: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(ROOT, "code")
if CODE not in sys.path:
    sys.path.insert(0, CODE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from imagefeaturizer import backbones  # noqa: E402
from imagefeaturizer.images import InvalidImageError, decode_to_pil, resize_pil  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procinfo  # noqa: E402

MIB = 1024 * 1024


class BenchmarkError(Exception):
    """A problem the user can fix; printed as one line."""


# --------------------------------------------------------------------------- images


def list_images(data: str, limit: int) -> list[str]:
    """The first ``limit`` (0: all) image files under ``data`` (any depth), sorted by path."""
    from xray.data import list_images as _list
    from xray.errors import DataError

    try:
        found = sorted(_list(data))
    except DataError as exc:
        raise BenchmarkError(str(exc)) from None
    return found[:limit] if limit else found


def decode_rate(paths: list[str], size: int) -> dict[str, float]:
    """Images/s of read + decode + resize alone, in this process (one core)."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            resize_pil(decode_to_pil(f.read(), origin=path), (size, size))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": len(paths) / seconds}


# --------------------------------------------------------------------------- plain Keras


def keras_baseline(model_name: str, weights: str, batch_size: int, paths: list[str]) -> dict[str, Any]:
    """Runs in its own process: plain Keras, from ``import tensorflow`` to the last image's features."""
    import numpy as np

    start = time.perf_counter()
    import tensorflow as tf

    import_s = time.perf_counter() - start
    backbone = backbones.get_backbone(model_name)
    gpus = tf.config.list_physical_devices("GPU")
    start = time.perf_counter()
    model = backbones.build_model(backbone, backbones.resolve_weights(backbone, weights), "avg")
    build_s = time.perf_counter() - start
    size = (backbone.input_size, backbone.input_size)

    start, cpu_start, machine_start = time.perf_counter(), _self_cpu_s(), procinfo.machine_cpu_times()
    n = 0
    for first in range(0, len(paths), batch_size):
        arrays = []
        for path in paths[first : first + batch_size]:
            with open(path, "rb") as f:
                image = resize_pil(decode_to_pil(f.read(), origin=path), size)
            arrays.append(np.asarray(image, dtype=np.uint8))
        batch = backbone.preprocess_input(np.stack(arrays).astype(np.float32))
        n += len(np.asarray(model.predict_on_batch(batch)))
    seconds, cpu_s = time.perf_counter() - start, _self_cpu_s() - cpu_start
    machine_end = procinfo.machine_cpu_times()
    busy = None
    if machine_start and machine_end and machine_end[1] > machine_start[1]:
        busy = (machine_end[0] - machine_start[0]) / (machine_end[1] - machine_start[1])
    end_to_end = import_s + build_s + seconds
    return {
        "images": n,
        "seconds": end_to_end,  # import TensorFlow, build the model, every image
        "images_per_s": n / end_to_end,
        "predict_seconds": seconds,  # the predict loop alone (files to features, after the build)
        "predict_images_per_s": n / seconds,
        "cpu_s": cpu_s,
        "machine_cpu_busy": busy,
        "tensorflow_import_s": import_s,
        "model_build_s": build_s,
        "device": f"GPU ({gpus[0].name})" if gpus else "CPU",
        "peak_rss_mib": _self_peak_mib(),
        "tensorflow": tf.__version__,
    }


def run_keras_baseline(model_name: str, weights: str, batch_size: int, paths: list[str]) -> dict[str, Any]:
    """:func:`keras_baseline` in a fresh Python process; its result as a dict."""
    with tempfile.TemporaryDirectory(prefix="featurize-bench-") as tmp:
        listing, result = os.path.join(tmp, "paths.json"), os.path.join(tmp, "result.json")
        with open(listing, "w", encoding="utf-8") as f:
            json.dump(paths, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--keras-baseline", model_name, "--weights", weights,
               "--batch-size", str(batch_size), "--paths-file", listing, "--result-file", result]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode < 0:
            raise BenchmarkError(f"plain Keras run of {model_name} was killed (signal {-proc.returncode}; out of memory?)")
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise BenchmarkError(f"plain Keras run of {model_name} failed: {lines[-1] if lines else proc.returncode}")
        with open(result, encoding="utf-8") as f:
            return json.load(f)


# --------------------------------------------------------------------------- memory and CPU


def _self_peak_mib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (MIB if sys.platform == "darwin" else 1024)


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SparkSampler:
    """Samples, while a Spark job runs, the memory and CPU time of the JVM and the Python workers.

    The JVM is this process' ``java`` descendant; the Python workers (Spark's ``pyspark.daemon``
    and the workers it forks) are the JVM's descendants. Memory: the JVM's peak since it started
    (``VmHWM``: it serves every backbone of a run), each worker's own peak and the peak of the
    workers' summed resident memory (sampled; shared pages counted in each).
    CPU: seconds used during the job by the JVM, the workers and this Python process, and how
    busy the whole machine was (other users' work included).
    """

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.available = procinfo.HAVE_PROC
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.jvm_peak_kib = 0
        self.worker_peak_kib = 0
        self.workers_sum_peak_kib = 0
        self._cpu: dict[int, list[float]] = {}  # pid -> [first seen, last seen] CPU seconds
        self._jvms: set[int] = set()
        self._workers: set[int] = set()
        self._machine_start: tuple[int, int] | None = None
        self._self_start = 0.0
        self.machine_cpu_busy: float | None = None
        self.driver_python_cpu_s = 0.0

    def _track_cpu(self, pid: int, fresh: bool) -> None:
        cpu = procinfo.cpu_s(pid)
        if cpu is None:
            return
        if pid not in self._cpu:
            self._cpu[pid] = [0.0 if fresh else cpu, cpu]
        self._cpu[pid][1] = cpu

    def _sample(self, fresh: bool = True) -> None:
        tree = procinfo.children()
        for jvm in (p for p in procinfo.descendants(os.getpid(), tree) if procinfo.comm(p) == "java"):
            self._jvms.add(jvm)
            self._track_cpu(jvm, fresh=False)  # the JVM outlives the job: count only its CPU during it
            self.jvm_peak_kib = max(self.jvm_peak_kib, procinfo.status_kib(jvm, "VmHWM") or 0)
            total = 0
            for worker in procinfo.descendants(jvm, tree):
                if not procinfo.comm(worker).startswith("python"):
                    continue
                self._workers.add(worker)
                self._track_cpu(worker, fresh)
                total += procinfo.status_kib(worker, "VmRSS") or 0
                self.worker_peak_kib = max(self.worker_peak_kib, procinfo.status_kib(worker, "VmHWM") or 0)
            self.workers_sum_peak_kib = max(self.workers_sum_peak_kib, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "SparkSampler":
        self._machine_start, self._self_start = procinfo.machine_cpu_times(), _self_cpu_s()
        if self.available:
            self._sample(fresh=False)  # what runs already (warm workers) counts from now on
            self._thread = threading.Thread(target=self._loop, name="spark-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        self.driver_python_cpu_s = _self_cpu_s() - self._self_start
        end = procinfo.machine_cpu_times()
        if self._machine_start and end and end[1] > self._machine_start[1]:
            self.machine_cpu_busy = (end[0] - self._machine_start[0]) / (end[1] - self._machine_start[1])

    def _cpu_of(self, pids: set[int]) -> float:
        return sum(self._cpu[p][1] - self._cpu[p][0] for p in pids if p in self._cpu)

    def report(self) -> dict[str, Any]:
        result: dict[str, Any] = {"machine_cpu_busy": self.machine_cpu_busy}
        if not self.available:
            return result
        jvm_cpu, workers_cpu = self._cpu_of(self._jvms), self._cpu_of(self._workers)
        return {
            **result,
            "cpu_s": jvm_cpu + workers_cpu + self.driver_python_cpu_s,
            "cpu_s_parts": {"jvm": jvm_cpu, "python_workers": workers_cpu, "driver_python": self.driver_python_cpu_s},
            "driver_jvm_peak_rss_mib": self.jvm_peak_kib / 1024,
            "worker_peak_rss_mib": self.worker_peak_kib / 1024,
            "workers_sum_peak_rss_mib": self.workers_sum_peak_kib / 1024,
            "python_processes": len(self._workers),
        }


# --------------------------------------------------------------------------- Spark


def spark_settings(master: str, extra_conf: list[str] | tuple[str, ...] = ()) -> dict:
    """The project's ``spark`` settings (config.yaml defaults) with this ``master`` and ``KEY=VALUE`` confs."""
    from xray.config import load_config
    from xray.errors import UserError

    try:
        settings = load_config(os.path.join(ROOT, "config.yaml")).defaults
    except UserError as exc:
        raise BenchmarkError(str(exc)) from None
    conf = dict(settings["spark"].get("conf") or {}, **{"spark.ui.enabled": "false"})
    for item in extra_conf:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchmarkError(f"--conf {item!r}: expected KEY=VALUE, e.g. spark.sql.execution.arrow.maxRecordsPerBatch=32")
        conf[key.strip()] = value
    return {"spark": dict(settings["spark"], master=master, app_name="featurize-benchmark", conf=conf)}


def cold_workers_warm_jvm(settings: dict, paths: list[str]):
    """A new SparkSession whose JVM has run the file scan and the Arrow path to Python, and whose
    Python workers are not started yet: the JVM's start-up compilation is not timed, the workers'
    start-up is.

    A long-running Spark application's JVM has compiled these long before; a fresh one spends
    several CPU-seconds of a 2-core machine compiling them during its first pandas UDF job. The
    warm-up runs in the active SparkContext (one is started when there is none), which is stopped
    afterwards (the JVM stays; the next context starts new Python workers).
    """
    from pyspark.sql import SparkSession

    from xray.session import spark_session

    warm_up_jvm(SparkSession.getActiveSession() or spark_session(settings), paths)
    SparkSession.getActiveSession().stop()
    return spark_session(settings)


def warm_up_jvm(spark, paths: list[str]) -> None:
    """Run the file scan and the Arrow path to Python once in ``spark`` (see :func:`cold_workers_warm_jvm`)."""
    from pyspark.sql import functions as F

    @F.pandas_udf("long")
    def nbytes(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for batch in batches:
            yield batch.map(len).astype("int64")

    df = spark.read.format("binaryFile").load([_glob_escape(p) for p in paths])
    df.select("path", F.length("content")).write.format("noop").mode("overwrite").save()
    df.select("path", nbytes("content")).write.format("noop").mode("overwrite").save()


def _glob_escape(path: str) -> str:
    """Spark reads load() paths as Hadoop globs: escape their special characters."""
    return "".join("\\" + c if c in "{}[]*?\\" else c for c in path)


def spark_run(settings: dict, model_name: str, weights: str, batch_size: int, paths: list[str],
              warm: bool, engine: str = "auto") -> dict[str, Any]:
    """The featurizer over ``paths`` in a fresh SparkContext (cold Python workers)."""
    from imagefeaturizer.featurizer import KerasImageFeaturizer

    start = time.perf_counter()
    spark = cold_workers_warm_jvm(settings, paths)
    session_s = time.perf_counter() - start
    featurizer = KerasImageFeaturizer(inputCol="content", outputCol="features", modelName=model_name,
                                      weights=weights, batchSize=batch_size, engine=engine)
    featurizer.resolveEngine(spark, log=print)  # an export the model cache lacks is made here, untimed

    def job() -> tuple[float, int]:
        begin = time.perf_counter()
        df = spark.read.format("binaryFile").load([_glob_escape(p) for p in paths])
        partitions = df.rdd.getNumPartitions()
        featurizer.transform(df).select("path", "features").write.format("noop").mode("overwrite").save()
        return time.perf_counter() - begin, partitions

    with SparkSampler() as sampler:
        seconds, partitions = job()
    result: dict[str, Any] = {
        "images": len(paths),
        "seconds": seconds,
        "images_per_s": len(paths) / seconds,
        "session_start_s": session_s,
        "master": spark.sparkContext.master,
        "default_parallelism": spark.sparkContext.defaultParallelism,
        "partitions": partitions,
        "arrow_max_records_per_batch": spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch"),
        **sampler.report(),
    }
    if warm:  # the same job again: Python workers and their models are already there
        with SparkSampler() as again:
            seconds, _ = job()
        warm_report = again.report()
        result["warm"] = {"seconds": seconds, "images_per_s": len(paths) / seconds,
                          **{k: warm_report.get(k) for k in ("cpu_s", "cpu_s_parts", "machine_cpu_busy")}}
    return result


# --------------------------------------------------------------------------- main


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))


def _per_cpu_s(run: dict[str, Any]) -> float | None:
    return run["images"] / run["cpu_s"] if run.get("cpu_s") else None


def print_tables(rows: list[dict[str, Any]]) -> None:
    """Speed, then memory: one line per backbone."""
    speed = []
    for r in rows:
        k, s = r["keras"], r["spark"]
        warm = s.get("warm", {}).get("images_per_s")
        speed.append((
            r["model"], str(r["images"]), k["device"], _fmt(k["images_per_s"], ".2f"), _fmt(s["images_per_s"], ".2f"),
            _fmt(r["ratio"], ".2f"), _fmt(k["predict_images_per_s"], ".2f"), _fmt(r["ratio_predict_loop"], ".2f"),
            _fmt(warm, ".2f"), _fmt(_per_cpu_s(k), ".2f"), _fmt(_per_cpu_s(s), ".2f"),
            _fmt(r["decode_resize"]["images_per_s"]), _fmt(k["tensorflow_import_s"] + k["model_build_s"]),
            str(s["partitions"]),
        ))
    _table(("backbone", "images", "device", "keras img/s", "spark img/s", "ratio", "keras loop img/s",
            "ratio vs loop", "spark warm img/s", "keras loop img/cpu-s", "spark img/cpu-s", "decode img/s (1 core)",
            "keras import+build s", "partitions"), speed)
    print("ratio: Spark / Keras end to end (both import TensorFlow and build the model in the timed span); "
          "ratio vs loop: Spark / Keras' predict loop alone (after its import and build)")
    print()
    memory = [(
        r["model"], _fmt(r["keras"].get("peak_rss_mib"), ".0f"), _fmt(r["driver_python_peak_rss_mib"], ".0f"),
        _fmt(r["spark"].get("driver_jvm_peak_rss_mib"), ".0f"), _fmt(r["spark"].get("worker_peak_rss_mib"), ".0f"),
        _fmt(r["spark"].get("workers_sum_peak_rss_mib"), ".0f"),
    ) for r in rows]
    _table(("peak RSS MiB", "keras process", "driver python", "driver JVM", "one python worker",
            "python workers sum"), memory)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Images/s of the Spark featurizer against plain single-process Keras, on the same images.")
    parser.add_argument("--data", help="folder of images (any depth), e.g. the shared covid19-xray set")
    parser.add_argument("--models", default=",".join(backbones.BACKBONES),
                        help="comma-separated backbones (default: all five)")
    parser.add_argument("--images", type=int, default=0,
                        help="first N images by sorted path (default 0: all of them)")
    parser.add_argument("--weights", default=backbones.RANDOM,
                        help="random (default), imagenet (Keras cache) or a weights file: same speed")
    parser.add_argument("--batch-size", type=int, default=32, help="images per backbone call (default 32)")
    parser.add_argument("--master", default="local[*]", help="Spark master (default local[*]: every core)")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark setting for the featurizer's session (repeatable)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each side this many times, alternating, and keep each side's best (default 1)")
    parser.add_argument("--engine", default="auto",
                        help="the featurizer's engine (default auto; tensorflow: the figures of benchmarks/README.md)")
    parser.add_argument("--warm", action="store_true",
                        help="also time the Spark job a second time with warm Python workers")
    parser.add_argument("--json", help="write every figure to this JSON file")
    # Internal: the plain Keras run, in its own process.
    parser.add_argument("--keras-baseline", help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.keras_baseline:
        return args
    if not args.data:
        parser.error("--data is required")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in args.models:
        try:
            backbones.get_backbone(name)
        except ValueError as exc:
            raise BenchmarkError(str(exc)) from None
    if args.images < 0 or args.batch_size < 1 or args.repeat < 1:
        raise BenchmarkError("--images must be >= 0 (0: all), --batch-size and --repeat > 0")
    return args


def measure_backbone(args: argparse.Namespace, name: str, settings: dict, paths: list[str],
                     decode: dict[str, float]) -> dict[str, Any]:
    """One backbone: ``--repeat`` runs of each side, alternated; each side's best run and the ratios."""
    keras_runs, spark_runs = [], []
    for attempt in range(1, args.repeat + 1):  # alternated, so both see the same machine load
        keras_runs.append(run_keras_baseline(name, args.weights, args.batch_size, paths))
        print(f"{name} [{attempt}/{args.repeat}]: plain Keras {keras_runs[-1]['images_per_s']:.2f} images/s "
              f"on {keras_runs[-1]['device']}", flush=True)
        spark_runs.append(spark_run(settings, name, args.weights, args.batch_size, paths, args.warm, args.engine))
        print(f"{name} [{attempt}/{args.repeat}]: Spark featurizer {spark_runs[-1]['images_per_s']:.2f} images/s",
              flush=True)
    keras = max(keras_runs, key=lambda r: r["images_per_s"])
    spark = max(spark_runs, key=lambda r: r["images_per_s"])
    ratio = spark["images_per_s"] / keras["images_per_s"]
    strict = spark["images_per_s"] / keras["predict_images_per_s"]
    print(f"{name}: ratio {ratio:.2f} end to end, {strict:.2f} against Keras' predict loop alone "
          f"(best of {args.repeat} each)", flush=True)
    return {
        "model": name,
        "images": len(paths),
        "ratio": ratio,
        "ratio_predict_loop": strict,
        "keras": keras,
        "spark": spark,
        "all_runs_images_per_s": {"keras": [r["images_per_s"] for r in keras_runs],
                                  "spark": [r["images_per_s"] for r in spark_runs]},
        "decode_resize": decode,
        "driver_python_peak_rss_mib": _self_peak_mib(),
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from xray.atomic import write_json_atomic

    paths = list_images(args.data, args.images)
    for name in args.models:  # fail before any timing, e.g. on missing ImageNet weights
        try:
            backbones.resolve_weights(name, args.weights)
        except backbones.WeightsError as exc:
            raise BenchmarkError(str(exc)) from None
    settings = spark_settings(args.master, args.conf)
    decode: dict[int, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"data": args.data, "images": len(paths), "weights": args.weights,
                     "batch_size": args.batch_size, "master": args.master, "conf": args.conf,
                     "repeat": args.repeat},
        "results": rows,
    }
    print(f"{len(paths)} images from {args.data}; backbones: {', '.join(args.models)}", flush=True)
    for name in args.models:
        size = backbones.get_backbone(name).input_size
        if size not in decode:
            try:
                decode[size] = decode_rate(paths, size)
            except InvalidImageError as exc:
                raise BenchmarkError(f"cannot benchmark on an undecodable image: {exc}") from None
        rows.append(measure_backbone(args, name, settings, paths, dict(decode[size], input_size=size)))
        if args.json:  # after every backbone: a run cut short keeps what it measured
            write_json_atomic(args.json, report)
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.keras_baseline:
            with open(args.paths_file, encoding="utf-8") as f:
                paths = json.load(f)
            result = keras_baseline(args.keras_baseline, args.weights, args.batch_size, paths)
            with open(args.result_file, "w", encoding="utf-8") as f:
                json.dump(result, f)
            return 0
        report = benchmark(args)
    except (BenchmarkError, InvalidImageError, backbones.WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print_tables(report["results"])
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
