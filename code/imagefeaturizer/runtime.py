"""What lives in a Spark Python worker that featurizes: extractors and the process around them.

- :class:`FeatureExtractor`: an engine plus what comes before it (resizing, batching).
- :func:`get_extractor`: one extractor per (backbone, weights, pooling, engine) per Python process,
  built on first use, the :data:`MAX_EXTRACTORS` most recently used kept (never captured in a UDF
  closure).
- The process set-up done once, before the first model is built: TensorFlow's threads sized to the
  task's cores (:func:`configure_threads`), GPU memory growth (:func:`configure_gpus`), and after
  the build ``gc.freeze`` (:func:`freeze_in_spark_worker`); :func:`drop_zip_finders` after each
  batch.
- :func:`ship_file` (driver) and :func:`local_file` / :func:`local_weights` (executor): a file of
  the driver (weights, a trained model) shipped to executors off local mode, as this machine sees
  it, checked against the driver's sha256.
- :func:`featurize_batches`: the body of the featurizer's pandas UDF, one Arrow batch at a time
  (decode every image, then fetch the extractor and predict).

Nothing here knows about Params: the Transformer (``featurizer.py``) passes plain values.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from . import backbones
from .engines import DEFAULT_ENGINE, Engine, create_engine
from .images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_record, resize_pil

GPU_MIN_BATCH = 128
"""On a GPU, images per backbone call are at least this many (still capped by the Arrow batch)."""

SHIP_WEIGHTS_CONF = "spark.imagefeaturizer.shipWeights"
"""Spark setting: ``false`` when a weights path is on storage every node reads (nothing shipped)."""


class FeatureExtractor:
    """A frozen backbone with its preprocessing: resized uint8 RGB images in, feature rows out.

    The engine (:mod:`imagefeaturizer.engines`) runs the network; ``device`` says where.
    """

    def __init__(self, model_name: str, weights_path: str | None, pooling: str = "avg",
                 engine: str = DEFAULT_ENGINE):
        self.backbone = backbones.get_backbone(model_name)
        self.engine: Engine = create_engine(engine, self.backbone, weights_path, pooling)

    @property
    def device(self) -> str:
        return self.engine.device

    def prepare(self, image) -> np.ndarray:
        """An RGB Pillow image resized to the input size, as a uint8 HxWx3 array."""
        return prepare(image, self.backbone)

    def batch_size(self, requested: int) -> int:
        """Images per backbone call: ``requested`` on a CPU, at least ``GPU_MIN_BATCH`` on a GPU."""
        return max(requested, GPU_MIN_BATCH) if self.device != "CPU" else requested

    def predict(self, arrays: list[np.ndarray], batch_size: int) -> np.ndarray:
        """Features (n, feature_size) float32 for arrays from :meth:`prepare`."""
        out = np.empty((len(arrays), self.backbone.feature_size), dtype=np.float32)
        for start, batch in self._batches(arrays, batch_size):
            out[start : start + len(batch)] = self.engine.run(batch)
        return out

    def predict_with_maps(self, arrays: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (n, feature_size) and the last feature maps (n, h, w, channels), float32."""
        features = np.empty((len(arrays), self.backbone.feature_size), dtype=np.float32)
        maps = np.empty((len(arrays), *self.backbone.map_shape), dtype=np.float32)
        for start, batch in self._batches(arrays, batch_size):
            end = start + len(batch)
            features[start:end], maps[start:end] = self.engine.run_with_maps(batch)
        return features, maps

    def _batches(self, arrays: list[np.ndarray], batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        step = self.batch_size(batch_size)
        for start in range(0, len(arrays), step):
            yield start, np.stack(arrays[start : start + step])


def prepare(image, backbone: backbones.Backbone) -> np.ndarray:
    """An RGB Pillow image resized to ``backbone``'s input size, as a uint8 HxWx3 array."""
    size = (backbone.input_size, backbone.input_size)
    return np.asarray(resize_pil(image, size), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# The per-process extractor cache
# ---------------------------------------------------------------------------------------------
MAX_EXTRACTORS = 2
"""Extractors kept per process (a backbone holds hundreds of MB); the least recently used goes first."""

_EXTRACTORS: dict[tuple, object] = {}  # extractors and Keras models; insertion order = use order, last = newest
_LOCK = threading.Lock()


def get_extractor(
    model_name: str,
    weights_path: str | None,
    pooling: str,
    weights_sha256: str | None = None,
    engine: str = DEFAULT_ENGINE,
) -> FeatureExtractor:
    """The cached extractor for this process, built on first use.

    ``weights_path`` is the driver's path; the file used is :func:`local_weights`'s. Before the
    first build TensorFlow's threads are set for the Spark task; after a build in a Spark task
    what exists is frozen (:func:`freeze_in_spark_worker`).
    """
    key = (model_name, weights_path, pooling, weights_sha256, engine)
    return _cached(key, lambda: FeatureExtractor(model_name, local_weights(weights_path, weights_sha256),
                                                 pooling, engine))


def get_keras_model(path: str, sha256: str | None):
    """A saved Keras model (``.keras``, e.g. a trained classifier) loaded once per process, in the
    same cache as the extractors; ``path`` is the driver's, shipped ``by_content`` off local mode
    (:func:`ship_file`, :func:`local_file`)."""
    shipped_name = content_name(path, sha256) if sha256 else None

    def load():
        from .networks import preprocess_layer_class
        import keras

        preprocess_layer_class()  # registered before loading: saved networks use it
        return keras.saving.load_model(local_file(path, sha256, shipped_name, what="model file"), compile=False)

    return _cached(("keras-model", path, sha256), load)


def _cached(key: tuple, build):
    """The cached item for ``key``, built on first use after the process set-up (threads, GPUs),
    the least recently used item evicted when the cache is full."""
    with _LOCK:
        item = _EXTRACTORS.pop(key, None)
        if item is None:
            configure_threads()
            if len(_EXTRACTORS) >= MAX_EXTRACTORS:
                _evict_oldest()
            configure_gpus()  # before the model is built: memory growth must come first
            item = build()
            freeze_in_spark_worker()
        _EXTRACTORS[key] = item
        return item


def _evict_oldest() -> None:
    """Drop the least recently used extractor(s) so one more fits; frozen objects are thawed first,
    or the collector could never free a dropped model's reference cycles."""
    while len(_EXTRACTORS) >= MAX_EXTRACTORS:
        _EXTRACTORS.pop(next(iter(_EXTRACTORS)))
    gc.unfreeze()
    gc.collect()
    import keras

    keras.backend.clear_session(free_memory=True)


# ---------------------------------------------------------------------------------------------
# Process set-up
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThreadSettings:
    intra_op: int  # threads inside one operation (a convolution)
    inter_op: int  # operations run at once


def thread_settings(task_cpus: int) -> ThreadSettings:
    """TensorFlow threads for a Spark task given ``task_cpus`` cores (``spark.task.cpus``).

    In local mode on N cores Spark runs N tasks at once, each in its own Python worker: one
    TensorFlow thread per task core keeps the machine at N busy threads instead of N x N.
    """
    cpus = max(1, int(task_cpus))
    return ThreadSettings(intra_op=cpus, inter_op=min(2, cpus))


_threads_configured = False


def configure_threads() -> ThreadSettings | None:
    """Apply :func:`thread_settings` for the current Spark task, once per process.

    Must run before TensorFlow's first operation in the process. Outside a Spark task TensorFlow's
    own defaults (every core) stay. Returns what was applied, or None when nothing was.
    """
    global _threads_configured
    from pyspark import TaskContext

    task = TaskContext.get()
    if _threads_configured or task is None:
        return None  # done already, or not in a Spark task: keep TensorFlow's defaults
    _threads_configured = True
    settings = thread_settings(task.cpus())
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(settings.intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(settings.inter_op)
    except RuntimeError:
        return None  # TensorFlow already initialised in this process: its settings stay
    return settings


def configure_gpus() -> None:
    """Memory growth on every GPU TensorFlow sees, so the Python workers of one machine share it."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # this process already uses the GPU: its setting stays


def freeze_in_spark_worker() -> None:
    """``gc.freeze()`` what exists now, after collecting what is garbage, inside a Spark task only.

    Spark's worker daemon runs a full ``gc.collect()`` after every task of a reused worker, which
    otherwise walks the millions of objects of TensorFlow, Keras and the model each time (about
    0.3 s of CPU per task for ResNet50). They live as long as the worker anyway: the extractor is
    cached for its life.
    """
    from pyspark import TaskContext

    if TaskContext.get() is not None:
        gc.collect()
        gc.freeze()


def drop_zip_finders() -> None:
    """Forget the cached finders of zip archives on ``sys.path`` (Spark's ``pyspark.zip``).

    Before every task a Spark Python worker calls ``importlib.invalidate_caches()``; on Python
    3.11 that makes each cached zip finder (one per package of ``pyspark.zip`` imported so far,
    about 17 in a featurizing worker) read the archive's directory again: about 0.05 s of CPU per
    task. Modules already imported stay imported, and Python rebuilds a finder for any later
    import from the archive, so dropping them changes nothing but that cost.
    """
    import zipimport

    for path, finder in list(sys.path_importer_cache.items()):
        if isinstance(finder, zipimport.zipimporter):
            sys.path_importer_cache.pop(path, None)


def local_weights(weights_path: str | None, weights_sha256: str | None) -> str | None:
    """The weights file as this process sees it, checked against the driver's sha256
    (:func:`local_file`); None for random weights."""
    return None if weights_path is None else local_file(weights_path, weights_sha256)


def local_file(driver_path: str, sha256: str | None, shipped_name: str | None = None,
               what: str = "weights file") -> str:
    """A file of the driver as this process sees it, checked against the driver's sha256.

    The driver's path when it is readable here (same machine, or storage every node mounts at
    the same path), else the copy the driver shipped through SparkFiles (:func:`ship_file`;
    named ``shipped_name``, default the file's name). A missing file or one whose sha256 differs
    from the driver's is a :class:`~imagefeaturizer.backbones.WeightsError`.
    """
    import socket

    host = socket.gethostname()
    path = driver_path if os.path.isfile(driver_path) else _shipped_copy(shipped_name or os.path.basename(driver_path))
    if not os.path.isfile(path):
        raise backbones.WeightsError(
            f"{what} {driver_path} is not readable on {host} and no copy was shipped: put it "
            f"on storage every node reads at the same path, or let the driver ship it "
            f"({SHIP_WEIGHTS_CONF} unset or true)"
        )
    if sha256:
        actual = backbones.file_sha256(path)
        if actual != sha256:
            raise backbones.WeightsError(
                f"{what} {path} on {host} does not match the driver's copy (sha256 {actual[:16]}..., "
                f"driver {sha256[:16]}...): make every node read the same file, or let the driver "
                f"ship it"
            )
    return path


def _shipped_copy(name: str) -> str:
    """Where SparkFiles put the driver's copy of the file ``name`` here ("" outside Spark)."""
    from pyspark import SparkFiles

    try:
        return SparkFiles.get(name)
    except Exception:  # noqa: BLE001 - no SparkFiles root: not in a Spark process
        return ""


# Per SparkContext (dropped with it): (path, size, mtime, by content) -> sha256, for files
# already hashed and shipped.
_SHIPPED: "weakref.WeakKeyDictionary[object, dict[tuple, str]]" = weakref.WeakKeyDictionary()


def content_name(path: str, sha256: str) -> str:
    """The name a file shipped ``by_content`` has on executors: its sha256 prefix and its name."""
    return f"{sha256[:16]}-{os.path.basename(path)}"


def ship_file(sc, path: str, by_content: bool = False) -> str:
    """The sha256 of a driver file, computed once per SparkContext (and file version).

    Off local mode the file is also shipped to every executor (``SparkContext.addFile``, each
    executor fetches it once), unless the Spark setting ``spark.imagefeaturizer.shipWeights`` is
    ``false`` because the path is on storage every node reads. ``by_content``: shipped under
    :func:`content_name` (files of one name from several folders, e.g. ``model.keras``).
    Executors find and check it with :func:`local_file`.
    """
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns, by_content)
    known = _SHIPPED.setdefault(sc, {})
    if key not in known:
        known[key] = sha = backbones.file_sha256(path)
        ship = sc.getConf().get(SHIP_WEIGHTS_CONF, "true").strip().lower() != "false"
        if ship and not sc.master.startswith("local"):
            sc.addFile(_named_copy(path, content_name(path, sha)) if by_content else path)
    return known[key]


def _named_copy(path: str, name: str) -> str:
    """A copy of ``path`` named ``name``, one path per name in this process (Spark refuses a
    second file of one name from another path); removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    folder = os.path.join(tempfile.gettempdir(), f"imagefeaturizer-ship-{os.getpid()}")
    if not os.path.isdir(folder):
        os.makedirs(folder)
        atexit.register(shutil.rmtree, folder, True)
    copy = os.path.join(folder, name)
    if not os.path.isfile(copy):
        shutil.copyfile(path, copy + ".tmp")
        os.replace(copy + ".tmp", copy)
    return copy


# ---------------------------------------------------------------------------------------------
# The featurizer's pandas UDF, in a worker
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeaturizeTask:
    """Everything a worker needs to featurize, as plain values (the UDF closure holds this, never
    a model)."""

    model_name: str
    weights_path: str | None
    weights_sha256: str | None
    pooling: str = "avg"
    batch_size: int = 32
    handle_invalid: str = "error"  # or "skip": the invalid image's row gets None
    max_pixels: int = DEFAULT_MAX_PIXELS
    engine: str = DEFAULT_ENGINE


def featurize_batches(
    task: FeaturizeTask, batches: Iterator[tuple[pd.Series, pd.Series]]
) -> Iterator[pd.Series]:
    """Features for each Arrow batch of (images, origins), the UDF's body."""
    for images, origins in batches:
        yield featurize_series(task, images, origins)
        drop_zip_finders()  # imports of this batch included


def featurize_series(task: FeaturizeTask, images: pd.Series | pd.DataFrame, origins: pd.Series) -> pd.Series:
    """Features for one Arrow batch; an invalid image raises, or its row is None (``skip``).

    ``images`` holds bytes, or is Spark's image struct (one column per field); ``origins`` names
    each image in error messages (null: its row number in the batch). Every image is decoded
    before the extractor is fetched: bad data fails fast, and a batch of only invalid images
    builds no model.
    """
    records = images.to_dict("records") if isinstance(images, pd.DataFrame) else list(images)
    arrays, keep = _decode_batch(task, records, origins)
    result = [None] * len(records)
    if arrays:
        extractor = get_extractor(
            task.model_name, task.weights_path, task.pooling, task.weights_sha256, task.engine
        )
        for i, features in zip(keep, extractor.predict(arrays, task.batch_size)):
            result[i] = features
    return pd.Series(result, dtype=object)


def _decode_batch(task: FeaturizeTask, records: list, origins: pd.Series) -> tuple[list[np.ndarray], list[int]]:
    """The valid images, prepared for the backbone, and their rows."""
    size = backbones.get_backbone(task.model_name).input_size
    return decode_batch(records, origins, size, task.max_pixels, task.handle_invalid)


def decode_batch(records: list, origins: pd.Series, size: int, max_pixels: int,
                 handle_invalid: str) -> tuple[list[np.ndarray], list[int]]:
    """The valid images of a batch as uint8 (size, size, 3) RGB arrays, and their rows; an invalid
    image raises unless ``handle_invalid`` is ``skip``. ``origins`` name the images in errors."""
    arrays, keep = [], []
    for i, (record, origin) in enumerate(zip(records, origins)):
        origin = origin if isinstance(origin, str) and origin else f"row {i} of its batch"
        try:
            image = decode_record(record, max_pixels=max_pixels, origin=origin)
            arrays.append(np.asarray(resize_pil(image, (size, size)), dtype=np.uint8))
            keep.append(i)
        except InvalidImageError:
            if handle_invalid == "error":
                raise
    return arrays, keep
