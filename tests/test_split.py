"""The train/test split and folds: grouped, stratified, seeded, independent of partitioning."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

from conftest import ROOT
from xray.split import assign_split, fold_gaps, group_of, min_class_size, split_rows, split_summary, with_split

NIH = r"^(\d{8})_\d{3}\."


def _keys(counts):
    return [(f"file:/data/{label}/img{i:03d}.png", label) for label, n in counts.items() for i in range(n)]


def _per_image_split(keys, seed, test_fraction, cv_folds):
    """The per-image split as it was before groups (its specification, written out plainly)."""
    by_label = defaultdict(list)
    for path, label in keys:
        by_label[label].append(path)
    rows = {}
    for label, paths in by_label.items():
        ranked = sorted(paths, key=lambda p: (hashlib.sha256(f"{label}\0{p.rsplit('/', 1)[-1]}\0{seed}".encode())
                                               .hexdigest(), p.rsplit("/", 1)[-1]))
        n_test = max(1, math.floor(len(paths) * test_fraction + 0.5))
        for rank, path in enumerate(ranked):
            rows[path] = (rank < n_test, -1 if rank < n_test else (rank - n_test) % max(cv_folds, 1))
    return rows


def _patients(seed, per_class=(("No_findings", 450), ("Pneumonia", 450)), mean_extra=1.5, shared=17, covid=112):
    """NIH-like names: patients with 1 to ~12 images each (most with one or two), some patients in
    two classes, and COVID-19 images whose names carry no patient."""
    rng = random.Random(seed)
    keys, pid = [], 0
    for label, n in per_class:
        while n > 0:
            pid += 1
            size = min(n, 1 + int(rng.expovariate(1 / mean_extra)))
            keys += [(f"file:/d/{label}/{pid:08d}_{j:03d}.png", label) for j in range(size)]
            n -= size
    for i in range(shared):  # the same patient in another class
        p = rng.randrange(1, pid)
        keys.append((f"file:/d/Pneumonia/{p:08d}_{500 + i:03d}.png", "Pneumonia"))
    return keys + [(f"file:/d/Covid-19/case-{i}.jpg", "Covid-19") for i in range(covid)]


def _check_grouped(rows, folds):
    """No group on two sides or in two folds; every image once."""
    side, fold = {}, {}
    for r in rows:
        assert side.setdefault(r.group, r.is_test) == r.is_test, f"group {r.group} on both sides"
        assert fold.setdefault(r.group, r.fold) == r.fold, f"group {r.group} in two folds"
        assert (r.fold == -1) == r.is_test and -1 <= r.fold < max(folds, 1)


def test_per_image_split_is_stratified_exact_and_seeded():
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


@pytest.mark.parametrize("pattern", [None, "", NIH, r"^(case)-(\d+)$"])  # the last two group nothing here
def test_one_image_per_group_gives_the_per_image_split_of_before(pattern):
    keys = _keys({"Covid-19": 25, "No_findings": 103, "Pneumonia": 7})
    for seed, fraction, folds in ((42, 0.2, 3), (7, 0.34, 0), (1, 0.1, 5)):
        got = {p: (t, f) for p, t, f in split_rows(keys, seed, fraction, folds, pattern)}
        assert got == _per_image_split(keys, seed, fraction, folds)


def test_group_of_takes_the_first_group_that_matched():
    pattern = __import__("re").compile(r"^(\d{8})_\d{3}\.|^(.+)-day\d+")
    assert group_of("file:/d/No_findings/00002658_001.png", "No_findings", pattern) == "00002658"
    assert group_of("file:/d/Covid-19/covid-19-pneumonia-24-day6.png", "Covid-19", pattern) == "covid-19-pneumonia-24"
    assert group_of("file:/d/Covid-19/lancet-case2a.png", "Covid-19", pattern) == "Covid-19/lancet-case2a.png"
    assert group_of("file:/d/Covid-19/x.png", "Covid-19", None) == "Covid-19/x.png"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_patient_groups_stay_on_one_side_and_classes_keep_their_share(seed):
    keys = _patients(seed)
    classes = ["Covid-19", "No_findings", "Pneumonia"]
    rows = assign_split(keys, seed, 0.2, 5, NIH)
    assert sorted((r.path, r.label) for r in rows) == sorted(keys)
    _check_grouped(rows, 5)
    s = split_summary(rows, classes, NIH)
    for c in classes:  # as close to 20% as the groups allow: within one image of the target here
        target = max(1, math.floor(s["per_class"][c]["images"] * 0.2 + 0.5))
        assert abs(s["per_class"][c]["test_images"] - target) <= 1, (c, s["per_class"][c])
    # the folds are group folds, and each class is spread evenly over them
    per_fold = Counter((r.fold, r.label) for r in rows if not r.is_test)
    for c in classes:
        sizes = [per_fold[(f, c)] for f in range(5)]
        assert max(sizes) - min(sizes) <= 2, (c, sizes)
    assert fold_gaps(rows, 5) == {}


def test_the_groups_and_the_mixed_class_groups_are_counted():
    keys = _patients(4)
    classes = ["Covid-19", "No_findings", "Pneumonia"]
    rows = assign_split(keys, 4, 0.2, 0, NIH)
    s = split_summary(rows, classes, NIH)
    labels_of = defaultdict(set)
    for path, label in keys:
        name = path.rsplit("/", 1)[-1]
        labels_of[name[:8] if name[:8].isdigit() else f"{label}/{name}"].add(label)
    mixed = sorted(g for g, labels in labels_of.items() if len(labels) > 1)
    assert s["groups"] == len(labels_of) and s["groups_test"] + s["groups_train"] == len(labels_of)
    assert s["mixed_class_groups"] == len(mixed) > 0 and s["mixed_class_group_names"] == mixed
    side = {r.group: r.is_test for r in rows}
    for g in mixed:  # a mixed group is whole: all its images, of both classes, on its one side
        assert {r.is_test for r in rows if r.group == g} == {side[g]}
    assert s["per_class"]["Covid-19"]["groups_test"] == s["per_class"]["Covid-19"]["test_images"]  # no pattern match
    assert s["per_class"]["Pneumonia"]["groups_test"] + s["per_class"]["Pneumonia"]["groups_train"] == \
        len({r.group for r in rows if r.label == "Pneumonia"})


def test_large_groups_without_single_images_are_spread_in_proportion():
    rng = random.Random(5)
    keys = [(f"file:/d/{c}/{c[0]}{p:03d}_{j:03d}.png", c) for c in ("a", "b") for p in range(40)
            for j in range(rng.randint(2, 12))]
    rows = assign_split(keys, 9, 0.25, 3, r"^(\w\d{3})_")
    _check_grouped(rows, 3)
    s = split_summary(rows, ["a", "b"], "x")
    assert s["largest_group"] == 12 and s["groups"] == 80
    for c in ("a", "b"):
        assert abs(s["per_class"][c]["test_share"] - 0.25) <= 6 / s["per_class"][c]["images"]  # half a large group
    # every fold holds a fair share of each class
    for c in ("a", "b"):
        sizes = Counter(r.fold for r in rows if r.label == c and not r.is_test)
        assert min(sizes.values()) >= 0.8 * sum(sizes.values()) / 3


def test_grouped_split_is_deterministic_and_seeded():
    keys = _patients(6)
    rows = assign_split(keys, 42, 0.2, 4, NIH)
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    assert assign_split(shuffled, 42, 0.2, 4, NIH) == rows  # input order does not matter
    moved = [(p.replace("file:/d/", "hdfs://nn/elsewhere/"), c) for p, c in keys]
    assert [(r.group, r.is_test, r.fold) for r in assign_split(moved, 42, 0.2, 4, NIH)] == \
        [(r.group, r.is_test, r.fold) for r in rows]
    other = assign_split(keys, 43, 0.2, 4, NIH)
    assert {r.group for r in other if r.is_test} != {r.group for r in rows if r.is_test}


SPLIT_IN_A_NEW_PROCESS = """
import json, sys
from xray.split import assign_split
keys, pattern = json.load(sys.stdin)
print(json.dumps([(r.path, r.group, r.is_test, r.fold) for r in assign_split(map(tuple, keys), 42, 0.2, 4, pattern)]))
"""


@pytest.mark.slow
def test_two_processes_give_the_same_grouped_split():
    """Two runs are two processes: their string hashing differs (here: randomised, there: off), the split does not."""
    keys = _patients(8)
    here = [[r.path, r.group, r.is_test, r.fold] for r in assign_split(keys, 42, 0.2, 4, NIH)]
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": os.path.join(ROOT, "code")}
    proc = subprocess.run([sys.executable, "-c", SPLIT_IN_A_NEW_PROCESS], input=json.dumps([keys, NIH]),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == here


def test_the_seed_is_an_int():
    keys = _patients(7)
    rows = assign_split(keys, 42, 0.2, 3, NIH)
    assert assign_split(keys, np.int64(42), 0.2, 3, NIH) == rows  # an integer of any type: the same split
    for bad in ((1, 42), "42", 42.0, True, None):  # hashed as text, each would split silently
        with pytest.raises(TypeError, match=r"^seed: expected an int, got "):
            assign_split(keys, bad, 0.2, 3, NIH)


def test_fold_gaps_name_the_class_a_fold_would_train_without():
    keys = [(f"file:/d/a/p1_{i}.png", "a") for i in range(6)] + _keys({"b": 12})
    rows = assign_split(keys, 1, 0.2, 2, r"^(p\d)_")
    # class a is one group: its fold trains on the other fold alone, which holds no a
    assert fold_gaps(rows, 2) in ({0: ["a"]}, {1: ["a"]})


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
