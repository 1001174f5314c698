"""The tuned head's cost on cached features: CrossValidator over a grid against one plain fit.

Feature vectors are generated (one Gaussian cluster per class, ``--dim`` dimensions, as many
rows as a training split), so no featurization is timed: this is what a tuned run adds once the
features are in the feature cache. Both sides run in one local SparkSession (``--master``,
default ``local[*]``) with the experiment's classifier settings from ``config.yaml``; the
plain fit is measured first and again last (its best kept), the tuned fit ``--repeat`` times
(its best kept). Prints a table and, with ``--json``, writes the figures (atomically).

    .venv/bin/python benchmarks/tuning.py --rows 900 --dim 2048 --classes 3 --folds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "code"))

import numpy as np  # noqa: E402

from xray import experiment, tuning  # noqa: E402
from xray.atomic import write_text_atomic  # noqa: E402
from xray.config import load_config  # noqa: E402
from xray.split import with_split  # noqa: E402


def feature_rows(spark, rows: int, dim: int, classes: int, seed: int):
    """``rows`` generated feature vectors of ``classes`` overlapping clusters, with ``path`` and ``label``."""
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql.types import StringType, StructField, StructType

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.0, (classes, dim))
    data = [(f"file:/bench/c{i % classes}/{i}.png", f"c{i % classes}",
             Vectors.dense(centers[i % classes] + rng.normal(0, 3.0, dim))) for i in range(rows)]
    schema = StructType([StructField("path", StringType()), StructField("label", StringType()),
                         StructField("features", VectorUDT())])
    return spark.createDataFrame(data, schema)


def best_seconds(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def benchmark(args: argparse.Namespace) -> dict:
    from pyspark.sql import SparkSession

    config = load_config(os.path.join(os.path.dirname(HERE), "config.yaml"))
    settings = dict(config.experiment(args.experiment).settings)
    grid = {"regParam": args.reg_params}
    settings.update(cv_folds=args.folds, classifier={**settings["classifier"], "grid": grid})
    spark = SparkSession.builder.master(args.master).appName("tuning-benchmark").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    classes = [f"c{k}" for k in range(args.classes)]
    train = with_split(feature_rows(spark, args.rows, args.dim, args.classes, args.seed), settings["seed"],
                       0.0001, args.folds).filter("not is_test").cache()
    n_train = train.count()
    plain = lambda: experiment.fit_head(train, settings, len(classes))  # noqa: E731
    records = []
    first_plain = best_seconds(plain, 1)
    tuned = best_seconds(lambda: records.append(tuning.fit_head(train, settings, classes, log=lambda *_: None)[1]),
                         args.repeat)
    plain_s = min(first_plain, best_seconds(plain, 1))
    spark.stop()
    record = records[-1]
    return {"rows": n_train, "dim": args.dim, "classes": args.classes, "folds": args.folds, "grid": grid,
            "candidates": len(record["candidates"]), "fits": record["fits"], "tuned_seconds": round(tuned, 2),
            "seconds_per_fit": round(tuned / record["fits"], 2), "plain_fit_seconds": round(plain_s, 2),
            "tuned_over_plain": round(tuned / plain_s, 2), "chosen": record["chosen"], "master": args.master}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The tuned head's cost on cached (here: generated) features.")
    parser.add_argument("--rows", type=int, default=900, help="training rows (default 900: the shared set's)")
    parser.add_argument("--dim", type=int, default=2048, help="feature size (default 2048: ResNet50, Xception)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--reg-params", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--experiment", default="ResNet50_multiclass_classification",
                        help="the config entry whose classifier settings are used")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--json", help="write the figures here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = benchmark(args)
    for key, value in result.items():
        print(f"{key:>18}: {value}")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
