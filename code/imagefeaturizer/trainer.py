"""Training a Keras image classifier (:mod:`imagefeaturizer.networks`) inside one Spark barrier task.

The driver calls :func:`fit_on_spark` with a DataFrame of labelled image rows. The rows go to one
partition and one barrier task (``mapInPandas(..., barrier=True)``), so the driver never holds an
image. In that task:

1. **first pass**: each Arrow batch of rows is decoded (:func:`imagefeaturizer.images.decode_record`),
   resized to the network's input and appended as raw uint8 to a cache file in the task's local
   directory (``SPARK_LOCAL_DIRS``), one for training rows and one for validation rows. Memory
   holds one Arrow batch; disk holds ``rows x size x size x 3`` bytes (about 150 MB for 1000
   images at 224x224), deleted when the task ends.
2. **training**: a child process of the task (a fresh Python with TensorFlow: every core of the
   executor for its own thread pools, its memory, GPU memory included, returned when it exits;
   a Python worker that featurized before keeps one thread per task core) builds the network,
   streams shuffled batches from the cache files through ``tf.data`` (read with ``pread``:
   one batch in memory at a time, whatever the data set's size) and runs ``model.fit``:
   stage one trains the head with the backbone frozen, stage two (``unfreeze`` > 0) the top
   ``unfreeze`` units of the backbone too at ``finetune_learning_rate``; a network from scratch
   has one stage. Each stage stops early when the validation loss has not improved for
   ``patience`` epochs and restores its best epoch; the better stage's weights are kept. It stops
   by itself when the task's process goes away.
3. the task returns the saved ``.keras`` file (in 16 MB rows) and the per-epoch history (with the
   training process' peak resident memory, ``peak_rss_mib``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from . import backbones, shipping
from .images import DEFAULT_MAX_PIXELS
from .networks import NetworkSpec, build_network, set_trainable_units
from .runtime import configure_gpus, decode_batch, local_weights, use_task_gpus

RESULT_SCHEMA = "kind string, part int, data binary"
CHUNK = 16 * 1024 * 1024  # bytes of the model file per result row
SETS = ("train", "validation")
MODEL_FILE, HISTORY_FILE, SPEC_FILE, ERROR_FILE = "model.keras", "history.json", "spec.json", "error.json"


class TrainingError(RuntimeError):
    """Training failed in the task; the message names the cause (type and first line)."""


@dataclass(frozen=True)
class TrainSpec:
    """Everything the task needs, as plain values (the task closure holds this, never a model)."""

    network: NetworkSpec
    epochs: int = 10  # most epochs of each stage
    batch_size: int = 16
    learning_rate: float = 1e-3  # stage one (the only stage from scratch)
    finetune_learning_rate: float = 1e-5  # stage two
    unfreeze: int = 0  # top backbone units trained in stage two; 0: no stage two
    patience: int = 3  # epochs without a better validation loss before a stage stops
    class_weight: dict | None = None  # label index -> weight of its training rows
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    weights_sha256: str | None = None  # of network.weights_path, checked where the task runs

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        raw = json.loads(text)
        raw["network"] = NetworkSpec(**raw["network"])
        if raw.get("class_weight"):
            raw["class_weight"] = {int(k): float(v) for k, v in raw["class_weight"].items()}
        return cls(**raw)


@dataclass
class TrainResult:
    model_bytes: bytes
    history: dict


# --------------------------------------------------------------------------- the driver


def fit_on_spark(rows, spec: TrainSpec, *, content_col: str = "content", label_col: str = "label_index",
                 validation_col: str = "is_validation", origin_col: str = "path") -> TrainResult:
    """Train ``spec``'s network on ``rows`` in one Spark barrier task; returns the model file and history.

    ``rows``: image bytes (or Spark's image struct), an integer label index, a boolean marking the
    validation rows and a column naming each image in errors.
    """
    weights_sha = None
    if spec.network.weights_path:
        weights_sha = shipping.weights_sha256(rows.sparkSession, spec.network.weights_path)
    shipping.ensure_package(rows.sparkSession)  # when workers may not import this package
    spec = dataclasses.replace(spec, weights_sha256=weights_sha)
    cols = rows.select(rows[content_col].alias("content"), rows[label_col].cast("int").alias("label"),
                       rows[validation_col].alias("validation"), rows[origin_col].cast("string").alias("origin"))
    # A shuffle to one partition: the barrier stage starts after it (Spark allows no coalesce there).
    task = cols.repartition(1).mapInPandas(partial(train_task, spec), RESULT_SCHEMA, barrier=True)
    out = task.collect()
    parts = sorted((r.part, bytes(r.data)) for r in out if r.kind == "model")
    history = next(json.loads(bytes(r.data)) for r in out if r.kind == "history")
    return TrainResult(b"".join(data for _, data in parts), history)


# --------------------------------------------------------------------------- the barrier task


def train_task(spec: TrainSpec, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """The body of the barrier task: cache the images, train in a child process, return the result."""
    workdir = tempfile.mkdtemp(prefix="imagefeaturizer-train-", dir=_local_dir())
    try:
        started = time.perf_counter()
        counts = write_cache(batches, workdir, spec.network.image_size, spec.max_pixels)
        cache_seconds = time.perf_counter() - started
        network = spec.network
        if network.weights_path:  # this machine's copy, checked against the driver's sha256
            network = dataclasses.replace(network, weights_path=local_weights(network.weights_path, spec.weights_sha256))
        use_task_gpus()  # the GPU(s) Spark gave this task, the only ones the child process sees
        run_child(workdir, dataclasses.replace(spec, network=network))
        with open(os.path.join(workdir, HISTORY_FILE), encoding="utf-8") as f:
            history = json.load(f)
        history.update(counts=counts, cache_seconds=round(cache_seconds, 3))
        yield pd.DataFrame({"kind": ["history"], "part": [0], "data": [json.dumps(history).encode()]})
        with open(os.path.join(workdir, MODEL_FILE), "rb") as f:
            for part, chunk in enumerate(iter(lambda: f.read(CHUNK), b"")):
                yield pd.DataFrame({"kind": ["model"], "part": [part], "data": [chunk]})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _local_dir() -> str | None:
    """The executor's local directory (Spark passes it to Python workers), else the system's."""
    dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d and os.path.isdir(d)]
    return dirs[0] if dirs else None


def write_cache(batches: Iterator[pd.DataFrame], workdir: str, size: int, max_pixels: int) -> dict[str, int]:
    """First pass: decode and resize every row, append its pixels to ``<set>.u8`` in ``workdir``
    and its label to ``<set>.labels.npy``; returns the rows per set."""
    labels: dict[str, list[int]] = {s: [] for s in SETS}
    files = {s: open(os.path.join(workdir, f"{s}.u8"), "wb") for s in SETS}
    try:
        for batch in batches:
            arrays, _ = decode_batch(list(batch["content"]), batch["origin"], size, max_pixels, "error")
            for pixels, label, validation in zip(arrays, batch["label"], batch["validation"]):
                which = SETS[1] if validation else SETS[0]
                files[which].write(pixels.tobytes())
                labels[which].append(int(label))
    finally:
        for f in files.values():
            f.close()
    for s in SETS:
        np.save(os.path.join(workdir, f"{s}.labels.npy"), np.asarray(labels[s], dtype=np.int32))
    return {s: len(labels[s]) for s in SETS}


def run_child(workdir: str, spec: TrainSpec) -> None:
    """Train in a fresh Python process (this interpreter, this ``sys.path``); raise its error."""
    with open(os.path.join(workdir, SPEC_FILE), "w", encoding="utf-8") as f:
        f.write(spec.to_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = subprocess.call([sys.executable, "-m", "imagefeaturizer.trainer", workdir, str(os.getpid())],
                           env=env, stdin=subprocess.DEVNULL)
    if code == 0:
        return
    try:
        with open(os.path.join(workdir, ERROR_FILE), encoding="utf-8") as f:
            error = json.load(f)
    except (OSError, ValueError):
        error = {"type": "TrainingError", "message": f"the training process ended with exit code {code}"}
    if error["type"] in ("WeightsError", "WeightsUnavailableError"):
        raise backbones.WeightsError(error["message"])
    raise TrainingError(f"training failed: {error['type']}: {error['message']}")


# --------------------------------------------------------------------------- the training process


class DiskImages:
    """Images of one set in a cache file: batches read with ``pread``, one batch in memory."""

    def __init__(self, workdir: str, which: str, size: int):
        self.labels = np.load(os.path.join(workdir, f"{which}.labels.npy"))
        self.shape = (size, size, 3)
        self.record = size * size * 3
        self.fd = os.open(os.path.join(workdir, f"{which}.u8"), os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        for k, i in enumerate(indices):
            out[k] = np.frombuffer(os.pread(self.fd, self.record, int(i) * self.record), np.uint8).reshape(self.shape)
        return out

    def batches(self, batch_size: int, rng: np.random.Generator | None,
                alive: Callable[[], bool] = lambda: True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch: batches in a fresh random order (``rng``) or in file order (None)."""
        order = rng.permutation(len(self)) if rng is not None else np.arange(len(self))
        for start in range(0, len(order), batch_size):
            if not alive():
                raise TrainingError("the Spark task that started this training is gone")
            idx = order[start:start + batch_size]
            yield self.read(idx), self.labels[idx]


def dataset(images: DiskImages, batch_size: int, rng=None, alive: Callable[[], bool] = lambda: True):
    """A ``tf.data`` pipeline over ``images``: a new pass (and order) each time Keras iterates it."""
    import tensorflow as tf

    signature = (tf.TensorSpec((None, *images.shape), tf.uint8), tf.TensorSpec((None,), tf.int32))
    ds = tf.data.Dataset.from_generator(lambda: images.batches(batch_size, rng, alive), output_signature=signature)
    ds = ds.apply(tf.data.experimental.assert_cardinality(-(-len(images) // batch_size)))  # Keras knows an epoch's end
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(2)


def compile_stage(model, learning_rate: float) -> None:
    """Adam, sparse categorical cross-entropy, accuracy: every stage and the benchmark's plain fit."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])


def epoch_recorder(stage: int, n_train: int, first_epoch: int, log: Callable[[str], object]):
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        """Per epoch: losses, accuracies, training seconds (validation excluded) and images/s."""

        def __init__(self):
            super().__init__()
            self.epochs: list[dict] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.perf_counter()
            self.trained = None

        def on_test_begin(self, logs=None):
            self.trained = time.perf_counter() - self.began

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            train_s = self.trained if self.trained is not None else time.perf_counter() - self.began
            row = {"epoch": first_epoch + epoch, "stage": stage,
                   **{k: float(logs[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in logs},
                   "train_seconds": round(train_s, 3), "seconds": round(time.perf_counter() - self.began, 3),
                   "images_per_second": round(n_train / train_s, 2) if train_s > 0 else None}
            self.epochs.append(row)
            log(f"training: stage {stage} epoch {row['epoch']}: loss {row['loss']:.4f} accuracy {row['accuracy']:.3f}"
                f" val_loss {row.get('val_loss', float('nan')):.4f} val_accuracy {row.get('val_accuracy', float('nan')):.3f}"
                f", {row['images_per_second']} images/s")

    return EpochRecorder()


def fit_stage(model, train_ds, val_ds, spec: TrainSpec, stage: int, learning_rate: float, n_train: int,
              first_epoch: int, log) -> dict:
    """One stage of ``model.fit`` with early stopping; its best epoch's weights are restored."""
    import keras

    compile_stage(model, learning_rate)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=spec.patience, restore_best_weights=True)
    recorder = epoch_recorder(stage, n_train, first_epoch, log)
    model.fit(train_ds, validation_data=val_ds, epochs=spec.epochs, class_weight=spec.class_weight,
              callbacks=[recorder, stopper], shuffle=False, verbose=0)  # the dataset shuffles
    best = min(recorder.epochs, key=lambda e: (e["val_loss"], e["epoch"]))
    return {"stage": stage, "learning_rate": learning_rate, "epochs": recorder.epochs,
            "best_epoch": best["epoch"], "best_val_loss": best["val_loss"]}


def train(workdir: str, spec: TrainSpec, alive: Callable[[], bool] = lambda: True,
          log: Callable[[str], object] = print) -> dict:
    """Build, fit in stages and save ``spec``'s network from the cache in ``workdir``; the history."""
    import keras


    configure_gpus()
    keras.utils.set_random_seed(spec.seed)
    model, backbone = build_network(spec.network)
    size = spec.network.image_size
    train_images, val_images = DiskImages(workdir, "train", size), DiskImages(workdir, "validation", size)
    train_ds = dataset(train_images, spec.batch_size, np.random.default_rng(spec.seed), alive)
    val_ds = dataset(val_images, spec.batch_size, None, alive)
    stages = [fit_stage(model, train_ds, val_ds, spec, 1, spec.learning_rate, len(train_images), 1, log)]
    unfrozen: list[str] = []
    if backbone is not None and spec.unfreeze > 0:
        kept = {v.path: v.numpy() for v in model.weights}  # stage one's best, should stage two not beat it
        unfrozen = set_trainable_units(backbone, spec.network.model_name, spec.unfreeze)
        first = stages[0]["epochs"][-1]["epoch"] + 1
        stages.append(fit_stage(model, train_ds, val_ds, spec, 2, spec.finetune_learning_rate, len(train_images),
                                first, log))
        if stages[1]["best_val_loss"] >= stages[0]["best_val_loss"]:
            for v in model.weights:
                v.assign(kept[v.path])
    chosen = min(stages, key=lambda s: s["best_val_loss"])
    compile_stage(model, spec.learning_rate)  # a fresh optimizer: its state is not saved with the model
    model.save(os.path.join(workdir, MODEL_FILE))
    return {"stages": stages, "chosen_epoch": chosen["best_epoch"], "chosen_stage": chosen["stage"],
            "unfrozen_units": unfrozen, "parameters": int(model.count_params()),
            "trainable_parameters": int(sum(int(np.prod(v.shape)) for v in model.trainable_weights))}


def peak_rss_mib() -> float:
    """This process' peak resident memory, MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def main(argv: list[str]) -> int:
    """``python -m imagefeaturizer.trainer WORKDIR PARENT_PID``: the training process."""
    workdir, parent = argv[0], int(argv[1])
    try:
        with open(os.path.join(workdir, SPEC_FILE), encoding="utf-8") as f:
            spec = TrainSpec.from_json(f.read())
        history = train(workdir, spec, alive=lambda: os.getppid() == parent,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
        history["peak_rss_mib"] = peak_rss_mib()
        with open(os.path.join(workdir, HISTORY_FILE), "w", encoding="utf-8") as f:
            json.dump(history, f)
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the task as one line
        message = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        with open(os.path.join(workdir, ERROR_FILE), "w", encoding="utf-8") as f:
            json.dump({"type": type(exc).__name__, "message": message[:500]}, f)
        return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
