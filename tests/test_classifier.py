"""KerasImageClassifier: a saved Keras network as a Spark ML stage. Fast: the workers' body
(classify_series) without Spark. Slow: one Spark test (predictions, bad images, a PipelineModel
holding the .keras file saved through a file: URI); a fresh process loads it in
tests/test_tracking.py."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest
from pyspark.ml import PipelineModel

from conftest import keras_classifier_pipeline, make_dataset
from imagefeaturizer import backbones, networks
from imagefeaturizer.classifier import STAGE_MODEL_FILE, ClassifyTask, KerasImageClassifier, classify_series
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


def test_classify_series_is_the_networks_on_decoded_resized_images(tmp_path, keras_file):
    """The worker's body without Spark: decode, resize, batches of ``batchSize``, the network's
    probabilities; a bad image is None (skip) or an error naming the file."""
    make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=2)
    paths = sorted(str(p) for p in (tmp_path / "raw").rglob("*") if p.is_file())
    contents = [open(p, "rb").read() for p in paths] + [b"\x89PNG\r\n\x1a\n cut"]
    origins = pd.Series(paths + ["a/cut.png"])
    task = ClassifyTask(keras_file, backbones.file_sha256(keras_file), 32, 3, "skip", 10_000_000)
    out = classify_series(task, pd.Series(contents), origins)
    expected = _keras_probabilities(keras_file, paths)
    n = len(paths)
    assert n == 4 and len(out) == n + 1
    np.testing.assert_allclose(np.stack(out["probability"][:n]), expected, rtol=1e-5, atol=1e-6)
    assert list(out["prediction"][:n]) == [float(i) for i in expected.argmax(axis=1)]
    assert pd.isna(out["prediction"][n]) and out["probability"][n] is None  # skipped
    with pytest.raises(Exception, match="cut.png"):
        classify_series(dataclasses.replace(task, handle_invalid="error"), pd.Series(contents), origins)
    with pytest.raises(ValueError, match="imageSize must be > 0"):
        KerasImageClassifier(imageSize=0)


@pytest.mark.slow  # Spark's Python workers start TensorFlow for it
def test_in_spark_predictions_bad_images_and_a_pipeline_saved_through_a_uri(spark, tmp_path, keras_file):
    """As a Spark stage: the network's probabilities, bad images skipped or failing naming the file,
    and a saved PipelineModel holding the .keras file, through a file: URI (a plain path: the
    fresh-process test in tests/test_featurizer.py and every run's model folder)."""
    root = make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=2)
    (tmp_path / "raw" / "a" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    images = _images(spark, root)
    skipping = KerasImageClassifier(inputCol="content", modelFile=keras_file, imageSize=32, batchSize=2,
                                    handleInvalid="skip")
    rows = skipping.transform(images).select("path", "prediction", "probability").collect()
    paths = [_strip(r.path) for r in rows]
    assert len(paths) == 4 and not any(p.endswith("cut.png") for p in paths)
    expected = _keras_probabilities(keras_file, paths)
    np.testing.assert_allclose(np.stack([r.probability.toArray() for r in rows]), expected, rtol=1e-5, atol=1e-6)
    assert [r.prediction for r in rows] == [float(i) for i in expected.argmax(axis=1)]
    with pytest.raises(Exception, match="cut.png"):
        KerasImageClassifier(modelFile=keras_file, imageSize=32).transform(images).collect()
    with pytest.raises(ValueError, match="modelFile 'nowhere.keras' is not a file"):
        KerasImageClassifier(modelFile="nowhere.keras").transform(images)

    good = images.filter(~images.path.endswith("cut.png"))
    model = _pipeline(spark, keras_file)
    before = _predictions(model, good)
    folder = tmp_path / "uri"
    model.write().save("file://" + str(folder))
    stage_dir = next(d for d in os.listdir(folder / "stages") if "KerasImageClassifier" in d)
    with open(folder / "stages" / stage_dir / STAGE_MODEL_FILE, "rb") as f, open(keras_file, "rb") as g:
        assert f.read() == g.read()
    loaded = PipelineModel.load("file://" + str(folder))
    stage = loaded.stages[1]
    assert isinstance(stage, KerasImageClassifier) and stage.getImageSize() == 32
    assert stage.getModelFile() != keras_file and os.path.isfile(stage.getModelFile())
    assert _predictions(loaded, good) == before


def _pipeline(spark, keras_file):
    return keras_classifier_pipeline(keras_file, CLASSES, 32)


def _predictions(model, images) -> dict:
    rows = model.transform(images).select("path", "predicted_label", "probability").collect()
    return {_strip(r.path): (r.predicted_label, r.probability.toArray().tolist()) for r in rows}


# A saved pipeline that loads in a fresh process with identical predictions (the .keras file it
# was built from deleted) is checked in tests/test_tracking.py's fresh-process test, in the same
# second process as the app's saved folder and both logged models (one Spark and TensorFlow start for all).
