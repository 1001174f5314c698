"""Near-duplicate images across the split: train-test pairs whose feature vectors are almost parallel.

A pixel-identical or barely changed copy of a training image in the test split (a follow-up image
saved twice, one image under two names) is recognised, not classified. After featurization this
compares every training image with every test image by the cosine similarity of their
*standardised* features (each feature dimension centred and scaled by its mean and standard
deviation over the experiment's images), using the features already computed (no second pass
over the images), and reports the pairs at or above ``split.near_duplicate_threshold``.

Why standardised: pooled ReLU features share a large common component. With ``weights=random``
the plain cosine of two unrelated X-rays of the shared set is 0.997 at the median; standardised,
the most similar pair of different images there is 0.985, while copies, JPEG re-encodings and
down-and-up-scaled copies stay at or above 0.995 (benchmarks/README.md has the figures).

Memory stays linear in the number of images: the standardised, L2-normalised test vectors
(float32) are broadcast once; each task compares one Arrow batch of training rows with them (a
block of ``batch x n_test`` similarities at a time) and emits only the pairs above the
threshold; they are counted on the executors and only the :data:`MAX_LISTED` most similar reach the
driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from pyspark.ml.functions import vector_to_array
from pyspark.ml.stat import Summarizer
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer.shipping import is_connect

MAX_LISTED = 100_000  # pairs listed in near_duplicates.csv (all are counted)
PAIR_SCHEMA = "train_path string, test_index int, similarity double"


@dataclass
class NearDuplicates:
    """The train-test pairs at or above ``threshold``, most similar first (at most MAX_LISTED)."""

    threshold: float
    pairs: int = 0  # every pair found
    test_images: int = 0  # test images with at least one near-duplicate in training
    train_images: int = 0  # training images with at least one in the test split
    listed: list[tuple[str, str, float]] = field(default_factory=list)  # (train path, test path, similarity)

    def summary(self) -> dict:
        """What metrics.json says."""
        return {"threshold": self.threshold, "measure": "cosine similarity of the standardised feature vectors",
                "pairs": self.pairs, "listed": len(self.listed), "test_images": self.test_images,
                "train_images": self.train_images}

    def warning(self, where: str) -> str | None:
        """The warning line of a run with near-duplicates (None without)."""
        if not self.pairs:
            return None
        return (f"warning: {self.pairs} train-test pair(s) of near-duplicate images (cosine similarity of "
                f"standardised features >= {self.threshold}; {self.test_images} test image(s) involved): test accuracy may count images "
                f"seen in training; the pairs: {where}")


@dataclass(frozen=True)
class Standardiser:
    """Each feature dimension's mean and standard deviation over the experiment's images."""

    mean: np.ndarray
    std: np.ndarray

    def __call__(self, matrix: np.ndarray) -> np.ndarray:
        """Rows centred and scaled per dimension (constant dimensions: centred only), then scaled
        to unit L2 norm (float32); a row equal to the mean stays zero."""
        z = (np.asarray(matrix, dtype=np.float32) - self.mean) / np.where(self.std > 0, self.std, 1.0)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return (z / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def feature_stats(rows: DataFrame) -> Standardiser:
    """The per-dimension mean and standard deviation of ``features`` (one Spark aggregation)."""
    stats = rows.select(Summarizer.metrics("mean", "std").summary(F.col("features")).alias("s")).first()["s"]
    return Standardiser(stats["mean"].toArray().astype(np.float32), stats["std"].toArray().astype(np.float32))


def pairs_above(block: np.ndarray, test: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block row, test row, similarity) of every pair at or above ``threshold``; both normalised."""
    sims = block @ test.T
    rows, cols = np.nonzero(sims >= threshold)
    return rows, cols, sims[rows, cols].astype(np.float64)


def _pair_finder(shared, threshold: float):
    """The mapInPandas function: each Arrow batch of training rows against the broadcast test rows
    (``shared``: a broadcast of (standardised test matrix, :class:`Standardiser`))."""
    def find(batches):
        test, standardise = shared.value
        for batch in batches:
            if batch.empty:
                continue
            rows, cols, sims = pairs_above(standardise(np.stack(batch["v"].to_numpy())), test, threshold)
            yield pd.DataFrame({"train_path": batch["path"].to_numpy()[rows],
                                "test_index": cols.astype(np.int32), "similarity": sims})
    return find


def _vectors(rows: DataFrame) -> DataFrame:
    return rows.select("path", vector_to_array("features", "float32").alias("v"))


def _as_bytes(batches):
    """mapInPandas: each vector as its float32 bytes (no Python float objects on the driver)."""
    for batch in batches:
        yield pd.DataFrame({"path": batch["path"], "v": [np.asarray(v, dtype=np.float32).tobytes() for v in batch["v"]]})


def _test_vectors(split: DataFrame) -> tuple[list[str], np.ndarray]:
    """(paths, float32 matrix) of the test rows, collected as bytes: n_test x dim x 4 bytes."""
    rows = _vectors(split.filter(F.col("is_test"))).mapInPandas(_as_bytes, "path string, v binary").collect()
    if not rows:
        return [], np.zeros((0, 0), dtype=np.float32)
    return [r.path for r in rows], np.stack([np.frombuffer(r.v, dtype=np.float32) for r in rows])


def find_near_duplicates(split: DataFrame, threshold: float) -> NearDuplicates:
    """The train-test pairs of ``split`` (rows with ``path``, ``features``, ``is_test``) whose
    standardised feature vectors have cosine similarity >= ``threshold``."""
    test_paths, test = _test_vectors(split)
    result = NearDuplicates(threshold)
    if not test_paths:
        return result
    standardise = feature_stats(split)
    shared = _share(split.sparkSession, (standardise(test), standardise))
    del test
    found = _vectors(split.filter(~F.col("is_test"))).mapInPandas(_pair_finder(shared, threshold), PAIR_SCHEMA).cache()
    try:
        _collect(result, found, test_paths)
    finally:
        found.unpersist()
        shared.unpersist()
    return result


class _InClosure:
    """A value the tasks get inside the function's closure, as a broadcast's ``value``: on Spark
    Connect, which has no SparkContext and so no broadcast variables."""

    def __init__(self, value) -> None:
        self.value = value

    def unpersist(self) -> None:
        pass


def _share(spark, value):
    """``value`` for every task: a broadcast in classic mode, else in the closure."""
    return _InClosure(value) if is_connect(spark) else spark.sparkContext.broadcast(value)


def _collect(result: NearDuplicates, found: DataFrame, test_paths: list[str]) -> None:
    """Count the pairs (``found`` is cached: the search runs once, on every partition at once) and
    bring the MAX_LISTED most similar to the driver, most similar first."""
    counts = found.agg(F.count("*").alias("pairs"), F.countDistinct("test_index").alias("tests"),
                       F.countDistinct("train_path").alias("trains")).first()
    result.pairs, result.test_images, result.train_images = counts["pairs"], counts["tests"], counts["trains"]
    if result.pairs:
        top = found.orderBy(F.desc("similarity"), "train_path", "test_index").limit(MAX_LISTED).collect()
        result.listed = [(r.train_path, test_paths[r.test_index], r.similarity) for r in top]
