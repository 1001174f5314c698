"""The train/test split and the cross-validation folds of an experiment: grouped, stratified, seeded.

Images are first put into groups (``split.group_pattern``: a regular expression on the file name
whose first capturing group names the group, e.g. the patient of ``00002658_001.png``); every
group stays whole on one side and in one fold. The split is computed on the driver, in plain
Python, from the (path, label) pairs alone, so the same files and seed give the same split on
any machine, partitioning or Spark version; it joins the feature rows as a broadcast table.

How groups are dealt (:func:`assign_split`):

1. Groups of two or more images come first, largest first (equal sizes in the order of a seeded
   SHA-256 of the group name). Each goes to the side (test, train) it fills least after adding
   it, relative to that side's per-class target: the test target of a class is
   ``max(1, round(n * test_fraction))`` images, the train target the rest. So large groups are
   spread over both sides in proportion.
2. Single images follow in the order of SHA-256 of (class, file name, seed) and fill each
   class's test target first, then go to training. With no group of two or more images (no
   pattern, or one that groups nothing) this is exactly the per-image split of before:
   stratified and exact per class.
3. The training groups are dealt to ``cv_folds`` folds the same way (large groups first, each to
   the fold it fills least, per class; ties to the lower fold): single images go round the
   folds in turn, per class.

A group whose images carry different classes stays whole and counts for each of its classes.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from collections import Counter
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from .data import LABEL

TRAIN, TEST = "train", "test"
MIXED_LISTED = 50  # mixed-class group names listed in metrics.json (all are counted)


@dataclass(frozen=True)
class SplitRow:
    """One image's place: its group, side and cross-validation fold (-1 on test rows)."""

    path: str
    label: str
    group: str
    is_test: bool
    fold: int

    @property
    def side(self) -> str:
        return TEST if self.is_test else TRAIN


@dataclass
class _Group:
    name: str
    members: list[tuple[str, str]]  # (path, label)
    counts: Counter  # images per class
    order: tuple  # the dealing order (see the module docstring)


def file_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def group_of(path: str, label: str, pattern: re.Pattern | None) -> str:
    """The group of an image: the first capturing group of ``pattern`` that matched its file name
    (``re.search``), else a group of its own named ``<class>/<file name>``."""
    name = file_name(path)
    match = pattern.search(name) if pattern is not None else None
    found = next((g for g in match.groups() if g), None) if match else None
    return found or f"{label}/{name}"


def _sha(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def _groups(keys, pattern: str | None, seed: int) -> list[_Group]:
    """The groups of the (path, label) pairs, in dealing order."""
    regex = re.compile(pattern) if pattern else None
    members: dict[str, list[tuple[str, str]]] = {}
    for path, label in keys:
        members.setdefault(group_of(path, label, regex), []).append((path, label))
    groups = []
    for name, items in members.items():
        items.sort()
        if len(items) > 1:
            order = (0, -len(items), _sha("group", name, seed), name)
        else:  # the per-image order of before: SHA-256 of (class, file name, seed), then the name
            path, label = items[0]
            order = (1, _sha(label, file_name(path), seed), file_name(path), path)
        groups.append(_Group(name, items, Counter(label for _, label in items), order))
    return sorted(groups, key=lambda g: g.order)


def _checked_seed(seed) -> int:
    """``seed`` as a plain int. The split hashes the seed's text, so anything else would pass
    silently: a tuple such as ``(1, i)``, a string, or ``True`` (which splits unlike ``1``)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    return int(seed)


def test_count(n: int, test_fraction: float) -> int:
    """Test images of a class of ``n``: ``n * test_fraction`` rounded (half up), at least one."""
    return max(1, math.floor(n * test_fraction + 0.5))


def min_class_size(test_fraction: float, cv_folds: int = 0) -> int:
    """The fewest images a class needs: its test images (:func:`test_count`) and at least one
    training image, or one per cross-validation fold (a lower bound when groups hold several)."""
    train = max(1, cv_folds)
    n = train + 1
    while n - test_count(n, test_fraction) < train:
        n += 1
    return n


def _fill_score(counts: Counter, filled: Counter, target: dict[str, float]) -> float:
    """How full a side (or fold) would be, relative to its per-class target, with a group added
    (weighted by the group's images per class)."""
    score = 0.0
    for label, n in counts.items():
        if target.get(label, 0) <= 0:
            return math.inf
        score += n * (filled[label] + n) / target[label]
    return score


def _least_filled(counts: Counter, filled: list[Counter], targets: list[dict[str, float]]) -> int:
    """The bin a group fills least (ties: the first)."""
    return min(range(len(filled)), key=lambda j: (_fill_score(counts, filled[j], targets[j]), j))


def _choose_test(groups: list[_Group], n_test: dict[str, int], n_train: dict[str, int]) -> set[str]:
    """The names of the test groups (steps 1 and 2 of the module docstring)."""
    filled = [Counter(), Counter()]  # test, train
    test = set()
    for g in groups:
        if len(g.members) == 1:
            (label,) = g.counts
            to_test = filled[0][label] < n_test[label]
        else:
            to_test = _least_filled(g.counts, filled, [n_test, n_train]) == 0
        filled[0 if to_test else 1].update(g.counts)
        if to_test:
            test.add(g.name)
    return test


def _deal_folds(groups: list[_Group], folds: int) -> dict[str, int]:
    """Group name -> fold, for the training groups in dealing order (step 3)."""
    totals = Counter()
    for g in groups:
        totals.update(g.counts)
    target = {label: n / folds for label, n in totals.items()}
    filled = [Counter() for _ in range(folds)]
    fold_of = {}
    for g in groups:
        f = _least_filled(g.counts, filled, [target] * folds)
        filled[f].update(g.counts)
        fold_of[g.name] = f
    return fold_of


def wanted_in_test(keys, test_fraction: float) -> dict[str, int]:
    """Test images wanted per class: ``max(1, round(n * test_fraction))``, halves rounded up."""
    totals = Counter(label for _, label in keys)
    return {label: test_count(n, test_fraction) for label, n in totals.items()}


def assign_split(keys, seed: int, test_fraction: float, cv_folds: int = 0,
                 group_pattern: str | None = None) -> list[SplitRow]:
    """Every (path, label) pair's group, side and fold (see the module docstring), sorted by class
    and path. The same pairs, seed and settings give the same rows, in any input order."""
    keys = list(keys)
    groups = _groups(keys, group_pattern, _checked_seed(seed))
    totals = Counter(label for _, label in keys)
    n_test = wanted_in_test(keys, test_fraction)
    test = _choose_test(groups, n_test, {c: totals[c] - n_test[c] for c in totals})
    fold_of = _deal_folds([g for g in groups if g.name not in test], max(cv_folds, 1))
    rows = [SplitRow(path, label, g.name, g.name in test, -1 if g.name in test else fold_of[g.name])
            for g in groups for path, label in g.members]
    return sorted(rows, key=lambda r: (r.label, r.path))


def split_rows(keys, seed: int, test_fraction: float, cv_folds: int = 0,
               group_pattern: str | None = None) -> list[tuple[str, bool, int]]:
    """``(path, is_test, fold)`` of :func:`assign_split`."""
    return [(r.path, r.is_test, r.fold) for r in assign_split(keys, seed, test_fraction, cv_folds, group_pattern)]


def join_split(df: DataFrame, rows: list[SplitRow]) -> DataFrame:
    """Add ``is_test`` and ``fold`` of ``rows`` to rows with ``path``: a broadcast join, so the
    feature rows are not shuffled."""
    table = df.sparkSession.createDataFrame([(r.path, r.is_test, r.fold) for r in rows],
                                            "path string, is_test boolean, fold int")
    return df.join(F.broadcast(table), "path")


def with_split(df: DataFrame, seed: int, test_fraction: float, cv_folds: int = 0, keys=None,
               group_pattern: str | None = None) -> DataFrame:
    """Add ``is_test`` and ``fold`` (see :func:`assign_split`) to rows with ``path`` and ``label``.

    The split is computed from the (path, label) pairs: ``keys`` when given (an experiment has
    them from the feature cache), else collected from ``df``.
    """
    if keys is None:
        keys = [(r["path"], r[LABEL]) for r in df.select("path", LABEL).collect()]
    return join_split(df, assign_split(keys, seed, test_fraction, cv_folds, group_pattern))


def split_summary(rows: list[SplitRow], classes: list[str], group_pattern: str | None) -> dict:
    """What metrics.json says of a split: groups per side and class, mixed-class groups, shares."""
    by_group: dict[str, list[SplitRow]] = {}
    for r in rows:
        by_group.setdefault(r.group, []).append(r)
    side_of = {g: members[0].side for g, members in by_group.items()}
    mixed = sorted(g for g, members in by_group.items() if len({r.label for r in members}) > 1)
    per_class = {}
    for c in classes:
        mine = [r for r in rows if r.label == c]
        groups = {r.group for r in mine}
        n_test = sum(r.is_test for r in mine)
        per_class[c] = {"images": len(mine), "test_images": n_test, "train_images": len(mine) - n_test,
                        "test_share": n_test / len(mine) if mine else None,
                        "groups_test": sum(side_of[g] == TEST for g in groups),
                        "groups_train": sum(side_of[g] == TRAIN for g in groups)}
    n_test = sum(r.is_test for r in rows)
    return {
        "group_pattern": group_pattern or None,
        "groups": len(by_group),
        "groups_test": sum(s == TEST for s in side_of.values()),
        "groups_train": sum(s == TRAIN for s in side_of.values()),
        "largest_group": max((len(m) for m in by_group.values()), default=0),
        "mixed_class_groups": len(mixed),
        "mixed_class_group_names": mixed[:MIXED_LISTED],
        "test_share": n_test / len(rows) if rows else None,
        "per_class": per_class,
    }


def fold_gaps(rows: list[SplitRow], folds: int) -> dict[int, list[str]]:
    """Per cross-validation fold, the classes missing from the other folds (its training part)."""
    classes = {r.label for r in rows if not r.is_test}
    gaps = {}
    for f in range(folds):
        present = {r.label for r in rows if not r.is_test and r.fold != f}
        if classes - present:
            gaps[f] = sorted(classes - present)
    return gaps


def describe_split(summary: dict) -> str:
    """One log line: groups per side, the achieved test share of each class, mixed-class groups."""
    shares = ", ".join(f"{c} {v['test_share']:.3f} ({v['test_images']} of {v['images']})"
                       for c, v in summary["per_class"].items())
    how = (f"groups by split.group_pattern {summary['group_pattern']!r}" if summary["group_pattern"]
           else "one group per image")
    mixed = summary["mixed_class_groups"]
    return (f"split: {summary['groups']} groups ({how}; largest {summary['largest_group']} images): "
            f"{summary['groups_train']} train, {summary['groups_test']} test; test share per class: {shares}"
            + (f"; {mixed} group(s) hold more than one class, each kept whole" if mixed else ""))
