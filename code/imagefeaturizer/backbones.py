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
- a path to a Keras weights file (``.h5`` / ``.weights.h5``) for this backbone without its top,
  checked on the spot (:func:`check_weights_file`: readable, HDF5, the backbone's weight shapes),
  without building a model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import math
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
    weights: tuple[int, int, str]  # what a weights file for it holds: :func:`weights_signature`

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


def _entry(name, module, input_size, map_layer, map_shape, stem, md5, weights, folder=None):
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
        weights=weights,
    )


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        _entry("InceptionV3", "inception_v3", 299, "mixed10", (8, 8, 2048),
               "inception_v3", "bcbd6486424b2319ff4ef7d526e38f63", (376, 21802784, "fff511ab291618a1")),
        _entry("ResNet50", "resnet50", 224, "conv5_block3_out", (7, 7, 2048),
               "resnet50", "4d473c1dd8becc155b73f8504c6f6626", (318, 23587712, "2bb5d120ede0845a"), "resnet"),
        _entry("VGG16", "vgg16", 224, "block5_pool", (7, 7, 512),
               "vgg16", "6d6bbae143d832006294945121d1f1fc", (26, 14714688, "183ae69d017403f7")),
        _entry("VGG19", "vgg19", 224, "block5_pool", (7, 7, 512),
               "vgg19", "253f8cb515780f3b799900260a226db6", (32, 20024384, "4965772d1755ad94")),
        _entry("Xception", "xception", 299, "block14_sepconv2_act", (10, 10, 2048),
               "xception", "b0042744bf5b25fce3cb969f33bebb97", (234, 20861480, "0de5fa0baa9a6a93")),
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


_SHA256: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime) -> sha256, per process


def file_sha256(path: str) -> str:
    """The file's sha256, read once per process while its size and mtime stay the same."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


# ---------------------------------------------------------------------------------------------
# What a weights file holds, checked on the driver without building a model
# ---------------------------------------------------------------------------------------------
def weights_signature(shapes) -> tuple[int, int, str]:
    """(weight arrays, values, digest of their sorted shapes) for a list of array shapes: what a
    backbone's weights file must hold (``Backbone.weights``, from Keras' own models)."""
    ordered = sorted(tuple(int(d) for d in shape) for shape in shapes)
    text = ";".join("x".join(map(str, shape)) for shape in ordered)
    return len(ordered), sum(math.prod(shape) for shape in ordered), hashlib.sha256(text.encode()).hexdigest()[:16]


def file_weight_shapes(path: str) -> list[tuple[int, ...]]:
    """Shapes of the weight arrays in a Keras HDF5 weights file: Keras 3's ``.weights.h5`` or the
    legacy ``.h5`` of Keras' ImageNet files (a whole legacy model: its ``model_weights``).
    Only the shapes are read. WeightsError when it is no HDF5 file."""
    import h5py

    if not h5py.is_hdf5(path):
        raise WeightsError(f"weights file {path!r} is not a Keras weights file (not HDF5)")
    shapes: list[tuple[int, ...]] = []
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f and "layer_names" not in f.attrs else f
        group.visititems(lambda _, obj: shapes.append(obj.shape) if isinstance(obj, h5py.Dataset) else None)
    return shapes


_VERDICTS: dict[tuple[str, str], str | None] = {}  # (backbone, sha256) -> None (fits) or the reason


def check_weights_file(backbone: Backbone | str, path: str) -> None:
    """A user's weights file before any Spark work: readable, a Keras HDF5 weights file, and
    holding exactly the weight shapes of ``backbone`` without its top (compared with the registry:
    no model built, no TensorFlow). WeightsError naming the fix otherwise; the verdict is kept
    per backbone and file content (sha256), so a sweep checks a file once."""
    if isinstance(backbone, str):
        backbone = get_backbone(backbone)
    fix = f"give the weights file of {backbone.name} without its top (include_top=False), or 'imagenet' or 'random'"
    try:
        key = (backbone.name, file_sha256(path))
    except OSError as exc:
        raise WeightsError(f"weights file {path!r} cannot be read ({exc.strerror}): {fix}") from None
    if key not in _VERDICTS:
        _VERDICTS[key] = _mismatch(backbone, path)
    if _VERDICTS[key]:
        raise WeightsError(f"{_VERDICTS[key]}: {fix}")


def _mismatch(backbone: Backbone, path: str) -> str | None:
    """Why the file does not fit ``backbone`` (None when it does)."""
    try:
        found = weights_signature(file_weight_shapes(path))
    except WeightsError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - HDF5 signature, but unreadable inside (truncated, damaged)
        return f"weights file {path!r} is a damaged HDF5 file ({str(exc).splitlines()[0][:150]})"
    if found == backbone.weights:
        return None
    other = next((b.name for b in BACKBONES.values() if b.weights == found), None)
    holds = f"{found[0]} weight arrays ({found[1]:,} values)" + (f", those of {other} without its top" if other else "")
    arrays, values, _ = backbone.weights
    return (f"weights file {path!r} does not fit {backbone.name} without its top: it holds {holds}; "
            f"{backbone.name} has {arrays} ({values:,} values)")


def keras_version() -> str:
    """Keras' version, read without importing Keras (seeded random weights depend on it)."""
    return importlib.metadata.version("keras")


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
    Keras does when they are missing, or the user's file, checked by :func:`check_weights_file`),
    or None for random weights.
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
    path = os.path.abspath(path)
    check_weights_file(backbone, path)
    return path


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
