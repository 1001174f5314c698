"""Engines: what runs a frozen backbone on a batch of images.

An engine is built from (backbone, weights path, pooling) and takes a batch of resized uint8 RGB
images, shape (n, H, W, 3) with H = W = the backbone's input size. It applies the backbone's own
``preprocess_input`` (to a float32 copy) and returns

- :meth:`Engine.run`: the pooled features, (n, feature_size) float32;
- :meth:`Engine.run_with_maps`: the same features and the last spatial feature maps they are
  pooled from, (n, h, w, channels) float32 (``backbone.map_shape``), from the same forward pass.

The network is built once, without pooling (its output are the maps), exactly as Keras defines
it; the engine does the global average or max pooling, the very operation Keras' own
``pooling="avg"``/``"max"`` layer does. So features and maps come from one model.

:class:`TensorFlowEngine` is the only engine today. Another runtime (ONNX Runtime, OpenVINO) plugs
in as a subclass of :class:`Engine` registered in :data:`ENGINES`; Keras stays the source of the
network and its weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from . import backbones

DEFAULT_ENGINE = "tensorflow"


class Engine(ABC):
    """A backbone ready to run: uint8 RGB batches in, features (and maps when asked) out.

    Subclasses set :attr:`name` and :attr:`device` and implement :meth:`_features` and
    :meth:`_features_and_maps` on a preprocessed float32 batch.
    """

    name: ClassVar[str]
    device: str = "CPU"
    """Where the network runs: "CPU" or "GPU"."""

    def __init__(self, backbone: backbones.Backbone | str, weights_path: str | None, pooling: str = "avg"):
        self.backbone = backbones.get_backbone(backbone) if isinstance(backbone, str) else backbone
        self.pooling = backbones.check_pooling(pooling)
        self.weights_path = weights_path

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Pooled features, (n, feature_size) float32, of a uint8 (n, H, W, 3) batch."""
        return self._features(self._preprocess(batch))

    def run_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, maps): the pooled features and the (n, h, w, channels) maps they pool."""
        return self._features_and_maps(self._preprocess(batch))

    def _preprocess(self, batch: np.ndarray) -> np.ndarray:
        """The backbone's ``preprocess_input`` on a float32 copy (it writes over its input)."""
        size = self.backbone.input_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(
                f"{self.backbone.name} takes batches of shape (n, {size}, {size}, 3), got {batch.shape}"
            )
        return self.backbone.preprocess_input(batch.astype(np.float32))

    @abstractmethod
    def _features(self, batch: np.ndarray) -> np.ndarray:
        """Pooled features of a preprocessed float32 batch."""

    @abstractmethod
    def _features_and_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features and spatial maps of a preprocessed float32 batch."""


class TensorFlowEngine(Engine):
    """The Keras model run by TensorFlow, as one traced graph with a free batch dimension.

    ``predict_on_batch`` traces the model again for the first batch of a new size (about a second
    on a CPU, in every Python worker, for the short last batch of a partition); a batch dimension
    of ``None`` avoids that. The graph returns the pooled features and the maps they pool:
    the maps exist anyway (the pooling's input), so returning them costs no extra computation and
    one trace serves both; :meth:`run` leaves them on the device, unread.
    Runs on the first GPU TensorFlow sees, else on the CPU.
    """

    name = "tensorflow"

    def __init__(self, backbone: backbones.Backbone | str, weights_path: str | None, pooling: str = "avg"):
        super().__init__(backbone, weights_path, pooling)
        _require_tensorflow_backend()
        import tensorflow as tf

        self.device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        self.model = backbones.build_model(self.backbone, weights_path, pooling=None)
        pool = tf.reduce_mean if self.pooling == "avg" else tf.reduce_max  # what Keras' layers call
        model = self.model

        def features_and_maps(x):
            maps = model(x, training=False)
            return pool(maps, axis=[1, 2]), maps

        size = self.backbone.input_size
        spec = [tf.TensorSpec((None, size, size, 3), tf.float32)]
        # autograph=False: the model has no Python control flow to convert; converting Keras' call
        # stack anyway costs about a second of tracing in every Python worker (as Keras' own
        # predict function avoids too).
        self.graph = tf.function(features_and_maps, input_signature=spec, autograph=False)

    def _features(self, batch: np.ndarray) -> np.ndarray:
        return self.graph(batch)[0].numpy()

    def _features_and_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, maps = self.graph(batch)
        return features.numpy(), maps.numpy()

    def tracing_count(self) -> int:
        """How often the graph was traced: 1 once used, whatever the batch sizes, else 0."""
        return self.graph.experimental_get_tracing_count()


def _require_tensorflow_backend() -> None:
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"the tensorflow engine needs Keras' TensorFlow backend, but Keras runs on {backend!r}: "
            f"set KERAS_BACKEND=tensorflow for the driver and the Spark Python workers"
        )


ENGINES: dict[str, type[Engine]] = {TensorFlowEngine.name: TensorFlowEngine}


def create_engine(
    name: str, backbone: backbones.Backbone | str, weights_path: str | None, pooling: str = "avg"
) -> Engine:
    """Build the engine called ``name`` for ``backbone``, or a ValueError naming the known ones."""
    try:
        engine_class = ENGINES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown engine {name!r}: expected one of {', '.join(ENGINES)}") from None
    return engine_class(backbone, weights_path, pooling)
