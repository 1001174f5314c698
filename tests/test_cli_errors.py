"""Config, command-line and data-folder mistakes: one line on stderr, exit 2, no traceback, no Spark.

In-process through ``xray.cli.main`` (the fast tier); tests/test_cli.py runs such errors through
wrapper.sh in a subprocess.
"""

from __future__ import annotations

import pytest
from pyspark.sql import SparkSession

from conftest import ROOT, make_dataset
from xray.cli import main

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
