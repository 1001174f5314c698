"""The Transformer: Params, both input kinds, invalid images and their origin, persistence."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import IndexToString, StringIndexer
from pyspark.ml.linalg import DenseVector

from conftest import ROOT, FakeSession, make_dataset, png_bytes, xray_like
from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer
from imagefeaturizer.images import decode_to_pil
from imagefeaturizer.runtime import get_extractor

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
    assert (f.getEngine(), f.getModelCacheDir()) == ("auto", "")
    assert f.setEngine("tensorflow").setModelCacheDir("/m").getEngine() == "tensorflow" and f.getModelCacheDir() == "/m"
    with pytest.raises(ValueError, match="unknown engine 'onnxruntime': expected one of auto, tensorflow, openvino"):
        KerasImageFeaturizer(engine="onnxruntime")


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
    local = _local_features(paths)
    np.testing.assert_allclose(np.stack([r.features.toArray() for r in rows]), local, rtol=1e-4, atol=1e-4)

    struct = spark.read.format("image").load(str(folder))
    rows2 = f.copy({f.inputCol: "image"}).transform(struct).select("image.origin", "features").collect()
    by_path = {_strip(r.origin): r.features.toArray() for r in rows2}
    np.testing.assert_allclose(np.stack([by_path[p] for p in paths]), local, rtol=1e-4, atol=1e-4)


def test_maps_col_adds_the_feature_maps_of_the_same_pass(spark, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    for i in range(3):
        xray_like(i, seed=i, size=(70, 50), mode="RGB").save(folder / f"im{i}.png")
    (folder / "broken.png").write_bytes(png_bytes(xray_like(1, seed=2))[:60])
    f = KerasImageFeaturizer(modelName=MODEL, weights="random", batchSize=2, mapsCol="maps", handleInvalid="skip")
    out = f.transform(spark.read.format("binaryFile").load(str(folder)))
    for df in (out, f.copy({f.mapsCol: ""}).transform(spark.read.format("binaryFile").load(str(folder)))):
        # One UDF call for features and maps, also under skip's null filter (which the optimizer
        # would otherwise evaluate with a second copy of the call).
        assert df._jdf.queryExecution().executedPlan().toString().count("ArrowEvalPython") == 1
    rows = out.select("path", "features", "maps").collect()
    assert sorted(os.path.basename(_strip(r.path)) for r in rows) == ["im0.png", "im1.png", "im2.png"]
    extractor = get_extractor(MODEL, None, "avg")
    arrays = [extractor.prepare(decode_to_pil(open(_strip(r.path), "rb").read())) for r in rows]
    features, maps = extractor.predict_with_maps(arrays, batch_size=2)
    assert f.backbone.map_shape == maps.shape[1:]
    np.testing.assert_allclose(np.stack([np.asarray(r.maps) for r in rows]), maps.reshape(len(rows), -1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.stack([r.features.toArray() for r in rows]), features, rtol=1e-4, atol=1e-4)
    assert "maps" not in KerasImageFeaturizer(modelName=MODEL, weights="random").transform(
        spark.read.format("binaryFile").load(str(folder / "im0.png"))).columns
    with pytest.raises(ValueError, match="mapsCol 'features' must differ"):
        KerasImageFeaturizer(mapsCol="features")


def test_maps_col_persists_and_older_saves_load_without_it(spark, tmp_path):
    import json

    KerasImageFeaturizer(modelName=MODEL, mapsCol="m", engine="openvino", modelCacheDir="/m").save(str(tmp_path / "with"))
    loaded = KerasImageFeaturizer.load(str(tmp_path / "with"))
    assert (loaded.getMapsCol(), loaded.getEngine(), loaded.getModelCacheDir()) == ("m", "openvino", "/m")
    KerasImageFeaturizer(modelName=MODEL).save(str(tmp_path / "old"))
    (meta,) = (tmp_path / "old" / "metadata").glob("part-*")
    saved = json.loads(meta.read_text())
    for key in ("paramMap", "defaultParamMap"):
        for param in ("mapsCol", "engine", "modelCacheDir"):
            saved[key].pop(param, None)  # as saved before these Params existed
    meta.write_text(json.dumps(saved))
    for crc in (tmp_path / "old" / "metadata").glob(".*.crc"):
        crc.unlink()  # the checksum of the file as first written
    old = KerasImageFeaturizer.load(str(tmp_path / "old"))
    assert (old.getMapsCol(), old.getEngine(), old.getModelCacheDir()) == ("", "auto", "")


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


def test_weights_are_shipped_once_per_session(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "check_weights_file", lambda *args: None)  # a stand-in file (tested in test_backbones)
    path = str(tmp_path / "w.h5")
    with open(path, "wb") as f:
        f.write(b"weights")
    sha = backbones.file_sha256(path)
    featurizer = KerasImageFeaturizer(modelName="ResNet50", weights=path)
    first, second = FakeSession(app_id="app-a"), FakeSession(app_id="app-b")  # e.g. a session stopped, a new one
    for spark in (first, first, second):
        assert featurizer._resolved_weights(spark) == (path, sha)
    for spark in (first, second):
        assert [kind for _, kind in spark.artifacts] == ["file"]
        shipped = spark.artifacts[0][0]
        assert os.path.basename(shipped) == f"{sha[:16]}-w.h5" and backbones.file_sha256(shipped) == sha


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


@pytest.mark.slow  # a fit and two passes of the featurizer
def test_pipeline_saves_and_loads(spark, tmp_path):
    """The library's own Pipeline, saved and loaded back in this process. In a fresh process (one
    for all, in tests/test_tracking.py: test_the_logged_model_loads_in_a_fresh_process_and_predicts_the_same):
    the app's saved model folder (the featurizer's Pipeline) and a trained network's Pipeline
    (KerasImageClassifier) saved to a plain folder, its .keras file deleted."""
    root = make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=4)
    model, images = _fit_pipeline(spark, root)
    images = images.drop("label")
    predictions = {
        _strip(r.path): (r.predicted_label, r.probability.toArray().tolist())
        for r in model.transform(images).select("path", "predicted_label", "probability").collect()
    }
    save_to = str(tmp_path / "model")
    model.write().save(save_to)

    loaded_model = PipelineModel.load(save_to)
    loaded = {_strip(r.path): (r.predicted_label, r.probability.toArray().tolist())
              for r in loaded_model.transform(images).select("path", "predicted_label", "probability").collect()}
    assert loaded.keys() == predictions.keys() and len(loaded) == 8
    for path, (label, prob) in predictions.items():
        assert loaded[path][0] == label
        np.testing.assert_allclose(loaded[path][1], prob, rtol=1e-5, atol=1e-6)
    stage = loaded_model.stages[1]
    assert isinstance(stage, KerasImageFeaturizer) and stage.getWeights() == "random"
    assert stage.getModelName() == MODEL and stage.getBatchSize() == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_backbone_in_spark(spark, tmp_path, name, random_extractor):
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
    extractor = random_extractor(name)  # TensorFlow's avg engine, built once per session: max-pool its maps
    paths = [_strip(r.path) for r in rows]
    _, maps = extractor.predict_with_maps([extractor.prepare(decode_to_pil(open(p, "rb").read())) for p in paths], 4)
    expected = maps.max(axis=(1, 2))
    np.testing.assert_allclose(np.stack([r.features.toArray() for r in rows]), expected, rtol=1e-4, atol=1e-4)


def test_auto_falls_back_to_tensorflow_when_openvino_cannot_run(spark, tmp_path, monkeypatch):
    from imagefeaturizer import engines

    monkeypatch.setattr(engines, "tensorflow_sees_gpu", lambda: False)  # auto would pick OpenVINO
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: import fails, find_spec is None
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        xray_like(i, seed=i, size=(70, 50), mode="RGB").save(folder / f"im{i}.png")
    f = KerasImageFeaturizer(modelName=MODEL, weights="random", modelCacheDir=str(tmp_path / "models"))
    logs = []
    plan = f.resolveEngine(spark, log=logs.append)
    assert plan.engine == "tensorflow" and "pip install openvino" in plan.fallback
    assert logs == [f"WARNING: {plan.fallback}"]
    # One partition: one Python worker imports TensorFlow and builds the model, not two.
    images = spark.read.format("binaryFile").load(str(folder)).coalesce(1)
    rows = f.transform(images).select("path", "features").collect()
    paths = [_strip(r.path) for r in rows]
    np.testing.assert_allclose(np.stack([r.features.toArray() for r in rows]), _local_features(paths), rtol=1e-4, atol=1e-4)
    assert not (tmp_path / "models").exists()  # nothing was exported


@pytest.mark.slow
def test_openvino_workers_import_no_tensorflow_use_a_thread_per_core_and_match_tensorflow(tmp_path):
    """A fresh application (the session's workers imported TensorFlow long ago): after featurizing
    with OpenVINO neither its workers nor its driver have imported TensorFlow or Keras."""
    import json

    from test_export import close_to

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        xray_like(i % 3, seed=i, size=(90, 70), mode="RGB").save(folder / f"im{i}.png")
    out = tmp_path / "out.json"
    job = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "engine_job.py"), str(folder), str(out),
                          "openvino", MODEL], capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert job.returncode == 0, job.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["plan"]["engine"] == "openvino" and result["partitions"] == 4
    workers = [w for w in result["workers"] if w["models"]]  # those that featurized
    assert workers and all(not w["tensorflow"] and not w["keras"] and w["openvino"] for w in workers)
    assert not result["driver_imported_tensorflow"]
    settings = {"INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1", "ENABLE_CPU_PINNING": "False",
                "INFERENCE_PRECISION_HINT": "<Type: 'float32'>"}  # local[2]: one core a task
    assert all(model == settings for w in workers for model in w["models"])
    names = sorted(result["features"])
    extractor = get_extractor(MODEL, None, "avg")
    arrays = [extractor.prepare(decode_to_pil((folder / n).read_bytes())) for n in names]
    features, maps = extractor.predict_with_maps(arrays, batch_size=4)
    assert close_to(np.array([result["features"][n] for n in names]), features) <= 1e-4
    assert close_to(np.array([result["maps"][n] for n in names]), maps.reshape(len(names), -1)) <= 1e-4
