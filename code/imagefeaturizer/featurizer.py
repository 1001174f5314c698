"""``KerasImageFeaturizer``: a pyspark.ml Transformer that turns images into backbone features.

How an image becomes a feature vector, in order:

1. bytes (Spark's ``binaryFile`` ``content``) or Spark's image struct (``format("image")``) are
   decoded into an RGB Pillow image (:func:`imagefeaturizer.images.decode_record`);
2. resized to the backbone's input size, exactly as ``keras.utils.load_img(target_size=...,
   interpolation="bilinear")`` does, and stacked into uint8 batches
   (:class:`imagefeaturizer.runtime.FeatureExtractor`);
3. run by an engine (:mod:`imagefeaturizer.engines`): the backbone's own Keras
   ``preprocess_input``, the frozen backbone without its top, global ``pooling``; built once per
   Python worker and kept for every later batch and task of that worker
   (:func:`imagefeaturizer.runtime.get_extractor`);
4. returned as a Spark ML ``DenseVector`` column that LogisticRegression takes directly.

This file holds the Transformer: its Params, persistence and the plan of the pandas UDF. What
runs inside the Python workers is in :mod:`imagefeaturizer.runtime`.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasHandleInvalid, HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from . import backbones, runtime
from .images import DEFAULT_MAX_PIXELS, SPARK_IMAGE_FIELDS

HANDLE_INVALID = ("error", "skip")


class KerasImageFeaturizer(
    Transformer, HasInputCol, HasOutputCol, HasHandleInvalid, DefaultParamsReadable, DefaultParamsWritable
):
    """Features of a frozen Keras ImageNet backbone, as a Spark ML vector column.

    ``inputCol`` holds image bytes (``spark.read.format("binaryFile")``'s ``content``) or Spark's
    image struct (``spark.read.format("image")``'s ``image``). ``outputCol`` gets a
    ``DenseVector`` of the backbone's pooled features (2048 or 512 values, never the flattened
    131k-dim maps). ``handleInvalid`` (pyspark's shared Param): ``error`` fails naming the image
    (``originCol``) and the reason, ``skip`` drops the row.

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
    originCol = Param(
        Params._dummy(),
        "originCol",
        "column naming each image in error messages (binaryFile's 'path'); when the DataFrame "
        "has no such column: the image struct's origin, else the row's place in its batch",
        typeConverter=TypeConverters.toString,
    )
    maxImagePixels = Param(
        Params._dummy(),
        "maxImagePixels",
        "images whose header claims more pixels (width x height) are invalid, rejected before "
        "decoding (> 0)",
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
        (:func:`imagefeaturizer.runtime.local_weights`); :func:`imagefeaturizer.runtime.ship_file`.
        """
        path = backbones.resolve_weights(self.backbone, self.getWeights())
        if path is None:
            return None, None
        return path, runtime.ship_file(spark.sparkContext, path)

    def _origin_column(self, dataset: DataFrame) -> Column:
        """What names each image in error messages: ``originCol``, else the struct's origin."""
        field = dataset.schema[self.getInputCol()].dataType
        if self.getOriginCol() in dataset.columns:
            return F.col(self.getOriginCol()).cast("string")
        if isinstance(field, T.StructType) and "origin" in field.fieldNames():
            return F.col(f"{self.getInputCol()}.origin")
        return F.lit(None).cast("string")

    def _check_input(self, dataset: DataFrame) -> None:
        input_col = self.getInputCol()
        if input_col not in dataset.columns:
            raise ValueError(
                f"input column {input_col!r} not found: the DataFrame has {dataset.columns}"
            )
        field = dataset.schema[input_col].dataType
        if isinstance(field, T.BinaryType):
            return
        if isinstance(field, T.StructType) and set(SPARK_IMAGE_FIELDS) <= set(field.fieldNames()):
            return
        raise TypeError(
            f"input column {input_col!r} has type {field.simpleString()}: expected binary "
            f"image bytes (format 'binaryFile') or Spark's image struct (format 'image')"
        )

    def _task(self, dataset: DataFrame) -> runtime.FeaturizeTask:
        """The plain values a worker featurizes with (the weights resolved on the driver)."""
        weights_path, weights_sha = self._resolved_weights(dataset.sparkSession)
        return runtime.FeaturizeTask(
            model_name=self.getModelName(),
            weights_path=weights_path,
            weights_sha256=weights_sha,
            pooling=self.getPooling(),
            batch_size=self.getBatchSize(),
            handle_invalid=self.getHandleInvalid(),
            max_pixels=self.getMaxImagePixels(),
        )

    def _transform(self, dataset: DataFrame) -> DataFrame:
        self._validate()
        self._check_input(dataset)
        task = self._task(dataset)

        @F.pandas_udf(T.ArrayType(T.FloatType()))
        def featurize(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
            yield from runtime.featurize_batches(task, batches)

        out_col = self.getOutputCol()
        result = dataset.withColumn(out_col, featurize(F.col(self.getInputCol()), self._origin_column(dataset)))
        if task.handle_invalid == "skip":
            result = result.filter(F.col(out_col).isNotNull())
        return result.withColumn(out_col, array_to_vector(F.col(out_col)))
