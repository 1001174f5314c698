"""The backbone registry: each Keras application this library can featurize with.

One entry per backbone: its Keras constructor and ``preprocess_input`` (looked up lazily, so
reading the registry does not import TensorFlow), its input size, its last spatial feature maps
(the output of the network without its top and without pooling: layer name and shape; their
channels are the pooled feature size) and the ImageNet "no top" weights file Keras itself
downloads for it.

``weights`` is resolved here, in one place, for every caller:

- ``"imagenet"``: the file Keras fetches into its cache (``~/.keras/models``), with Keras' own
  name, address and checksum. Offline and not cached, :class:`WeightsUnavailableError` says so and
  names the fixes.
- ``"random"``: Keras' own initialisers under a fixed seed, so every Spark worker (and a later
  process loading a saved pipeline) builds the very same network. Not transfer learning: for
  smoke runs and tests.
- a path to a Keras weights file (``.h5`` / ``.weights.h5``) for this backbone without its top.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

IMAGENET = "imagenet"
RANDOM = "random"
RANDOM_WEIGHTS_SEED = 1234
POOLINGS = ("avg", "max")

_KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


class WeightsError(ValueError):
    """The ``weights`` setting cannot be used (bad value, missing or mismatched file)."""


class WeightsUnavailableError(WeightsError):
    """ImageNet weights are neither in the Keras cache nor downloadable."""


@dataclass(frozen=True)
class Backbone:
    name: str
    module: str  # keras.applications submodule holding the constructor and preprocess_input
    constructor_name: str
    input_size: int  # square input side, pixels
    map_layer: str  # the layer whose output are the last spatial feature maps (no top, no pooling)
    map_shape: tuple[int, int, int]  # (height, width, channels) of those maps at input_size
    imagenet_file: str  # Keras' file name for the ImageNet weights without the top
    imagenet_md5: str  # Keras' checksum of that file
    imagenet_folder: str  # folder of that file at Keras' weights address

    @property
    def feature_size(self) -> int:
        """Length of the pooled feature vector: one value per channel of the last maps."""
        return self.map_shape[2]

    @property
    def imagenet_url(self) -> str:
        return f"{_KERAS_WEIGHTS_URL}{self.imagenet_folder}/{self.imagenet_file}"

    def _keras_module(self):
        return importlib.import_module(self.module)

    @property
    def constructor(self) -> Callable[..., Any]:
        return getattr(self._keras_module(), self.constructor_name)

    @property
    def preprocess_input(self) -> Callable[..., Any]:
        return self._keras_module().preprocess_input


def _entry(name, module, input_size, map_layer, map_shape, stem, md5, folder=None):
    return Backbone(
        name=name,
        module=f"keras.applications.{module}",
        constructor_name=name,
        input_size=input_size,
        map_layer=map_layer,
        map_shape=map_shape,
        imagenet_file=f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        imagenet_md5=md5,
        imagenet_folder=folder or stem,
    )


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        _entry("InceptionV3", "inception_v3", 299, "mixed10", (8, 8, 2048),
               "inception_v3", "bcbd6486424b2319ff4ef7d526e38f63"),
        _entry("ResNet50", "resnet50", 224, "conv5_block3_out", (7, 7, 2048),
               "resnet50", "4d473c1dd8becc155b73f8504c6f6626", "resnet"),
        _entry("VGG16", "vgg16", 224, "block5_pool", (7, 7, 512),
               "vgg16", "6d6bbae143d832006294945121d1f1fc"),
        _entry("VGG19", "vgg19", 224, "block5_pool", (7, 7, 512),
               "vgg19", "253f8cb515780f3b799900260a226db6"),
        _entry("Xception", "xception", 299, "block14_sepconv2_act", (10, 10, 2048),
               "xception", "b0042744bf5b25fce3cb969f33bebb97"),
    )
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for ``name``, or a ValueError naming the allowed values."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model name {name!r}: expected one of {', '.join(BACKBONES)}"
        ) from None


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    return pooling


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def offline_fix_message(backbone: Backbone) -> str:
    cache = os.path.join(os.environ.get("KERAS_HOME", os.path.join("~", ".keras")), "models")
    return (
        f"ImageNet weights for {backbone.name} could not be downloaded (offline?): put "
        f"{backbone.imagenet_file} (from {backbone.imagenet_url}) in the Keras cache {cache}/, "
        f"or set weights to a local weights file, or weights=random for a smoke run "
        f"(not transfer learning)"
    )


def resolve_weights(backbone: Backbone | str, weights: str) -> str | None:
    """Turn a ``weights`` setting into what the model is built from.

    Returns a local file path (ImageNet weights from the Keras cache, downloading them the way
    Keras does when they are missing, or the user's file), or None for random weights.
    """
    if isinstance(backbone, str):
        backbone = get_backbone(backbone)
    if not isinstance(weights, str) or not weights:
        raise WeightsError(
            f"weights must be 'imagenet', 'random' or a path to a weights file, got {weights!r}"
        )
    if weights == RANDOM:
        return None
    if weights == IMAGENET:
        from keras.utils import get_file

        try:
            return get_file(
                backbone.imagenet_file,
                backbone.imagenet_url,
                cache_subdir="models",
                file_hash=backbone.imagenet_md5,
            )
        except Exception as exc:  # Keras raises plain Exception for URL and hash failures
            raise WeightsUnavailableError(offline_fix_message(backbone)) from exc
    path = os.path.expanduser(weights)
    if not os.path.isfile(path):
        raise WeightsError(
            f"weights file {weights!r} not found: give an existing Keras weights file for "
            f"{backbone.name} (include_top=False), or 'imagenet' or 'random'"
        )
    return os.path.abspath(path)


def build_model(backbone: Backbone | str, weights_path: str | None, pooling: str | None = "avg",
                input_size: int | None = None):
    """The frozen Keras backbone without its top, with global ``pooling``, exactly as Keras defines it.

    ``pooling=None``: no pooling, the model outputs the last spatial feature maps
    (``backbone.map_shape`` per image, from layer ``backbone.map_layer``). Pooling has no weights:
    the same ``weights_path`` gives the same weights either way. ``weights_path`` comes from
    :func:`resolve_weights` (None: seeded random weights). ``input_size``: the square input side
    (default: the backbone's own; Keras accepts smaller ones without the top, e.g. for fine-tuning
    tests on tiny images).
    """
    if isinstance(backbone, str):
        backbone = get_backbone(backbone)
    if pooling is not None:
        check_pooling(pooling)
    import keras

    kwargs = dict(
        include_top=False,
        pooling=pooling,
        input_shape=(input_size or backbone.input_size, input_size or backbone.input_size, 3),
    )
    if weights_path is None:
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
        model = backbone.constructor(weights=None, **kwargs)
    else:
        try:
            model = backbone.constructor(weights=weights_path, **kwargs)
        except (ValueError, OSError) as exc:
            raise WeightsError(
                f"weights file {weights_path!r} does not fit {backbone.name} without its top "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): give the file for "
                f"this backbone, include_top=False"
            ) from exc
    model.trainable = False
    return model
