"""KerasImageClassifier: a saved Keras network as a Spark ML stage: its predictions, bad images, and a
PipelineModel holding the .keras file that loads elsewhere (a file: URI; a fresh process in
tests/test_featurizer.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.ml import PipelineModel

from conftest import keras_classifier_pipeline, make_dataset
from imagefeaturizer import networks
from imagefeaturizer.classifier import STAGE_MODEL_FILE, KerasImageClassifier
from imagefeaturizer.images import decode_to_pil, resize_pil

CLASSES = ["a", "b"]


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    spec = networks.NetworkSpec(kind=networks.SCRATCH, model_name="SmallCNN", n_classes=2, image_size=32, seed=3)
    model, _ = networks.build_network(spec)
    path = str(tmp_path_factory.mktemp("net") / "net.keras")
    model.save(path)
    return path


def _images(spark, root):
    return spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(root))


def _strip(path: str) -> str:
    return path[len("file:"):] if path.startswith("file:") else path


def _keras_probabilities(keras_file, paths):
    import keras

    model = keras.saving.load_model(keras_file, compile=False)
    batch = np.stack([np.asarray(resize_pil(decode_to_pil(open(p, "rb").read()), (32, 32))) for p in paths])
    return model.predict(batch.astype(np.float32), verbose=0)


def test_predictions_are_the_networks_on_decoded_resized_images(spark, tmp_path, keras_file):
    root = make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=3)
    stage = KerasImageClassifier(inputCol="content", modelFile=keras_file, imageSize=32, batchSize=2)
    rows = stage.transform(_images(spark, root)).select("path", "prediction", "probability").collect()
    paths = [_strip(r.path) for r in rows]
    expected = _keras_probabilities(keras_file, paths)
    got = np.stack([r.probability.toArray() for r in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [r.prediction for r in rows] == [float(i) for i in expected.argmax(axis=1)]


def test_bad_images_fail_naming_the_file_or_are_skipped(spark, tmp_path, keras_file):
    root = make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=2)
    (tmp_path / "raw" / "a" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    images = _images(spark, root)
    skipping = KerasImageClassifier(modelFile=keras_file, imageSize=32, handleInvalid="skip")
    kept = [_strip(r.path) for r in skipping.transform(images).select("path").collect()]
    assert len(kept) == 4 and not any(p.endswith("cut.png") for p in kept)
    with pytest.raises(Exception, match="cut.png"):
        KerasImageClassifier(modelFile=keras_file, imageSize=32).transform(images).collect()
    with pytest.raises(ValueError, match="modelFile 'nowhere.keras' is not a file"):
        KerasImageClassifier(modelFile="nowhere.keras").transform(images)
    with pytest.raises(ValueError, match="imageSize must be > 0"):
        KerasImageClassifier(imageSize=0)


def _pipeline(spark, keras_file):
    return keras_classifier_pipeline(keras_file, CLASSES, 32)


def _predictions(model, images) -> dict:
    rows = model.transform(images).select("path", "predicted_label", "probability").collect()
    return {_strip(r.path): (r.predicted_label, r.probability.toArray().tolist()) for r in rows}


def test_saved_pipeline_holds_the_keras_file_also_through_a_uri(spark, tmp_path, keras_file):
    root = make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=2)
    images = _images(spark, root)
    model = _pipeline(spark, keras_file)
    before = _predictions(model, images)
    # A file: URI here; a plain path in the fresh-process test below and in every run's model folder.
    folder = tmp_path / "uri"
    model.write().save("file://" + str(folder))
    stage_dir = next(d for d in os.listdir(folder / "stages") if "KerasImageClassifier" in d)
    with open(folder / "stages" / stage_dir / STAGE_MODEL_FILE, "rb") as f, open(keras_file, "rb") as g:
        assert f.read() == g.read()
    loaded = PipelineModel.load("file://" + str(folder))
    stage = loaded.stages[1]
    assert isinstance(stage, KerasImageClassifier) and stage.getImageSize() == 32
    assert stage.getModelFile() != keras_file and os.path.isfile(stage.getModelFile())
    assert _predictions(loaded, images) == before


# A saved pipeline that loads in a fresh process with identical predictions (the .keras file it
# was built from deleted) is checked in tests/test_featurizer.py's fresh-process test, in the same
# second process as the featurizer's pipeline (one Spark and TensorFlow start for both).
