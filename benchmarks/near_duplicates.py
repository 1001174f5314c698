"""Benchmark: the near-duplicate search across the split, at the shared set's size and larger.

    .venv/bin/python benchmarks/near_duplicates.py --images 1012,10120 [--dim 2048] [--json out.json]

For each size, generated feature vectors stand in for a featurized data set (the search sees
only vectors: their content does not change its cost): ``--dim`` non-negative values a row with
a large common component, as pooled ReLU features have, made on the executors (no vector passes
through the driver), with every fifth row a test row and ``--planted`` training rows that copy a
test row (with a little noise on half of them). The rows are cached in Spark first (untimed), as
an experiment's split is; then :func:`xray.near_duplicates.find_near_duplicates` runs, timed,
while the peak resident memory of the driver's Python process, its JVM and the Python workers is
sampled (``/proc``, Linux). Prints, per size: images, train x test pairs compared, pairs found
(the planted ones must all be found), seconds, and the memory peaks. Figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "code"), HERE]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "code"), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the Python workers import xray too

from pyspark.ml.functions import array_to_vector  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

from sweep import DriverSampler  # noqa: E402
from xray.atomic import write_json_atomic  # noqa: E402
from xray.near_duplicates import find_near_duplicates  # noqa: E402

TEST_EVERY = 5  # every fifth row is a test row: test_fraction 0.2


def _row_vector(i: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return (20.0 + rng.gamma(0.5, 1.0, dim)).astype(np.float32)


def _generator(dim: int, planted: int):
    """mapInPandas: ids -> (path, v, is_test); training row 1 + 5k (k < planted) copies test row 5k."""
    def gen(batches):
        for batch in batches:
            ids = batch["id"].to_numpy()
            vectors = []
            for i in ids:
                copy_of = i - 1 if i % TEST_EVERY == 1 and i // TEST_EVERY < planted else None
                v = _row_vector(int(copy_of if copy_of is not None else i), dim)
                if copy_of is not None and (i // TEST_EVERY) % 2:
                    v = v + np.random.default_rng((1, int(i))).normal(0, 0.005, dim).astype(np.float32)
                vectors.append(v)
            yield pd.DataFrame({"path": [f"img{i:07d}.png" for i in ids], "v": vectors,
                                "is_test": ids % TEST_EVERY == 0})
    return gen


def run_size(spark: SparkSession, n: int, dim: int, planted: int, threshold: float) -> dict:
    rows = (spark.range(n, numPartitions=max(2, n // 2000))
            .mapInPandas(_generator(dim, planted), "path string, v array<float>, is_test boolean")
            .select("path", array_to_vector("v").alias("features"), "is_test").cache())
    rows.count()  # generate and cache, untimed (an experiment's split is cached before the search)
    with DriverSampler(os.getpid()) as sampler:
        start = time.perf_counter()
        found = find_near_duplicates(rows, threshold)
        seconds = time.perf_counter() - start
    rows.unpersist()
    n_test = len(range(0, n, TEST_EVERY))
    planted_found = sum(int(a[3:10]) == int(b[3:10]) + 1 for a, b, _ in found.listed)
    return {"images": n, "dim": dim, "train": n - n_test, "test": n_test, "pairs_compared": (n - n_test) * n_test,
            "pairs_found": found.pairs, "planted": min(planted, n_test), "planted_found": planted_found,
            "seconds": round(seconds, 2), **{k: round(v, 1) for k, v in sampler.report().items()}}


def _print(result: dict) -> None:
    print(f"{result['images']:>7} images ({result['train']} train x {result['test']} test = "
          f"{result['pairs_compared']:,} pairs): {result['seconds']:.1f} s; found {result['pairs_found']} "
          f"(planted {result['planted_found']} of {result['planted']}); peak MiB: driver Python "
          f"{result.get('driver_python_peak_rss_mib', 'n/a')}, JVM {result.get('driver_jvm_peak_rss_mib', 'n/a')}, "
          f"Python workers {result.get('python_workers_sum_peak_rss_mib', 'n/a')} "
          f"(largest {result.get('python_worker_peak_rss_mib', 'n/a')})", flush=True)


def main(argv: list[str] | None = None, spark: SparkSession | None = None) -> int:
    """``spark``: a running session to use (left running, e.g. a test's) instead of a new local one
    on ``--master``, which is stopped at the end."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="1012,10120", help="comma-separated numbers of images")
    parser.add_argument("--dim", type=int, default=2048, help="feature size (ResNet50, InceptionV3, Xception: 2048)")
    parser.add_argument("--planted", type=int, default=20, help="training rows that copy a test row")
    parser.add_argument("--threshold", type=float, default=0.995)
    parser.add_argument("--master", default="local[*]")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    try:
        sizes = [int(v) for v in args.images.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < TEST_EVERY:
        parser.error(f"--images: expected comma-separated numbers of at least {TEST_EVERY}, got {args.images!r}")
    own = spark is None
    if own:
        spark = (SparkSession.builder.master(args.master).appName("near-duplicates-benchmark")
                 .config("spark.driver.memory", "1g").config("spark.sql.execution.arrow.maxRecordsPerBatch", "64")
                 .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    results = []
    try:
        for n in sizes:
            results.append(run_size(spark, n, args.dim, args.planted, args.threshold))
            _print(results[-1])
    finally:
        if own:
            spark.stop()
    if args.json:
        write_json_atomic(args.json, {"date": datetime.date.today().isoformat(), "cores": os.cpu_count(),
                                      "settings": vars(args), "results": results})
        print(f"wrote {args.json}")
    return 0 if all(r["planted_found"] == r["planted"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
