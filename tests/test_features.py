"""The feature cache, with a stand-in featurizer computed by Spark SQL (no backbone, no Python
workers): what is featurized, what comes from the cache, duplicates, and parts of another run."""

from __future__ import annotations

import os
import shutil

from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.sql import functions as F

from xray import progress
from xray.features import _parts, cache_folder, featurize_cached


class _LengthFeaturizer(Transformer):
    """Stands in for the backbone: features = (byte length, first byte) of ``content``."""

    def getModelName(self) -> str:  # noqa: N802 - KerasImageFeaturizer's names
        return "Stub"

    def getPooling(self) -> str:  # noqa: N802
        return "avg"

    def getWeights(self) -> str:  # noqa: N802
        return "random"

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
