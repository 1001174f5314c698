"""Engines: pooled features equal Keras' own pooled model, maps from the same pass, one trace."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import xray_like
from imagefeaturizer import backbones
from imagefeaturizer.engines import TensorFlowEngine, create_engine
from imagefeaturizer.runtime import FeatureExtractor, get_extractor

CHEAP = "VGG16"  # quick to build


def _batch(size: int, n: int) -> np.ndarray:
    images = [xray_like(i % 3, seed=i, size=(60, 50), mode="RGB").resize((size, size)) for i in range(n)]
    return np.stack([np.asarray(image, dtype=np.uint8) for image in images])


def test_max_pooled_features_equal_keras_own_max_model():
    """The engine pools the maps itself; Keras' pooling="max" model gives the same features.
    (Average pooling is compared with Keras for every backbone in test_backbones.)"""
    engine = create_engine("tensorflow", CHEAP, None, "max")
    batch = _batch(engine.backbone.input_size, 2)
    keras_model = backbones.build_model(CHEAP, None, "max")
    # Keras' own forward pass, called eagerly (as predict computes it, without tracing a predict function)
    expected = np.asarray(keras_model(engine.backbone.preprocess_input(batch.astype(np.float32)), training=False))
    features, maps = engine.run_with_maps(batch)
    np.testing.assert_allclose(engine.run(batch), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    assert maps.shape == (2, *engine.backbone.map_shape)
    np.testing.assert_array_equal(maps.max(axis=(1, 2)), features)
    assert not np.array_equal(features[0], features[1])  # two different images, two feature rows


def test_one_trace_serves_every_batch_size_and_the_maps():
    extractor = FeatureExtractor("VGG19", None, "avg")
    arrays = list(_batch(extractor.backbone.input_size, 3))
    split = extractor.predict(arrays, batch_size=2)  # batches of 2 and 1
    whole, maps = extractor.predict_with_maps(arrays, batch_size=3)
    np.testing.assert_allclose(split, whole, rtol=1e-4, atol=1e-4)
    assert maps.shape == (3, 7, 7, 512)
    assert extractor.engine.tracing_count() == 1


def test_wrong_batch_shape_is_a_clear_error():
    engine = get_extractor("ResNet50", None, "avg").engine
    expected = r"ResNet50 takes batches of shape \(n, 224, 224, 3\), got \(224, 224, 3\)"
    with pytest.raises(ValueError, match=expected):
        engine.run(np.zeros((224, 224, 3), np.uint8))


def test_unknown_engine_and_pooling_name_the_choices():
    with pytest.raises(ValueError, match="unknown engine 'onnx': expected one of tensorflow"):
        create_engine("onnx", CHEAP, None)
    with pytest.raises(ValueError, match="avg, max"):
        TensorFlowEngine(CHEAP, None, "flatten")


def test_other_keras_backends_are_refused_with_the_fix(monkeypatch):
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="set KERAS_BACKEND=tensorflow"):
        TensorFlowEngine(CHEAP, None)

