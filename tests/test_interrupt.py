"""Ctrl-C during the resize job and featurization, as a user presses it:
one line ``error: interrupted ...``, exit 130, Spark stopped, nothing half-written, and the
rerun continues from what was finished (slow: real wrapper.sh subprocesses; one test carries
every probe). The rerun is also the suite's whole ``wrapper.sh run`` as a user runs it (clean
terminal, one log, printed result = saved result, raw folder untouched). A sweep's Ctrl-C is
tested in process, in tests/test_sweep.py.

A job is interrupted at a point it signals, never after a guessed time: with
``IMAGEFEATURIZER_TEST_HOLD=<point>:<marker>`` a Spark task reaching ``<point>`` ("resize": the
resize job's tasks; "featurize": the featurizer's UDF) creates the marker file and waits; the
test sends SIGINT once the marker exists, to the whole process group (a terminal's Ctrl-C) or
to the driver alone (``kill -INT``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, make_dataset
from imagefeaturizer.runtime import TEST_HOLD_ENV

pytestmark = pytest.mark.slow

WRAPPER = os.path.join(ROOT, "wrapper.sh")
MODEL = "ResNet50"  # the suite's backbone: its export (cache/models) is made once for every test
EXPERIMENT = f"{MODEL}_binary_classification"


def _settings(tmp_path) -> list[str]:
    sets = {
        "weights": "random", "dataset.raw_dir": tmp_path / "raw", "dataset.resized_dir": tmp_path / "resized",
        "results_dir": tmp_path / "results", "cache_dir": tmp_path / "cache", "dataset.image_size": 64,
        "test_fraction": 0.4, "spark.master": "local[2]",
        "classifier.maxIter": 5,  # tiny separable data: LR would run ~30 iterations, one Spark job each
    }
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([WRAPPER, *args], capture_output=True, text=True, timeout=900, cwd="/",
                          stdin=subprocess.DEVNULL)


def _interrupt(tmp_path, point: str, args: list[str], group: bool) -> tuple[int, str, str]:
    """Run wrapper.sh ``args`` until a task reaches ``point``, then SIGINT; (exit code, stdout, stderr)."""
    marker = tmp_path / f"{point}-{time.monotonic_ns()}.marker"
    env = {**os.environ, TEST_HOLD_ENV: f"{point}:{marker}"}
    proc = subprocess.Popen([WRAPPER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd="/", stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while not marker.exists():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"ended (exit {proc.returncode}) before reaching {point}:\n{out}\n{err}")
            time.sleep(0.2)
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _assert_no_process_left(str(marker))
    return proc.returncode, out, err


def _assert_no_process_left(marker: str, wait_s: float = 120.0) -> None:
    """No process started by the run (JVM, Python workers) outlives it: none has its hold setting."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [pid for pid in os.listdir("/proc") if pid.isdigit() and marker in _environ(pid)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"processes of the interrupted run still alive: {left}"


def _environ(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _assert_one_interrupted_line(code: int, out: str, err: str) -> str:
    assert code == 130, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted: Spark jobs cancelled"), err
    assert "Traceback" not in out + err and "Py4J" not in out + err
    log = lines[0].rsplit("log: ", 1)[-1]
    assert os.path.isfile(log), lines[0]
    return log


def _temporaries(tmp_path) -> list[str]:
    """Half-written outputs: every writer writes under a .tmp- name and renames."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files if n.startswith(".tmp-")]


def _files_and_times(folder) -> list[tuple[str, float]]:
    return sorted((os.path.join(d, n), os.path.getmtime(os.path.join(d, n))) for d, _, names in os.walk(folder) for n in names)


def test_interrupted_runs_stop_cleanly_and_rerun_continues(tmp_path, random_extractor):
    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=5)
    raw_before = _files_and_times(raw)
    args = ["run", EXPERIMENT, *_settings(tmp_path)]

    # Ctrl-C to the driver alone during the resize job: no manifest claims unfinished outputs.
    _assert_one_interrupted_line(*_interrupt(tmp_path, "resize", args, group=False))
    assert not (tmp_path / "resized" / ".resize-manifest.json").exists() and not _temporaries(tmp_path)

    # Ctrl-C to the process group during featurization: no cache part, no results folder.
    log = _assert_one_interrupted_line(*_interrupt(tmp_path, "featurize", args, group=True))
    assert "cancelled" in open(log, encoding="utf-8").read()  # the details are in the log
    cache = [os.path.join(d, n) for d, _, names in os.walk(tmp_path / "cache") for n in names]
    assert cache == [] and not (tmp_path / "results" / EXPERIMENT).exists() and not _temporaries(tmp_path)

    logs_before = os.listdir(tmp_path / "results" / "logs")
    rerun = _run(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "running the resize step" not in rerun.stdout  # the resize finished before is kept
    assert "featurizing 10 images" in rerun.stdout
    _assert_a_whole_run(tmp_path, rerun, logs_before)

    # Not an interruption, but the same path from the workers to the terminal: weights whose shapes
    # fit the backbone (the driver's check passes) and whose layers Keras cannot match fail in the Python
    # worker; the terminal gets one line naming the log, the log the worker's traceback. The TensorFlow
    # engine, as auto falls back to for these weights (without first trying their OpenVINO export in a
    # child process of its own), on one core (one worker builds the model and fails, not two at once).
    weights = _renamed_layer_weights(tmp_path, random_extractor(MODEL).engine.model)
    failed = _run(*args, *(arg for s in (f"weights={weights}", "engine=tensorflow", "spark.master=local[1]")
                           for arg in ("--set", s)))
    assert failed.returncode == 2, failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith(f"error: weights file '{weights}' does not fit {MODEL} without its top (ValueError: ")
    log = lines[0].rsplit("(details: ", 1)[-1].rstrip(")")
    text = open(log, encoding="utf-8").read()
    assert "Traceback (most recent call last)" in text and "PythonException" in text
    assert json.loads((tmp_path / "results" / EXPERIMENT / "metrics.json").read_text())["weights"] == "random"  # kept
    assert _files_and_times(raw) == raw_before  # the raw folder is never written


def _assert_a_whole_run(tmp_path, run: subprocess.CompletedProcess, logs_before: list[str]) -> None:
    """What ``wrapper.sh run`` shows and leaves: a clean terminal, one log, the printed result the saved one."""
    assert "Traceback" not in run.stderr
    assert "WARN" not in run.stderr and "log4j" not in run.stderr  # the JVM's start-up lines go to the log
    assert len(os.listdir(tmp_path / "results" / "logs")) == len(logs_before) + 1
    assert "NOT transfer learning" in run.stdout
    assert "accuracy" in run.stdout and "recall Covid-19" in run.stdout
    metrics = json.loads((tmp_path / "results" / EXPERIMENT / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_test"] == 10
    assert f"accuracy {metrics['accuracy']:.3f} (95% CI" in run.stdout  # the printed result is the saved one
    assert metrics["images_per_second"] > 0
    assert metrics["weights"] == "random" and metrics["transfer_learning"] is False
    assert (tmp_path / "results" / EXPERIMENT / "model" / "stages").is_dir()


def _renamed_layer_weights(tmp_path, model) -> str:
    """``model``'s weights (the session's seeded random backbone without its top, built once for
    several test files) with one layer renamed."""
    import h5py

    weights = str(tmp_path / "renamed.weights.h5")
    model.save_weights(weights)
    with h5py.File(weights, "a") as f:
        f.move("layers/conv2d", "layers/renamed")
    return weights
