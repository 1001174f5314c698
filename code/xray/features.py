"""The feature cache: backbone features keyed by image content, stored as Parquet.

Layout: ``<cache_dir>/<model>-<pooling>-<weights id>-<FEATURE_VERSION>/part-<uuid>/`` holds rows
``(sha256, features)``. A run featurizes only images whose content hash is in no part yet and
writes them as a new part, atomically (:func:`xray.atomic.atomic_folder`), so a half-written
part is never read. The key covers everything that changes a feature: the image bytes, the
backbone, the weights (their checksum, or Keras' version for seeded random weights), the pooling
and the preprocessing version.

The featurization job is one Spark stage (read, hash, pick the new images, featurize, write) so
that :class:`xray.progress.Progress` can report it from the stage's finished tasks.

Faults (:mod:`xray.cache_parts`): each part is checked before Spark reads it, and a damaged one
is moved to ``<cache_dir>/quarantine/`` and featurized again; temporary parts of killed runs are
removed (a running run's stay), and a failed run leaves no empty cache folder. Runs may write the
same cache at once: each writes its own part, and rows of contents in two parts are read once.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
import uuid
from dataclasses import dataclass, field

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer
from imagefeaturizer.images import InvalidImageError, decode_to_pil

from .atomic import atomic_folder
from .cache_parts import remove_killed_runs_parts, removed_if_left_empty, usable_parts
from .paths import local_path, spark_literal
from .progress import Progress

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
    featurized_for_others: int = 0  # images of other labels featurized in the same job (``keep``)
    keys: list = field(default_factory=list, repr=False)  # (path, label) of the returned rows' images
    skipped: dict = field(default_factory=dict)  # local path -> reason: left out by handleInvalid=skip


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


def featurize_cached(
    spark, images: DataFrame, featurizer: KerasImageFeaturizer, cache_dir: str | None, log=print,
    keep: list[str] | None = None,
) -> tuple[DataFrame, FeaturizeStats]:
    """``images`` (path, label, content) -> (path, label, features), each image featurized once.

    With ``keep`` (labels), only rows of those labels are returned and counted in the stats; the
    other rows are featurized into the cache in the same job (a sweep's other tasks with the same
    backbone: one pass over the images per backbone). With ``cache_dir`` None the features are
    computed and kept in Spark's cache for this run only.
    """
    if keep is not None and cache_dir is None:
        images = images.filter(F.col("label").isin(list(keep)))
        keep = None
    keyed = images.withColumn("sha256", F.sha2(F.col("content"), 256))
    if cache_dir is None:
        return _featurize_uncached(spark, keyed, featurizer, log)

    remove_killed_runs_parts(cache_dir, log)
    folder = cache_folder(cache_dir, featurizer)
    keys = keyed.select("path", "label", "sha256").collect()  # small: a path, label and hash per image
    wanted = set(keep) if keep is not None else None
    own = [r for r in keys if wanted is None or r.label in wanted]
    cache = _read_cache(spark, folder, log)
    todo = _new_contents(keys, cache.hashes)
    own_missing = {r.sha256 for r in own if r.sha256 not in cache.hashes}
    n_cached = sum(1 for r in own if r.sha256 in cache.hashes)
    seconds, written = 0.0, set()
    if todo:
        others = f", {len(todo) - len(own_missing)} of them for other tasks" if len(todo) > len(own_missing) else ""
        log(f"featurizing {len(todo)} images with {featurizer.getModelName()} ({n_cached} of {len(own)} already "
            f"cached{others})")
        seconds, written = _write_part(spark, keyed, featurizer, folder, todo, cache, log)
    parts = sorted(cache.seen)
    rate, source = (len(written) / seconds, "this run") if written and seconds > 0 else _recorded_rate(parts)
    joined = _features_for(spark, parts, own, dedupe=not cache.unique)
    n_own_done = len(own_missing & written)
    dropped = set(todo) - written  # contents the featurizer left out (handleInvalid=skip)
    skipped = _name_skipped([r.path for r in own if r.sha256 in dropped], featurizer, log)
    stats = FeaturizeStats(len(own), n_own_done, n_cached, seconds, rate, source, len(written) - n_own_done,
                           keys=[(r.path, r.label) for r in own], skipped=skipped)
    return joined, stats


def _featurize_uncached(spark, keyed: DataFrame, featurizer: KerasImageFeaturizer, log) -> tuple[DataFrame, FeaturizeStats]:
    """No cache folder: featurize every image, keep the features in Spark's cache for this run."""
    paths = [r.path for r in keyed.select("path").collect()]
    start = time.perf_counter()
    feats = featurizer.transform(keyed).select("path", "label", "sha256", "features").persist()
    with Progress(spark, len(paths), log):
        n = feats.count()
    seconds = time.perf_counter() - start
    keys = [(r.path, r.label) for r in feats.select("path", "label").collect()]
    done = {path for path, _ in keys}
    skipped = _name_skipped([p for p in paths if p not in done], featurizer, log)
    stats = FeaturizeStats(len(paths), n, 0, seconds, n / seconds if seconds > 0 else None, "this run", keys=keys,
                           skipped=skipped)
    return feats.drop("sha256"), stats


def _name_skipped(paths: list[str], featurizer: KerasImageFeaturizer, log) -> dict[str, str]:
    """Images the featurizer left out (``handleInvalid=skip``): local path -> why, logged in one line.

    The reason is the decoder's, found again on the driver for these few files."""
    reasons = {}
    for uri in sorted(paths):
        path = local_path(uri)
        try:
            with open(path, "rb") as f:
                decode_to_pil(f.read(), max_pixels=featurizer.getMaxImagePixels(), origin=path)
            reasons[path] = "left out by the featurizer"
        except OSError as exc:
            reasons[path] = f"cannot read file ({exc.strerror})"
        except InvalidImageError as exc:
            reasons[path] = exc.reason
    if reasons:
        shown = "; ".join(f"{p}: {why}" for p, why in list(reasons.items())[:10])
        more = f"; and {len(reasons) - 10} more" if len(reasons) > 10 else ""
        log(f"left out {len(reasons)} image(s) that did not decode (handleInvalid=skip): {shown}{more}")
    return reasons


@dataclass
class _Cache:
    """What the cache folder held when this run read it, and the parts this run knows."""

    hashes: set[str]
    unique: bool  # no content in two parts (so the rows need no deduplication)
    seen: set[str]  # parts whose rows are counted in ``hashes`` (and the part this run writes)


def _read_cache(spark, folder: str, log) -> _Cache:
    # One row a cached image, 64 bytes each: the parts hold each content once unless two runs
    # featurized the same new images at the same time (then the rows are deduplicated).
    parts = usable_parts(folder, log)
    rows = [r.sha256 for r in _read_parts(spark, parts).select("sha256").collect()] if parts else []
    hashes = set(rows)
    return _Cache(hashes, len(hashes) == len(rows), set(parts))


def _new_contents(keys: list, cached: set[str]) -> dict[str, str]:
    """Distinct new contents -> the one file featurized for each (the first path): duplicate
    images are featurized once."""
    todo: dict[str, str] = {}
    for r in sorted(keys, key=lambda r: r.path):
        if r.sha256 not in cached:
            todo.setdefault(r.sha256, r.path)
    return todo


def _read_parts(spark, parts: list[str]) -> DataFrame:
    return spark.read.parquet(*[spark_literal(p) for p in parts])


def _write_part(spark, keyed: DataFrame, featurizer: KerasImageFeaturizer, folder: str, todo: dict[str, str],
                cache: _Cache, log) -> tuple[float, set[str]]:
    """Featurize the chosen files into a new cache part; returns (seconds, the contents written)."""
    # A broadcast join keeps the job one stage (no shuffle): progress is that stage's tasks.
    chosen = spark.createDataFrame([(p,) for p in todo.values()], "path string")
    missing = keyed.join(F.broadcast(chosen), "path")
    part = os.path.join(folder, f"part-{uuid.uuid4().hex}")
    with removed_if_left_empty(folder), atomic_folder(part) as tmp:
        start = time.perf_counter()
        with Progress(spark, len(todo), log):
            featurizer.transform(missing).select("sha256", "features").write.parquet(tmp)
        seconds = time.perf_counter() - start
        new_rows = [r.sha256 for r in _read_parts(spark, [tmp]).select("sha256").collect()]
        with open(os.path.join(tmp, "_stats.json"), "w", encoding="utf-8") as f:
            json.dump({"images": len(new_rows), "seconds": seconds}, f)
    cache.unique = cache.unique and len(set(new_rows)) == len(new_rows) and cache.hashes.isdisjoint(new_rows)
    cache.seen.add(part)
    return seconds, set(new_rows)


def _features_for(spark, parts: list[str], own: list, dedupe: bool) -> DataFrame:
    """(path, label, features) of the ``own`` images from the cache parts.

    The keys collected earlier, not the images read and hashed once more; a broadcast join, so
    the feature rows are not shuffled. ``dedupe``: a part of another run may repeat contents."""
    own_keys = spark.createDataFrame([(r.path, r.label, r.sha256) for r in own],
                                     "path string, label string, sha256 string")
    if not parts:
        return own_keys.limit(0).select("path", "label", F.lit(None).alias("features"))
    feats = _read_parts(spark, parts)
    if dedupe:
        feats = feats.dropDuplicates(["sha256"])
    return feats.join(F.broadcast(own_keys), "sha256", "inner").select("path", "label", "features")


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
