"""``KerasImageClassifier``: a pyspark.ml Transformer that applies a trained Keras image classifier.

The network is a saved Keras model (a ``.keras`` file, e.g. from :mod:`imagefeaturizer.trainer`)
that takes float32 RGB pixels in 0..255 at ``imageSize`` x ``imageSize`` and returns class
probabilities. Each image (bytes or Spark's image struct) is decoded by
:func:`imagefeaturizer.images.decode_record`, resized like the featurizer's input and classified
in batches; the model is loaded once per Python worker (:func:`imagefeaturizer.runtime.get_keras_model`),
the UDF closure holds only plain values. Output: ``predictionCol`` (the class index, double) and
``probabilityCol`` (a Spark ML vector), as Spark's own classifiers name them, so ``IndexToString``
and Spark's evaluators take them.

Persistence: the ``.keras`` file is copied into the stage's folder (``model.keras`` beside
``metadata/``) when a Pipeline is saved; loading sets ``modelFile`` to that copy, so a saved
``PipelineModel`` is self-contained and loads in any process.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Iterator, Tuple

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasHandleInvalid, HasInputCol, HasPredictionCol, HasProbabilityCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsReader, DefaultParamsWritable, DefaultParamsWriter
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from . import runtime, shipping
from .images import DEFAULT_MAX_PIXELS

STAGE_MODEL_FILE = "model.keras"
HANDLE_INVALID = ("error", "skip")


@dataclass(frozen=True)
class ClassifyTask:
    """What a worker classifies with, as plain values (never a model)."""

    model_path: str  # the driver's path
    model_sha256: str
    image_size: int
    batch_size: int
    handle_invalid: str
    max_pixels: int


class KerasImageClassifier(Transformer, HasInputCol, HasPredictionCol, HasProbabilityCol, HasHandleInvalid,
                           DefaultParamsReadable, DefaultParamsWritable):
    """Class probabilities and the predicted class index of a trained Keras network.

    >>> KerasImageClassifier(inputCol="content", modelFile="model.keras", imageSize=224)
    """

    modelFile = Param(Params._dummy(), "modelFile",
                      "path of the saved Keras model (.keras); after loading a saved stage, its copy inside the "
                      "stage folder", typeConverter=TypeConverters.toString)
    imageSize = Param(Params._dummy(), "imageSize", "square input side of the network, pixels (> 0)",
                      typeConverter=TypeConverters.toInt)
    batchSize = Param(Params._dummy(), "batchSize", "images per network call in each Python worker (> 0)",
                      typeConverter=TypeConverters.toInt)
    originCol = Param(Params._dummy(), "originCol", "column naming each image in error messages",
                      typeConverter=TypeConverters.toString)
    maxImagePixels = Param(Params._dummy(), "maxImagePixels",
                           "images whose header claims more pixels are invalid (> 0)", typeConverter=TypeConverters.toInt)

    @keyword_only
    def __init__(self, *, inputCol: str = "content", predictionCol: str = "prediction",
                 probabilityCol: str = "probability", modelFile: str = "", imageSize: int = 224,
                 batchSize: int = 32, handleInvalid: str = "error", originCol: str = "path",
                 maxImagePixels: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        self._setDefault(inputCol="content", predictionCol="prediction", probabilityCol="probability",
                         modelFile="", imageSize=224, batchSize=32, handleInvalid="error", originCol="path",
                         maxImagePixels=DEFAULT_MAX_PIXELS)
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(self, *, inputCol: str = "content", predictionCol: str = "prediction",
                  probabilityCol: str = "probability", modelFile: str = "", imageSize: int = 224,
                  batchSize: int = 32, handleInvalid: str = "error", originCol: str = "path",
                  maxImagePixels: int = DEFAULT_MAX_PIXELS) -> "KerasImageClassifier":
        self._set(**self._input_kwargs)
        self._validate()
        return self

    def _validate(self) -> None:
        if self.getHandleInvalid() not in HANDLE_INVALID:
            raise ValueError(f"unknown handleInvalid {self.getHandleInvalid()!r}: expected one of "
                             f"{', '.join(HANDLE_INVALID)}")
        for name in ("imageSize", "batchSize", "maxImagePixels"):
            if self.getOrDefault(name) < 1:
                raise ValueError(f"{name} must be > 0, got {self.getOrDefault(name)}")

    def getModelFile(self) -> str:
        return self.getOrDefault(self.modelFile)

    def setModelFile(self, value: str) -> "KerasImageClassifier":
        return self.setParams(modelFile=value)

    def getImageSize(self) -> int:
        return self.getOrDefault(self.imageSize)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def getOriginCol(self) -> str:
        return self.getOrDefault(self.originCol)

    def getMaxImagePixels(self) -> int:
        return self.getOrDefault(self.maxImagePixels)

    # ------------------------------------------------------------------ transform

    def _task(self, dataset: DataFrame) -> ClassifyTask:
        path = os.path.abspath(self.getModelFile()) if self.getModelFile() else ""
        if not os.path.isfile(path):
            raise ValueError(f"modelFile {self.getModelFile()!r} is not a file: set it to a saved Keras model (.keras)")
        sha = shipping.ship_file(dataset.sparkSession, path)  # under its sha256 prefix: many model.keras
        return ClassifyTask(path, sha, self.getImageSize(), self.getBatchSize(), self.getHandleInvalid(),
                            self.getMaxImagePixels())

    def _transform(self, dataset: DataFrame) -> DataFrame:
        self._validate()
        if self.getInputCol() not in dataset.columns:
            raise ValueError(f"input column {self.getInputCol()!r} not found: the DataFrame has {dataset.columns}")
        task = self._task(dataset)
        shipping.ensure_package(dataset.sparkSession)  # when workers may not import this package

        @F.pandas_udf("prediction double, probability array<double>")
        def classify(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
            for images, origins in batches:
                yield classify_series(task, images, origins)
                runtime.drop_zip_finders()

        origin = F.col(self.getOriginCol()).cast("string") if self.getOriginCol() in dataset.columns else F.lit(None)
        out = dataset.withColumn("__classified", classify(F.col(self.getInputCol()), origin.cast("string")))
        if task.handle_invalid == "skip":
            out = out.filter(F.col("__classified.prediction").isNotNull())
        return (out.withColumn(self.getPredictionCol(), F.col("__classified.prediction"))
                .withColumn(self.getProbabilityCol(), array_to_vector(F.col("__classified.probability")))
                .drop("__classified"))

    # ------------------------------------------------------------------ persistence

    def write(self) -> "_ClassifierWriter":
        return _ClassifierWriter(self)

    @classmethod
    def read(cls) -> "_ClassifierReader":
        return _ClassifierReader(cls)


def classify_series(task: ClassifyTask, images: pd.Series | pd.DataFrame, origins: pd.Series) -> pd.DataFrame:
    """(prediction, probability) per row of one Arrow batch; None for an invalid image (``skip``).

    Every image is decoded before the model is fetched: bad data fails fast."""
    records = images.to_dict("records") if isinstance(images, pd.DataFrame) else list(images)
    arrays, keep = runtime.decode_batch(records, origins, task.image_size, task.max_pixels, task.handle_invalid)
    predictions: list = [None] * len(records)
    probabilities: list = [None] * len(records)
    if arrays:
        model = runtime.get_keras_model(task.model_path, task.model_sha256)
        for start in range(0, len(arrays), task.batch_size):
            batch = np.stack(arrays[start:start + task.batch_size]).astype(np.float32)
            for i, p in zip(keep[start:start + task.batch_size], np.asarray(model.predict_on_batch(batch))):
                predictions[i], probabilities[i] = float(np.argmax(p)), p.astype(np.float64).tolist()
    return pd.DataFrame({"prediction": predictions, "probability": probabilities})


# --------------------------------------------------------------------------- the stage's model file


def _is_plain_path(path: str) -> bool:
    return "://" not in path and not path.startswith("file:")


def _hadoop(spark, path: str):
    """(FileSystem, Path) of a URI through Spark's JVM (HDFS, S3, ``file:`` ...)."""
    jvm = spark.sparkContext._jvm  # noqa: SLF001 - Hadoop's FileSystem has no Python API
    target = jvm.org.apache.hadoop.fs.Path(path)
    return target.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), target  # noqa: SLF001


class _ClassifierWriter(DefaultParamsWriter):
    """Params as every DefaultParamsWritable stage, plus the ``.keras`` file inside the stage folder."""

    def saveImpl(self, path: str) -> None:
        super().saveImpl(path)
        source, dest = self.instance.getModelFile(), f"{path.rstrip('/')}/{STAGE_MODEL_FILE}"
        if not os.path.isfile(source):
            raise ValueError(f"modelFile {source!r} is not a file: nothing to save")
        if _is_plain_path(dest):
            shutil.copyfile(source, dest)
        else:
            fs, target = _hadoop(self.sparkSession, dest)
            fs.copyFromLocalFile(False, True, self.sparkSession.sparkContext._jvm.org.apache.hadoop.fs.Path(
                os.path.abspath(source)), target)  # noqa: SLF001


class _ClassifierReader(DefaultParamsReader):
    """Params as every DefaultParamsReadable stage; ``modelFile`` set to the stage folder's copy
    (a local copy of it when the folder is not on a local file system)."""

    def load(self, path: str) -> KerasImageClassifier:
        instance = super().load(path)
        source = f"{path.rstrip('/')}/{STAGE_MODEL_FILE}"
        if _is_plain_path(source):
            local = os.path.abspath(source)
        else:
            import tempfile

            local = os.path.join(tempfile.mkdtemp(prefix="imagefeaturizer-model-"), STAGE_MODEL_FILE)
            fs, remote = _hadoop(self.sparkSession, source)
            fs.copyToLocalFile(False, remote, self.sparkSession.sparkContext._jvm.org.apache.hadoop.fs.Path(local),
                               True)  # noqa: SLF001
        if not os.path.isfile(local):
            raise ValueError(f"saved stage {path} has no {STAGE_MODEL_FILE}: save the model again")
        return instance._set(modelFile=local)
