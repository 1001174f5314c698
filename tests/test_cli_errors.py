"""Config, command-line and data-folder mistakes: one line on stderr, exit 2, no traceback, no Spark."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import CODE, ROOT, make_dataset

FIVE = "InceptionV3, ResNet50, VGG16, VGG19, Xception"


def _cli(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": CODE}
    return subprocess.run(
        [sys.executable, "-m", "xray", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


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


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error_exit_2(tmp_path, case):
    make_args, fragments = CASES[case]
    done = _cli(*make_args(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    assert "Spark" not in done.stdout + done.stderr  # every check happens before Spark starts
