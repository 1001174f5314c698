"""The train/test split and the cross-validation folds of an experiment: stratified and seeded.

Computed on the driver from (path, label) pairs, so the same files and seed give the same split
on any machine, partitioning or Spark version; joined to feature rows as a broadcast table.
"""

from __future__ import annotations

import hashlib
import math

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .data import LABEL


def split_rows(keys, seed: int, test_fraction: float, cv_folds: int = 0) -> list[tuple[str, bool, int]]:
    """``(path, is_test, fold)`` for ``(path, label)`` pairs: stratified, seeded, exact per class.

    Inside each class the files are ordered by SHA-256 of (class, file name, seed), then file
    name: the same files and seed give the same split on any machine, partitioning or Spark
    version. The first ``max(1, round(n * test_fraction))`` files of a class (half rounded up)
    are its test split; the training files are dealt to ``cv_folds`` folds in turn (``fold`` is
    -1 on test rows).
    """
    by_label: dict[str, list[str]] = {}
    for path, label in keys:
        by_label.setdefault(label, []).append(path)
    folds = max(cv_folds, 1)
    rows = []
    for label, paths in sorted(by_label.items()):
        def order(path: str, label: str = label) -> tuple[str, str]:
            name = path.rsplit("/", 1)[-1]
            return hashlib.sha256(f"{label}\0{name}\0{seed}".encode()).hexdigest(), name

        n_test = test_count(len(paths), test_fraction)
        for rank, path in enumerate(sorted(paths, key=order)):
            rows.append((path, rank < n_test, -1 if rank < n_test else (rank - n_test) % folds))
    return rows


def test_count(n: int, test_fraction: float) -> int:
    """Test images of a class of ``n``: ``n * test_fraction`` rounded (half up), at least one."""
    return max(1, math.floor(n * test_fraction + 0.5))


def min_class_size(test_fraction: float, cv_folds: int = 0) -> int:
    """The fewest images a class needs: its test images (:func:`test_count`) and at least one
    training image, or one per cross-validation fold."""
    train = max(1, cv_folds)
    n = train + 1
    while n - test_count(n, test_fraction) < train:
        n += 1
    return n


def with_split(df: DataFrame, seed: int, test_fraction: float, cv_folds: int = 0, keys=None) -> DataFrame:
    """Add ``is_test`` and ``fold`` (see :func:`split_rows`) to rows with ``path`` and ``label``.

    The split is computed on the driver from the (path, label) pairs, ``keys`` when given (an
    experiment has them from the feature cache), else collected from ``df``; it joins ``df`` as a
    broadcast table, so the feature rows are not shuffled.
    """
    if keys is None:
        keys = [(r["path"], r[LABEL]) for r in df.select("path", LABEL).collect()]
    table = df.sparkSession.createDataFrame(split_rows(keys, seed, test_fraction, cv_folds),
                                            "path string, is_test boolean, fold int")
    return df.join(F.broadcast(table), "path")
