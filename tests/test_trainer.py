"""The training task without Spark: the on-disk cache of the first pass, shuffled epochs streamed from
it, the stages, early stopping's restored epoch, frozen units, and errors from the training process."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import png_bytes, xray_like
from imagefeaturizer import backbones, networks, trainer
from imagefeaturizer.images import decode_image, resize_pil


def _batches(n_per_class: int, classes: int = 2, validation_every: int = 4, size=(40, 36)):
    """Arrow-like batches of (content, label, validation, origin): visible classes, a few validation rows."""
    rows = []
    for k in range(classes):
        for i in range(n_per_class):
            image = xray_like(k, seed=100 * k + i, size=size, mode="RGB" if i % 2 else "L")
            rows.append((png_bytes(image), k, i % validation_every == 0, f"c{k}/img{i}.png"))
    frame = pd.DataFrame(rows, columns=["content", "label", "validation", "origin"])
    return [frame.iloc[i:i + 5] for i in range(0, len(frame), 5)]


def _spec(**kw) -> trainer.TrainSpec:
    network = networks.NetworkSpec(kind=networks.SCRATCH, model_name="SmallCNN", n_classes=2, image_size=32,
                                   augment=False, seed=1)
    return trainer.TrainSpec(**{"network": network, "epochs": 2, "batch_size": 4, "learning_rate": 1e-3,
                                "patience": 2, "seed": 1, **kw})


def test_first_pass_writes_resized_pixels_and_labels_per_set(tmp_path):
    batches = _batches(6)
    counts = trainer.write_cache(iter(batches), str(tmp_path), 32, 10_000)
    assert counts == {"train": 8, "validation": 4}
    assert os.path.getsize(tmp_path / "train.u8") == 8 * 32 * 32 * 3
    images = trainer.DiskImages(str(tmp_path), "validation", 32)
    assert list(images.labels) == [0, 0, 1, 1]
    first = pd.concat(batches).iloc[0]  # the first validation row
    expected = np.asarray(resize_pil(_pil(first["content"]), (32, 32)), dtype=np.uint8)
    np.testing.assert_array_equal(images.read(np.array([0]))[0], expected)


def _pil(content: bytes):
    from PIL import Image

    return Image.fromarray(decode_image(content))


def test_epochs_stream_every_image_once_in_a_new_seeded_order(tmp_path):
    trainer.write_cache(iter(_batches(6)), str(tmp_path), 32, 10_000)
    images = trainer.DiskImages(str(tmp_path), "train", 32)
    all_pixels = images.read(np.arange(len(images)))

    def epoch(rng):
        xs, ys = zip(*images.batches(3, rng))
        return np.concatenate(xs), np.concatenate(ys)

    rng = np.random.default_rng(5)
    (x1, y1), (x2, _) = epoch(rng), epoch(rng)
    order1 = [int(np.flatnonzero((all_pixels == x).all(axis=(1, 2, 3)))[0]) for x in x1]
    order2 = [int(np.flatnonzero((all_pixels == x).all(axis=(1, 2, 3)))[0]) for x in x2]
    assert sorted(order1) == sorted(order2) == list(range(len(images)))
    assert order1 != order2  # a new order each epoch
    np.testing.assert_array_equal(y1, images.labels[order1])
    again = np.random.default_rng(5)
    np.testing.assert_array_equal(epoch(again)[0], x1)  # seeded
    with pytest.raises(trainer.TrainingError, match="task that started this training is gone"):
        next(images.batches(3, None, alive=lambda: False))


@pytest.fixture(scope="module")
def trained_twice(tmp_path_factory):
    """One cache trained twice with the same spec and seed (augmentation, dropout, class weights, 3
    epochs): each run's history and saved weights; the second run's model file stays in the folder."""
    import keras

    workdir = tmp_path_factory.mktemp("trained")
    trainer.write_cache(iter(_batches(6)), str(workdir), 32, 10_000)
    spec = dataclasses.replace(_spec(epochs=3, class_weight={0: 1.0, 1: 1.0}),
                               network=dataclasses.replace(_spec().network, augment=True))
    runs = []
    for _ in range(2):
        history = trainer.train(str(workdir), spec, log=lambda *_: None)
        weights = [w.numpy() for w in keras.saving.load_model(str(workdir / trainer.MODEL_FILE), compile=False).weights]
        runs.append((history, weights))
    return workdir, runs


def test_training_restores_the_best_epoch_and_saves_a_loadable_model(trained_twice):
    import keras

    tmp_path, runs = trained_twice
    history = runs[-1][0]
    (stage,) = history["stages"]
    assert [e["epoch"] for e in stage["epochs"]] == list(range(1, len(stage["epochs"]) + 1))
    best = min(stage["epochs"], key=lambda e: e["val_loss"])
    assert history["chosen_epoch"] == best["epoch"] and history["chosen_stage"] == 1
    assert all(e["images_per_second"] > 0 and e["train_seconds"] > 0 for e in stage["epochs"])
    # The saved model is the chosen epoch's: its validation loss is the one recorded for that epoch.
    model = keras.saving.load_model(str(tmp_path / trainer.MODEL_FILE), compile=False)
    val = trainer.DiskImages(str(tmp_path), "validation", 32)
    probabilities = model.predict(val.read(np.arange(len(val))).astype(np.float32), verbose=0)
    loss = -np.mean(np.log(probabilities[np.arange(len(val)), val.labels]))
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras notes that the saved optimizer has no slots to restore
        compiled = keras.saving.load_model(str(tmp_path / trainer.MODEL_FILE))
    assert int(compiled.optimizer.iterations.numpy()) == 0  # no optimizer state saved


def test_training_is_seeded(trained_twice):
    """The same cache, spec and seed give the same trained weights (augmentation, dropout, order)."""
    (first_history, first), (second_history, second) = trained_twice[1]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    losses = [[e["val_loss"] for e in h["stages"][0]["epochs"]] for h in (first_history, second_history)]
    assert losses[0] == losses[1]


@pytest.mark.slow  # VGG16 fitted in two stages
def test_stage_two_trains_the_top_units_only(tmp_path):
    trainer.write_cache(iter(_batches(6)), str(tmp_path), 32, 10_000)
    network = networks.NetworkSpec(kind=networks.FINETUNE, model_name="VGG16", n_classes=2, image_size=32,
                                   augment=True, seed=1)
    spec = dataclasses.replace(_spec(), network=network, epochs=1, unfreeze=1, finetune_learning_rate=1e-3)
    before, _ = networks.build_network(network)
    history = trainer.train(str(tmp_path), spec, log=lambda *_: None)
    assert [s["stage"] for s in history["stages"]] == [1, 2] and history["unfrozen_units"] == ["block5"]
    assert [e["epoch"] for s in history["stages"] for e in s["epochs"]] == [1, 2]
    import keras

    after = keras.saving.load_model(str(tmp_path / trainer.MODEL_FILE), compile=False)
    weights = {w.path: w.numpy() for w in after.weights}
    changed = {p.split("/")[0] for p, w in ((w.path, w.numpy()) for w in before.weights)
               if not np.array_equal(weights[p], w)}
    if history["chosen_stage"] == 2:  # stage two kept: block5 moved, the blocks below did not
        assert changed == {"block5_conv1", "block5_conv2", "block5_conv3", "head_norm", "head"}
    else:  # stage two did not beat stage one: stage one's weights, the backbone untouched
        assert changed == {"head_norm", "head"}


@pytest.mark.slow
def test_batch_norm_of_unfrozen_units_stays_in_inference_mode():
    """One stage-two training step of ResNet50 with its top two units unfrozen: their convolutions
    move, their batch-norm moving statistics (and scale and shift) do not, the frozen units not at all."""
    import keras

    network = networks.NetworkSpec(kind=networks.FINETUNE, model_name="ResNet50", n_classes=2, image_size=32,
                                   augment=False, seed=1)
    model, backbone = networks.build_network(network)
    assert networks.set_trainable_units(backbone, "ResNet50", 2) == ["conv5_block2", "conv5_block3"]
    before = {w.path: w.numpy() for w in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    model.train_on_batch(images, np.array([0, 1, 0, 1]))
    changed = {p for p, w in ((w.path, w.numpy()) for w in model.weights) if not np.array_equal(before[p], w)}
    assert any(p.startswith("conv5_block3_3_conv/kernel") for p in changed)
    assert not [p for p in changed if "_bn/" in p]  # moving mean/variance, gamma, beta of every unit
    assert {p.split("_")[0] for p in changed if not p.startswith("head")} == {"conv5"}


@pytest.mark.slow
def test_a_failing_training_process_raises_its_one_line_reason(tmp_path):
    trainer.write_cache(iter(_batches(2)), str(tmp_path), 32, 10_000)
    bad = tmp_path / "resnet.h5"
    bad.write_bytes(b"not weights")
    network = networks.NetworkSpec(kind=networks.FINETUNE, model_name="ResNet50", n_classes=2, image_size=32,
                                   weights_path=str(bad))
    with pytest.raises(backbones.WeightsError, match="does not fit ResNet50"):
        trainer.run_child(str(tmp_path), dataclasses.replace(_spec(), network=network))
