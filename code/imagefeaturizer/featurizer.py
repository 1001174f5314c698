"""``KerasImageFeaturizer``: a pyspark.ml Transformer that turns images into backbone features.

How an image becomes a feature vector, in order:

1. bytes (Spark's ``binaryFile`` ``content``) or Spark's image struct (``format("image")``) are
   decoded into an RGB Pillow image (:func:`imagefeaturizer.images.decode_record`);
2. resized to the backbone's input size, exactly as ``keras.utils.load_img(target_size=...,
   interpolation="bilinear")`` does, and stacked into uint8 batches
   (:class:`imagefeaturizer.runtime.FeatureExtractor`);
3. run by an engine (``engine``; :mod:`imagefeaturizer.engines`): the backbone's own Keras
   ``preprocess_input``, the frozen backbone without its top, global ``pooling``; built once per
   Python worker and kept for every later batch and task of that worker
   (:func:`imagefeaturizer.runtime.get_extractor`); OpenVINO runs the Keras model exported once
   (:mod:`imagefeaturizer.export`);
4. returned as a Spark ML ``DenseVector`` column that LogisticRegression takes directly; with
   ``mapsCol`` set, also the last spatial feature maps the features were pooled from (same
   forward pass), which :mod:`imagefeaturizer.cam` turns into class activation maps.

This file holds the Transformer: its Params and the plan of the pandas UDF. What runs inside the
Python workers is in :mod:`imagefeaturizer.runtime`; what the driver ships to them (weights, this
package) in :mod:`imagefeaturizer.shipping`; how a saved featurizer carries its weights file in
:mod:`imagefeaturizer.persistence`. No SparkContext or JVM access: it runs on Spark Connect too.
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

from . import backbones, export, persistence, runtime, shipping
from .engines import AUTO, ENGINE_CHOICES
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
    (``originCol``) and the reason, ``skip`` drops the row. ``mapsCol`` (optional, "" = none):
    also an ``array<float>`` column of the last spatial feature maps, flattened in (height, width,
    channels) order; their shape is ``featurizer.backbone.map_shape``. ``engine``: what runs the
    backbone (``auto``: OpenVINO on CPUs, TensorFlow where TensorFlow sees a GPU; see
    :meth:`resolveEngine`); features are equal to TensorFlow's within 1e-4 of their largest value.

    >>> KerasImageFeaturizer(inputCol="content", outputCol="features", modelName="ResNet50")
    """

    modelName = Param(
        Params._dummy(), "modelName",
        f"Keras backbone: one of {', '.join(backbones.BACKBONES)}", typeConverter=TypeConverters.toString)
    weights = Param(
        Params._dummy(), "weights",
        "'imagenet' (Keras' cache, downloaded when missing), 'random' (seeded, not transfer "
        "learning) or a path to a Keras weights file for the backbone without its top",
        typeConverter=TypeConverters.toString)
    pooling = Param(
        Params._dummy(), "pooling",
        "global pooling of the last feature maps: 'avg' or 'max'", typeConverter=TypeConverters.toString)
    batchSize = Param(
        Params._dummy(), "batchSize",
        "images per backbone call inside each Python worker (> 0)", typeConverter=TypeConverters.toInt)
    originCol = Param(
        Params._dummy(), "originCol",
        "column naming each image in error messages (binaryFile's 'path'); when the DataFrame "
        "has no such column: the image struct's origin, else the row's place in its batch",
        typeConverter=TypeConverters.toString)
    maxImagePixels = Param(
        Params._dummy(), "maxImagePixels",
        "images whose header claims more pixels (width x height) are invalid, rejected before "
        "decoding (> 0)", typeConverter=TypeConverters.toInt)
    mapsCol = Param(
        Params._dummy(), "mapsCol",
        "when not empty: also output the last spatial feature maps (before pooling, same forward "
        "pass) into this column, an array<float> of height*width*channels values in (height, "
        "width, channels) order (backbone.map_shape)", typeConverter=TypeConverters.toString)
    engine = Param(
        Params._dummy(), "engine",
        f"what runs the backbone: one of {', '.join(ENGINE_CHOICES)} ('auto': OpenVINO on CPUs, "
        f"TensorFlow where TensorFlow sees a GPU)", typeConverter=TypeConverters.toString)
    modelCacheDir = Param(
        Params._dummy(), "modelCacheDir",
        f"folder of the exported models ('': ${export.MODEL_CACHE_ENV}, else ~/.cache/imagefeaturizer/models)",
        typeConverter=TypeConverters.toString)

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
        mapsCol: str = "",
        engine: str = AUTO,
        modelCacheDir: str = "",
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
            mapsCol="",
            engine=AUTO,
            modelCacheDir="",
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
        mapsCol: str = "",
        engine: str = AUTO,
        modelCacheDir: str = "",
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
        if self.getEngine() not in ENGINE_CHOICES:
            raise ValueError(f"unknown engine {self.getEngine()!r}: expected one of {', '.join(ENGINE_CHOICES)}")
        if self.getBatchSize() < 1:
            raise ValueError(f"batchSize must be > 0, got {self.getBatchSize()}")
        if self.getMaxImagePixels() < 1:
            raise ValueError(f"maxImagePixels must be > 0, got {self.getMaxImagePixels()}")
        if self.getMapsCol() and self.getMapsCol() in (self.getOutputCol(), self.getInputCol()):
            raise ValueError(f"mapsCol {self.getMapsCol()!r} must differ from inputCol and outputCol")

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

    def setMapsCol(self, value: str) -> "KerasImageFeaturizer":
        return self.setParams(mapsCol=value)

    def getMapsCol(self) -> str:
        return self.getOrDefault(self.mapsCol)

    def setEngine(self, value: str) -> "KerasImageFeaturizer":
        return self.setParams(engine=value)

    def getEngine(self) -> str:
        return self.getOrDefault(self.engine)

    def setModelCacheDir(self, value: str) -> "KerasImageFeaturizer":
        return self.setParams(modelCacheDir=value)

    def getModelCacheDir(self) -> str:
        return self.getOrDefault(self.modelCacheDir)

    def setInputCol(self, value: str) -> "KerasImageFeaturizer":
        return self._set(inputCol=value)

    def setOutputCol(self, value: str) -> "KerasImageFeaturizer":
        return self._set(outputCol=value)

    @property
    def backbone(self) -> backbones.Backbone:
        return backbones.get_backbone(self.getModelName())

    def _resolved_weights(self, spark) -> tuple[str | None, str | None]:
        """(path, sha256) of the weights on the driver; the file hashed and, where workers may not
        read it, shipped once per session (:func:`imagefeaturizer.shipping.weights_sha256`).
        Workers check the sha256 (:func:`imagefeaturizer.runtime.local_weights`); a loaded
        featurizer also checks it against the saved one."""
        path = backbones.resolve_weights(self.backbone, self.getWeights())
        if path is None:
            return None, None
        sha = shipping.weights_sha256(spark, path)
        persistence.check_saved_hash(self, path, sha)
        return path, sha

    def write(self) -> persistence.FeaturizerWriter:
        """Params as ``DefaultParamsWriter`` saves them, plus the weights file copied into the
        saved folder with its sha256 (:mod:`imagefeaturizer.persistence`)."""
        return persistence.FeaturizerWriter(self)

    @classmethod
    def read(cls) -> persistence.FeaturizerReader:
        return persistence.FeaturizerReader(cls)

    def resolveEngine(self, spark, log=None) -> export.EnginePlan:
        """Which engine runs, decided on the driver once per SparkContext (``auto`` resolved, the
        model exported into ``modelCacheDir`` if missing, or ``auto``'s fallback to TensorFlow,
        said in ``log``); an engine named that cannot run raises ``EngineError`` naming the fix."""
        weights_path, weights_sha = self._resolved_weights(spark)
        return export.plan_for_context(spark, self.getEngine(), self.getModelName(), weights_path,
                                       weights_sha, export.cache_dir(self.getModelCacheDir()), log)

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
        plan = self.resolveEngine(dataset.sparkSession)
        return runtime.FeaturizeTask(
            model_name=self.getModelName(),
            weights_path=weights_path,
            weights_sha256=weights_sha,
            pooling=self.getPooling(),
            batch_size=self.getBatchSize(),
            handle_invalid=self.getHandleInvalid(),
            max_pixels=self.getMaxImagePixels(),
            with_maps=bool(self.getMapsCol()),
            engine=plan.engine,
            model_files=plan.shipped_files(dataset.sparkSession),
        )

    def _transform(self, dataset: DataFrame) -> DataFrame:
        self._validate()
        self._check_input(dataset)
        shipping.ensure_package(dataset.sparkSession)  # when workers may not import this package
        task = self._task(dataset)
        features = T.ArrayType(T.FloatType())
        returns = T.StructType([T.StructField("features", features), T.StructField("maps", features)])

        @F.pandas_udf(returns if task.with_maps else features)
        def featurize(batches: Iterator[Tuple[pd.Series, pd.Series]]) -> Iterator[pd.Series]:
            yield from runtime.featurize_batches(task, batches)

        # Nondeterministic for the optimizer: else it pushes skip's null filter below the UDF's
        # projection with a copy of the call, and every image is featurized twice.
        featurize = featurize.asNondeterministic()

        out_col, maps_col = self.getOutputCol(), self.getMapsCol()
        udf_col = f"__{out_col}_and_maps" if task.with_maps else out_col  # one UDF call, two columns
        result = dataset.withColumn(udf_col, featurize(F.col(self.getInputCol()), self._origin_column(dataset)))
        if task.with_maps:
            result = result.withColumns({out_col: F.col(f"{udf_col}.features"), maps_col: F.col(f"{udf_col}.maps")})
            result = result.drop(udf_col)
        if task.handle_invalid == "skip":
            result = result.filter(F.col(out_col).isNotNull())
        return result.withColumn(out_col, array_to_vector(F.col(out_col)))
