"""The feature cache, with a stand-in featurizer computed by Spark SQL (no backbone, no Python
workers): what is featurized, what comes from the cache, duplicates, and parts of another run."""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.sql import functions as F

from xray import atomic, features, progress
from xray.cache_parts import list_parts as _parts
from xray.features import cache_folder, featurize_cached


class _LengthFeaturizer(Transformer):
    """Stands in for the backbone: features = (byte length, first byte) of ``content``."""

    def getModelName(self) -> str:  # noqa: N802 - KerasImageFeaturizer's names
        return "Stub"

    def getPooling(self) -> str:  # noqa: N802
        return "avg"

    def getWeights(self) -> str:  # noqa: N802
        return "random"

    def getMaxImagePixels(self) -> int:  # noqa: N802
        return 10_000_000

    def _transform(self, df):
        first = F.conv(F.hex(F.substring("content", 1, 1)), 16, 10).cast("double")
        return df.withColumn("features", array_to_vector(F.array(F.length("content").cast("double"), first)))


def _images(spark, contents: dict[str, bytes]):
    rows = [(f"file:/d/{path}", path.split("/")[0], data) for path, data in contents.items()]
    return spark.createDataFrame(rows, "path string, label string, content binary")


def _features(df) -> dict[str, list[float]]:
    return {r.path.rsplit("/d/", 1)[1]: list(r.features) for r in df.collect()}


CONTENTS = {"a/1.png": b"\x01abc", "a/2.png": b"\x02abcdef", "b/1.png": b"\x03ab", "b/copy.png": b"\x01abc",
            "c/1.png": b"\x04abcd"}
EXPECTED = {path: [float(len(data)), float(data[0])] for path, data in CONTENTS.items()}


def test_cache_featurizes_each_content_once_then_reads_it(spark, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 3600.0)  # no progress lines, however slow the machine
    images, featurizer, cache = _images(spark, CONTENTS), _LengthFeaturizer(), str(tmp_path / "cache")
    logs: list[str] = []
    # Classes a and b for this task, c for a later one: featurized in the same pass, not returned.
    feats, stats = featurize_cached(spark, images, featurizer, cache, log=logs.append, keep=["a", "b"])
    assert _features(feats) == {p: v for p, v in EXPECTED.items() if not p.startswith("c/")}
    # b/copy.png has a/1.png's bytes: 4 distinct contents, one of them for the other task.
    assert (stats.images, stats.featurized, stats.from_cache, stats.featurized_for_others) == (4, 3, 0, 1)
    assert sorted(stats.keys) == sorted((f"file:/d/{p}", p[0]) for p in CONTENTS if not p.startswith("c/"))
    assert logs == ["featurizing 4 images with Stub (0 of 4 already cached, 1 of them for other tasks)"]
    assert stats.rate_source == "this run"

    logs.clear()
    feats, stats = featurize_cached(spark, images, featurizer, cache, log=logs.append)
    assert _features(feats) == EXPECTED and logs == []
    assert (stats.images, stats.featurized, stats.from_cache, stats.rate_source) == (5, 0, 5, "cache")

    # Another run featurized the same images at the same time: its part repeats every content.
    folder = cache_folder(cache, featurizer)
    (part,) = _parts(folder)
    shutil.copytree(part, os.path.join(folder, "part-other-run"))
    assert len(_parts(folder)) == 2
    feats, stats = featurize_cached(spark, images, featurizer, cache, log=logs.append)
    rows = feats.collect()
    assert len(rows) == 5 and _features(feats) == EXPECTED  # each image once, with its features
    assert [f for f in os.listdir(folder) if f.startswith(".")] == []  # no temporary part left


def test_without_a_cache_folder_features_stay_in_spark(spark):
    feats, stats = featurize_cached(spark, _images(spark, CONTENTS), _LengthFeaturizer(), None,
                                    log=lambda line: None, keep=["b"])
    assert _features(feats) == {p: v for p, v in EXPECTED.items() if p.startswith("b/")}
    assert (stats.images, stats.featurized, stats.from_cache, stats.rate_source) == (2, 2, 0, "this run")


# --------------------------------------------------------------------------- damage, odd paths, two runs at once


def _damage(part: str, how: str) -> str:
    """Damage the largest Parquet file of a cache part as a crash, a disk or a user might; returns its name."""
    name = max((f for f in os.listdir(part) if f.endswith(".parquet")), key=lambda f: os.path.getsize(os.path.join(part, f)))
    path, crc = os.path.join(part, name), os.path.join(part, f".{name}.crc")
    data = open(path, "rb").read()
    if how == "bit flip":  # same length, one byte changed in the data pages: only the .crc tells
        data = data[:40] + bytes([data[40] ^ 0xFF]) + data[41:]
    else:  # garbage without .crc
        data = b"garbage " * 50
        os.unlink(crc)
    with open(path, "wb") as f:
        f.write(data)
    return name


# The check's two branches: a checksum file that no longer matches (a same-length change, which only
# the checksum shows; truncation fails it too), and no checksum file at all (every page decoded).
@pytest.mark.parametrize("how", ["bit flip", "garbage without .crc"])
def test_a_damaged_cache_part_is_set_aside_and_its_images_featurized_again(spark, tmp_path, how):
    images, featurizer, cache = _images(spark, CONTENTS), _LengthFeaturizer(), str(tmp_path / "cache")
    featurize_cached(spark, images, featurizer, cache, log=lambda line: None)
    folder = cache_folder(cache, featurizer)
    (part,) = _parts(folder)
    damaged = _damage(part, how)

    logs: list[str] = []
    feats, stats = featurize_cached(spark, images, featurizer, cache, log=logs.append)
    assert _features(feats) == EXPECTED and stats.from_cache == 0 and stats.featurized == 4
    # Set aside, not deleted, and named in one line; a new part holds its images.
    moved = os.path.join(cache, "quarantine", os.path.basename(folder), os.path.basename(part))
    assert damaged in os.listdir(moved) and not os.path.exists(part)
    (line,) = [line for line in logs if "damaged" in line]
    assert line.startswith(f"feature cache: part {part} is damaged (") and f"moved to {moved}" in line
    assert len(_parts(folder)) == 1

    logs.clear()
    feats, stats = featurize_cached(spark, images, featurizer, cache, log=logs.append)
    assert _features(feats) == EXPECTED and stats.from_cache == 5 and logs == []


GLOB_NAME = "cache [1] {a,b} *?\\"


def test_a_cache_folder_with_glob_characters(spark, tmp_path):
    images, featurizer, cache = _images(spark, CONTENTS), _LengthFeaturizer(), str(tmp_path / GLOB_NAME)
    for from_cache in (0, 5):
        feats, stats = featurize_cached(spark, images, featurizer, cache, log=lambda line: None)
        assert _features(feats) == EXPECTED and stats.from_cache == from_cache


def test_two_runs_featurize_into_one_cache_at_once(spark, tmp_path, monkeypatch):
    """Both runs read the empty cache before either writes (a barrier makes sure), so both
    featurize every image: each returns every image once, and later runs read each once."""
    images, featurizer, cache = _images(spark, CONTENTS), _LengthFeaturizer(), str(tmp_path / "cache")
    barrier = threading.Barrier(2, timeout=300)
    read_cache = features._read_cache

    def read_then_wait(*args, **kwargs):
        cache = read_cache(*args, **kwargs)
        barrier.wait()
        return cache

    monkeypatch.setattr(features, "_read_cache", read_then_wait)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(featurize_cached, spark, images, featurizer, cache, log=lambda line: None)
                for _ in range(2)]
        results = [run.result() for run in runs]
    for feats, stats in results:
        assert feats.count() == 5 and _features(feats) == EXPECTED and stats.featurized == 4
    folder = cache_folder(cache, featurizer)
    assert len(_parts(folder)) == 2 and [f for f in os.listdir(folder) if f.startswith(".")] == []

    monkeypatch.setattr(features, "_read_cache", read_cache)
    feats, stats = featurize_cached(spark, images, featurizer, cache, log=lambda line: None)
    assert feats.count() == 5 and _features(feats) == EXPECTED and stats.from_cache == 5


class _SkippingFeaturizer(_LengthFeaturizer):
    """handleInvalid=skip's behaviour: rows whose content is not an image are dropped."""

    def _transform(self, df):
        return super()._transform(df.filter(F.hex(F.substring("content", 1, 1)) != "04"))


def test_images_the_featurizer_skips_are_named_with_their_reason(spark, tmp_path):
    files = {}
    for rel, content in CONTENTS.items():
        path = tmp_path / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        files[f"file:{path}"] = (rel.split("/")[0], content)
    images = spark.createDataFrame([(p, label, data) for p, (label, data) in files.items()],
                                   "path string, label string, content binary")
    for run in range(2):  # a skipped image is not cached: each run tries it again and names it
        logs: list[str] = []
        feats, stats = featurize_cached(spark, images, _SkippingFeaturizer(), str(tmp_path / "cache"), log=logs.append)
        assert feats.count() == 4
        bad = str(tmp_path / "c" / "1.png")
        assert stats.skipped == {bad: "not an image (unrecognised format)"}
        assert any(line.startswith(f"left out 1 image(s) that did not decode (handleInvalid=skip): {bad}: not an image")
                   for line in logs)


class _FailingFeaturizer(_LengthFeaturizer):
    """Fails inside the Spark job, as a wrong weights file or a bad image with handleInvalid=error do."""

    def _transform(self, df):
        return df.withColumn("features", array_to_vector(F.array(F.raise_error(F.lit("featurizer failed")).cast("double"))))


def test_a_failed_run_leaves_no_empty_cache_folder_and_later_runs_tidy_up(spark, tmp_path):
    images, cache = _images(spark, CONTENTS), tmp_path / "cache" / "features"
    with pytest.raises(Exception, match="featurizer failed"):
        featurize_cached(spark, images, _FailingFeaturizer(), str(cache), log=lambda line: None)
    assert os.listdir(tmp_path) == []  # neither the cache folders it made nor a temporary part

    # What earlier runs left: an empty cache folder, a killed run's temporary part (its process
    # is gone); a running run's temporary part stays.
    (cache / "Other-avg-x-v1").mkdir(parents=True)
    host, boot, pid, start = atomic.owner_tag().split(".")
    killed = cache / "Stub-avg-x-v1" / f".tmp-{host}.{boot}.{pid}.{int(start) + 1}-part-1"
    (killed / "_temporary" / "0").mkdir(parents=True)
    running = cache / "Busy-avg-x-v1" / f".tmp-{atomic.owner_tag()}-part-2"
    running.mkdir(parents=True)
    logs: list[str] = []
    feats, _ = featurize_cached(spark, images, _LengthFeaturizer(), str(cache), log=logs.append)
    assert _features(feats) == EXPECTED
    assert not killed.exists() and running.exists() and not (cache / "Other-avg-x-v1").exists()
    assert any(line.startswith("feature cache: removed 1 temporary part(s) left by an interrupted run")
               and str(killed) in line for line in logs)
