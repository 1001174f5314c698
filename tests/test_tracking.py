"""MLflow tracking: what a run logs, sweeps as parent runs, the store check, and the logged model
loading in a fresh process (with the run's saved Pipeline folder: the suite's fresh-process
save/load round trip; and a trained network's logged model and its Pipeline saved to a plain
folder, in the same process: each fresh process costs a Spark and TensorFlow start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_dataset, png_files, tracked_overrides
from xray import tracking
from xray.cli import main as xray_main
from xray.config import load_config

BINARY, MULTI = "ResNet50_binary_classification", "ResNet50_multiclass_classification"


def _experiment(tmp_path, name=BINARY, *extra):
    return load_config(os.path.join(ROOT, "config.yaml")).experiment(name, tracked_overrides(tmp_path, *extra))


def test_store_uri_is_a_sqlite_file_under_the_project_by_default(tmp_path):
    assert tracking.store_uri({}, str(tmp_path)) == f"sqlite:///{tmp_path}/mlruns.db"
    assert tracking.store_uri({"tracking": {"uri": "runs/x.db"}}, str(tmp_path)) == f"sqlite:///{tmp_path}/runs/x.db"
    assert tracking.store_uri({"tracking": {"uri": "http://mlflow:5000"}}, str(tmp_path)) == "http://mlflow:5000"
    assert tracking.artifact_root(f"sqlite:///{tmp_path}/mlruns.db") == f"{tmp_path}/mlartifacts"
    assert tracking.artifact_root("http://mlflow:5000") is None
    command = tracking.ui_command({}, str(tmp_path), 5001)
    assert command[command.index("--host") + 1] == "127.0.0.1" and f"sqlite:///{tmp_path}/mlruns.db" in command


def test_unreachable_store_stops_the_run_in_one_line_before_spark(tmp_path, capsys):
    make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=2)
    args = ["run", BINARY]
    for assignment in tracked_overrides(tmp_path, "tracking.uri=http://127.0.0.1:9"):  # the discard port: refused
        args += ["--set", assignment]
    assert xray_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: MLflow tracking store http://127.0.0.1:9 cannot be used (")
    assert err.endswith("fix tracking.uri, or set tracking.mlflow=false") and "\n" not in err
    assert not (tmp_path / "resized").exists()  # no Spark work
    # results/ holds at most the command's log (MLflow's refused connection is logged there)
    assert not (tmp_path / "results").exists() or os.listdir(tmp_path / "results") == ["logs"]


def _result(exp, accuracy: float) -> dict:
    """A finished run's metrics.json and reports, as fit_and_report writes them (no Spark needed)."""
    os.makedirs(exp.results_dir, exist_ok=True)
    for name in ("confusion_matrix.png", "roc.png", "learning_curve.png", "config.json"):
        with open(os.path.join(exp.results_dir, name), "wb") as f:
            f.write(b"report")
    classes = list(exp.classes)
    result = {
        "experiment": exp.name, "model": exp.model, "task": exp.task, "classes": classes, "weights": "random",
        "weights_id": "random1234", "transfer_learning": False, "accuracy": accuracy,
        "accuracy_ci95": [accuracy - 0.1, accuracy + 0.05], "balanced_accuracy": accuracy - 0.01,
        "per_class": {c: {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4} for c in classes},
        "roc": {"kind": "binary", "positive_class": classes[0], "auc": 0.875} if len(classes) == 2
        else {"kind": "one-vs-rest", "per_class": {}, "macro_auc": 0.625},
        "images_per_second": 12.5, "featurization_seconds": 2.0, "wall_seconds": 9.0, "n_train": 8, "n_test": 4,
        "n_images": 12, "phase_seconds": {"featurize": 2.0, "fit": 1.5},
        "reports": {"confusion_matrix": "confusion_matrix.png", "roc": "roc.png",
                    "learning_curve": "learning_curve.png", "config": "config.json"},
    }
    with open(os.path.join(exp.results_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def test_a_sweep_is_a_parent_run_with_one_child_per_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    exps = [_experiment(tmp_path, BINARY), _experiment(tmp_path, MULTI)]
    os.makedirs(tmp_path / "results")
    (tmp_path / "results" / "summary.md").write_text("| experiment |\n")
    logs: list[str] = []
    with tracking.sweep_run(exps[0].settings, exps[0].base_dir, "ResNet50_*", [e.name for e in exps]) as finish:
        ids = [tracking.log_experiment(e, _result(e, a), None, logs.append) for e, a in zip(exps, (0.75, 0.5))]
        finish(str(tmp_path / "results"), True)
    assert all(ids) and not any(line.startswith("warning") for line in logs)

    client = MlflowClient(tracking.store_uri(exps[0].settings, exps[0].base_dir))
    binary, multi = (client.get_run(i) for i in ids)
    parent = client.get_run(binary.data.tags["mlflow.parentRunId"])
    assert multi.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.run_name == "sweep ResNet50_*" and parent.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["summary.md"]

    assert binary.info.run_name == BINARY and binary.info.status == "FINISHED"
    assert {k: binary.data.tags[k] for k in ("model", "task", "weights", "transfer_learning")} == {
        "model": "ResNet50", "task": "binary", "weights": "random", "transfer_learning": "false"}
    assert "linear probe" in binary.data.tags["method"]
    metrics = binary.data.metrics
    assert metrics["accuracy"] == 0.75 and metrics["accuracy_ci95_low"] == pytest.approx(0.65)
    assert metrics["auc"] == 0.875 and metrics["recall.Covid-19"] == 0.25 and metrics["phase_seconds.fit"] == 1.5
    assert multi.data.metrics["auc"] == 0.625 and "f1.Pneumonia" in multi.data.metrics
    params = binary.data.params
    assert params["classifier.maxIter"] == "5" and params["weights"] == "random"
    assert params["spark.conf.spark.sql.shuffle.partitions"] == "8" and params["tracking.mlflow"] == "True"
    assert sorted(a.path for a in client.list_artifacts(binary.info.run_id)) == [
        "config.json", "confusion_matrix.png", "learning_curve.png", "metrics.json", "roc.png"]


def test_logging_failure_after_the_run_is_a_warning(tmp_path, monkeypatch):
    exp = _experiment(tmp_path)
    result = _result(exp, 0.75)
    monkeypatch.setattr(tracking, "run_metrics", lambda result: 1 / 0)
    logs: list[str] = []
    assert tracking.log_experiment(exp, result, None, logs.append) is None
    assert logs == [f"warning: MLflow logging of {BINARY} failed (ZeroDivisionError: division by zero); its files "
                    f"in {exp.results_dir} are complete"]


_FRESH_PROCESS = """
import json, sys
import mlflow
from pyspark.sql import SparkSession
spark = (SparkSession.builder.master("local[1]").config("spark.driver.host", "127.0.0.1")
         .config("spark.ui.enabled", "false").getOrCreate())
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.spark.load_model(sys.argv[2])
import imagefeaturizer
images = (spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", "*.png")
          .load(sys.argv[3]))


def predictions(model):
    rows = model.transform(images).select("path", "predicted_label", "probability").collect()
    return {r.path: [r.predicted_label, r.probability.toArray().tolist()] for r in rows}


out = {"package": imagefeaturizer.__file__, "rows": predictions(model)}
# The run's own saved folder too, as PipelineModel.load reads it (the project now importable).
from pyspark.ml import PipelineModel
out["folder_rows"] = predictions(PipelineModel.load(sys.argv[4]))
# A trained network's logged model (KerasImageClassifier holding its .keras file), and the same
# Pipeline saved to a plain folder (PipelineModel.write), its .keras file deleted.
out["network_rows"] = predictions(mlflow.spark.load_model(sys.argv[5]))
out["network_folder_rows"] = predictions(PipelineModel.load(sys.argv[6]))
print(json.dumps(out))
"""


def _log_network(tmp_path, images, store: str) -> tuple[str, str, dict]:
    """A SmallCNN network's model as a training run saves it (StringIndexerModel,
    KerasImageClassifier, IndexToString), logged by the call a training run makes and saved to a
    plain folder: (its model URI in the tracking store ``store``, the folder, its predictions
    here). Its own .keras file is deleted after both (the logged model and the folder hold a copy)."""
    from conftest import keras_classifier_pipeline
    from imagefeaturizer import networks

    spec = networks.NetworkSpec(kind=networks.SCRATCH, model_name="SmallCNN", n_classes=2, image_size=32, seed=3)
    keras_file = str(tmp_path / "network.keras")
    networks.build_network(spec)[0].save(keras_file)
    model = keras_classifier_pipeline(keras_file, ["Covid-19", "No_findings"], 32)
    exp = _experiment(tmp_path, "SmallCNN_binary_scratch", f"tracking.uri={store}")
    logs: list[str] = []
    tracking.log_experiment(exp, {**_result(exp, 0.5), "method": "scratch"}, model, logs.append)
    want = {r.path: (r.predicted_label, r.probability.toArray())
            for r in model.transform(images).select("path", "predicted_label", "probability").collect()}
    folder = str(tmp_path / "network_model")
    model.write().save(folder)
    os.remove(keras_file)
    return next(line for line in logs if line.startswith("MLflow: run ")).split("model: ")[1], folder, want


@pytest.mark.slow
def test_the_logged_model_loads_in_a_fresh_process_and_predicts_the_same(spark, tmp_path, tiny_tracked_run):
    run = tiny_tracked_run  # the experiment, MLflow on, run in this process' session (shared with test_connect)
    exp, want = run.exp, run.predictions
    uri = next(line for line in run.logs if line.startswith("MLflow: run ")).split("model: ")[1]
    images = png_files(spark, str(run.out / "resized"))
    network_uri, network_folder, network_want = _log_network(tmp_path, images, exp.settings["tracking"]["uri"])

    # A fresh process that has never seen this project: no PYTHONPATH, another working folder.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, tracking.store_uri(exp.settings, exp.base_dir), uri,
                           str(run.out / "resized"), os.path.join(exp.results_dir, "model"), network_uri, network_folder],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["package"].startswith(os.path.join(ROOT, "code"))  # the model's own copy of the code
    assert len(want) == 6
    # the logged model, the saved folder loaded as it is, and the trained network's logged model and folder
    for rows, expected, network in ((got["rows"], want, False), (got["folder_rows"], want, False),
                                    (got["network_rows"], network_want, True),
                                    (got["network_folder_rows"], network_want, True)):
        assert rows.keys() == expected.keys()
        for path, (label, probability) in expected.items():
            assert rows[path][0] == label
            # float32 sums in another batch layout (local[1] there) may differ in the last bit
            np.testing.assert_allclose(rows[path][1], probability, rtol=1e-5 if network else 1e-6,
                                       atol=1e-6 if network else 1e-9)
