"""Spark Connect: one small experiment through a local Spark Connect server equals classic mode.

The Connect run is its own process (``spark.remote: local`` starts a server in the client's JVM;
this test process holds a classic SparkContext). That process gets no PYTHONPATH and works in
another folder, so the Python workers can import the project only from the code the client ships
as a Spark Connect artifact. Its MLflow run logs the saved model folder (no JVM on the client).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import CODE, ROOT, make_dataset
from xray.config import load_config
from xray.run import run_experiment

EXPERIMENT = "ResNet50_binary_classification"
_LAUNCH = "import sys; sys.path.insert(0, sys.argv[1]); from xray.cli import main; sys.exit(main(sys.argv[2:]))"


def _overrides(tmp_path, raw, mode):
    out = tmp_path / mode
    return ["weights=random", f"dataset.raw_dir={raw}", f"dataset.resized_dir={out / 'resized'}",
            "dataset.image_size=64", f"results_dir={out / 'results'}", f"cache_dir={out / 'cache'}",
            "test_fraction=0.34", "batch_size=8", "classifier.maxIter=5"]


def _features(out) -> dict[str, np.ndarray]:
    """sha256 of each image -> its cached feature vector."""
    found = {}
    for part in glob.glob(str(out / "cache" / "*" / "part-*")):
        table = pq.read_table(part).to_pydict()
        for sha, vector in zip(table["sha256"], table["features"]):
            found[sha] = np.asarray(vector["values"], dtype=np.float32)
    return found


def _predictions(spark, model_dir: str, images: str) -> dict:
    from pyspark.ml import PipelineModel

    df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", "*.png").load(images)
    rows = PipelineModel.load(model_dir).transform(df).select("path", "predicted_label", "probability").collect()
    return {os.path.basename(r.path): (r.predicted_label, r.probability.toArray()) for r in rows}


@pytest.mark.slow
def test_an_experiment_through_spark_connect_equals_classic_mode(spark, tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=3)
    config_path = os.path.join(ROOT, "config.yaml")
    classic = run_experiment(load_config(config_path).experiment(EXPERIMENT, _overrides(tmp_path, raw, "classic")),
                             log=lambda *_: None)

    store = tmp_path / "mlruns.db"
    args = ["--config", config_path, "run", EXPERIMENT]
    for assignment in [*_overrides(tmp_path, raw, "connect"), "spark.remote=local", "spark.master=local[2]",
                       "tracking.mlflow=true", f"tracking.uri={store}"]:
        args += ["--set", assignment]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    (tmp_path / "elsewhere").mkdir()
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, CODE, *args], cwd=tmp_path / "elsewhere", env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    connect = json.loads((tmp_path / "connect" / "results" / EXPERIMENT / "metrics.json").read_text())

    # The same features, bit for bit, and the same split and metrics.
    want, got = _features(tmp_path / "classic"), _features(tmp_path / "connect")
    assert len(want) == 6 and got.keys() == want.keys()
    for sha, vector in want.items():
        np.testing.assert_array_equal(got[sha], vector)
    for key in ("n_images", "n_train", "n_test", "classes", "split", "confusion_matrix", "accuracy",
                "accuracy_ci95", "balanced_accuracy", "per_class"):
        assert connect[key] == classic[key], key
    assert connect["roc"]["auc"] == pytest.approx(classic["roc"]["auc"], abs=1e-9)

    # The model the Connect run saved loads in classic mode and predicts as the classic one.
    images = str(tmp_path / "classic" / "resized")
    from_connect = _predictions(spark, str(tmp_path / "connect" / "results" / EXPERIMENT / "model"), images)
    from_classic = _predictions(spark, str(tmp_path / "classic" / "results" / EXPERIMENT / "model"), images)
    assert from_connect.keys() == from_classic.keys()
    for name, (label, probability) in from_classic.items():
        assert from_connect[name][0] == label
        np.testing.assert_allclose(from_connect[name][1], probability, rtol=1e-6, atol=1e-9)

    # MLflow on Connect: the saved folder in the Spark flavour's layout.
    from mlflow.tracking import MlflowClient

    run_id = next(line for line in proc.stdout.splitlines() if line.startswith("MLflow: run ")).split()[2]
    client = MlflowClient(f"sqlite:///{store}")
    logged = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/sparkml", "model/code", "model/requirements.txt"} <= logged
    assert client.get_run(run_id).data.metrics["accuracy"] == classic["accuracy"]
