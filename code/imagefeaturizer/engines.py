"""Engines: what runs a frozen backbone on a batch of images.

An engine takes a batch of resized uint8 RGB images, shape (n, H, W, 3) with H = W = the
backbone's input size, applies the backbone's own ``preprocess_input`` and returns

- :meth:`Engine.run`: the pooled features, (n, feature_size) float32;
- :meth:`Engine.run_with_maps`: the same features and the last spatial feature maps they are
  pooled from, (n, h, w, channels) float32 (``backbone.map_shape``), from the same forward pass.

The network is the backbone without pooling (its output are the maps), exactly as Keras defines
it; the engine does the global average or max pooling, the very operation Keras' own
``pooling="avg"``/``"max"`` layer does. So features and maps come from one model.

Engines, registered in :data:`ENGINES`:

- :class:`TensorFlowEngine` (``tensorflow``): the Keras model itself, one traced ``tf.function``;
  Keras' ``preprocess_input`` in numpy before it. On the first GPU TensorFlow sees, else the CPU.
- :class:`OpenVinoEngine` (``openvino``): the same Keras model exported once to OpenVINO's format
  (:mod:`imagefeaturizer.export`: uint8 in, Keras' ``preprocess_input``, the network and both
  poolings inside the graph), run by OpenVINO on the CPU. Its worker imports neither TensorFlow
  nor Keras (about 1 instead of 7 to 11 CPU-seconds to get ready, 200 instead of 700 MiB).

``auto`` (the featurizer's default, :func:`choose_auto`): OpenVINO on CPUs, TensorFlow where
TensorFlow sees a GPU. An exported engine is a subclass of :class:`Engine` with ``exported =
True`` and :meth:`Engine.write_export`; Keras stays the source of the network and its weights.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import sys
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from . import backbones

DEFAULT_ENGINE = "tensorflow"
"""What the worker-level functions use when no engine is named (the featurizer defaults to AUTO)."""
AUTO = "auto"


class EngineError(RuntimeError):
    """The engine asked for cannot run here (not installed, export failed); the message names the fix."""


@dataclass(frozen=True)
class ThreadSettings:
    intra_op: int  # threads inside one operation (a convolution)
    inter_op: int  # operations run at once


class Engine(ABC):
    """A backbone ready to run: uint8 RGB batches in, features (and maps when asked) out.

    ``source`` is what the network is loaded from: the Keras weights file (None: seeded random
    weights) for an engine that runs Keras, the exported model's main file for an ``exported``
    one. ``threads``: the engine's threads for this process (None: the engine's default, every
    core). Subclasses implement :meth:`_run`.
    """

    name: ClassVar[str]
    module: ClassVar[str]
    """The Python module the engine needs (also the pip package that brings it)."""
    exported: ClassVar[bool] = False
    """True: runs a model exported from Keras (:mod:`imagefeaturizer.export`), not Keras itself."""
    device: str = "CPU"
    """Where the network runs: "CPU" or "GPU"."""

    def __init__(self, backbone: backbones.Backbone | str, source: str | None, pooling: str = "avg",
                 threads: ThreadSettings | None = None):
        self.backbone = backbones.get_backbone(backbone) if isinstance(backbone, str) else backbone
        self.pooling = backbones.check_pooling(pooling)
        self.source = source

    @classmethod
    def thread_settings(cls, task_cpus: int) -> ThreadSettings:
        """Threads for a Spark task given ``task_cpus`` cores: one engine thread per task core, so
        local mode on N cores runs N threads, never N x N."""
        return ThreadSettings(intra_op=max(1, int(task_cpus)), inter_op=1)

    @classmethod
    def installed(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    @classmethod
    def version(cls) -> str:
        """The engine's version, read without importing it ("not installed" when it is not)."""
        return _distribution_version(cls.module)

    @classmethod
    def export_files(cls, stem: str) -> tuple[str, ...]:
        """File names of an export called ``stem``; the first is the one the engine opens."""
        raise NotImplementedError(f"the {cls.name} engine runs Keras itself: nothing to export")

    @classmethod
    def write_export(cls, function, folder: str, stem: str) -> None:
        """Convert ``function`` (a traced TensorFlow concrete function: uint8 ``images`` in; ``avg``,
        ``max`` and ``maps`` out) into :meth:`export_files` in ``folder``."""
        raise NotImplementedError(f"the {cls.name} engine runs Keras itself: nothing to export")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Pooled features, (n, feature_size) float32, of a uint8 (n, H, W, 3) batch."""
        return self._run(self._checked(batch), with_maps=False)[0]

    def run_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, maps): the pooled features and the (n, h, w, channels) maps they pool."""
        return self._run(self._checked(batch), with_maps=True)

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        size = self.backbone.input_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(
                f"{self.backbone.name} takes batches of shape (n, {size}, {size}, 3), got {batch.shape}"
            )
        return batch

    @abstractmethod
    def _run(self, batch: np.ndarray, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, maps or None) of a checked uint8 batch."""


class TensorFlowEngine(Engine):
    """The Keras model run by TensorFlow, as one traced graph with a free batch dimension.

    ``predict_on_batch`` traces the model again for the first batch of a new size (about a second
    on a CPU, in every Python worker, for the short last batch of a partition); a batch dimension
    of ``None`` avoids that. The graph returns the pooled features and the maps they pool:
    the maps exist anyway (the pooling's input), so returning them costs no extra computation and
    one trace serves both; :meth:`run` leaves them on the device, unread. The backbone's
    ``preprocess_input`` runs in numpy on a float32 copy (it writes over its input).
    Runs on the first GPU TensorFlow sees, else on the CPU. TensorFlow's threads are set for the
    whole process (:func:`imagefeaturizer.runtime.configure_threads`), not per engine.
    """

    name = "tensorflow"
    module = "tensorflow"

    def __init__(self, backbone: backbones.Backbone | str, source: str | None, pooling: str = "avg",
                 threads: ThreadSettings | None = None):
        super().__init__(backbone, source, pooling, threads)
        _require_tensorflow_backend()
        import tensorflow as tf

        self.device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        self.model = backbones.build_model(self.backbone, source, pooling=None)
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

    @classmethod
    def thread_settings(cls, task_cpus: int) -> ThreadSettings:
        cpus = max(1, int(task_cpus))
        return ThreadSettings(intra_op=cpus, inter_op=min(2, cpus))

    @classmethod
    def version(cls) -> str:
        return _distribution_version("tensorflow", "tensorflow-cpu")

    def _run(self, batch: np.ndarray, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        features, maps = self.graph(self.backbone.preprocess_input(batch.astype(np.float32)))
        return features.numpy(), maps.numpy() if with_maps else None

    def tracing_count(self) -> int:
        """How often the graph was traced: 1 once used, whatever the batch sizes, else 0."""
        return self.graph.experimental_get_tracing_count()


class OpenVinoEngine(Engine):
    """The backbone exported to OpenVINO's format (``.xml`` graph, ``.bin`` weights), on the CPU.

    Settings (each measured or needed for equal features): the latency hint with one stream and
    ``threads.intra_op`` inference threads (Spark's layout, N single-thread workers, suits it
    best); no CPU pinning (by default every worker process pins its thread to the same core, and
    two workers share one core); float32 inference (on CPUs with bf16 or fp16 units OpenVINO
    would otherwise compute in those, far from TensorFlow's features).
    """

    name = "openvino"
    module = "openvino"
    exported = True

    def __init__(self, backbone: backbones.Backbone | str, source: str | None, pooling: str = "avg",
                 threads: ThreadSettings | None = None):
        super().__init__(backbone, source, pooling, threads)
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints
        import openvino.properties.streams as streams

        config = {
            hints.performance_mode: hints.PerformanceMode.LATENCY,
            hints.inference_precision: ov.Type.f32,
            hints.enable_cpu_pinning: False,
            streams.num: 1,
        }
        if threads is not None:
            config[props.inference_num_threads] = threads.intra_op
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(source), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one request: one batch at a time
        self._features_out, self._maps_out = self.compiled.output(self.pooling), self.compiled.output("maps")

    @classmethod
    def export_files(cls, stem: str) -> tuple[str, ...]:
        return f"{stem}.xml", f"{stem}.bin"  # OpenVINO reads the .bin beside the .xml of its name

    @classmethod
    def write_export(cls, function, folder: str, stem: str) -> None:
        import openvino as ov

        # save_model stores weights as float16 unless told not to: features would drift from Keras'.
        ov.save_model(ov.convert_model(function), os.path.join(folder, cls.export_files(stem)[0]),
                      compress_to_fp16=False)

    def _run(self, batch: np.ndarray, with_maps: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            result = self._request.infer({0: batch})
            # Copies: the request's output buffers are reused by its next call.
            features = np.array(result[self._features_out], dtype=np.float32)
            maps = np.array(result[self._maps_out], dtype=np.float32) if with_maps else None
        return features, maps


def _require_tensorflow_backend() -> None:
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"the tensorflow engine needs Keras' TensorFlow backend, but Keras runs on {backend!r}: "
            f"set KERAS_BACKEND=tensorflow for the driver and the Spark Python workers"
        )


def _distribution_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


ENGINES: dict[str, type[Engine]] = {e.name: e for e in (TensorFlowEngine, OpenVinoEngine)}
ENGINE_CHOICES = (AUTO, *ENGINES)
"""What the featurizer's ``engine`` Param and the ``engine`` config key take."""


def engine_class(name: str) -> type[Engine]:
    """The engine registered as ``name``, or a ValueError naming the known ones."""
    try:
        return ENGINES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown engine {name!r}: expected one of {', '.join(ENGINES)}") from None


def create_engine(name: str, backbone: backbones.Backbone | str, source: str | None, pooling: str = "avg",
                  threads: ThreadSettings | None = None) -> Engine:
    """Build the engine called ``name`` for ``backbone`` from ``source`` (see :class:`Engine`)."""
    return engine_class(name)(backbone, source, pooling, threads)


def tensorflow_sees_gpu() -> bool:
    """Whether TensorFlow would run on a GPU in this process, without importing TensorFlow.

    Asks TensorFlow when it is imported already; else: no when ``CUDA_VISIBLE_DEVICES`` hides
    every GPU, no NVIDIA device node exists, or the installed TensorFlow is the CPU-only build
    (``tensorflow-cpu``); yes otherwise.
    """
    if "tensorflow" in sys.modules:
        return bool(sys.modules["tensorflow"].config.list_physical_devices("GPU"))
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    if not glob.glob("/dev/nvidia[0-9]*"):
        return False
    return _distribution_version("tensorflow") != "not installed"


def choose_auto() -> tuple[str, str]:
    """(engine, why) for ``auto``: TensorFlow where it sees a GPU, else OpenVINO (measured fastest
    on CPUs for every backbone; benchmarks/README.md)."""
    if tensorflow_sees_gpu():
        return TensorFlowEngine.name, "auto: TensorFlow sees a GPU"
    return OpenVinoEngine.name, "auto: no GPU for TensorFlow, OpenVINO is the fastest on CPUs"
