"""The Transformer: Params, both input kinds, invalid images and their origin, persistence."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import IndexToString, StringIndexer
from pyspark.ml.linalg import DenseVector

from conftest import ROOT, make_dataset, png_bytes, predict_in_fresh_process, xray_like
from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer
from imagefeaturizer.images import decode_to_pil
from imagefeaturizer.runtime import FeatureExtractor, get_extractor

MODEL = "ResNet50"  # the cheapest backbone on a CPU


def _local_features(paths, model=MODEL):
    extractor = get_extractor(model, None, "avg")
    arrays = [extractor.prepare(decode_to_pil(open(p, "rb").read())) for p in paths]
    return extractor.predict(arrays, batch_size=8)


def _strip(path: str) -> str:
    return path.replace("file://", "").replace("file:", "")


def test_params_defaults_and_validation():
    f = KerasImageFeaturizer()
    assert (f.getInputCol(), f.getOutputCol(), f.getModelName()) == ("content", "features", "ResNet50")
    assert (f.getWeights(), f.getPooling(), f.getBatchSize(), f.getHandleInvalid()) == ("imagenet", "avg", 32, "error")
    f.setModelName("VGG19").setPooling("max").setBatchSize(4)
    assert (f.getModelName(), f.getPooling(), f.getBatchSize()) == ("VGG19", "max", 4)
    with pytest.raises(ValueError, match="expected one of InceptionV3"):
        KerasImageFeaturizer(modelName="AlexNet")
    with pytest.raises(ValueError, match="pooling"):
        KerasImageFeaturizer(pooling="flatten")
    with pytest.raises(ValueError, match="handleInvalid"):
        KerasImageFeaturizer(handleInvalid="keep")
    with pytest.raises(ValueError, match="batchSize"):
        KerasImageFeaturizer(batchSize=0)


def test_binary_and_image_struct_inputs_match_local_features(spark, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        xray_like(i % 3, seed=i, size=(80, 60), mode="RGB").save(folder / f"im{i}.png")
    f = KerasImageFeaturizer(modelName=MODEL, weights="random", batchSize=2)

    binary = spark.read.format("binaryFile").load(str(folder))
    rows = f.transform(binary).select("path", "features").collect()
    assert len(rows) == 5 and all(isinstance(r.features, DenseVector) for r in rows)
    paths = [_strip(r.path) for r in rows]
    np.testing.assert_allclose(np.stack([r.features.toArray() for r in rows]), _local_features(paths), rtol=1e-4, atol=1e-4)

    struct = spark.read.format("image").load(str(folder))
    rows2 = f.copy({f.inputCol: "image"}).transform(struct).select("image.origin", "features").collect()
    by_path = {_strip(r.origin): r.features.toArray() for r in rows2}
    np.testing.assert_allclose(np.stack([by_path[p] for p in paths]), _local_features(paths), rtol=1e-4, atol=1e-4)


def test_wrong_input_column_type_is_a_clear_error(spark):
    df = spark.createDataFrame([(1,)], ["content"])
    with pytest.raises(TypeError, match="expected binary image bytes"):
        KerasImageFeaturizer(weights="random").transform(df)
    with pytest.raises(ValueError, match="not found"):
        KerasImageFeaturizer(weights="random", inputCol="image").transform(df)


def test_handle_invalid_skip_and_error(spark, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    xray_like(0, seed=1).save(folder / "good.png")
    (folder / "broken.png").write_bytes(png_bytes(xray_like(1, seed=2))[:60])
    df = spark.read.format("binaryFile").load(str(folder))

    kept = KerasImageFeaturizer(modelName=MODEL, weights="random", handleInvalid="skip").transform(df)
    assert [os.path.basename(r.path) for r in kept.select("path").collect()] == ["good.png"]

    with pytest.raises(Exception) as info:
        KerasImageFeaturizer(modelName=MODEL, weights="random").transform(df).collect()
    from xray.errors import worker_error_message

    message = worker_error_message(info.value)
    assert message is not None and "broken.png" in message and "truncated" in message


def _worker_error(df, featurizer) -> str:
    with pytest.raises(Exception) as info:
        featurizer.transform(df).collect()
    return str(info.value)


def test_origin_col_names_the_invalid_image_and_falls_back_when_absent(spark):
    broken = png_bytes(xray_like(1, seed=2))[:60]
    df = spark.createDataFrame([(bytearray(broken), "scan-042.png")], ["content", "name"]).coalesce(1)
    named = _worker_error(df, KerasImageFeaturizer(modelName=MODEL, weights="random", originCol="name"))
    assert "scan-042.png: truncated image data" in named
    unnamed = _worker_error(df, KerasImageFeaturizer(modelName=MODEL, weights="random", originCol="nowhere"))
    assert "row 0 of its batch: truncated image data" in unnamed and "scan-042.png" not in unnamed


def test_image_struct_spark_could_not_read_is_invalid(spark, tmp_path):
    folder = tmp_path / "structs"
    folder.mkdir()
    xray_like(0, seed=1, size=(50, 40)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(png_bytes(xray_like(1, seed=2))[:60])
    df = spark.read.format("image").load(str(folder))  # keeps Spark's invalid-image rows
    f = KerasImageFeaturizer(modelName=MODEL, weights="random", inputCol="image")
    kept = f.copy({f.handleInvalid: "skip"}).transform(df).select("image.origin").collect()
    assert [os.path.basename(r.origin) for r in kept] == ["good.png"]
    message = _worker_error(df, f)
    assert "broken.png: Spark's image reader could not decode this file" in message


def test_handle_invalid_is_pysparks_shared_param():
    from pyspark.ml.param.shared import HasHandleInvalid

    f = KerasImageFeaturizer(handleInvalid="skip")
    assert isinstance(f, HasHandleInvalid) and f.getHandleInvalid() == "skip"
    assert f.handleInvalid.name == "handleInvalid" and f.setHandleInvalid("error").getHandleInvalid() == "error"


class _FakeContext:
    """What ``_resolved_weights`` uses of a SparkContext: a cluster master, addFile, getConf."""

    master = "spark://10.0.0.1:7077"

    def __init__(self):
        self.added = []

    def addFile(self, path):  # noqa: N802 - Spark's name
        self.added.append(path)

    def getConf(self):  # noqa: N802 - Spark's name
        return {}


def test_weights_are_shipped_once_per_spark_context(tmp_path):
    import types

    path = str(tmp_path / "w.h5")
    with open(path, "wb") as f:
        f.write(b"weights")
    featurizer = KerasImageFeaturizer(modelName="ResNet50", weights=path)
    first, second = _FakeContext(), _FakeContext()  # e.g. a context stopped and a new one started
    for sc in (first, first, second):
        spark = types.SimpleNamespace(sparkContext=sc)
        assert featurizer._resolved_weights(spark) == (path, backbones.file_sha256(path))
    assert first.added == [path] and second.added == [path]
    assert not any(name.startswith("_featurizer") for name in vars(first))  # nothing stored on the context


def _fit_pipeline(spark, root):
    images = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(root))
    from pyspark.sql import functions as F

    images = images.withColumn("label", F.regexp_extract("path", r"/([^/]+)/[^/]+$", 1))
    indexer = StringIndexer(inputCol="label", outputCol="label_index")
    featurizer = KerasImageFeaturizer(modelName=MODEL, weights="random", batchSize=4)
    lr = LogisticRegression(labelCol="label_index", maxIter=20, regParam=0.1)
    fitted = Pipeline(stages=[indexer, featurizer, lr]).fit(images)
    converter = IndexToString(inputCol="prediction", outputCol="predicted_label", labels=fitted.stages[0].labels)
    return PipelineModel(fitted.stages + [converter]), images


def test_pipeline_saves_and_loads_in_a_fresh_process(spark, tmp_path):
    root = make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=4)
    model, images = _fit_pipeline(spark, root)
    predictions = {
        _strip(r.path): (r.predicted_label, r.probability.toArray().tolist())
        for r in model.transform(images.drop("label")).select("path", "predicted_label", "probability").collect()
    }
    save_to = str(tmp_path / "model")
    model.write().save(save_to)

    loaded = {_strip(k): v for k, v in predict_in_fresh_process(save_to, root, ROOT).items()}
    assert loaded.keys() == predictions.keys()
    for path, (label, prob) in predictions.items():
        assert loaded[path][0] == label
        np.testing.assert_allclose(loaded[path][1], prob, rtol=1e-5, atol=1e-6)
    stage = PipelineModel.load(save_to).stages[1]
    assert isinstance(stage, KerasImageFeaturizer) and stage.getWeights() == "random"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_backbone_in_spark(spark, tmp_path, name):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        xray_like(i, seed=i, size=(50, 40)).save(folder / f"im{i}.png")
    rows = (
        KerasImageFeaturizer(modelName=name, weights="random", pooling="max")
        .transform(spark.read.format("binaryFile").load(str(folder)))
        .select("path", "features")
        .collect()
    )
    assert len(rows) == 3
    assert {len(r.features) for r in rows} == {backbones.get_backbone(name).feature_size}
    extractor = FeatureExtractor(name, None, "max")
    paths = [_strip(r.path) for r in rows]
    expected = extractor.predict([extractor.prepare(decode_to_pil(open(p, "rb").read())) for p in paths], 4)
    np.testing.assert_allclose(np.stack([r.features.toArray() for r in rows]), expected, rtol=1e-4, atol=1e-4)
