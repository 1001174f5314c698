"""wrapper.sh end to end, as a user runs it, on a few generated images."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT, make_dataset

pytestmark = pytest.mark.slow  # every test starts wrapper.sh in a subprocess

WRAPPER = os.path.join(ROOT, "wrapper.sh")


def wrapper(*args, timeout=600, cwd=None):
    return subprocess.run(
        [WRAPPER, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or "/", stdin=subprocess.DEVNULL
    )


def test_list_prints_every_experiment_from_any_folder():
    out = wrapper("list")
    assert out.returncode == 0, out.stderr
    names = out.stdout.split()
    assert "VGG16_binary_classification" in names and "Xception_multiclass_classification" in names
    assert len([n for n in names if n.endswith("_classification")]) == 10


def test_usage_on_bad_command():
    out = wrapper("frobnicate")
    assert out.returncode == 2
    assert "Usage" in out.stderr


def test_run_end_to_end_on_generated_images(tmp_path):
    raw = make_dataset(tmp_path / "raw", per_class=5)
    before = sorted((p, os.path.getmtime(os.path.join(d, p))) for d, _, fs in os.walk(raw) for p in fs)
    out = wrapper(
        "run", "ResNet50_binary_classification",
        "--set", "weights=random",
        "--set", f"dataset.raw_dir={raw}",
        "--set", f"dataset.resized_dir={tmp_path / 'resized'}",
        "--set", f"results_dir={tmp_path / 'results'}",
        "--set", f"cache_dir={tmp_path / 'cache'}",
        "--set", "dataset.image_size=64",
        "--set", "test_fraction=0.4",
        "--set", "spark.master=local[2]",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "WARN" not in out.stderr and "log4j" not in out.stderr  # the JVM's start-up lines go to the log
    assert len(os.listdir(tmp_path / "results" / "logs")) == 1
    assert "NOT transfer learning" in out.stdout
    assert "accuracy" in out.stdout and "recall Covid-19" in out.stdout
    metrics = json.loads((tmp_path / "results" / "ResNet50_binary_classification" / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_test"] == 10
    assert f"accuracy {metrics['accuracy']:.3f} (95% CI" in out.stdout  # the printed result is the saved one
    assert metrics["images_per_second"] > 0
    assert metrics["weights"] == "random" and metrics["transfer_learning"] is False
    assert (tmp_path / "results" / "ResNet50_binary_classification" / "model" / "stages").is_dir()
    after = sorted((p, os.path.getmtime(os.path.join(d, p))) for d, _, fs in os.walk(raw) for p in fs)
    assert after == before  # the raw folder is never written


def test_config_option_before_or_after_every_command(tmp_path):
    (tmp_path / "my.yaml").write_text(
        "defaults: {weights: random}\ntasks: {binary: [a, b]}\nexperiments:\n  only_one: {model: VGG16, task: binary}\n"
    )
    for args in (["--config", "my.yaml", "list"], ["list", "--config", "my.yaml"], ["--config=my.yaml", "list"]):
        out = wrapper(*args, cwd=tmp_path)  # relative to the folder it is called from
        assert out.returncode == 0 and out.stdout.split() == ["only_one"], (args, out.stderr)
    for args in (["run", "nope", "--config", "my.yaml"], ["--config", "my.yaml", "predict", "nope", "x.png"]):
        out = wrapper(*args, cwd=tmp_path)
        assert out.returncode == 2 and f"in {tmp_path / 'my.yaml'}" in out.stderr, (args, out.stderr)
    out = wrapper("--config", "my.yaml", "test", cwd=tmp_path)
    assert out.returncode == 2 and "--config is for the experiment commands, not 'test'" in out.stderr


def test_user_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "garbage.h5").write_bytes(b"not a weights file" * 1000)
    raw = make_dataset(tmp_path / "raw", per_class=2)
    cases = [
        (["run", "VGG16_binary_classification", "--set", f"weights={tmp_path / 'garbage.h5'}",
          "--set", f"dataset.raw_dir={raw}", "--set", f"results_dir={tmp_path / 'results'}"],
         "is not a Keras weights file (not HDF5)"),
        (["run", "NoSuchExperiment"], "unknown experiment 'NoSuchExperiment'"),
        (["run", "VGG16_binary_classification", "--set", "colour=red"], "unknown key 'colour'"),
        (["run", "VGG16_binary_classification", "--set", "weights=random", "--set", f"dataset.raw_dir={tmp_path}/none"],
         "not found"),
    ]
    for args, expected in cases:
        out = wrapper(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], out.stderr
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "results").exists()  # found before Spark started: no JVM, no log
