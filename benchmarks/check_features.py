"""Check: the featurizer's features for real images against Keras' own model with the same weights file.

    .venv/bin/python benchmarks/check_features.py --data PATH/TO/covid19-xray [--models ResNet50] [--images 64]

For each backbone and both poolings: Keras' own model (the Keras application's constructor with
the weights file, ``include_top=False``, ``pooling=avg|max``), the backbone's ``preprocess_input``
and ``model.predict``, on the images read, decoded and resized by the project's decoder (as the
featurizer does); against ``KerasImageFeaturizer`` with ``--engine`` (default ``auto``: OpenVINO
on CPUs) in a local Spark application on the same files. Prints max |featurizer - Keras| / max
|Keras| per backbone and pooling and passes at 1e-4; exit code 1 when any fails.
``--weights random`` (default) writes the seeded random weights to a weights file first, and both
sides load that file; ``imagenet`` or a path use that file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "code"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from imagefeaturizer import backbones  # noqa: E402
from imagefeaturizer.images import InvalidImageError, decode_to_pil, resize_pil  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from featurize import BenchmarkError, _glob_escape, _table, list_images, spark_settings  # noqa: E402

TOLERANCE = 1e-4
DEFAULT_MODEL_CACHE = os.path.join(ROOT, "cache", "models")


def weights_file(model_name: str, weights: str, folder: str) -> str:
    """The weights file both sides load: ``random`` is written from the seeded random model."""
    if weights != backbones.RANDOM:
        return backbones.resolve_weights(model_name, weights)
    path = os.path.join(folder, f"{model_name}-random.weights.h5")
    backbones.build_model(model_name, None, pooling=None).save_weights(path)
    return path


def keras_features(model_name: str, weights: str, pooling: str, paths: list[str]) -> np.ndarray:
    """Keras' own application model with ``weights``, its preprocess_input, predict."""
    backbone = backbones.get_backbone(model_name)
    size = backbone.input_size
    model = backbone.constructor(weights=weights, include_top=False, pooling=pooling, input_shape=(size, size, 3))
    images = []
    for path in paths:
        with open(path, "rb") as f:
            images.append(np.asarray(resize_pil(decode_to_pil(f.read(), origin=path), (size, size)), np.float32))
    return model.predict(backbone.preprocess_input(np.stack(images)), batch_size=16, verbose=0)


def featurizer_features(spark, model_name: str, weights: str, pooling: str, paths: list[str],
                        engine: str, model_cache: str) -> tuple[np.ndarray, str]:
    from imagefeaturizer.featurizer import KerasImageFeaturizer

    featurizer = KerasImageFeaturizer(modelName=model_name, weights=weights, pooling=pooling, engine=engine,
                                      modelCacheDir=model_cache)
    plan = featurizer.resolveEngine(spark, log=print)
    df = spark.read.format("binaryFile").load([_glob_escape(p) for p in paths])
    rows = {r.path.removeprefix("file:"): r.features.toArray() for r in featurizer.transform(df).collect()}
    return np.stack([rows[p] for p in paths]), plan.engine


def check(args: argparse.Namespace, spark=None) -> list[dict[str, Any]]:
    """Both sides for every backbone and pooling; in ``spark`` when given (left running, e.g. a
    test's session), else in a new local application on ``--master``, stopped at the end."""
    from xray.session import spark_session

    paths = [os.path.abspath(p) for p in list_images(args.data, args.images)]
    own = spark is None
    spark = spark_session(spark_settings(args.master)) if own else spark
    results = []
    with tempfile.TemporaryDirectory(prefix="check-features-") as tmp:
        for name in args.models:
            weights = weights_file(name, args.weights, tmp)
            for pooling in ("avg", "max"):
                ours, engine = featurizer_features(spark, name, weights, pooling, paths, args.engine, args.model_cache)
                reference = keras_features(name, weights, pooling, paths)
                error = float(np.abs(ours - reference).max() / np.abs(reference).max())
                results.append({"model": name, "pooling": pooling, "engine": engine, "images": len(paths),
                                "max_abs_diff_over_max_abs": error, "ok": error <= TOLERANCE})
                print(f"{name} {pooling} ({engine}, {len(paths)} images): {error:.2e}", flush=True)
    if own:
        spark.stop()
    return results


def main(argv: list[str] | None = None, spark=None) -> int:
    """``spark``: a running session to use instead of a new one (see :func:`check`)."""
    parser = argparse.ArgumentParser(description="Featurizer features against Keras' own model, same weights file.")
    parser.add_argument("--data", required=True, help="folder of images (any depth)")
    parser.add_argument("--models", default="ResNet50", help="comma-separated backbones (default ResNet50)")
    parser.add_argument("--images", type=int, default=64, help="first N images by sorted path (0: all; default 64)")
    parser.add_argument("--weights", default=backbones.RANDOM, help="random (written to a file), imagenet or a file")
    parser.add_argument("--engine", default="auto", help="the featurizer's engine (default auto)")
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--model-cache", default=DEFAULT_MODEL_CACHE, help="exported models (default cache/models)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        for name in args.models:
            backbones.resolve_weights(name, args.weights)
        results = check(args, spark)
    except (BenchmarkError, InvalidImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    _table(("backbone", "pooling", "engine", "images", "max|diff| / max|keras|", f"<= {TOLERANCE}"),
           [(r["model"], r["pooling"], r["engine"], str(r["images"]), f"{r['max_abs_diff_over_max_abs']:.2e}",
             "yes" if r["ok"] else "NO") for r in results])
    if args.json:
        from xray.atomic import write_json_atomic

        write_json_atomic(args.json, {"tolerance": TOLERANCE, "results": results})
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
