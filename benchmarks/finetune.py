"""Benchmark: training a network through the project's path against plain Keras ``model.fit``.

    .venv/bin/python benchmarks/finetune.py --model SmallCNN --images 400 --json benchmarks/out/finetune-smallcnn.json
    .venv/bin/python benchmarks/finetune.py --model ResNet50 --data PATH/TO/covid19-xray --images 200 \
        --json benchmarks/out/finetune-resnet50.json

The same images, network and settings on both sides, each run in a fresh process of its own:

- ``project``: the trainer as ``xray run`` runs it: a local SparkSession with the project's Spark
  settings (``--master``, ``--conf``) reads the image files (:func:`xray.data.load_images`), each
  row marked with its label index and whether it validates, and
  :func:`imagefeaturizer.trainer.fit_on_spark` trains in one barrier task (a first pass into a
  disk cache, then a child process that streams batches from it through ``tf.data``).
- ``keras``: plain Keras as a careful user writes it: every image decoded and resized (the
  project's decoder: the same pixels) into float32 arrays in memory, the same network
  (:func:`imagefeaturizer.networks.build_network`), ``model.fit`` on the arrays.

Shared: the network (``--model``, ``--image-size``, augmentation, dropout, seed, weights), batch
size, epochs per stage, learning rates, class weights, the validation rows (every k-th image of
each class), the stages (fine-tuning: stage one the head, stage two also the top ``--unfreeze``
units of the backbone; from scratch one stage); patience equals the epochs, so no stage stops
early. Both sides time epochs with the same Keras callback
(:func:`imagefeaturizer.trainer.epoch_recorder`): an epoch's training seconds, its validation
pass excluded. Per run:

- **steady** images/s: the epochs after each stage's first (whose seconds include tracing the
  training step): fitted images / their training seconds. The target's measure: the project at
  least 0.9x plain Keras (issue 15).
- **all epochs** images/s: every epoch, tracing included.
- **cold** images/s: fitted images x epochs / seconds from spawning the process to the end of
  training (interpreter, imports, building the network; the project also starts the JVM and
  Spark, reads and caches the images; Keras decodes every image).

``--rounds`` (3) alternates the sides (project, keras, project, keras, ...); min / median / max
over the rounds, ratios of medians. **Memory**: the peak resident memory of the process that
trains (project: the training process the barrier task starts, its own ``ru_maxrss``; keras:
the whole process, which holds every image) at ``--images`` N (the rounds' median) and 2N (one
more run of each side; ``--no-memory`` skips them). The project's must not grow with the data
set. Images: generated (two classes, ``--source-size`` pixels square, written to a temporary
folder) unless ``--data`` names a folder with one sub-folder per class (taken in turn from each
class, sorted by path). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# featurize puts code/ on sys.path (and quiets TensorFlow's C++ log) when imported.
from featurize import ROOT, BenchmarkError, _table, spark_settings  # noqa: E402
from engines import _mmm, spread  # noqa: E402
from imagefeaturizer import backbones, networks  # noqa: E402
from imagefeaturizer.trainer import TrainSpec, peak_rss_mib  # noqa: E402

SIDES = ("project", "keras")
TARGET = 0.9
VALIDATE_EVERY = 5  # every 5th image of each class validates (20%)


# --------------------------------------------------------------------------- images


def generated_images(folder: str, count: int, size: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` grayscale PNGs in two classes (a bright disc, stripes), noisy; (path, class)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(count):
        cls = ("disc", "stripes")[i % 2]
        os.makedirs(os.path.join(folder, cls), exist_ok=True)
        if cls == "disc":
            cy, cx = rng.uniform(0.3, 0.7, 2) * size
            base = 220.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.25 * size) ** 2)
        else:
            base = 200.0 * ((xx // rng.integers(4, 12)) % 2)
        pixels = np.clip(base + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, cls, f"img{i:05d}.png")
        Image.fromarray(pixels, "L").save(path)
        out.append((path, cls))
    return out


def pick_images(data: str, count: int) -> list[tuple[str, str]]:
    """(path, class) of ``count`` images of ``data``'s class folders, taken in turn from each class."""
    from xray.data import list_dataset
    from xray.errors import DataError

    try:
        listing = list_dataset(data)
    except DataError as exc:
        raise BenchmarkError(str(exc)) from None
    queues = {cls: sorted(rels) for cls, rels in listing.files.items()}
    out: list[tuple[str, str]] = []
    while len(out) < count and any(queues.values()):
        for cls, rels in queues.items():
            if rels and len(out) < count:
                out.append((os.path.join(data, rels.pop(0)), cls))
    if len(out) < count:
        raise BenchmarkError(f"{data} holds {len(out)} images, fewer than the {count} asked for: lower --images")
    return out


def marked(images: list[tuple[str, str]]) -> list[dict]:
    """Each image with its label index (classes sorted) and whether it validates (every k-th of its class)."""
    classes = sorted({cls for _, cls in images})
    seen: dict[str, int] = {}
    rows = []
    for path, cls in images:
        seen[cls] = seen.get(cls, 0) + 1
        rows.append({"path": path, "label": classes.index(cls), "validation": seen[cls] % VALIDATE_EVERY == 0})
    short = [cls for cls in classes if seen[cls] < VALIDATE_EVERY]
    if short:
        raise BenchmarkError(f"class(es) {', '.join(short)} have fewer than {VALIDATE_EVERY} of the {len(images)} "
                             f"images (every {VALIDATE_EVERY}th validates): raise --images")
    return rows


def train_spec(args: argparse.Namespace, rows: list[dict]) -> TrainSpec:
    """The settings of both sides, as the app builds them (xray.training)."""
    from xray.training import class_weights

    n_classes = len({r["label"] for r in rows})
    fit = [r["label"] for r in rows if not r["validation"]]
    counts = {str(k): fit.count(k) for k in range(n_classes)}
    kind = networks.SCRATCH if args.model in networks.SCRATCH_MODELS else networks.FINETUNE
    weights = backbones.resolve_weights(args.model, args.weights) if kind == networks.FINETUNE else None
    network = networks.NetworkSpec(kind=kind, model_name=args.model, n_classes=n_classes, image_size=args.image_size,
                                   weights_path=weights, augment=args.augment, seed=args.seed)
    return TrainSpec(network=network, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                     finetune_learning_rate=args.finetune_learning_rate, unfreeze=args.unfreeze,
                     patience=args.epochs, class_weight=class_weights(counts, [str(k) for k in range(n_classes)]),
                     seed=args.seed)


# --------------------------------------------------------------------------- inside a side's process


def side_project(spark, spec: TrainSpec, rows: list[dict]) -> dict[str, Any]:
    """The trainer as the app runs it: Spark reads the files, one barrier task trains."""
    from pyspark.sql import functions as F

    from imagefeaturizer.trainer import fit_on_spark
    from xray.data import load_images
    from xray.paths import file_uri

    images = load_images(spark, [(r["path"], None) for r in rows])
    marks = spark.createDataFrame([(file_uri(r["path"]), r["label"], r["validation"]) for r in rows],
                                  "path string, label_index int, is_validation boolean")
    history = fit_on_spark(images.join(F.broadcast(marks), "path"), spec).history
    return {"trained_at": time.time(), "epochs": [e for s in history["stages"] for e in s["epochs"]],
            "n_fit": history["counts"]["train"], "n_validation": history["counts"]["validation"],
            "training_peak_rss_mib": history["peak_rss_mib"], "driver_python_peak_rss_mib": peak_rss_mib()}


def side_keras(spec: TrainSpec, rows: list[dict]) -> dict[str, Any]:
    """Plain Keras: the images decoded into arrays in memory, ``model.fit`` on them, stage by stage."""
    import keras
    import pandas as pd

    from imagefeaturizer.runtime import decode_batch
    from imagefeaturizer.trainer import compile_stage, epoch_recorder

    sets = {}
    for which in (False, True):
        chosen = [r for r in rows if r["validation"] == which]
        paths = [r["path"] for r in chosen]
        contents = [open(p, "rb").read() for p in paths]
        arrays, _ = decode_batch(contents, pd.Series(paths), spec.network.image_size, spec.max_pixels, "error")
        sets[which] = (np.stack(arrays).astype(np.float32), np.asarray([r["label"] for r in chosen], np.int32))
    (x, y), validation = sets[False], sets[True]
    keras.utils.set_random_seed(spec.seed)
    model, backbone = networks.build_network(spec.network)
    epochs: list[dict] = []
    stages = [(1, spec.learning_rate)] + ([(2, spec.finetune_learning_rate)] if backbone and spec.unfreeze else [])
    for stage, rate in stages:
        if stage == 2:
            networks.set_trainable_units(backbone, spec.network.model_name, spec.unfreeze)
        compile_stage(model, rate)
        recorder = epoch_recorder(stage, len(x), len(epochs) + 1, lambda line: None)
        model.fit(x, y, batch_size=spec.batch_size, epochs=spec.epochs, validation_data=validation,
                  class_weight=spec.class_weight, shuffle=True, callbacks=[recorder], verbose=0)
        epochs += recorder.epochs
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        model.save(os.path.join(tmp, "model.keras"))  # as the project's training process does
    return {"trained_at": time.time(), "epochs": epochs, "n_fit": len(x), "n_validation": len(validation[0]),
            "training_peak_rss_mib": peak_rss_mib()}


def child_main(args: argparse.Namespace) -> None:
    with open(args.rows_file, encoding="utf-8") as f:
        job = json.load(f)
    spec, rows = TrainSpec.from_json(job["spec"]), job["rows"]
    if args.child == "project":
        from xray.session import spark_session

        spark = spark_session(spark_settings(args.master, args.conf))
        result = side_project(spark, spec, rows)
        spark.stop()
    else:
        result = side_keras(spec, rows)
    with open(args.result_file, "w", encoding="utf-8") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------- the parent


def run_figures(run: dict[str, Any], spawned: float) -> dict[str, Any]:
    """A run's images/s: steady (each stage's first epoch left out), all epochs, and cold."""
    epochs, n = run["epochs"], run["n_fit"]
    firsts = {s: min(e["epoch"] for e in epochs if e["stage"] == s) for s in {e["stage"] for e in epochs}}
    steady = [e for e in epochs if e["epoch"] != firsts[e["stage"]]]  # each stage's first traces its step
    rate = (lambda es: n * len(es) / sum(e["train_seconds"] for e in es) if es else None)
    cold = run["trained_at"] - spawned
    return {**run, "steady_images_per_s": rate(steady), "all_epochs_images_per_s": rate(epochs),
            "cold_seconds": cold, "cold_images_per_s": n * len(epochs) / cold}


def run_side(args: argparse.Namespace, side: str, spec: TrainSpec, rows: list[dict]) -> dict[str, Any]:
    """One side in a fresh process; its epochs, images/s and peak memory."""
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        job, result_file = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(job, "w", encoding="utf-8") as f:
            json.dump({"spec": spec.to_json(), "rows": rows}, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--rows-file", job,
               "--result-file", result_file, "--master", args.master, *[x for c in args.conf for x in ("--conf", c)]]
        load = os.getloadavg()[0]
        spawned = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise BenchmarkError(f"{side} training of {spec.network.model_name} failed: "
                                 f"{lines[-1] if lines else proc.returncode}")
        with open(result_file, encoding="utf-8") as f:
            result = json.load(f)
    return {**run_figures(result, spawned), "load_average": load}


KINDS = ("steady", "all_epochs", "cold")


def measure(args: argparse.Namespace, spec: TrainSpec, rows: list[dict], more_rows: list[dict] | None) -> dict:
    """``--rounds`` alternated runs of both sides on ``rows``; then one of each on ``more_rows`` (memory)."""
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(1, args.rounds + 1):
        for side in SIDES:  # alternated: both sides see the machine of every round
            run = run_side(args, side, spec, rows)
            runs[side].append(run)
            print(f"round {round_}/{args.rounds} {side}: steady {_f(run['steady_images_per_s'])} images/s, all epochs "
                  f"{_f(run['all_epochs_images_per_s'])}, cold {_f(run['cold_images_per_s'])}; training process "
                  f"peak {run['training_peak_rss_mib']:.0f} MiB (load {run['load_average']:.1f})", flush=True)
    larger = {side: run_side(args, side, spec, more_rows) for side in SIDES} if more_rows else {}
    return summarise(runs, larger)


def summarise(runs: dict[str, list[dict]], larger: dict[str, dict]) -> dict[str, Any]:
    """min / median / max of each side's figures over the rounds, ratios of medians, memory at N and 2N."""
    summary = {side: {kind: spread([r[f"{kind}_images_per_s"] for r in rs]) if all(
        r[f"{kind}_images_per_s"] for r in rs) else None for kind in KINDS} for side, rs in runs.items()}
    ratios = {kind: summary["project"][kind]["median"] / summary["keras"][kind]["median"]
              if summary["project"][kind] and summary["keras"][kind] else None for kind in KINDS}
    memory = {side: {"images": [rs[0]["n_fit"] + rs[0]["n_validation"]],
                     "peak_rss_mib": [spread([r["training_peak_rss_mib"] for r in rs])["median"]]}
              for side, rs in runs.items()}
    for side, run in larger.items():
        memory[side]["images"].append(run["n_fit"] + run["n_validation"])
        memory[side]["peak_rss_mib"].append(run["training_peak_rss_mib"])
        memory[side]["growth"] = memory[side]["peak_rss_mib"][1] / memory[side]["peak_rss_mib"][0]
    return {"summary": summary, "ratios": ratios, "target": TARGET, "memory": memory,
            "runs": runs, "larger_runs": larger}


# --------------------------------------------------------------------------- output and main


def _f(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_tables(report: dict[str, Any]) -> None:
    r = report["result"]
    _table(("side", "steady img/s min / median / max", "all epochs img/s min / median / max",
            "cold img/s min / median / max"),
           [(side, *(_mmm(s[kind]) for kind in KINDS)) for side, s in r["summary"].items()])
    q = r["ratios"]
    met = "n/a" if q["steady"] is None else "met" if q["steady"] >= r["target"] else "NOT met"
    print(f"project / keras (medians): steady {_f(q['steady'])} (target >= {r['target']}: {met}), all epochs "
          f"{_f(q['all_epochs'])}, cold {_f(q['cold'])}")
    print()
    rows = [(side, " / ".join(str(n) for n in m["images"]), " / ".join(f"{v:.0f}" for v in m["peak_rss_mib"]),
             _f(m.get("growth"))) for side, m in r["memory"].items()]
    _table(("side", "images", "training process peak RSS MiB", "growth"), rows)
    print("project: the training process the barrier task starts (streams batches from disk); keras: the whole "
          "process (holds every image)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Training images/s through the project's Spark path against plain "
                                                 "Keras model.fit on the same images and settings; memory at N and 2N.")
    parser.add_argument("--model", default="SmallCNN", help="SmallCNN (from scratch) or a backbone (fine-tuned)")
    parser.add_argument("--data", help="folder with one sub-folder per class (default: generated images)")
    parser.add_argument("--images", type=int, default=200, help="images per run, validation included (default 200)")
    parser.add_argument("--image-size", type=int, default=0, help="network input side (0: the model's own)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the generated images (default 256)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per stage (default 3)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--unfreeze", type=int, help="fine-tuning: top units trained in stage two (default: config's)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-5)
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="augmentation off on both sides")
    parser.add_argument("--weights", default=backbones.RANDOM, help="random (default), imagenet or a weights file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="no runs at 2N images")
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark setting")
    parser.add_argument("--json", help="write every figure to this JSON file")
    for internal in ("--child", "--rows-file", "--result-file"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return args if args.child else check_args(args)


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on the model, and one-line errors before any timing."""
    from xray.config import load_config

    kind = networks.SCRATCH if args.model in networks.SCRATCH_MODELS else networks.FINETUNE
    try:
        smallest = networks.min_input_size(kind, args.model)
        args.image_size = args.image_size or networks.default_input_size(kind, args.model)
        if kind == networks.FINETUNE:
            backbones.resolve_weights(args.model, args.weights)
    except (ValueError, backbones.WeightsError) as exc:
        raise BenchmarkError(str(exc)) from None
    units = networks.UNITS.get(args.model, 0)
    if args.unfreeze is None:
        args.unfreeze = min(units, load_config(os.path.join(ROOT, "config.yaml")).defaults["finetune"]["unfreeze"])
    if args.images < 2 * VALIDATE_EVERY or args.epochs < 1 or args.rounds < 1 or args.batch_size < 1:
        raise BenchmarkError(f"--images >= {2 * VALIDATE_EVERY}; --epochs, --rounds and --batch-size > 0")
    if args.image_size < smallest or not 0 <= args.unfreeze <= units:
        raise BenchmarkError(f"--image-size >= {smallest} and --unfreeze 0..{units} for {args.model}")
    return args


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from xray.atomic import write_json_atomic

    with tempfile.TemporaryDirectory(prefix="finetune-images-") as generated:
        count = args.images * (2 if args.memory else 1)
        images = pick_images(args.data, count) if args.data else generated_images(generated, count, args.source_size)
        rows, more = marked(images[:args.images]), marked(images) if args.memory else None
        spec = train_spec(args, rows)
        print(f"{args.model} ({spec.network.kind}): {len(rows)} images from {args.data or 'generated images'}, "
              f"{spec.network.image_size}x{spec.network.image_size}, {args.epochs} epoch(s) a stage, unfreeze "
              f"{spec.unfreeze}, batch {spec.batch_size}, augment {spec.network.augment}", flush=True)
        result = measure(args, spec, rows, more)
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "settings": {**{k: getattr(args, k) for k in (
                  "model", "data", "images", "image_size", "epochs", "batch_size", "unfreeze", "learning_rate",
                  "finetune_learning_rate", "augment", "weights", "seed", "rounds", "memory", "master", "conf")},
                  "validation": f"every {VALIDATE_EVERY}th image of each class"},
              "result": result}
    print()
    print_tables(report)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    return report


def main(argv: list[str] | None = None) -> int:
    """The benchmark, or (``--child``) one side's run; exit 2 with one line on a user error."""
    try:
        args = parse_args(argv)
        (child_main if args.child else benchmark)(args)
    except (BenchmarkError, backbones.WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
