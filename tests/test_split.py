"""The train/test split and folds: stratified, exact per class, seeded, independent of partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from xray.split import min_class_size, split_rows, with_split


def _keys(counts):
    return [(f"file:/data/{label}/img{i:03d}.png", label) for label, n in counts.items() for i in range(n)]


def test_split_is_stratified_exact_and_seeded():
    keys = _keys({"Covid-19": 25, "No_findings": 103, "Pneumonia": 1})
    rows = split_rows(keys, seed=42, test_fraction=0.2, cv_folds=3)
    assert sorted(p for p, _, _ in rows) == sorted(p for p, _ in keys)
    label_of = dict(keys)
    tests = {c: sum(t for p, t, _ in rows if label_of[p] == c) for c in ("Covid-19", "No_findings", "Pneumonia")}
    assert tests == {"Covid-19": 5, "No_findings": 21, "Pneumonia": 1}  # round(20.6) = 21; at least one a class
    assert all(f == -1 for _, t, f in rows if t)
    # training files are dealt to the folds in turn, per class: fold sizes differ by at most one
    for c in ("Covid-19", "No_findings"):
        sizes = np.bincount([f for p, t, f in rows if not t and label_of[p] == c], minlength=3)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == {"Covid-19": 20, "No_findings": 82}[c]
    # order of the input does not matter; the seed does; the same seed gives the same split
    assert sorted(split_rows(list(reversed(keys)), 42, 0.2, 3)) == sorted(rows)
    other = {p for p, t, _ in split_rows(keys, 7, 0.2, 3) if t}
    assert other != {p for p, t, _ in rows if t}
    # the split of a file does not depend on the folder above its class (a moved data set)
    moved = [(p.replace("file:/data/", "hdfs://nn/x/"), c) for p, c in keys]
    assert {p.rsplit("/", 1)[-1] for p, t, _ in split_rows(moved, 42, 0.2, 3) if t} == \
        {p.rsplit("/", 1)[-1] for p, t, _ in rows if t}


def test_with_split_joins_the_same_split_on_any_partitioning(spark):
    keys = _keys({"a": 9, "b": 14})
    rows = {p: (t, f) for p, t, f in split_rows(keys, 3, 0.34, 2)}
    df = spark.createDataFrame([(p, c, float(i)) for i, (p, c) in enumerate(keys)], "path string, label string, x double")
    for frame in (df, df.repartition(5)):
        got = {r.path: (r.is_test, r.fold) for r in with_split(frame, 3, 0.34, 2).collect()}
        assert got == rows
    # keys given by the caller (an experiment has them) give the same rows without a collect
    assert {r.path: (r.is_test, r.fold) for r in with_split(df, 3, 0.34, 2, keys=keys).collect()} == rows


@pytest.mark.parametrize("test_fraction", [0.01, 0.2, 0.4, 0.5, 0.9])
@pytest.mark.parametrize("cv_folds", [0, 1, 2, 5])
def test_min_class_size_is_the_fewest_images_the_split_can_use(test_fraction, cv_folds):
    """With min_class_size images a class has training images for every fold; with one fewer it has not."""
    need = min_class_size(test_fraction, cv_folds)

    def training(n):
        rows = split_rows(_keys({"a": n}), seed=3, test_fraction=test_fraction, cv_folds=cv_folds)
        return [f for _, is_test, f in rows if not is_test]

    assert len(set(training(need))) == max(1, cv_folds)  # each fold (or the one training set) has an image
    assert len(set(training(need - 1))) < max(1, cv_folds)
