"""Benchmark: a sweep against one featurization pass per backbone, and the driver's memory.

    .venv/bin/python benchmarks/sweep.py --data PATH/TO/covid19-xray
    .venv/bin/python benchmarks/sweep.py --data PATH/TO/covid19-xray --scale 10 --pattern 'ResNet50_*' --no-passes

On the images of ``--data`` (or a generated set ``--scale`` times larger, see below):

1. **resize**: the ``dataset_resize`` job into a resized folder of this benchmark (untimed here,
   reported; it runs once per data set and is reused by later runs).
2. **single passes**: for each backbone of the matching experiments, in a fresh Python process
   and SparkContext with the project's Spark settings, one ``KerasImageFeaturizer`` pass over
   every resized image the sweep uses (the union of the tasks' classes), forced with a ``noop``
   write. Timed from reading the files to the end of the job (so it includes starting the Python
   workers and building the model, not starting the JVM).
3. **sweep**: ``python -m xray sweep PATTERN`` in its own process, as ``wrapper.sh sweep`` runs it,
   with an empty feature cache: timed from process start to exit, so it includes starting Spark,
   the data checks, featurization, every LogisticRegression fit, evaluation, charts and saving
   the models. Meanwhile the peak resident memory of the sweep's driver (its Python process and
   its JVM, which in local mode also runs the executor) and of its Python workers is sampled.

Prints the sweep's time against the sum of the single passes (target: at most 1.15) and the
driver's peak memory (target: under 2 GiB, not growing with the number of images).

``--scale N`` (N > 1) writes a generated data set N times the size of ``--data`` under
``--out`` first (kept for later runs): each source image, plus N - 1 variants of it (shifted a few
pixels, brightness changed), each with content of its own, so the feature cache cannot share
them; class folders and file formats as in the source. The generated images are derived from the
source data set: they stay under ``--out`` (git-ignored) and must not be committed.

Memory is read from ``/proc`` (Linux); elsewhere it shows as ``n/a``. ``--json`` writes every
figure. Use ``--weights random`` (default) unless the ImageNet weights are in the Keras cache:
the speed is the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(ROOT, "code")
if CODE not in sys.path:
    sys.path.insert(0, CODE)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from imagefeaturizer import backbones  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procinfo  # noqa: E402
from featurize import cold_workers_warm_jvm  # noqa: E402

SWEEP_RATIO_TARGET = 1.15
POOL_FROM = 64  # variant images: fewer are written in this process
DRIVER_MEMORY_TARGET_MIB = 2048


class BenchmarkError(Exception):
    """A problem the user can fix; printed as one line."""


# --------------------------------------------------------------------------- generated data


def _variant(source: str, dest: str, k: int) -> None:
    """Variant ``k`` of one image: shifted by a few pixels and brightened, same format and mode."""
    from PIL import Image, ImageChops, ImageEnhance

    from xray.atomic import atomic_file

    with Image.open(source) as image:
        image.load()
        fmt = image.format or "PNG"
        dx, dy = (k % 5) - 2, (k // 5) % 5 - 2
        shifted = ImageChops.offset(image, dx, dy)
        if shifted.mode in ("L", "RGB"):
            shifted = ImageEnhance.Brightness(shifted).enhance(1.0 + 0.01 * k)
        with atomic_file(dest) as tmp:
            shifted.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _variant_job(job: tuple[str, str, int]) -> None:
    _variant(*job)


def generate(data: str, scale: int, out: str, classes: list[str], log=print) -> str:
    """``out/data-<scale>x``: every image of ``data``'s class folders and ``scale - 1`` variants of it."""
    from multiprocessing import get_context

    from xray.data import list_dataset
    from xray.errors import DataError

    try:
        listing = list_dataset(data, classes)
    except DataError as exc:
        raise BenchmarkError(str(exc)) from None
    dest_root = os.path.join(out, f"data-{scale}x")
    jobs, copies = [], []
    for cls in classes:
        folder = os.path.join(dest_root, cls)
        os.makedirs(folder, exist_ok=True)
        for rel in listing.files[cls]:
            path = os.path.join(listing.root, rel)
            name, ext = os.path.splitext(os.path.basename(path))
            first = os.path.join(folder, os.path.basename(path))
            if not os.path.exists(first):
                copies.append((path, first))
            for k in range(1, scale):
                dest = os.path.join(folder, f"{name}--v{k}{ext}")
                if not os.path.exists(dest):
                    jobs.append((path, dest, k))
    for source, dest in copies:
        shutil.copyfile(source, dest + ".tmp")
        os.replace(dest + ".tmp", dest)
    if jobs:
        log(f"generating {len(jobs)} variant images into {dest_root} (kept for later runs)")
        start = time.perf_counter()
        if len(jobs) < POOL_FROM:  # a pool's start (a fresh Python each) costs more than it saves
            for job in jobs:
                _variant_job(job)
        else:
            with get_context("spawn").Pool(os.cpu_count() or 1) as pool:
                for _ in pool.imap_unordered(_variant_job, jobs, chunksize=16):
                    pass
        log(f"generated in {time.perf_counter() - start:.0f} s")
    return dest_root


# --------------------------------------------------------------------------- memory


class DriverSampler:
    """Peak memory of a driver process (``pid``), its JVM and the JVM's Python workers, sampled.

    Driver Python and JVM: their own peak (``VmHWM``), read at every sample. ``driver_sum``: the
    peak of the two's summed resident memory. Python workers: the peak of their summed resident
    memory (shared pages counted in each) and the largest single one.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval = pid, interval
        self.available = procinfo.HAVE_PROC
        self.python_peak_kib = self.jvm_peak_kib = self.driver_sum_peak_kib = 0
        self.workers_sum_peak_kib = self.worker_peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="driver-sampler", daemon=True)

    def _sample(self) -> None:
        tree = procinfo.children()
        python_rss = procinfo.status_kib(self.pid, "VmRSS")
        if python_rss is None:
            return
        self.python_peak_kib = max(self.python_peak_kib, procinfo.status_kib(self.pid, "VmHWM") or 0)
        jvm_rss = workers = 0
        for jvm in (p for p in procinfo.descendants(self.pid, tree) if procinfo.comm(p) == "java"):
            jvm_rss += procinfo.status_kib(jvm, "VmRSS") or 0
            self.jvm_peak_kib = max(self.jvm_peak_kib, procinfo.status_kib(jvm, "VmHWM") or 0)
            for worker in procinfo.descendants(jvm, tree):
                if procinfo.comm(worker).startswith("python"):
                    rss = procinfo.status_kib(worker, "VmRSS") or 0
                    workers += rss
                    self.worker_peak_kib = max(self.worker_peak_kib, rss)
        self.driver_sum_peak_kib = max(self.driver_sum_peak_kib, python_rss + jvm_rss)
        self.workers_sum_peak_kib = max(self.workers_sum_peak_kib, workers)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "DriverSampler":
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def report(self) -> dict[str, float | None]:
        if not self.available:
            return {}
        return {
            "driver_python_peak_rss_mib": self.python_peak_kib / 1024,
            "driver_jvm_peak_rss_mib": self.jvm_peak_kib / 1024,
            "driver_peak_rss_mib": self.driver_sum_peak_kib / 1024,
            "python_workers_sum_peak_rss_mib": self.workers_sum_peak_kib / 1024,
            "python_worker_peak_rss_mib": self.worker_peak_kib / 1024,
        }


# --------------------------------------------------------------------------- the runs


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CODE, env.get("PYTHONPATH", "")) if p)
    env["PYSPARK_PYTHON"] = sys.executable
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _set_args(overrides: list[str]) -> list[str]:
    """``--set KEY=VALUE`` for each override, as ``wrapper.sh`` and this script take them."""
    return [arg for o in overrides for arg in ("--set", o)]


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and "WARN" not in line]
    return lines[-1] if lines else ""


def _xray(args: list[str], log_path: str) -> tuple[int, float, dict]:
    """``python -m xray ARGS`` in its own process, output to ``log_path``: (exit code, seconds, memory)."""
    with open(log_path, "w", encoding="utf-8") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "xray", "--config", os.path.join(ROOT, "config.yaml"), *args],
                                cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        with DriverSampler(proc.pid) as sampler:
            code = proc.wait()
        return code, time.perf_counter() - start, sampler.report()


def single_pass(experiment: str, overrides: list[str], classes: list[str]) -> dict[str, Any]:
    """Runs in its own process: one featurizer pass of ``experiment``'s backbone over the resized
    images of ``classes``, with its settings; a warm JVM, cold Python workers (as in featurize.py)."""
    from imagefeaturizer.featurizer import KerasImageFeaturizer
    from xray.config import load_config
    from xray.data import load_images
    from xray.resize import resized_images
    from xray.session import spark_session

    exp = load_config(os.path.join(ROOT, "config.yaml")).experiment(experiment, overrides)
    settings = {"spark": dict(exp.settings["spark"], app_name="sweep-benchmark-pass")}
    files = resized_images(exp.resized_dir, classes, log=lambda line: None)
    paths = [r.path for r in load_images(spark_session(settings), files).select("path").collect()]
    spark = cold_workers_warm_jvm(settings, paths)
    n = len(paths)
    featurizer = KerasImageFeaturizer(inputCol="content", outputCol="features", modelName=exp.model,
                                      weights=exp.weights, pooling=exp["pooling"], batchSize=exp["batch_size"],
                                      handleInvalid=exp["handleInvalid"], maxImagePixels=exp["max_image_pixels"])
    start = time.perf_counter()
    featurizer.transform(load_images(spark, files)).select("path", "features") \
        .write.format("noop").mode("overwrite").save()
    seconds = time.perf_counter() - start
    spark.stop()
    return {"model": exp.model, "images": n, "seconds": seconds, "images_per_s": n / seconds}


def run_single_pass(experiment: str, model: str, overrides: list[str], classes: list[str], work: str) -> dict[str, Any]:
    result = os.path.join(work, f"pass-{model}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--single-pass", experiment, "--classes", ",".join(classes),
           "--result-file", result, *_set_args(overrides)]
    proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise BenchmarkError(f"single pass of {model} failed: {_last_line(proc.stderr) or proc.returncode}")
    with open(result, encoding="utf-8") as f:
        return json.load(f)


def plan(args: argparse.Namespace) -> tuple[list[str], dict[str, str], list[str]]:
    """The matching experiments, each backbone's first experiment, and the classes they use.

    Fails before any timing on a bad pattern or setting, or missing ImageNet weights."""
    from xray.config import load_config
    from xray.errors import UserError
    from xray.sweep import matching

    if not os.path.isdir(args.data):
        raise BenchmarkError(f"--data {args.data}: no such folder; give the folder with one sub-folder per class")
    config = load_config(os.path.join(ROOT, "config.yaml"))
    try:
        names = matching(config, args.pattern)
        exps = [config.experiment(n, [f"weights={args.weights}", *args.overrides]) for n in names]
    except UserError as exc:
        raise BenchmarkError(str(exc)) from None
    first_of: dict[str, str] = {}  # backbone -> its first experiment (its settings drive the single pass)
    for e in exps:
        first_of.setdefault(e.model, e.name)
    for model in first_of:
        try:
            backbones.resolve_weights(model, next(e.weights for e in exps if e.model == model))
        except backbones.WeightsError as exc:
            raise BenchmarkError(str(exc)) from None
    return names, first_of, sorted({c for e in exps for c in e.classes})


def run_sweep(pattern: str, overrides: list[str], work: str, names: list[str]) -> tuple[float, dict, list[dict]]:
    """The sweep in its own process with an empty feature cache: (seconds, memory, each experiment's figures)."""
    results = os.path.join(work, "results")
    sweep_overrides = [*overrides, f"cache_dir={os.path.join(work, 'cache')}", f"results_dir={results}"]
    print("sweep: running (log in sweep.log) ...", flush=True)
    code, seconds, memory = _xray(["sweep", pattern, *_set_args(sweep_overrides)], os.path.join(work, "sweep.log"))
    if code != 0:
        with open(os.path.join(work, "sweep.log"), encoding="utf-8") as f:
            raise BenchmarkError(f"the sweep failed (exit {code}): {_last_line(f.read())}")
    experiments = []
    for name in names:
        with open(os.path.join(results, name, "metrics.json"), encoding="utf-8") as f:
            m = json.load(f)
        experiments.append({k: m.get(k) for k in ("experiment", "model", "task", "n_images", "images_featurized",
                                                  "images_from_cache", "featurization_seconds", "wall_seconds",
                                                  "lr_iterations", "accuracy", "phase_seconds")})
    return seconds, memory, experiments


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    names, first_of, classes = plan(args)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    raw = os.path.abspath(args.data) if args.scale == 1 else generate(args.data, args.scale, out, classes)
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    work = os.path.join(out, f"run-{args.scale}x-{run_id}")
    os.makedirs(work)
    overrides = [f"weights={args.weights}", *args.overrides, f"dataset.raw_dir={raw}",
                 f"dataset.resized_dir={os.path.join(out, f'resized-{args.scale}x')}"]
    print(f"sweep '{args.pattern}': {len(names)} experiments, backbones {', '.join(first_of)}; data {raw} "
          f"(scale {args.scale}); work folder {work}", flush=True)
    code, resize_s, _ = _xray(["run", "dataset_resize", *_set_args(overrides)], os.path.join(work, "resize.log"))
    if code != 0:
        raise BenchmarkError(f"the resize job failed (exit {code}): see {os.path.join(work, 'resize.log')}")
    print(f"resize job: {resize_s:.1f} s (reused by later runs on the same data)", flush=True)

    passes = []
    for model in ([] if args.no_passes else first_of):
        passes.append(run_single_pass(first_of[model], model, overrides, classes, work))
        print(f"single pass {model}: {passes[-1]['images']} images in {passes[-1]['seconds']:.1f} s "
              f"({passes[-1]['images_per_s']:.2f} images/s)", flush=True)
    sweep_s, memory, experiments = run_sweep(args.pattern, overrides, work, names)
    passes_s = sum(p["seconds"] for p in passes) if passes else None
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"data": args.data, "scale": args.scale, "pattern": args.pattern, "weights": args.weights,
                     "set": args.overrides, "images": passes[0]["images"] if passes else None},
        "experiments": experiments,
        "single_passes": passes,
        "single_passes_seconds": passes_s,
        "sweep_seconds": sweep_s,
        "sweep_featurization_seconds": sum(e["featurization_seconds"] for e in experiments),
        "sweep_images_featurized": sum(e["images_featurized"] for e in experiments),
        "sweep_ratio": sweep_s / passes_s if passes_s else None,
        "resize_seconds": resize_s,
        "memory": memory,
        "work": work,
    }
    if not args.keep:
        shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
    return report


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(r: dict[str, Any]) -> None:
    print()
    print(f"{'experiment':40s} {'images':>7s} {'featurized':>10s} {'featurize s':>11s} {'wall s':>7s} {'LR iter':>7s}")
    for e in r["experiments"]:
        print(f"{e['experiment']:40s} {e['n_images']:7d} {e['images_featurized']:10d} "
              f"{e['featurization_seconds']:11.1f} {e['wall_seconds']:7.1f} {e['lr_iterations'] or 0:7d}")
    print()
    if r["single_passes"]:
        for p in r["single_passes"]:
            print(f"single pass {p['model']:12s} {p['images']:6d} images {p['seconds']:8.1f} s")
        verdict = "within" if r["sweep_ratio"] <= SWEEP_RATIO_TARGET else "ABOVE"
        print(f"sum of single passes: {r['single_passes_seconds']:.1f} s; sweep: {r['sweep_seconds']:.1f} s "
              f"(of which featurization {r['sweep_featurization_seconds']:.1f} s); ratio {r['sweep_ratio']:.3f} "
              f"({verdict} the {SWEEP_RATIO_TARGET} target)")
    else:
        print(f"sweep: {r['sweep_seconds']:.1f} s (of which featurization {r['sweep_featurization_seconds']:.1f} s); "
              "no single passes (--no-passes)")
    m = r["memory"]
    if m:
        verdict = "under" if m["driver_peak_rss_mib"] < DRIVER_MEMORY_TARGET_MIB else "OVER"
        print(f"driver peak RSS: python {_fmt(m['driver_python_peak_rss_mib'], '.0f')} MiB, JVM "
              f"{_fmt(m['driver_jvm_peak_rss_mib'], '.0f')} MiB, together {_fmt(m['driver_peak_rss_mib'], '.0f')} MiB "
              f"({verdict} {DRIVER_MEMORY_TARGET_MIB} MiB); Python workers together "
              f"{_fmt(m['python_workers_sum_peak_rss_mib'], '.0f')} MiB, largest one "
              f"{_fmt(m['python_worker_peak_rss_mib'], '.0f')} MiB")
    else:
        print("memory: n/a (no /proc on this system)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A sweep's time against one featurization pass per backbone, "
                                                 "and the driver's peak memory.")
    parser.add_argument("--data", help="folder with one sub-folder per class, e.g. the shared covid19-xray set")
    parser.add_argument("--pattern", default="*_classification", help="experiments to sweep (default: all ten)")
    parser.add_argument("--scale", type=int, default=1,
                        help="N > 1: run on a generated data set N times the size of --data (default 1)")
    parser.add_argument("--weights", default=backbones.RANDOM, help="random (default), imagenet or a weights file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the sweep and the single passes (repeatable), as in wrapper.sh")
    parser.add_argument("--no-passes", action="store_true", help="skip the single passes (memory only)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "sweep"),
                        help="work folder: generated data, resized images, logs, results (default benchmarks/out/sweep)")
    parser.add_argument("--keep", action="store_true", help="keep the run's feature cache")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--single-pass", help=argparse.SUPPRESS)
    parser.add_argument("--classes", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single_pass:
        return args
    if not args.data:
        parser.error("--data is required")
    if args.scale < 1:
        raise BenchmarkError("--scale must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.single_pass:
            result = single_pass(args.single_pass, args.overrides, args.classes.split(","))
            with open(args.result_file, "w", encoding="utf-8") as f:
                json.dump(result, f)
            return 0
        report = benchmark(args)
    except (BenchmarkError, backbones.WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        from xray.atomic import write_json_atomic

        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
