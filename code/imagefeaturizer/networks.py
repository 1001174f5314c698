"""Trainable Keras image classifiers: a registry backbone with a new head (fine-tuning), or a small
CNN trained from scratch.

Every network takes a float32 batch of RGB pixels in 0..255, shape (n, size, size, 3), and
returns class probabilities (softmax). In order:

1. ``augment`` (when asked): Keras preprocessing layers (random horizontal flip, small rotation,
   zoom-in up to 10% (a random crop resized back), brightness and contrast). Keras runs them only
   in training; evaluation and prediction see the image as it is.
2. the fine-tuned backbone: :class:`BackbonePreprocess` (the backbone's own Keras
   ``preprocess_input``), the backbone without its top exactly as Keras defines it (weights as for
   the featurizer: ImageNet, seeded random or a file), called with ``training=False``; its
   batch-norm layers stay frozen, so in inference mode, also in unfrozen blocks
   (:func:`set_trainable_units`); global pooling; layer
   normalization of the pooled features (their scale differs by backbone and is huge for random
   weights; no moving statistics, so training and inference agree from the first step); dropout;
   a dense softmax head.
   ``SmallCNN``: rescaling to 0..1, five conv blocks (3x3 conv, batch norm, ReLU, 2x2 max pool,
   dropout), global average pooling, three dense layers (256, 64, classes) with dropout between.

The unit of fine-tuning is a **block** as Keras names it: VGG ``block1``..``block5``; ResNet50's
residual blocks ``conv2_block1``..``conv5_block3`` (16) and its stem (``conv1``, the pooling);
InceptionV3's modules ``mixed0``..``mixed10`` and its stem; Xception's ``block1``..``block14``.
:func:`backbone_units` finds them in the built network (layers between two points that every
path crosses, named by the block their layers belong to); :data:`UNITS` holds their counts so
that configs are checked without building a network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import backbones

FINETUNE, SCRATCH = "finetune", "scratch"
SCRATCH_MODELS = ("SmallCNN",)
SMALLCNN_FILTERS = (32, 64, 128, 128, 256)  # the five conv blocks
SMALLCNN_DENSE = (256, 64)  # the dense layers before the softmax one
SMALLCNN_DEFAULT_SIZE = 128
SMALLCNN_MIN_SIZE = 32  # five 2x2 poolings
CONV_DROPOUT = 0.1
BN_MOMENTUM = 0.9  # SmallCNN's moving statistics settle within tens of steps (Keras' 0.99: hundreds)

# Smallest square input Keras accepts for each backbone without its top (others: 32).
MIN_INPUT_SIZE = {"InceptionV3": 75, "Xception": 71}
# Block name patterns: a layer named so belongs to that block; other layers join the block of
# the segment they sit in (Xception's residual convolutions, InceptionV3's branch layers).
_UNIT_PATTERNS = {
    "InceptionV3": r"^(mixed\d+)$",
    "ResNet50": r"^(conv\d_block\d+)_",
    "VGG16": r"^(block\d+)_",
    "VGG19": r"^(block\d+)_",
    "Xception": r"^(block\d+)_",
}
UNITS = {"InceptionV3": 12, "ResNet50": 17, "VGG16": 5, "VGG19": 5, "Xception": 14}
"""Units (blocks, stem included where it has weights) of each backbone, bottom to top."""


@dataclass(frozen=True)
class NetworkSpec:
    """What to build: plain values (sent to the training process as JSON)."""

    kind: str  # FINETUNE | SCRATCH
    model_name: str  # a registry backbone (FINETUNE) or one of SCRATCH_MODELS
    n_classes: int
    image_size: int  # square input side
    weights_path: str | None = None  # FINETUNE: from backbones.resolve_weights (None: seeded random)
    pooling: str = "avg"
    dropout: float = 0.3
    augment: bool = True
    seed: int = 0


def min_input_size(kind: str, model_name: str) -> int:
    return SMALLCNN_MIN_SIZE if kind == SCRATCH else MIN_INPUT_SIZE.get(model_name, 32)


def default_input_size(kind: str, model_name: str) -> int:
    return SMALLCNN_DEFAULT_SIZE if kind == SCRATCH else backbones.get_backbone(model_name).input_size


def _keras():
    import keras

    return keras


def _preprocess_layer_class():
    keras = _keras()

    @keras.saving.register_keras_serializable(package="imagefeaturizer")
    class BackbonePreprocess(keras.layers.Layer):
        """The registry backbone's own Keras ``preprocess_input``, as a layer (no weights)."""

        def __init__(self, model_name: str, **kwargs):
            super().__init__(**kwargs)
            self.model_name = model_name
            self._preprocess = backbones.get_backbone(model_name).preprocess_input

        def call(self, inputs):
            return self._preprocess(inputs)

        def get_config(self):
            return {**super().get_config(), "model_name": self.model_name}

    return BackbonePreprocess


_PREPROCESS_CLASS = None


def preprocess_layer_class():
    """The serializable preprocessing layer (registered with Keras once, on first use), so that a
    saved ``.keras`` file loads wherever this module is importable."""
    global _PREPROCESS_CLASS
    if _PREPROCESS_CLASS is None:
        _PREPROCESS_CLASS = _preprocess_layer_class()
    return _PREPROCESS_CLASS


def augmentation(seed: int):
    """The training-time augmentation (inactive at inference, as every Keras preprocessing layer)."""
    layers = _keras().layers
    return _keras().Sequential([
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomRotation(0.03, fill_mode="constant", seed=seed + 1),
        layers.RandomZoom((-0.1, 0.0), fill_mode="constant", seed=seed + 2),
        layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3),
        layers.RandomContrast(0.1, value_range=(0, 255), seed=seed + 4),
    ], name="augment")


def build_network(spec: NetworkSpec):
    """(the Keras model, the backbone sub-model or None for a network trained from scratch).

    A fine-tuned network starts with its backbone frozen (stage one: the head only)."""
    keras = _keras()
    inputs = keras.Input((spec.image_size, spec.image_size, 3), name="image")
    x = augmentation(spec.seed)(inputs) if spec.augment else inputs
    if spec.kind == SCRATCH:
        if spec.model_name not in SCRATCH_MODELS:
            raise ValueError(f"unknown network {spec.model_name!r}: expected one of {', '.join(SCRATCH_MODELS)}")
        keras.utils.set_random_seed(spec.seed)
        return keras.Model(inputs, _small_cnn(x, spec), name=spec.model_name), None
    backbone = backbones.build_model(spec.model_name, spec.weights_path, pooling=None, input_size=spec.image_size)
    keras.utils.set_random_seed(spec.seed)  # the head's initial weights and dropout masks
    x = preprocess_layer_class()(spec.model_name, name="preprocess_input")(x)
    x = backbone(x, training=False)  # not enough in Keras 3 once unfrozen: set_trainable_units keeps batch norm frozen
    pool = keras.layers.GlobalAveragePooling2D if spec.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pool(name="pool")(x)
    x = keras.layers.LayerNormalization(name="head_norm")(x)  # feature scales of any backbone, no moving stats
    x = keras.layers.Dropout(spec.dropout, seed=spec.seed, name="head_dropout")(x)
    outputs = keras.layers.Dense(spec.n_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{spec.model_name}_finetune"), backbone


def _small_cnn(x, spec: NetworkSpec):
    layers = _keras().layers
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    for i, filters in enumerate(SMALLCNN_FILTERS, start=1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"block{i}_bn")(x)
        x = layers.ReLU(name=f"block{i}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
        x = layers.Dropout(CONV_DROPOUT, seed=spec.seed + i, name=f"block{i}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    for j, units in enumerate(SMALLCNN_DENSE, start=1):
        x = layers.Dense(units, activation="relu", name=f"dense{j}")(x)
        x = layers.Dropout(spec.dropout, seed=spec.seed + 10 + j, name=f"dense{j}_dropout")(x)
    return layers.Dense(spec.n_classes, activation="softmax", name="head")(x)


# --------------------------------------------------------------------------- units of fine-tuning


def backbone_units(backbone, model_name: str) -> list[tuple[str, list]]:
    """The backbone's units, bottom to top: (name, layers), units without weights left out.

    The layers (Keras keeps them in topological order) are cut at each layer that every path
    from input to output crosses; each segment is named by the block pattern of the last layer
    in it that has a block name (none yet: ``stem``), and consecutive segments of one block form
    its unit.
    """
    pattern = re.compile(_UNIT_PATTERNS[model_name])
    units: list[tuple[str, list]] = []
    for segment in _segments(backbone.layers):
        named = [m.group(1) for m in (pattern.match(layer.name) for layer in reversed(segment)) if m]
        name = named[0] if named else (units[-1][0] if units else "stem")
        if units and units[-1][0] == name:
            units[-1][1].extend(segment)
        else:
            units.append((name, list(segment)))
    return [(name, layers) for name, layers in units if any(layer.weights for layer in layers)]


def _segments(layers: list) -> list[list]:
    """Consecutive runs of ``layers`` that each end at a layer every path crosses."""
    index = {id(layer): i for i, layer in enumerate(layers)}
    farthest = list(range(len(layers)))  # per layer: the latest layer that reads its output
    for i, layer in enumerate(layers):
        for node in layer._inbound_nodes:  # noqa: SLF001 - Keras has no public graph walk
            for parent in node.parent_nodes:
                j = index[id(parent.operation)]
                if j >= i:
                    raise ValueError(f"layers of {layer.name} are not in topological order")
                farthest[j] = max(farthest[j], i)
    segments, current, reach = [], [], 0
    for i, layer in enumerate(layers):
        current.append(layer)
        if reach <= i:  # no layer before i is read after i: every path crosses layer i
            segments.append(current)
            current = []
        reach = max(reach, farthest[i])
    return segments


def set_trainable_units(backbone, model_name: str, unfreeze: int) -> list[str]:
    """Make the top ``unfreeze`` units of ``backbone`` trainable (but their batch-norm layers),
    the rest frozen; their names."""
    units = backbone_units(backbone, model_name)
    if not 0 <= unfreeze <= len(units):
        raise ValueError(f"unfreeze={unfreeze}: {model_name} has {len(units)} units (0..{len(units)})")
    top = units[len(units) - unfreeze:] if unfreeze else []
    chosen = {id(layer) for _, layers in top for layer in layers}
    batch_norm = _keras().layers.BatchNormalization
    backbone.trainable = bool(unfreeze)
    for layer in backbone.layers:
        # Batch norm stays frozen: a frozen BatchNormalization layer runs in inference mode (its
        # moving statistics kept); an unfrozen one would update them in training, whatever
        # ``training=False`` the backbone was called with when the network was built.
        layer.trainable = id(layer) in chosen and not isinstance(layer, batch_norm)
    return [name for name, _ in top]
