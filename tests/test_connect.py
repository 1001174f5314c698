"""Spark Connect: one small experiment through a local Spark Connect server equals classic mode
(the session's ``tiny_tracked_run``: the same experiment and images, run in this process).

The Connect run (and a ``predict`` with its model) is its own process (``spark.remote: local`` starts a server in the client's JVM;
this test process holds a classic SparkContext). That process gets no PYTHONPATH and works in
another folder, so the Python workers can import the project only from the code the client ships
as a Spark Connect artifact. Its MLflow run logs the saved model folder (no JVM on the client).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import CODE, ROOT, cached_features, saved_model_predictions, tiny_overrides

EXPERIMENT = "ResNet50_binary_classification"
# Runs ``python -m xray`` commands one after the other in one process (one Connect session).
_LAUNCH = ("import json, sys; sys.path.insert(0, sys.argv[1]); from xray.cli import main; "
           "sys.exit(next((code for code in map(main, json.loads(sys.argv[2])) if code), 0))")


def _key(path: str) -> str:
    """``<file name without extension>|<class folder>``: a raw image and its resized PNG alike."""
    folder, name = path.rsplit("/", 2)[-2:]
    return f"{os.path.splitext(name)[0]}|{folder}"


@pytest.mark.slow
def test_an_experiment_through_spark_connect_equals_classic_mode(spark, tmp_path, tiny_tracked_run):
    reference = tiny_tracked_run  # classic mode, in this process' session: the same experiment and images
    assert reference.exp.name == EXPERIMENT
    raw, classic = reference.raw, reference.metrics
    config_path = os.path.join(ROOT, "config.yaml")
    store = tmp_path / "mlruns.db"
    settings = []
    for assignment in [*tiny_overrides(tmp_path / "connect", raw, "classifier.maxIter=5"), "spark.remote=local",
                       "spark.master=local[2]", "tracking.mlflow=true", f"tracking.uri={store}"]:
        settings += ["--set", assignment]
    model_dir = str(tmp_path / "connect" / "results" / EXPERIMENT / "model")
    commands = [["--config", config_path, "run", EXPERIMENT, *settings],
                ["--config", config_path, "predict", model_dir, str(raw), *settings]]
    # nor this process' MLflow state (MLFLOW_TRACKING_URI is set here by the session's tracked run)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MLFLOW_")}
    (tmp_path / "elsewhere").mkdir()
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, CODE, json.dumps(commands)], cwd=tmp_path / "elsewhere",
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    connect = json.loads((tmp_path / "connect" / "results" / EXPERIMENT / "metrics.json").read_text())

    # The same features, bit for bit, and the same split and metrics.
    want, got = cached_features(reference.out), cached_features(tmp_path / "connect")
    assert len(want) == 6 and got.keys() == want.keys()
    for sha, vector in want.items():
        np.testing.assert_array_equal(got[sha], vector)
    for key in ("n_images", "n_train", "n_test", "classes", "split", "confusion_matrix", "accuracy",
                "accuracy_ci95", "balanced_accuracy", "per_class"):
        assert connect[key] == classic[key], key
    assert connect["roc"]["auc"] == pytest.approx(classic["roc"]["auc"], abs=1e-9)

    # The model the Connect run saved loads in classic mode and predicts as the classic one.
    from_connect = {_key(path): prediction
                    for path, prediction in saved_model_predictions(spark, model_dir, str(reference.out / "resized")).items()}
    from_classic = {_key(path): prediction for path, prediction in reference.predictions.items()}
    assert from_connect.keys() == from_classic.keys()
    for key, (label, probability) in from_classic.items():
        assert from_connect[key][0] == label
        np.testing.assert_allclose(from_connect[key][1], probability, rtol=1e-6, atol=1e-9)

    # predict on Connect: the raw files, normalised as in training, classified as the classic model does.
    with open(os.path.join(os.path.dirname(model_dir), "predictions.csv"), encoding="utf-8") as f:
        predicted = {_key(r["path"]): r for r in csv.DictReader(f)}
    assert predicted.keys() == from_classic.keys() and not any(r["error"] for r in predicted.values())
    for key, (label, probability) in from_classic.items():
        assert predicted[key]["predicted_class"] == label
        assert float(predicted[key]["p_Covid-19"]) == pytest.approx(probability[0], abs=1e-6)

    # MLflow on Connect: the saved folder in the Spark flavour's layout.
    from mlflow.tracking import MlflowClient

    run_id = next(line for line in proc.stdout.splitlines() if line.startswith("MLflow: run ")).split()[2]
    client = MlflowClient(f"sqlite:///{store}")
    logged = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/sparkml", "model/code", "model/requirements.txt"} <= logged
    assert client.get_run(run_id).data.metrics["accuracy"] == classic["accuracy"]
