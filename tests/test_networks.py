"""Trainable networks: the backbone exactly as Keras defines it behind its own preprocess_input, the
units of fine-tuning, SmallCNN's shape, augmentation only in training, and .keras round trips."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from imagefeaturizer import backbones, networks


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float32)


def _finetune_spec(name: str = "VGG16", size: int = 32, **kw) -> networks.NetworkSpec:
    return networks.NetworkSpec(kind=networks.FINETUNE, model_name=name, n_classes=3, image_size=size, **kw)


def test_finetune_network_is_keras_backbone_behind_its_own_preprocess_input():
    import keras

    model, backbone = networks.build_network(_finetune_spec(augment=False))
    x = _images(2, 32)
    inner = keras.Model(model.input, model.get_layer("pool").input)  # the backbone's maps
    module = importlib.import_module("keras.applications.vgg16")
    expected = backbone.predict(module.preprocess_input(x.copy()), verbose=0)
    np.testing.assert_allclose(inner.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-4)
    probabilities = model.predict(x, verbose=0)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert not backbone.trainable and model.trainable_weights  # stage one: the head only
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {"head_norm", "head"}


def test_augmentation_acts_in_training_only():
    model, _ = networks.build_network(_finetune_spec(augment=True, dropout=0.0))
    augment = model.get_layer("augment")
    x = _images(4, 32, seed=1)
    np.testing.assert_array_equal(np.asarray(augment(x, training=False)), x)
    assert not np.allclose(np.asarray(augment(x, training=True)), x)
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))


def test_small_cnn_has_five_conv_blocks_and_three_dense_layers():
    import keras

    spec = networks.NetworkSpec(kind=networks.SCRATCH, model_name="SmallCNN", n_classes=2, image_size=32)
    model, backbone = networks.build_network(spec)
    assert backbone is None and model.name == "SmallCNN"
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 5 and kinds.count("BatchNormalization") == 5 and kinds.count("MaxPooling2D") == 5
    assert kinds.count("Dense") == 3 and kinds.count("Dropout") == 7
    assert model.output_shape == (None, 2)
    assert all(isinstance(layer, keras.layers.Layer) for layer in model.layers)
    with pytest.raises(ValueError, match="unknown network 'TinyNet'"):
        networks.build_network(networks.NetworkSpec(kind=networks.SCRATCH, model_name="TinyNet", n_classes=2,
                                                    image_size=32))


def test_units_and_unfreezing_the_top_ones():
    model, backbone = networks.build_network(_finetune_spec())
    units = networks.backbone_units(backbone, "VGG16")
    assert [name for name, _ in units] == ["block1", "block2", "block3", "block4", "block5"]
    assert len(units) == networks.UNITS["VGG16"]
    names = networks.set_trainable_units(backbone, "VGG16", 2)
    assert names == ["block4", "block5"]
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {"block4_conv1", "block4_conv2", "block4_conv3", "block5_conv1", "block5_conv2",
                         "block5_conv3", "head_norm", "head"}
    assert networks.set_trainable_units(backbone, "VGG16", 0) == []
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {"head_norm", "head"}
    with pytest.raises(ValueError, match="VGG16 has 5 units"):
        networks.set_trainable_units(backbone, "VGG16", 6)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_unit_counts_match_the_registry_and_cover_every_weight(name):
    """UNITS (what configs are checked against) is what the built network has; every layer with
    weights is in exactly one unit, and units follow Keras' block names."""
    model = backbones.build_model(name, None, pooling=None, input_size=networks.min_input_size(networks.FINETUNE, name))
    units = networks.backbone_units(model, name)
    assert len(units) == networks.UNITS[name]
    ids = [id(layer) for _, layers in units for layer in layers]
    assert len(ids) == len(set(ids))
    assert {id(layer) for layer in model.layers if layer.weights} <= set(ids)
    top_name, top_layers = units[-1]
    assert top_name == {"InceptionV3": "mixed10", "ResNet50": "conv5_block3", "VGG16": "block5", "VGG19": "block5",
                        "Xception": "block14"}[name]
    assert model.layers[-1] in top_layers  # the top unit ends at the backbone's output


def test_saved_network_loads_with_identical_predictions(tmp_path):
    from imagefeaturizer.runtime import get_keras_model

    model, _ = networks.build_network(_finetune_spec(augment=True))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = get_keras_model(path, backbones.file_sha256(path))
    assert loaded.get_layer("preprocess_input").model_name == "VGG16"
    x = _images(3, 32, seed=2)
    np.testing.assert_array_equal(loaded.predict_on_batch(x), model.predict_on_batch(x))
    assert get_keras_model(path, backbones.file_sha256(path)) is loaded  # once per process
