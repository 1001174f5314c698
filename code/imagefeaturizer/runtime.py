"""What lives in a Spark Python worker that featurizes: extractors and the process around them.

- :class:`FeatureExtractor`: an engine plus what comes before it (resizing, batching).
- :func:`get_extractor`: one extractor per (backbone, weights, pooling, engine, exported model) per
  Python process, built on first use, the :data:`MAX_EXTRACTORS` most recently used kept (never
  captured in a UDF closure).
- The process set-up done before a model is built: the GPU(s) Spark assigned to the task as the
  only ones TensorFlow sees (:func:`use_task_gpus`), the engine's threads sized to the task's cores
  (:func:`task_threads`; TensorFlow's once per process, :func:`configure_threads`), GPU memory
  growth (:func:`configure_gpus`), and after the build ``gc.freeze``
  (:func:`freeze_in_spark_worker`); :func:`drop_zip_finders` after each batch. A worker that runs
  an exported engine (OpenVINO) imports neither TensorFlow nor Keras.
- :func:`get_keras_model`: a saved Keras model (a trained classifier's ``.keras`` file) loaded once
  per process, in the same cache and after the same set-up as the extractors.
- :func:`local_weights` and the exported model's files: as this machine sees them, checked against
  the driver's sha256 (:func:`local_file`).
- :func:`featurize_batches`: the body of the featurizer's pandas UDF, one Arrow batch at a time
  (decode every image, then fetch the extractor and predict).

Nothing here knows about Params: the Transformer (``featurizer.py``) passes plain values.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from . import backbones
from .engines import DEFAULT_ENGINE, Engine, TensorFlowEngine, ThreadSettings, create_engine, engine_class
from .images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_record, resize_pil

__all__ = ["SHIP_WEIGHTS_CONF", "ThreadSettings"]  # here too for the callers that know them from here

GPU_MIN_BATCH = 128
"""On a GPU, images per backbone call are at least this many (still capped by the Arrow batch)."""

SHIP_WEIGHTS_CONF = "spark.imagefeaturizer.shipWeights"
"""Spark setting: ``false`` when a weights path is on storage every node reads (nothing shipped)."""


class FeatureExtractor:
    """A frozen backbone with its preprocessing: resized uint8 RGB images in, feature rows out.

    The engine (:mod:`imagefeaturizer.engines`) runs the network; ``device`` says where.
    """

    def __init__(self, model_name: str, source: str | None, pooling: str = "avg",
                 engine: str = DEFAULT_ENGINE, threads: ThreadSettings | None = None):
        self.backbone = backbones.get_backbone(model_name)
        self.engine: Engine = create_engine(engine, self.backbone, source, pooling, threads)

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

_EXTRACTORS: dict[tuple, FeatureExtractor] = {}  # insertion order = use order, last = newest
_LOCK = threading.Lock()


def get_extractor(
    model_name: str,
    weights_path: str | None,
    pooling: str,
    weights_sha256: str | None = None,
    engine: str = DEFAULT_ENGINE,
    model_files: tuple[tuple[str, str], ...] = (),
) -> FeatureExtractor:
    """The cached extractor for this process, built on first use.

    ``weights_path`` is the driver's path; the file used is :func:`local_weights`'s. An exported
    engine opens ``model_files`` instead ((driver path, sha256) of each file of the export, the
    first the one it opens), each checked like the weights. Before a build the engine's threads
    are set for the Spark task; after a build in a Spark task what exists is frozen
    (:func:`freeze_in_spark_worker`).
    """
    key = (model_name, weights_path, pooling, weights_sha256, engine, model_files)
    return _cached(key, lambda: _build_extractor(model_name, weights_path, pooling, weights_sha256, engine,
                                                 model_files))


def get_keras_model(path: str, sha256: str | None):
    """A saved Keras model (``.keras``, e.g. a trained classifier) loaded once per process, in the
    extractors' cache; ``path`` is the driver's, the file used :func:`local_file`'s (the driver
    ships it with :func:`imagefeaturizer.shipping.ship_file`)."""
    return _cached(("keras-model", path, sha256), lambda: _load_keras_model(path, sha256))


def _cached(key: tuple, build):
    """The cached item for ``key`` (an extractor or a Keras model), built on first use; the most
    recently used last."""
    with _LOCK:
        item = _EXTRACTORS.pop(key, None)
        if item is None:
            item = build()
        _EXTRACTORS[key] = item
        return item


def _build_extractor(model_name, weights_path, pooling, weights_sha256, engine, model_files) -> FeatureExtractor:
    uses_tensorflow = not engine_class(engine).exported
    if uses_tensorflow:
        use_task_gpus()  # before TensorFlow initialises its devices
        configure_threads()
        source = local_weights(weights_path, weights_sha256)
    elif not model_files:
        raise ValueError(f"the {engine} engine runs an exported model, but no model files were given")
    else:
        source = [local_file(path, sha, "exported model file") for path, sha in model_files][0]
    if len(_EXTRACTORS) >= MAX_EXTRACTORS:
        _evict_oldest()
    if uses_tensorflow:
        configure_gpus()  # before the model is built: memory growth must come first
    extractor = FeatureExtractor(model_name, source, pooling, engine, task_threads(engine))
    freeze_in_spark_worker()
    return extractor


def _load_keras_model(path: str, sha256: str | None):
    use_task_gpus()  # before TensorFlow initialises its devices
    configure_threads()
    source = local_file(path, sha256, "model file")
    if len(_EXTRACTORS) >= MAX_EXTRACTORS:
        _evict_oldest()
    configure_gpus()
    import keras

    from .networks import preprocess_layer_class

    preprocess_layer_class()  # registered before loading: saved networks use it
    model = keras.saving.load_model(source, compile=False)
    freeze_in_spark_worker()
    return model


def _evict_oldest() -> None:
    """Drop the least recently used extractor(s) so one more fits; frozen objects are thawed first,
    or the collector could never free a dropped model's reference cycles."""
    while len(_EXTRACTORS) >= MAX_EXTRACTORS:
        _EXTRACTORS.pop(next(iter(_EXTRACTORS)))
    gc.unfreeze()
    gc.collect()
    if "keras" in sys.modules:  # a Keras model may have been dropped (an OpenVINO worker has no Keras)
        sys.modules["keras"].backend.clear_session(free_memory=True)


# ---------------------------------------------------------------------------------------------
# Process set-up
# ---------------------------------------------------------------------------------------------
def thread_settings(task_cpus: int) -> ThreadSettings:
    """TensorFlow threads for a Spark task given ``task_cpus`` cores (``spark.task.cpus``).

    In local mode on N cores Spark runs N tasks at once, each in its own Python worker: one
    TensorFlow thread per task core keeps the machine at N busy threads instead of N x N.
    """
    return TensorFlowEngine.thread_settings(task_cpus)


def task_threads(engine: str) -> ThreadSettings | None:
    """The threads of ``engine`` for the current Spark task (one per task core), None outside one
    (the engine's default: every core)."""
    from pyspark import TaskContext

    task = TaskContext.get()
    return None if task is None else engine_class(engine).thread_settings(task.cpus())


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


_gpus_decided = False


def task_gpus() -> list[str]:
    """The addresses of the GPUs Spark assigned to the running task (``TaskContext.resources()``
    with GPU scheduling: ``spark.task.resource.gpu.amount``), else []."""
    from pyspark import TaskContext

    task = TaskContext.get()
    if task is None:
        return []
    try:
        gpu = task.resources().get("gpu")
    except Exception:  # noqa: BLE001 - a context without resources: no GPU scheduling
        return []
    return [str(a) for a in gpu.addresses] if gpu is not None else []


def use_task_gpus() -> list[str] | None:
    """Make TensorFlow see only the GPUs Spark assigned to this task (``CUDA_VISIBLE_DEVICES``),
    once per process, before TensorFlow initialises its devices; without it every worker would
    use the first GPU it sees. Returns the addresses used (None: nothing assigned, or decided
    before). A Python worker keeps its first task's GPU: Spark may reuse it for a task given
    another GPU, and TensorFlow cannot move then. Untested on real GPUs (none here)."""
    global _gpus_decided
    if _gpus_decided:
        return None
    _gpus_decided = True
    addresses = task_gpus()
    if not addresses:
        return None
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA numbers = nvidia-smi's, as discovery reports
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(addresses)
    return addresses


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
    """The weights file as this process sees it, checked against the driver's sha256.

    The driver's path when it is readable here (same machine, or storage every node mounts at
    the same path), else the copy the driver shipped (:func:`shipped_name`, or a file of the same
    name shipped by hand, e.g. ``spark-submit --files``). A missing file or one whose sha256
    differs from the driver's is a :class:`~imagefeaturizer.backbones.WeightsError`.
    """
    return None if weights_path is None else local_file(weights_path, weights_sha256, "weights file")


def local_file(driver_path: str, sha256: str | None, what: str) -> str:
    """A file the driver named (weights, an exported model's file) as this process sees it: the
    driver's path when readable here, else the shipped copy; checked against the driver's sha256
    (a :class:`~imagefeaturizer.backbones.WeightsError` naming ``what`` and the fix otherwise)."""
    import socket

    host = socket.gethostname()
    path = driver_path if os.path.isfile(driver_path) else _shipped_copy(driver_path, sha256)
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


def shipped_name(weights_path: str, weights_sha256: str | None) -> str:
    """The name the driver ships a weights file under: its sha256 prefix and its file name, so two
    files of the same name never collide in one application or Spark Connect session."""
    base = os.path.basename(weights_path)
    return f"{weights_sha256[:16]}-{base}" if weights_sha256 else base


def _shipped_copy(weights_path: str, weights_sha256: str | None = None) -> str:
    """Where SparkFiles put the driver's copy of ``weights_path`` here ("" when none)."""
    from pyspark import SparkFiles

    try:
        root = SparkFiles.getRootDirectory()
    except Exception:  # noqa: BLE001 - no SparkFiles root: not in a Spark process
        return ""
    for name in dict.fromkeys((shipped_name(weights_path, weights_sha256), os.path.basename(weights_path))):
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return ""


TEST_HOLD_ENV = "IMAGEFEATURIZER_TEST_HOLD"
"""Test hook: ``<point>:<marker file>`` makes a task that reaches ``point`` wait (see below)."""


def hold_for_tests(point: str, seconds: float = 600.0) -> None:
    """Nothing, unless the environment holds ``IMAGEFEATURIZER_TEST_HOLD=<point>:<marker file>``:
    then a task reaching ``point`` ("featurize": the featurizer's UDF; the app names its own)
    creates the marker file and waits, so that a test can interrupt a job at a known step
    without guessing a time."""
    point_set, _, marker = os.environ.get(TEST_HOLD_ENV, "").partition(":")
    if point_set != point or not marker:
        return
    with open(marker, "a", encoding="utf-8"):
        pass
    time.sleep(seconds)


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
    with_maps: bool = False  # also return the last feature maps (same forward pass)
    model_files: tuple[tuple[str, str], ...] = ()  # an exported engine's files: (driver path, sha256)


def featurize_batches(
    task: FeaturizeTask, batches: Iterator[tuple[pd.Series, pd.Series]]
) -> Iterator[pd.Series | pd.DataFrame]:
    """Features (and maps, :attr:`FeaturizeTask.with_maps`) for each Arrow batch of (images,
    origins), the UDF's body."""
    for images, origins in batches:
        hold_for_tests("featurize")
        yield featurize_series(task, images, origins)
        drop_zip_finders()  # imports of this batch included


def featurize_series(
    task: FeaturizeTask, images: pd.Series | pd.DataFrame, origins: pd.Series
) -> pd.Series | pd.DataFrame:
    """Features for one Arrow batch; an invalid image raises, or its row is None (``skip``).

    ``images`` holds bytes, or is Spark's image struct (one column per field); ``origins`` names
    each image in error messages (null: its row number in the batch). Every image is decoded
    before the extractor is fetched: bad data fails fast, and a batch of only invalid images
    builds no model. With ``task.with_maps`` the result is a frame of ``features`` and ``maps``
    (each image's last feature maps, flattened in (height, width, channels) order).
    """
    records = images.to_dict("records") if isinstance(images, pd.DataFrame) else list(images)
    arrays, keep = _decode_batch(task, records, origins)
    features, maps = [None] * len(records), [None] * len(records)
    if arrays:
        extractor = get_extractor(task.model_name, task.weights_path, task.pooling, task.weights_sha256,
                                  task.engine, task.model_files)
        if task.with_maps:
            rows, grids = extractor.predict_with_maps(arrays, task.batch_size)
            for i, grid in zip(keep, grids):
                maps[i] = grid.ravel()
        else:
            rows = extractor.predict(arrays, task.batch_size)
        for i, row in zip(keep, rows):
            features[i] = row
    if task.with_maps:
        return pd.DataFrame({"features": features, "maps": maps})
    return pd.Series(features, dtype=object)


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
