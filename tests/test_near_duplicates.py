"""Near-duplicates across the split: blocked cosine search on standardised features, against brute force."""

from __future__ import annotations

import numpy as np
from pyspark.ml.linalg import Vectors

from xray import near_duplicates
from xray.near_duplicates import Standardiser, find_near_duplicates, pairs_above

PLANTED = {("file:/d/a/tr3.png", "file:/d/b/te0.png"), ("file:/d/a/tr7.png", "file:/d/b/te1.png"),
           ("file:/d/a/tr8.png", "file:/d/b/te1.png")}


def _features(seed, n=60, dim=32, common=20.0):
    """Non-negative features sharing a large common component (as pooled ReLU features do), with
    planted near-copies: train 3 = test 0, train 7 ~ test 1 (a little noise), train 8 = test 1;
    test 2 and 3 are copies of each other (same side)."""
    rng = np.random.default_rng(seed)
    train = common + rng.gamma(0.5, 1.0, (n, dim))
    test = common + rng.gamma(0.5, 1.0, (n // 3, dim))
    train[3] = test[0]
    train[7] = test[1] + rng.normal(0, 0.005, dim)
    train[8] = test[1]
    test[3] = test[2]
    train[:, 5] = test[:, 5] = 1.0  # a constant dimension (std 0)
    return train, test


def _standardised(rows, both):
    z = (rows - both.mean(0)) / np.where(both.std(0) > 0, both.std(0), 1.0)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _brute_force(train, test, threshold):
    both = np.vstack([train, test])
    sims = _standardised(train, both) @ _standardised(test, both).T
    return {(int(i), int(j)) for i, j in zip(*np.nonzero(sims >= threshold))}


def test_plain_cosine_would_flag_everything_standardised_only_the_copies():
    train, test = _features(0)
    plain = (train / np.linalg.norm(train, axis=1, keepdims=True)) @ (test / np.linalg.norm(test, axis=1, keepdims=True)).T
    assert (plain >= 0.995).mean() > 0.5  # the common component makes unrelated rows look alike
    both = np.vstack([train, test])
    standardise = Standardiser(both.mean(0).astype(np.float32), both.std(0, ddof=1).astype(np.float32))
    rows, cols, sims = pairs_above(standardise(train), standardise(test), 0.995)
    assert set(zip(rows.tolist(), cols.tolist())) == {(3, 0), (7, 1), (8, 1)} == _brute_force(train, test, 0.995)
    assert np.all(sims >= 0.995) and np.all(sims <= 1.0 + 1e-5)
    # a block at a time gives the same pairs as the whole matrix
    blocks = set()
    for start in range(0, len(train), 7):
        r, c, _ = pairs_above(standardise(train[start:start + 7]), standardise(test), 0.5)
        blocks |= {(int(i) + start, int(j)) for i, j in zip(r, c)}
    assert blocks == _brute_force(train, test, 0.5) and len(blocks) > 3
    assert not standardise(both.mean(0, keepdims=True)).any()  # the mean itself: a zero row, similar to nothing


def _split_frame(spark, train, test, partitions):
    rows = [(f"file:/d/a/tr{i}.png", Vectors.dense(v.tolist()), False) for i, v in enumerate(train)]
    rows += [(f"file:/d/b/te{j}.png", Vectors.dense(v.tolist()), True) for j, v in enumerate(test)]
    return spark.createDataFrame(rows, ["path", "features", "is_test"]).repartition(partitions)


def test_find_near_duplicates_lists_the_train_test_pairs_on_any_partitioning(spark, monkeypatch):
    train, test = _features(1)
    found = find_near_duplicates(_split_frame(spark, train, test, 3), 0.995)
    assert found.pairs == 3 and found.test_images == 2 and found.train_images == 3
    assert {(a, b) for a, b, _ in found.listed} == PLANTED  # te2/te3 are copies too, but both in test
    assert [s for _, _, s in found.listed] == sorted((s for _, _, s in found.listed), reverse=True)
    assert found.summary()["pairs"] == 3 and "3 train-test pair(s)" in found.warning("x.csv")
    # one partition: the same pairs; with room for two, every pair still counted, the most similar listed
    monkeypatch.setattr(near_duplicates, "MAX_LISTED", 2)
    capped = find_near_duplicates(_split_frame(spark, train, test, 1), 0.995)
    assert capped.pairs == 3 and capped.summary()["listed"] == 2
    assert {(a, b) for a, b, _ in capped.listed} < PLANTED
    assert min(s for _, _, s in capped.listed) >= max(s for a, b, s in found.listed if (a, b) not in
                                                     {(x, y) for x, y, _ in capped.listed})
    none = find_near_duplicates(_split_frame(spark, train[:3], test[1:], 2), 0.995)  # no copy across the split
    assert none.pairs == 0 and none.listed == [] and none.warning("x.csv") is None


def test_spark_search_equals_brute_force(spark):
    train, test = _features(3, n=90, dim=16)
    found = find_near_duplicates(_split_frame(spark, train, test, 4), 0.6)
    expected = _brute_force(train, test, 0.6)
    assert {(int(a.rsplit("tr", 1)[1][:-4]), int(b.rsplit("te", 1)[1][:-4])) for a, b, _ in found.listed} == expected
    assert found.pairs == len(expected) > 3
