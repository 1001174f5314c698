"""The registry matches Keras: input size, feature size, feature maps, preprocessing and features."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from conftest import png_bytes, xray_like
from imagefeaturizer import backbones

# What Keras documents for each application without its top: module, input size, the size of the
# last feature maps at that input (5 stride-2 stages: 224 -> 7; 299 -> 8 or 10) and their channels.
KERAS_FACTS = {
    "InceptionV3": ("inception_v3", 299, 8, 2048),
    "ResNet50": ("resnet50", 224, 7, 2048),
    "VGG16": ("vgg16", 224, 7, 512),
    "VGG19": ("vgg19", 224, 7, 512),
    "Xception": ("xception", 299, 10, 2048),
}


def test_registry_names_the_five_backbones():
    assert sorted(backbones.BACKBONES) == sorted(KERAS_FACTS)


@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_registry_sizes_are_keras_documented_ones(name):
    _, size, map_side, feature_size = KERAS_FACTS[name]
    entry = backbones.get_backbone(name)
    assert (entry.input_size, entry.feature_size) == (size, feature_size)
    assert entry.map_shape == (map_side, map_side, feature_size)


# ResNet50 in the fast tier; the other four build and trace larger graphs (InceptionV3 alone
# about 17 s on 2 cores), so they run with the slow tier, as test_cam's per-backbone identities do.
@pytest.mark.parametrize("name", [n if n == "ResNet50" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(backbones.BACKBONES)])
def test_features_equal_keras_own_pipeline(name, tmp_path, random_extractor):
    """Our bytes -> features path equals load_img + the module's preprocess_input + Keras' own
    pooled model; the maps come from the registry's layer and pool to those features."""
    import keras

    module_name, size, map_side, feature_size = KERAS_FACTS[name]
    entry = backbones.get_backbone(name)

    image = xray_like(1, seed=7, size=(90, 70), mode="RGB")
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(image))

    extractor = random_extractor(name)  # FeatureExtractor(name, None, "avg"), shared with later files
    ours, maps = extractor.predict_with_maps([extractor.prepare(image)], batch_size=4)
    assert ours.shape == (1, feature_size) and maps.shape == (1, *entry.map_shape)
    np.testing.assert_allclose(extractor.predict([extractor.prepare(image)], batch_size=4), ours, rtol=1e-6)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), ours, rtol=1e-4, atol=1e-5)

    module = importlib.import_module(f"keras.applications.{module_name}")
    reference = getattr(keras.applications, name)(
        weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3)
    )
    assert reference.get_layer(entry.map_layer).output.shape[1:] == entry.map_shape
    assert backbones.weights_signature(w.shape for w in reference.weights) == entry.weights  # what its files hold
    reference.set_weights(extractor.engine.model.get_weights())
    pixels = keras.utils.img_to_array(
        keras.utils.load_img(path, target_size=(size, size), interpolation="bilinear")
    )
    # Keras' own forward pass, called eagerly: the same layers and result as reference.predict,
    # without tracing a predict function for one image (seconds of CPU for InceptionV3).
    expected = np.asarray(reference(module.preprocess_input(pixels[None].copy()), training=False))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(ours).sum() > 0


@pytest.fixture(scope="module")
def vgg16_random(random_extractor):
    """VGG16 with seeded random weights: (pooled "avg", built once for this module; the maps, the
    session's TensorFlow engine's model, built as every engine builds it)."""
    return backbones.build_model("VGG16", None), random_extractor("VGG16").engine.model


def test_random_weights_are_the_same_in_every_build_pooled_or_not(vgg16_random):
    a, b = vgg16_random  # b: what the engines build, the maps
    assert tuple(a.output.shape) == (None, 512) and tuple(b.output.shape) == (None, 7, 7, 512)
    assert len(a.get_weights()) == len(b.get_weights())
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_weights_file_round_trip_and_mismatch(tmp_path, vgg16_random):
    model = vgg16_random[0]
    path = str(tmp_path / "vgg16.weights.h5")
    model.save_weights(path)
    assert backbones.resolve_weights("VGG16", path) == path
    loaded = backbones.build_model("VGG16", path)
    for wa, wb in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    with pytest.raises(backbones.WeightsError, match="does not fit ResNet50"):
        backbones.build_model("ResNet50", path)


def _no_model_built(*args, **kwargs):
    raise AssertionError("the weights check built a model")


def test_weights_files_are_checked_without_building_a_model(tmp_path, monkeypatch, vgg16_random):
    """VGG16 weights given to ResNet50, a garbage file, a truncated one: found on the spot, in one
    line naming the fix; the legacy .h5 layout of Keras' ImageNet files passes, and loads."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    model = vgg16_random[1]
    vgg, legacy = str(tmp_path / "vgg16.weights.h5"), str(tmp_path / "vgg16_notop.h5")
    model.save_weights(vgg)
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    garbage, truncated = tmp_path / "garbage.h5", tmp_path / "truncated.h5"
    garbage.write_bytes(b"not weights at all" * 64)
    truncated.write_bytes(open(vgg, "rb").read()[: 1 << 20])

    monkeypatch.setattr(backbones, "build_model", _no_model_built)
    assert backbones.resolve_weights("VGG16", vgg) == vgg and backbones.resolve_weights("VGG16", legacy) == legacy
    cases = [
        ("ResNet50", vgg, "does not fit ResNet50 without its top: it holds 26 weight arrays (14,714,688 values), "
                          "those of VGG16 without its top; ResNet50 has 318"),
        ("ResNet50", str(garbage), "is not a Keras weights file (not HDF5)"),
        ("VGG16", str(truncated), "is a damaged HDF5 file"),
    ]
    for name, path, reason in cases:
        with pytest.raises(backbones.WeightsError) as info:
            backbones.resolve_weights(name, path)
        message = str(info.value)
        assert reason in message and message.endswith(f"give the weights file of {name} without its top "
                                                      f"(include_top=False), or 'imagenet' or 'random'")
        assert "\n" not in message
    monkeypatch.undo()
    loaded = backbones.build_model("VGG16", legacy, pooling=None)  # what passes the check loads
    for wa, wb in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_the_weights_verdict_is_kept_per_content(tmp_path, monkeypatch):
    import h5py

    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.zeros((3, 4), np.float32))
    reads = []
    real = backbones.file_weight_shapes
    monkeypatch.setattr(backbones, "file_weight_shapes", lambda p: reads.append(p) or real(p))
    for _ in range(3):  # a sweep's experiments: one read of the file
        with pytest.raises(backbones.WeightsError, match="it holds 1 weight arrays \\(12 values\\); VGG19 has 32"):
            backbones.resolve_weights("VGG19", str(path))
    assert len(reads) == 1
    with h5py.File(path, "a") as f:  # new content: checked again
        f.create_dataset("layers/dense/vars/1", data=np.zeros((4,), np.float32))
    with pytest.raises(backbones.WeightsError, match="it holds 2 weight arrays \\(16 values\\)"):
        backbones.resolve_weights("VGG19", str(path))
    assert len(reads) == 2


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(backbones.WeightsError, match="not found"):
        backbones.resolve_weights("VGG16", str(tmp_path / "nope.h5"))


def test_imagenet_offline_names_the_fixes(monkeypatch, tmp_path):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(backbones.WeightsUnavailableError) as info:
        backbones.resolve_weights("Xception", "imagenet")
    message = str(info.value)
    assert "\n" not in message
    for fix in ("xception_weights_tf_dim_ordering_tf_kernels_notop.h5", "Keras cache", "weights=random"):
        assert fix in message


def test_imagenet_uses_the_keras_cache(monkeypatch, tmp_path):
    """With the file in the Keras cache, no download is attempted: Keras' own lookup finds it."""
    calls = {}

    import keras

    def fake_get_file(fname, origin, cache_subdir, file_hash):
        calls.update(fname=fname, origin=origin, cache_subdir=cache_subdir, file_hash=file_hash)
        return str(tmp_path / fname)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    entry = backbones.get_backbone("ResNet50")
    assert backbones.resolve_weights(entry, "imagenet") == str(tmp_path / entry.imagenet_file)
    assert calls["origin"].endswith("/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    assert calls["cache_subdir"] == "models" and calls["file_hash"] == entry.imagenet_md5


@pytest.mark.parametrize("bad", ["resnet", "VGG-16", "", None])
def test_unknown_backbone_lists_the_allowed(bad):
    with pytest.raises(ValueError, match="InceptionV3, ResNet50, VGG16, VGG19, Xception"):
        backbones.get_backbone(bad)
