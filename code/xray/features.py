"""The feature cache: backbone features keyed by image content, stored as Parquet.

Layout: ``<cache_dir>/<model>-<pooling>-<weights id>-<FEATURE_VERSION>/part-<uuid>/`` holds rows
``(sha256, features)``. A run featurizes only images whose content hash is in no part yet,
writes them to a temporary folder and renames it to ``part-<uuid>`` when complete, so a
half-written part is never read. The key covers everything that changes a feature: the image
bytes, the backbone, the weights (their checksum, or Keras' version for seeded random weights),
the pooling and the preprocessing version.

The featurization job is one Spark stage (read, hash, pick the new images, featurize, write) so
that :class:`Progress` can report it from the stage's finished tasks: images done of total,
images/s and time left, at most every :data:`PROGRESS_EVERY_S` seconds.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer

# Bump when decoding, resizing or preprocessing changes what a feature vector holds.
FEATURE_VERSION = "v1"

PROGRESS_EVERY_S = 10.0  # seconds between progress lines; none for steps shorter than this


class Progress:
    """Progress of the Spark jobs run inside ``with Progress(...)``, logged from a driver thread.

    The jobs get their own job group; a thread polls ``statusTracker()`` and scales the share of
    finished tasks of the group's latest stage to ``total`` items: "featurizing: 320 of 1000
    images, 12.1 images/s, about 56 s left". Nothing is logged before ``every`` seconds, so short
    steps (and tests) stay quiet. The estimate is per task: Spark reports no finer progress.
    """

    def __init__(self, spark, total: int, log: Callable[[str], object] = print, what: str = "featurizing",
                 every: float | None = None) -> None:
        self.sc = spark.sparkContext
        self.total, self.log, self.what = total, log, what
        self.every = PROGRESS_EVERY_S if every is None else every
        self.group = f"xray-progress-{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_group: str | None = None

    def __enter__(self) -> "Progress":
        self._previous_group = self.sc.getLocalProperty("spark.jobGroup.id")
        self.sc.setJobGroup(self.group, f"{self.what} {self.total} images")
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="xray-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sc.setLocalProperty("spark.jobGroup.id", self._previous_group)
        self.sc.setLocalProperty("spark.job.description", None)

    def fraction(self) -> float:
        """Share of finished tasks of the group's widest stage (0 when none).

        The widest stage is the featurization; small side jobs of the group (a broadcast, a
        count) finish early and must not read as "all done".
        """
        tracker = self.sc.statusTracker()
        best = None
        for job_id in tracker.getJobIdsForGroup(self.group):
            info = tracker.getJobInfo(job_id)
            for stage_id in (info.stageIds if info else ()):
                stage = tracker.getStageInfo(stage_id)
                if stage is not None and stage.numTasks and (best is None or stage.numTasks > best.numTasks):
                    best = stage
        return min(1.0, best.numCompletedTasks / best.numTasks) if best is not None else 0.0

    def line(self, done: int, elapsed: float) -> str:
        """One progress line for ``done`` of ``total`` items after ``elapsed`` seconds."""
        text = f"{self.what}: {done} of {self.total} images"
        if done and elapsed > 0:
            rate = done / elapsed
            text += f", {rate:.1f} images/s, about {(self.total - done) / rate:.0f} s left"
        else:
            text += f", starting ({elapsed:.0f} s)"
        return text

    def _run(self) -> None:
        next_report = self.every
        while not self._stop.wait(min(1.0, self.every)):
            elapsed = time.perf_counter() - self.started
            if elapsed < next_report:
                continue
            next_report = elapsed + self.every
            try:
                done = int(self.fraction() * self.total)
            except Exception:  # noqa: BLE001 - the session may be stopping; progress is optional
                return
            self.log(self.line(done, elapsed))


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
        total = keyed.count()
        start = time.perf_counter()
        feats = featurizer.transform(keyed).select("path", "label", "sha256", "features").persist()
        with Progress(spark, total, log):
            n = feats.count()
        seconds = time.perf_counter() - start
        keys = [(r.path, r.label) for r in feats.select("path", "label").collect()]
        stats = FeaturizeStats(total, n, 0, seconds, n / seconds if seconds > 0 else None, "this run", keys=keys)
        return feats.drop("sha256"), stats

    folder = cache_folder(cache_dir, featurizer)
    parts = _parts(folder)
    keys = keyed.select("path", "label", "sha256").collect()  # small: a path, label and hash per image
    wanted = set(keep) if keep is not None else None
    own = [r for r in keys if wanted is None or r.label in wanted]
    total = len(own)
    # One row a cached image, 64 bytes each: the parts hold each content once unless two runs
    # featurized the same new images at the same time (then the rows are deduplicated below).
    cached_rows = [r.sha256 for r in spark.read.parquet(*parts).select("sha256").collect()] if parts else []
    cached = set(cached_rows)
    unique = len(cached) == len(cached_rows)
    seen_parts = set(parts)
    n_cached = sum(1 for r in own if r.sha256 in cached)
    todo: dict[str, str] = {}  # distinct new content -> the one file featurized for it
    for r in sorted(keys, key=lambda r: r.path):
        if r.sha256 not in cached:
            todo.setdefault(r.sha256, r.path)
    n_missing = len(todo)  # distinct contents: duplicate images are featurized once
    n_own_missing = len({r.sha256 for r in own if r.sha256 not in cached})
    seconds, n_done = 0.0, 0
    if n_missing:
        others = f", {n_missing - n_own_missing} of them for other tasks" if n_missing > n_own_missing else ""
        log(f"featurizing {n_missing} images with {featurizer.getModelName()} ({n_cached} of {total} already "
            f"cached{others})")
        # A broadcast join keeps the job one stage (no shuffle): progress is that stage's tasks.
        chosen = spark.createDataFrame([(p,) for p in todo.values()], "path string")
        missing = keyed.join(F.broadcast(chosen), "path")
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        start = time.perf_counter()
        try:
            with Progress(spark, n_missing, log):
                featurizer.transform(missing).select("sha256", "features").write.parquet(tmp)
            seconds = time.perf_counter() - start
            new_rows = [r.sha256 for r in spark.read.parquet(tmp).select("sha256").collect()]
            n_done = len(new_rows)
            unique = unique and len(set(new_rows)) == n_done and cached.isdisjoint(new_rows)
            with open(os.path.join(tmp, "_stats.json"), "w", encoding="utf-8") as f:
                json.dump({"images": n_done, "seconds": seconds}, f)
            new_part = os.path.join(folder, f"part-{uuid.uuid4().hex}")
            os.replace(tmp, new_part)
            seen_parts.add(new_part)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        parts = _parts(folder)
    rate, source = (n_done / seconds, "this run") if n_done and seconds > 0 else _recorded_rate(parts)
    feats = spark.read.parquet(*parts) if parts else None
    if feats is not None and not (unique and seen_parts.issuperset(parts)):  # a part of another run
        feats = feats.dropDuplicates(["sha256"])
    # The keys collected above, not the images read and hashed once more; a broadcast join, so
    # the feature rows are not shuffled.
    own_keys = spark.createDataFrame([(r.path, r.label, r.sha256) for r in own],
                                     "path string, label string, sha256 string")
    if feats is None:
        joined = own_keys.limit(0).select("path", "label", F.lit(None).alias("features"))
    else:
        joined = feats.join(F.broadcast(own_keys), "sha256", "inner").select("path", "label", "features")
    n_own_done = min(n_own_missing, n_done)
    stats = FeaturizeStats(total, n_own_done, n_cached, seconds, rate, source, n_done - n_own_done,
                           keys=[(r.path, r.label) for r in own])
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
