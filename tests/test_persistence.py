"""Portable saved models: a saved featurizer carries its weights file, checked by sha256."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import StringIndexer
from pyspark.sql import functions as F

from conftest import make_dataset
from imagefeaturizer import backbones, persistence
from imagefeaturizer.featurizer import KerasImageFeaturizer

MODEL = "VGG16"  # the smallest weights file (58 MB)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    """VGG16 weights without top, saved by Keras, unlike ``weights="random"``."""
    path = str(tmp_path_factory.mktemp("weights") / "vgg16-own.weights.h5")
    model = backbones.build_model(MODEL, None)
    weights = model.get_weights()
    weights[0] = weights[0] * 0.5
    model.set_weights(weights)
    model.save_weights(path)
    return path


def _images(spark, root):
    df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(root))
    return df.withColumn("label", F.regexp_extract("path", r"/([^/]+)/[^/]+$", 1))


def _predictions(model, images) -> dict:
    rows = model.transform(images.drop("label")).select("path", "probability").collect()
    return {os.path.basename(r.path): r.probability.toArray() for r in rows}


def _metadata(folder: str) -> dict:
    """The metadata a stage folder holds (pyspark writes it as one JSON text part)."""
    part = next(p for p in os.listdir(os.path.join(folder, "metadata")) if p.startswith("part-"))
    with open(os.path.join(folder, "metadata", part), encoding="utf-8") as f:
        return json.loads(f.read())


def _stage_metadata(model_dir: str) -> dict:
    stage = next(d for d in os.listdir(os.path.join(model_dir, "stages")) if "KerasImageFeaturizer" in d)
    folder = os.path.join(model_dir, "stages", stage)
    return {"folder": folder, **_metadata(folder)}


@pytest.mark.slow
def test_a_moved_model_folder_predicts_the_same_without_the_original_weights(spark, tmp_path, weights_file):
    source = str(tmp_path / "mine.weights.h5")
    shutil.copyfile(weights_file, source)
    images = _images(spark, make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=2))
    featurizer = KerasImageFeaturizer(modelName=MODEL, weights=source, batchSize=4)
    model = Pipeline(stages=[StringIndexer(inputCol="label", outputCol="label_index"), featurizer,
                             LogisticRegression(labelCol="label_index", maxIter=5)]).fit(images)
    before = _predictions(model, images)
    saved = str(tmp_path / "here" / "model")
    model.write().save(saved)

    meta = _stage_metadata(saved)
    record = meta["weights"]
    assert record == {"kind": "file", "file": "weights/mine.weights.h5", "sha256": backbones.file_sha256(source),
                      "source": source}
    assert backbones.file_sha256(os.path.join(meta["folder"], "weights", "mine.weights.h5")) == record["sha256"]

    moved = str(tmp_path / "elsewhere" / "model")
    shutil.move(saved, moved)
    os.unlink(source)  # the machine the folder moved to has no such file
    loaded = PipelineModel.load(moved)
    stage = loaded.stages[1]
    assert stage.getWeights() == os.path.join(_stage_metadata(moved)["folder"], "weights", "mine.weights.h5")
    after = _predictions(loaded, images)
    assert after.keys() == before.keys()
    for name, probability in before.items():
        np.testing.assert_allclose(after[name], probability, rtol=1e-5, atol=1e-6)


def _saved_featurizer(tmp_path, weights: str) -> str:
    path = str(tmp_path / "featurizer")
    KerasImageFeaturizer(modelName=MODEL, weights=weights).write().save(path)
    return path


def test_a_missing_or_altered_weights_file_fails_naming_the_file_and_its_hash(spark, tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "check_weights_file", lambda *args: None)  # a stand-in file (tested in test_backbones)
    source = str(tmp_path / "w.weights.h5")  # loading checks the file's hash only: any bytes serve
    with open(source, "wb") as f:
        f.write(os.urandom(64 * 1024))
    sha = backbones.file_sha256(source)
    saved = _saved_featurizer(tmp_path, source)
    copy = os.path.join(saved, "weights", "w.weights.h5")
    assert KerasImageFeaturizer.load(saved).getWeights() == copy

    with open(copy, "r+b") as f:
        f.seek(4096)
        f.write(b"\x00altered\x00")
    with pytest.raises(backbones.WeightsError) as altered:
        KerasImageFeaturizer.load(saved)
    assert str(altered.value).startswith(f"weights file {copy} was altered: sha256 ")
    assert f"expected {sha}" in str(altered.value) and "\n" not in str(altered.value)

    os.unlink(copy)
    os.unlink(source)
    with pytest.raises(backbones.WeightsError) as missing:
        KerasImageFeaturizer.load(saved)
    assert str(missing.value).startswith(f"weights file {copy} is missing (expected sha256 {sha})")
    assert "\n" not in str(missing.value)


def test_imagenet_weights_are_recorded_by_keras_file_and_hash(spark, tmp_path, monkeypatch):
    cached, other = tmp_path / "cached.h5", tmp_path / "other.h5"
    cached.write_bytes(b"the file in the Keras cache")
    other.write_bytes(b"another file in its place")
    resolve = backbones.resolve_weights
    monkeypatch.setattr(backbones, "resolve_weights",
                        lambda b, w: str(cached) if w == backbones.IMAGENET else resolve(b, w))
    saved = _saved_featurizer(tmp_path, backbones.IMAGENET)
    record = _metadata(saved)["weights"]
    vgg = backbones.get_backbone(MODEL)
    assert record == {"kind": "imagenet", "file": vgg.imagenet_file, "md5": vgg.imagenet_md5,
                      "sha256": backbones.file_sha256(str(cached))}
    assert not os.path.exists(os.path.join(saved, "weights"))  # Keras' own file is named, not copied

    loaded = KerasImageFeaturizer.load(saved)
    assert loaded._resolved_weights(spark)[1] == record["sha256"]
    monkeypatch.setattr(backbones, "resolve_weights", lambda b, w: str(other))
    with pytest.raises(backbones.WeightsError, match=f"not the one the model was saved with .*expected {record['sha256']}"):
        loaded._resolved_weights(spark)
    assert KerasImageFeaturizer(modelName=MODEL)._resolved_weights(spark)[0] == str(other)  # not loaded: no check


def test_random_weights_record_the_seed_and_copy_nothing(spark, tmp_path):
    saved = _saved_featurizer(tmp_path, backbones.RANDOM)
    assert _metadata(saved)["weights"] == {"kind": "random", "seed": backbones.RANDOM_WEIGHTS_SEED}
    assert not os.path.exists(os.path.join(saved, "weights"))
    assert KerasImageFeaturizer.load(saved).getWeights() == backbones.RANDOM


def test_local_folder_of_save_paths(tmp_path):
    assert persistence.local_folder(str(tmp_path)) == str(tmp_path)
    assert persistence.local_folder(f"file://{tmp_path}") == str(tmp_path)
    assert persistence.local_folder("hdfs://nn:8020/models/m") is None
