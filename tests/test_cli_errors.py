"""Config, command-line and data-folder mistakes: one line on stderr, exit 2, no traceback, no Spark.

In-process through ``xray.cli.main`` (the fast tier); tests/test_cli.py runs such errors through
wrapper.sh in a subprocess.
"""

from __future__ import annotations

import os
import warnings

import pytest
from pyspark.sql import SparkSession

from conftest import ROOT, make_dataset
from xray.cli import COMMANDS, main

FIVE = "InceptionV3, ResNet50, VGG16, VGG19, Xception"


def _bad_yaml(tmp_path) -> str:
    path = tmp_path / "broken.yaml"
    path.write_text("defaults:\n  weights: random\nexperiments:\n  x: {model: VGG16\n  y: 1\n")
    return str(path)


def _unknown_key_file(tmp_path) -> str:
    path = tmp_path / "keys.yaml"
    path.write_text("defaults: {weights: random}\ntasks: {b: [a, c]}\nexperiments:\n  x: {model: VGG16, task: b, lr: 3}\n")
    return str(path)


def _one_class(tmp_path) -> str:
    return make_dataset(tmp_path / "raw", classes=("Covid-19",), per_class=1)


def _one_covid_image(tmp_path) -> str:
    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=4)
    for name in sorted(os.listdir(os.path.join(raw, "Covid-19")))[1:]:
        os.unlink(os.path.join(raw, "Covid-19", name))
    return raw


def _latin1_config(tmp_path) -> str:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("defaults:\n  weights: random  # café\n".encode("latin-1"))
    return str(path)


def _garbage_weights(tmp_path) -> str:
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"\x00garbage" * 100)
    return str(path)


def _other_weights(tmp_path) -> str:
    """An HDF5 weights file of another network (two arrays)."""
    import h5py
    import numpy as np

    path = tmp_path / "other.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.zeros((8, 2), np.float32))
        f.create_dataset("layers/dense/vars/1", data=np.zeros((2,), np.float32))
    return str(path)


CASES = {
    "unknown experiment": (
        lambda t: ["run", "ResNet51_binary_classification"],
        ["unknown experiment 'ResNet51_binary_classification'", "ResNet50_binary_classification", "dataset_resize"],
    ),
    "unknown model": (
        lambda t: ["run", "ResNet50_binary_classification", "--set", "model=AlexNet"],
        ["model: 'AlexNet' is not allowed: expected one of " + FIVE],
    ),
    "bad yaml": (lambda t: ["--config", _bad_yaml(t), "list"], ["broken.yaml, line 5: invalid YAML"]),
    "unknown key in file": (lambda t: ["--config", _unknown_key_file(t), "list"], ["[x]: unknown key 'lr'"]),
    "unknown --set key": (
        lambda t: ["run", "ResNet50_binary_classification", "--set", "colour=red"],
        ["unknown key 'colour'", "dataset.raw_dir"],
    ),
    "bad --set value": (lambda t: ["run", "dataset_resize", "--set", "seed=abc"], ["seed: expected int, got 'abc'"]),
    "bad --set form": (lambda t: ["run", "dataset_resize", "--set", "weights"], ["expected key=value"]),
    "bad handleInvalid": (
        lambda t: ["run", "dataset_resize", "--set", "handleInvalid=ignore"], ["expected one of error, skip"]
    ),
    "missing data folder": (
        lambda t: ["run", "dataset_resize", "--set", f"dataset.raw_dir={t / 'nowhere'}"],
        ["data folder", "nowhere not found: set dataset.raw_dir", "dataset_download"],
    ),
    "one class folder": (
        lambda t: ["run", "dataset_resize", "--set", f"dataset.raw_dir={_one_class(t)}"],
        ["has 1 class folder(s) with images: expected at least two"],
    ),
    "missing class for the task": (
        lambda t: ["run", "ResNet50_multiclass_classification", "--set", "weights=random",
                   "--set", f"dataset.raw_dir={make_dataset(t / 'raw', ('Covid-19', 'No_findings'), 1)}"],
        ["lacks class folder(s) Pneumonia needed by the task"],
    ),
    "missing config": (lambda t: ["--config", str(t / "none.yaml"), "list"], ["none.yaml' not found"]),
    "missing config after the command": (
        lambda t: ["list", "--config", str(t / "none.yaml")], ["none.yaml' not found: give an existing file with --config"]
    ),
    "config not UTF-8": (
        lambda t: ["list", "--config", _latin1_config(t)], ["latin1.yaml is not UTF-8 text (byte 0xe9", "save it as UTF-8"]
    ),
    "spark.conf as a value": (
        lambda t: ["run", "dataset_resize", "--set", "spark.conf=1"], ["'spark.conf' is a section of Spark settings"]
    ),
    "garbage weights file": (
        lambda t: ["run", "ResNet50_binary_classification", "--set", f"dataset.raw_dir={make_dataset(t / 'raw')}",
                   "--set", f"weights={_garbage_weights(t)}"],
        ["garbage.h5' is not a Keras weights file (not HDF5): give the weights file of ResNet50 without its top"],
    ),
    "weights of another network": (
        lambda t: ["run", "ResNet50_binary_classification", "--set", f"dataset.raw_dir={make_dataset(t / 'raw')}",
                   "--set", f"weights={_other_weights(t)}"],
        ["does not fit ResNet50 without its top: it holds 2 weight arrays (18 values); ResNet50 has 318"],
    ),
    "a class with one image": (
        lambda t: ["run", "VGG16_binary_classification", "--set", "weights=random",
                   "--set", f"dataset.raw_dir={_one_covid_image(t)}", "--set", "cv_folds=3"],
        ["class Covid-19 needs at least 4 images", "Covid-19 has 1: the test split takes at least one",
         "3 for training (cv_folds=3)"],
    ),
}


def _no_spark(self):
    raise AssertionError("a SparkSession was started before the error was found")


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error_exit_2(tmp_path, case, monkeypatch, capsys):
    make_args, fragments = CASES[case]
    args = make_args(tmp_path)
    monkeypatch.chdir(ROOT)  # the default config.yaml
    monkeypatch.setattr(SparkSession.Builder, "getOrCreate", _no_spark)  # every check happens before Spark
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


# Bad input to a training run (train: finetune | scratch): found before Spark, nothing written.
TRAINING_CASES = {
    "unknown train value": ("VGG16_binary_finetune", 6, ["train=transfer"],
                            ["train: 'transfer' is not allowed: expected one of probe, finetune, scratch"]),
    "unfreeze larger than the backbone": (
        "VGG16_binary_finetune", 6, ["finetune.unfreeze=6"],
        ["finetune.unfreeze=6 is larger than VGG16, which has 5 units (blocks): set finetune.unfreeze to 0..5"]),
    "a class with no training image": (  # the probe's split check comes first (tests/test_training.py: the other)
        "SmallCNN_binary_scratch", 1, [],
        ["class Covid-19 needs at least 2 images", "the test split takes at least one (test_fraction=0.2) and one "
         "for training; add images to it"]),
    "too few images for the validation split": (
        "SmallCNN_binary_scratch", 2, [],
        ["too few images of Covid-19 for the validation split: 1 training image(s)", "training.validation_fraction="]),
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_bad_training_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case, monkeypatch, capsys):
    entry, covid_images, sets, fragments = TRAINING_CASES[case]
    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=6)
    for name in sorted(os.listdir(os.path.join(raw, "Covid-19")))[covid_images:]:
        os.unlink(os.path.join(raw, "Covid-19", name))
    args = ["run", entry]
    for assignment in ["weights=random", "test_fraction=0.2", f"dataset.raw_dir={raw}", *sets,
                       f"dataset.resized_dir={tmp_path / 'resized'}", f"results_dir={tmp_path / 'results'}"]:
        args += ["--set", assignment]
    monkeypatch.setattr(SparkSession.Builder, "getOrCreate", _no_spark)
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not (tmp_path / "resized").exists()  # nothing resized, no staging or model folder, no results
    assert not (tmp_path / "results").exists() or os.listdir(tmp_path / "results") == ["logs"]


# An error as Spark hands it over from a Python worker: the Java text with the worker's traceback.
_WORKER_TRACEBACK = """An error occurred while calling o161.parquet.
: org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 in stage 3.0 failed 1 times
org.apache.spark.api.python.PythonException: Traceback (most recent call last):
  File "/x/imagefeaturizer/runtime.py", line 130, in get_extractor
    raise backbones.WeightsError(message)
{error}
\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException(PythonRunner.scala:581)
"""


@pytest.mark.parametrize("error, code, line", [
    ("imagefeaturizer.backbones.WeightsError: weights file /w.h5 does not fit ResNet50 without its top", 2,
     "error: weights file /w.h5 does not fit ResNet50 without its top (details: "),
    ("MemoryError: cannot allocate 1.5 GiB", 1, "error: MemoryError: cannot allocate 1.5 GiB (traceback: "),
])
def test_errors_from_spark_workers_are_one_line_naming_the_log(tmp_path, monkeypatch, capsys, error, code, line):
    def from_a_worker(args):
        warnings.warn("toPandas attempted Arrow optimization ... \n\tat org.apache.spark.Foo")  # as PySpark does
        raise RuntimeError(_WORKER_TRACEBACK.format(error=error))

    monkeypatch.setitem(COMMANDS, "run", from_a_worker)
    assert main(["run", "VGG16_binary_classification", "--set", f"results_dir={tmp_path}"]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(line), err
    log = err.strip().rsplit(" ", 1)[-1].rstrip(")")
    assert os.path.dirname(log) == str(tmp_path / "logs")
    text = open(log, encoding="utf-8").read()
    assert "PythonRunner.scala" in text and "toPandas attempted" in text  # the details are kept there


def test_old_command_logs_are_pruned_and_nothing_else(tmp_path, monkeypatch, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    old = [logs / f"run-20260101-0000{i:02d}-{100 + i}.log" for i in range(25)]
    for i, path in enumerate(old):
        path.write_text("old")
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))  # days ago, in order
    (logs / "VGG16_binary_classification-error.log").write_text("a sweep's traceback")
    os.utime(logs / "VGG16_binary_classification-error.log", (1_600_000_000, 1_600_000_000))
    assert main(["run", "NoSuchExperiment", "--set", f"results_dir={tmp_path}"]) == 2
    assert sorted(os.listdir(logs)) == sorted([p.name for p in old[5:]] + ["VGG16_binary_classification-error.log"])
