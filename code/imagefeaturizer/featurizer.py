"""``KerasImageFeaturizer``: a pyspark.ml Transformer that turns images into backbone features.

How an image becomes a feature vector, in order (this file and ``images.py``):

1. bytes (Spark's ``binaryFile`` ``content``) or Spark's image struct (``format("image")``) are
   decoded by :func:`imagefeaturizer.images.decode_to_pil` into an RGB Pillow image;
2. resized to the backbone's input size, exactly as ``keras.utils.load_img(target_size=...,
   interpolation="bilinear")`` does;
3. stacked into a float32 batch and passed through the backbone's own Keras ``preprocess_input``;
4. run through the frozen backbone (no top, global ``pooling``), built once per Python worker and
   kept for every later batch and task of that worker (:func:`get_extractor`);
5. returned as a Spark ML ``DenseVector`` column that LogisticRegression takes directly.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from typing import Callable, Iterator, Tuple

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from . import backbones
from . import images
from .images import DEFAULT_MAX_PIXELS, InvalidImageError, decode_to_pil, resize_pil

HANDLE_INVALID = ("error", "skip")


def from_spark_image(record: dict, *, origin: str, max_pixels: int):
    """Spark's image struct (BGR or BGRA bytes, row-wise, 8 bits) as an RGB Pillow image."""
    from PIL import Image

    data, height, width, channels = (record.get(k) for k in ("data", "height", "width", "nChannels"))
    if data is None or not height or not width or channels not in (1, 3, 4):
        raise InvalidImageError("not a decodable Spark image struct (Spark could not read this file)", origin)
    images.check_size((int(width), int(height)), max_pixels, origin)
    try:
        pixels = np.frombuffer(bytes(data), dtype=np.uint8).reshape(int(height), int(width), int(channels))
    except ValueError:
        raise InvalidImageError("image struct data does not match its height, width and channels", origin) from None
    if channels == 1:
        image = Image.fromarray(pixels[:, :, 0], "L")
    else:
        order = [2, 1, 0] if channels == 3 else [2, 1, 0, 3]  # BGR(A) -> RGB(A)
        image = Image.fromarray(np.ascontiguousarray(pixels[:, :, order]), "RGB" if channels == 3 else "RGBA")
    return images.to_mode(image, "RGB", origin)


GPU_MIN_BATCH = 128
"""On a GPU, images per backbone call are at least this many (still capped by the Arrow batch)."""


class FeatureExtractor:
    """A frozen backbone with its preprocessing: uint8 RGB images in, feature rows out.

    Runs on the first GPU TensorFlow sees, else on the CPU (``device`` says which). The backbone
    is traced once for any batch size, so the partial last batch of a partition costs no retrace.
    """

    def __init__(self, model_name: str, weights_path: str | None, pooling: str = "avg"):
        self.backbone = backbones.get_backbone(model_name)
        self.device = _configure_gpus()  # before the model is built: memory growth must come first
        self.model = backbones.build_model(self.backbone, weights_path, pooling)
        self.size = (self.backbone.input_size, self.backbone.input_size)
        self._run = _predict_function(self.model, self.backbone.input_size)

    def prepare(self, image) -> np.ndarray:
        """An RGB Pillow image resized to the input size, as a uint8 HxWx3 array."""
        return np.asarray(resize_pil(image, self.size), dtype=np.uint8)

    def batch_size(self, requested: int) -> int:
        """Images per backbone call: ``requested`` on a CPU, at least ``GPU_MIN_BATCH`` on a GPU."""
        return max(requested, GPU_MIN_BATCH) if self.device != "CPU" else requested

    def predict(self, arrays: list[np.ndarray], batch_size: int) -> np.ndarray:
        """Features (n, feature_size) float32 for resized uint8 RGB arrays."""
        step = self.batch_size(batch_size)
        out = np.empty((len(arrays), self.backbone.feature_size), dtype=np.float32)
        for start in range(0, len(arrays), step):
            # A fresh float32 batch: preprocess_input writes over its input.
            batch = np.stack(arrays[start : start + step]).astype(np.float32)
            batch = self.backbone.preprocess_input(batch)
            out[start : start + len(batch)] = self._run(batch)
        return out


def _predict_function(model, input_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """``model`` in inference mode, as one graph traced for every batch size (TensorFlow backend).

    ``predict_on_batch`` traces the model again for the first batch of a new size (about a second
    on a CPU, in every Python worker, for the short last batch of a partition); a batch dimension
    of ``None`` avoids that. Other Keras backends keep ``predict_on_batch``. The returned function
    has a ``graph`` attribute: the ``tf.function``, or None.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        def run(batch: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict_on_batch(batch))

        run.graph = None  # type: ignore[attr-defined]
        return run
    import tensorflow as tf

    spec = tf.TensorSpec((None, input_size, input_size, 3), tf.float32)
    # autograph=False: the model has no Python control flow to convert; converting Keras' call
    # stack anyway costs about a second of tracing in every Python worker (as Keras' own
    # predict function avoids too).
    graph = tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)

    def run(batch: np.ndarray) -> np.ndarray:
        return graph(batch).numpy()

    run.graph = graph  # type: ignore[attr-defined]
    return run


def _configure_gpus() -> str:
    """``"CPU"``, or ``"GPU"`` with memory growth on, so the Python workers of one machine share it."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # this process already uses the GPU: its setting stays
    return "GPU" if gpus else "CPU"


# One extractor per (backbone, weights, pooling) per Python process, never in a UDF closure; the
# MAX_EXTRACTORS most recently used are kept (a backbone holds hundreds of MB).
MAX_EXTRACTORS = 2
_EXTRACTORS: dict[tuple, FeatureExtractor] = {}
_LOCK = threading.Lock()
_threads_configured = False


def _configure_threads() -> None:
    """Give TensorFlow the cores Spark gives this task, so concurrent tasks don't oversubscribe.

    In local mode on N cores Spark runs N tasks at once, each in its own Python worker: one
    TensorFlow thread per task (``spark.task.cpus``) keeps the machine at N busy threads. Must run
    before TensorFlow's first operation in the process; outside a Spark task TensorFlow's own
    defaults (every core) stay.
    """
    global _threads_configured
    if _threads_configured:
        return
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return  # not in a Spark task: keep TensorFlow's defaults
    _threads_configured = True
    cpus = max(1, int(ctx.cpus()))
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, cpus))
    except RuntimeError:
        pass  # TensorFlow already initialised in this process: its settings stay


SHIP_WEIGHTS_CONF = "spark.imagefeaturizer.shipWeights"
"""Spark setting: ``false`` when a weights path is on storage every node reads (nothing shipped)."""


def _local_weights(weights_path: str | None, weights_sha256: str | None) -> str | None:
    """The weights file as this process sees it, checked against the driver's sha256.

    The driver's path when it is readable here (same machine, or storage every node mounts at
    the same path), else the copy the driver shipped through SparkFiles. A missing file or one
    whose sha256 differs from the driver's is a :class:`~imagefeaturizer.backbones.WeightsError`.
    """
    if weights_path is None:
        return None
    import socket

    host = socket.gethostname()
    path = weights_path
    if not os.path.isfile(path):
        from pyspark import SparkFiles

        try:
            path = SparkFiles.get(os.path.basename(weights_path))
        except Exception:  # noqa: BLE001 - no SparkFiles root: not in a Spark process
            path = ""
        if not os.path.isfile(path):
            raise backbones.WeightsError(
                f"weights file {weights_path} is not readable on {host} and no copy was shipped: put it "
                f"on storage every node reads at the same path, or let the driver ship it "
                f"({SHIP_WEIGHTS_CONF} unset or true)"
            )
    if weights_sha256:
        actual = backbones.file_sha256(path)
        if actual != weights_sha256:
            raise backbones.WeightsError(
                f"weights file {path} on {host} does not match the driver's copy (sha256 {actual[:16]}..., "
                f"driver {weights_sha256[:16]}...): make every node read the same file, or let the driver "
                f"ship it"
            )
    return path


def get_extractor(
    model_name: str, weights_path: str | None, pooling: str, weights_sha256: str | None = None
) -> FeatureExtractor:
    """The cached extractor for this worker process, built on first use.

    In a Spark Python worker the objects that exist once the model is built (TensorFlow, Keras,
    the model: millions of them) are moved out of the garbage collector's sight
    (``gc.freeze``): Spark's worker daemon runs a full ``gc.collect()`` after every task of a
    reused worker, which otherwise walks all of them each time (about 0.3 s of CPU per task for
    ResNet50). They live as long as the worker anyway: the extractor is cached for its life.
    """
    key = (model_name, weights_path, pooling, weights_sha256)
    with _LOCK:
        extractor = _EXTRACTORS.pop(key, None)
        if extractor is None:
            _configure_threads()
            local = _local_weights(weights_path, weights_sha256)
            if len(_EXTRACTORS) >= MAX_EXTRACTORS:
                _evict_oldest()
            extractor = FeatureExtractor(model_name, local, pooling)
            _freeze_in_spark_worker()
        _EXTRACTORS[key] = extractor  # last = most recently used
        return extractor


def _evict_oldest() -> None:
    """Drop the least recently used extractor(s) so one more fits; frozen objects are thawed first,
    or the collector could never free a dropped model's reference cycles."""
    while len(_EXTRACTORS) >= MAX_EXTRACTORS:
        _EXTRACTORS.pop(next(iter(_EXTRACTORS)))
    gc.unfreeze()
    gc.collect()
    import keras

    keras.backend.clear_session(free_memory=True)


def _freeze_in_spark_worker() -> None:
    """``gc.freeze()`` what exists now, after collecting what is garbage, inside a Spark task only."""
    from pyspark import TaskContext

    if TaskContext.get() is not None:
        gc.collect()
        gc.freeze()


def _drop_zip_finders() -> None:
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


def featurize_series(
    extractor: FeatureExtractor,
    images: pd.Series | pd.DataFrame,
    origins: pd.Series,
    *,
    batch_size: int,
    handle_invalid: str,
    max_pixels: int,
) -> pd.Series:
    """Features for one Arrow batch; invalid images raise or become None (``skip``)."""
    if isinstance(images, pd.DataFrame):  # Spark image struct: one column per field
        records = images.to_dict("records")
    else:
        records = list(images)
    arrays, keep = [], []
    for i, (record, origin) in enumerate(zip(records, origins)):
        origin = origin if isinstance(origin, str) and origin else f"row {i} of its batch"
        try:
            if record is None:
                raise InvalidImageError("no image (null)", origin=origin)
            if isinstance(record, dict):
                image = from_spark_image(record, origin=origin, max_pixels=max_pixels)
            else:
                image = decode_to_pil(bytes(record), max_pixels=max_pixels, origin=origin)
            arrays.append(extractor.prepare(image))
            keep.append(i)
        except InvalidImageError:
            if handle_invalid == "error":
                raise
    result = [None] * len(records)
    if arrays:
        features = extractor.predict(arrays, batch_size)
        for row, i in enumerate(keep):
            result[i] = features[row]
    return pd.Series(result, dtype=object)


class KerasImageFeaturizer(
    Transformer, HasInputCol, HasOutputCol, DefaultParamsReadable, DefaultParamsWritable
):
    """Features of a frozen Keras ImageNet backbone, as a Spark ML vector column.

    ``inputCol`` holds image bytes (``spark.read.format("binaryFile")``'s ``content``) or Spark's
    image struct (``spark.read.format("image")``'s ``image``). ``outputCol`` gets a
    ``DenseVector`` of the backbone's pooled features (2048 or 512 values, never the flattened
    131k-dim maps).

    >>> KerasImageFeaturizer(inputCol="content", outputCol="features", modelName="ResNet50")
    """

    modelName = Param(
        Params._dummy(),
        "modelName",
        f"Keras backbone: one of {', '.join(backbones.BACKBONES)}",
        typeConverter=TypeConverters.toString,
    )
    weights = Param(
        Params._dummy(),
        "weights",
        "'imagenet' (Keras' cache, downloaded when missing), 'random' (seeded, not transfer "
        "learning) or a path to a Keras weights file for the backbone without its top",
        typeConverter=TypeConverters.toString,
    )
    pooling = Param(
        Params._dummy(),
        "pooling",
        "global pooling of the last feature maps: 'avg' or 'max'",
        typeConverter=TypeConverters.toString,
    )
    batchSize = Param(
        Params._dummy(),
        "batchSize",
        "images per backbone call inside each Python worker (> 0)",
        typeConverter=TypeConverters.toInt,
    )
    handleInvalid = Param(
        Params._dummy(),
        "handleInvalid",
        "what to do with images that cannot be decoded: 'error' (fail naming the file and the "
        "reason) or 'skip' (drop the row)",
        typeConverter=TypeConverters.toString,
    )
    originCol = Param(
        Params._dummy(),
        "originCol",
        "column naming each image in error messages (binaryFile's 'path'); ignored when absent",
        typeConverter=TypeConverters.toString,
    )
    maxImagePixels = Param(
        Params._dummy(),
        "maxImagePixels",
        "images whose header claims more pixels are rejected before decoding",
        typeConverter=TypeConverters.toInt,
    )

    @keyword_only
    def __init__(
        self,
        *,
        inputCol: str = "content",
        outputCol: str = "features",
        modelName: str = "ResNet50",
        weights: str = backbones.IMAGENET,
        pooling: str = "avg",
        batchSize: int = 32,
        handleInvalid: str = "error",
        originCol: str = "path",
        maxImagePixels: int = DEFAULT_MAX_PIXELS,
    ):
        super().__init__()
        self._setDefault(
            inputCol="content",
            outputCol="features",
            modelName="ResNet50",
            weights=backbones.IMAGENET,
            pooling="avg",
            batchSize=32,
            handleInvalid="error",
            originCol="path",
            maxImagePixels=DEFAULT_MAX_PIXELS,
        )
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        inputCol: str = "content",
        outputCol: str = "features",
        modelName: str = "ResNet50",
        weights: str = backbones.IMAGENET,
        pooling: str = "avg",
        batchSize: int = 32,
        handleInvalid: str = "error",
        originCol: str = "path",
        maxImagePixels: int = DEFAULT_MAX_PIXELS,
    ) -> "KerasImageFeaturizer":
        kwargs = self._input_kwargs
        self._set(**kwargs)
        self._validate()
        return self

    def _validate(self) -> None:
        backbones.get_backbone(self.getModelName())
        backbones.check_pooling(self.getPooling())
        if self.getHandleInvalid() not in HANDLE_INVALID:
            raise ValueError(
                f"unknown handleInvalid {self.getHandleInvalid()!r}: expected one of "
                f"{', '.join(HANDLE_INVALID)}"
            )
        if self.getBatchSize() < 1:
            raise ValueError(f"batchSize must be > 0, got {self.getBatchSize()}")
        if self.getMaxImagePixels() < 1:
            raise ValueError(f"maxImagePixels must be > 0, got {self.getMaxImagePixels()}")

    def setModelName(self, value: str) -> "KerasImageFeaturizer":
        return self.setParams(modelName=value)

    def getModelName(self) -> str:
        return self.getOrDefault(self.modelName)

    def setWeights(self, value: str) -> "KerasImageFeaturizer":
        return self.setParams(weights=value)

    def getWeights(self) -> str:
        return self.getOrDefault(self.weights)

    def setPooling(self, value: str) -> "KerasImageFeaturizer":
        return self.setParams(pooling=value)

    def getPooling(self) -> str:
        return self.getOrDefault(self.pooling)

    def setBatchSize(self, value: int) -> "KerasImageFeaturizer":
        return self.setParams(batchSize=value)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def setHandleInvalid(self, value: str) -> "KerasImageFeaturizer":
        return self.setParams(handleInvalid=value)

    def getHandleInvalid(self) -> str:
        return self.getOrDefault(self.handleInvalid)

    def setOriginCol(self, value: str) -> "KerasImageFeaturizer":
        return self.setParams(originCol=value)

    def getOriginCol(self) -> str:
        return self.getOrDefault(self.originCol)

    def setMaxImagePixels(self, value: int) -> "KerasImageFeaturizer":
        return self.setParams(maxImagePixels=value)

    def getMaxImagePixels(self) -> int:
        return self.getOrDefault(self.maxImagePixels)

    def setInputCol(self, value: str) -> "KerasImageFeaturizer":
        return self._set(inputCol=value)

    def setOutputCol(self, value: str) -> "KerasImageFeaturizer":
        return self._set(outputCol=value)

    @property
    def backbone(self) -> backbones.Backbone:
        return backbones.get_backbone(self.getModelName())

    def _resolved_weights(self, spark) -> tuple[str | None, str | None]:
        """(path, sha256) of the weights on the driver, computed once per SparkContext.

        Off local mode the file is also shipped to every executor (``SparkContext.addFile``; each
        executor fetches it once), unless the Spark setting ``spark.imagefeaturizer.shipWeights``
        is ``false`` because the path is on storage every node reads. Executors check the sha256
        (:func:`_local_weights`).
        """
        path = backbones.resolve_weights(self.backbone, self.getWeights())
        if path is None:
            return None, None
        sc = spark.sparkContext
        shipped = getattr(sc, "_featurizer_shipped", None)
        if shipped is None:
            shipped = sc._featurizer_shipped = {}
        if path not in shipped:
            shipped[path] = backbones.file_sha256(path)
            ship = sc.getConf().get(SHIP_WEIGHTS_CONF, "true").strip().lower() != "false"
            if ship and not sc.master.startswith("local"):
                sc.addFile(path)
        return path, shipped[path]

    def _transform(self, dataset: DataFrame) -> DataFrame:
        self._validate()
        input_col = self.getInputCol()
        if input_col not in dataset.columns:
            raise ValueError(
                f"input column {input_col!r} not found: the DataFrame has {dataset.columns}"
            )
        field = dataset.schema[input_col].dataType
        if isinstance(field, T.BinaryType):
            origin = self.getOriginCol()
            origin_col = F.col(origin) if origin in dataset.columns else F.lit(None).cast("string")
        elif isinstance(field, T.StructType) and {"data", "height", "width", "nChannels"} <= set(
            field.fieldNames()
        ):
            origin_col = F.col(f"{input_col}.origin") if "origin" in field.fieldNames() else F.lit(None).cast("string")
        else:
            raise TypeError(
                f"input column {input_col!r} has type {field.simpleString()}: expected binary "
                f"image bytes (format 'binaryFile') or Spark's image struct (format 'image')"
            )

        weights_path, weights_sha = self._resolved_weights(dataset.sparkSession)
        model_name, pooling = self.getModelName(), self.getPooling()
        batch_size, handle_invalid = self.getBatchSize(), self.getHandleInvalid()
        max_pixels = self.getMaxImagePixels()

        @F.pandas_udf(T.ArrayType(T.FloatType()))
        def featurize(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
            extractor = get_extractor(model_name, weights_path, pooling, weights_sha)
            _drop_zip_finders()
            for images, origins in batches:
                yield featurize_series(
                    extractor,
                    images,
                    origins,
                    batch_size=batch_size,
                    handle_invalid=handle_invalid,
                    max_pixels=max_pixels,
                )

        out_col = self.getOutputCol()
        result = dataset.withColumn(out_col, featurize(F.col(input_col), origin_col))
        if handle_invalid == "skip":
            result = result.filter(F.col(out_col).isNotNull())
        return result.withColumn(out_col, array_to_vector(F.col(out_col)))
