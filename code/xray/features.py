"""The feature cache: backbone features keyed by image content, stored as Parquet.

Layout: ``<cache_dir>/<model>-<pooling>-<weights id>-<FEATURE_VERSION>/part-<uuid>/`` holds rows
``(sha256, features)``. A run featurizes only images whose content hash is in no part yet,
writes them to a temporary folder and renames it to ``part-<uuid>`` when complete, so a
half-written part is never read. The key covers everything that changes a feature: the image
bytes, the backbone, the weights (their checksum, or Keras' version for seeded random weights),
the pooling and the preprocessing version.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer

# Bump when decoding, resizing or preprocessing changes what a feature vector holds.
FEATURE_VERSION = "v1"


@dataclass
class FeaturizeStats:
    images: int  # images in the data set
    featurized: int  # featurized in this run
    from_cache: int  # images whose features were already in the cache
    seconds: float  # featurization wall time of this run
    images_per_second: float | None  # this run's rate, else the rate recorded by the cache parts
    rate_source: str  # "this run" | "cache" | "none"


def weights_id(model_name: str, weights: str) -> str:
    if weights == backbones.RANDOM:
        return f"random{backbones.RANDOM_WEIGHTS_SEED}-keras{importlib.metadata.version('keras')}"
    if weights == backbones.IMAGENET:
        return f"imagenet-{backbones.get_backbone(model_name).imagenet_md5[:12]}"
    return f"file-{backbones.file_sha256(weights)[:16]}"


def cache_folder(cache_dir: str, featurizer: KerasImageFeaturizer) -> str:
    name = "-".join(
        (
            featurizer.getModelName(),
            featurizer.getPooling(),
            weights_id(featurizer.getModelName(), featurizer.getWeights()),
            FEATURE_VERSION,
        )
    )
    return os.path.join(cache_dir, name)


def _parts(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, p)
        for p in os.listdir(folder)
        if p.startswith("part-") and os.path.isfile(os.path.join(folder, p, "_SUCCESS"))
    )


def featurize_cached(
    spark, images: DataFrame, featurizer: KerasImageFeaturizer, cache_dir: str | None, log=print
) -> tuple[DataFrame, FeaturizeStats]:
    """``images`` (path, label, content) -> (path, label, features), each image featurized once.

    With ``cache_dir`` None the features are computed and kept in Spark's cache for this run only.
    """
    keyed = images.withColumn("sha256", F.sha2(F.col("content"), 256))
    total = keyed.count()
    if cache_dir is None:
        start = time.perf_counter()
        feats = featurizer.transform(keyed).select("path", "label", "sha256", "features").persist()
        n = feats.count()
        seconds = time.perf_counter() - start
        stats = FeaturizeStats(total, n, 0, seconds, n / seconds if seconds > 0 else None, "this run")
        return feats.drop("sha256"), stats

    folder = cache_folder(cache_dir, featurizer)
    parts = _parts(folder)
    cached = spark.read.parquet(*parts) if parts else None
    missing = keyed.join(cached.select("sha256"), "sha256", "left_anti") if cached is not None else keyed
    missing = missing.dropDuplicates(["sha256"])
    n_missing = missing.count()  # distinct contents: duplicate images are featurized once
    n_cached = keyed.join(cached.select("sha256"), "sha256", "left_semi").count() if cached is not None else 0
    seconds, n_done = 0.0, 0
    if n_missing:
        log(f"featurizing {n_missing} images with {featurizer.getModelName()} ({n_cached} of {total} already cached)")
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        start = time.perf_counter()
        try:
            featurizer.transform(missing).select("sha256", "features").write.parquet(tmp)
            seconds = time.perf_counter() - start
            n_done = spark.read.parquet(tmp).count()
            with open(os.path.join(tmp, "_stats.json"), "w", encoding="utf-8") as f:
                json.dump({"images": n_done, "seconds": seconds}, f)
            os.replace(tmp, os.path.join(folder, f"part-{uuid.uuid4().hex}"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        parts = _parts(folder)
    rate, source = (n_done / seconds, "this run") if n_done and seconds > 0 else _recorded_rate(parts)
    feats = spark.read.parquet(*parts).dropDuplicates(["sha256"]) if parts else None
    if feats is None:
        joined = keyed.limit(0).select("path", "label", F.lit(None).alias("features"))
    else:
        joined = keyed.select("path", "label", "sha256").join(feats, "sha256", "inner").drop("sha256")
    stats = FeaturizeStats(total, n_done, n_cached, seconds, rate, source)
    return joined, stats


def _recorded_rate(parts: list[str]) -> tuple[float | None, str]:
    images = seconds = 0.0
    for part in parts:
        try:
            with open(os.path.join(part, "_stats.json"), encoding="utf-8") as f:
                recorded = json.load(f)
            images += recorded["images"]
            seconds += recorded["seconds"]
        except (OSError, ValueError, KeyError):
            continue
    return (images / seconds, "cache") if seconds > 0 else (None, "none")
