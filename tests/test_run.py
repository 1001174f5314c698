"""One experiment run end to end through the Python API (xray.run), on generated images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F

from conftest import ROOT, make_dataset
from xray.config import load_config
from xray.errors import DataError
from xray.run import run_experiment
from xray.split import with_split


def _overrides(tmp_path, raw, *extra):
    return [
        "weights=random",
        f"dataset.raw_dir={raw}",
        f"dataset.resized_dir={tmp_path / 'resized'}",
        "dataset.image_size=64",
        f"results_dir={tmp_path / 'results'}",
        f"cache_dir={tmp_path / 'cache'}",
        "test_fraction=0.34",
        "batch_size=8",
        *extra,
    ]


@pytest.fixture(scope="module")
def config():
    return load_config(os.path.join(ROOT, "config.yaml"))


@pytest.mark.slow
def test_multiclass_experiment_end_to_end(spark, config, tmp_path, dataset):
    exp = config.experiment("ResNet50_multiclass_classification", _overrides(tmp_path, dataset))
    logs = []
    m = run_experiment(exp, log=logs.append)

    # The resize step ran first: one mode, one size, same layout, raw folder untouched.
    for cls in ("Covid-19", "No_findings", "Pneumonia"):
        outs = sorted(os.listdir(tmp_path / "resized" / cls))
        assert len(outs) == 6
        with Image.open(tmp_path / "resized" / cls / outs[0]) as im:
            assert (im.mode, im.size, im.format) == ("L", (64, 64), "PNG")
    assert any("resize" in line for line in logs)
    assert any("NOT transfer learning" in line for line in logs)

    saved = json.loads((tmp_path / "results" / exp.name / "metrics.json").read_text())
    assert saved["n_train"] + saved["n_test"] == 18 and saved["n_test"] == 6  # 2 of 6 per class
    assert set(saved["per_class"]) == {"Covid-19", "No_findings", "Pneumonia"}
    assert all(v["support"] == 2 for v in saved["per_class"].values())
    assert saved["transfer_learning"] is False and saved["weights"] == "random"
    assert saved["images_featurized"] == 18 and saved["images_per_second"] > 0
    assert len(saved["confusion_matrix"]["rows_true_columns_predicted"]) == 3
    assert saved["roc"]["kind"] == "one-vs-rest"
    assert saved["data_audit"]["Covid-19"]["formats"] == {"PNG": 3, "JPEG": 3}
    # The generated classes differ visibly; even random features separate them well above chance.
    assert saved["accuracy"] > 0.6
    # Where the wall time went, step by step, in order; the steps add up to (nearly) all of it.
    phases = saved["phase_seconds"]
    assert list(phases) == ["checks", "spark_session", "data_checks", "featurize", "waiting", "split", "fit",
                            "evaluate", "save_model", "reports", "explanations"]
    assert sum(phases.values()) == pytest.approx(saved["wall_seconds"], abs=0.5)

    # Class activation maps of the test images: the gallery and, per true class, where the evidence lies
    # (the 2 test images of each class are the sample and the gallery's correct ones).
    explanations = saved["explanations"]
    assert {c: v["images"] for c, v in explanations["per_class"].items()} == {c: 2 for c in saved["classes"]}
    assert all(0 <= v["border_share"] <= 1 and 0 < v["peak_x"] < 1 for v in explanations["per_class"].values())
    assert explanations["gallery_images"] == 6  # up to 3 correct a class and 6 misclassified: all 6 test images
    assert explanations["sample_per_class"] == 16 and explanations["border_area_share"] == 0.51
    with Image.open(tmp_path / "results" / exp.name / "cam_gallery.png") as im:
        assert im.format == "PNG" and im.size[0] > 600

    # The saved PipelineModel, applied to the test split's image files, reproduces the accuracy.
    model = PipelineModel.load(str(tmp_path / "results" / exp.name / "model"))
    images = (
        spark.read.format("binaryFile").option("pathGlobFilter", "*.png").option("recursiveFileLookup", "true")
        .load(str(tmp_path / "resized"))
        .withColumn("label", F.regexp_extract("path", r"/([^/]+)/[^/]+$", 1))
    )
    test_rows = with_split(images, exp["seed"], exp["test_fraction"]).filter("is_test").drop("label")
    rows = model.transform(test_rows).select("path", "predicted_label").collect()
    assert len(rows) == 6
    correct = sum(r.path.rsplit("/", 2)[-2] == r.predicted_label for r in rows)
    assert correct / len(rows) == pytest.approx(saved["accuracy"])

    # A second run reads every feature from the cache and reproduces the metrics exactly.
    m2 = run_experiment(exp, log=logs.append)
    assert m2["images_from_cache"] == 18 and m2["images_featurized"] == 0
    for key in ("accuracy", "per_class", "confusion_matrix", "roc", "n_train", "n_test"):
        assert m2[key] == m[key]


@pytest.mark.slow
def test_binary_uses_two_classes_and_binomial(spark, config, tmp_path, dataset):
    exp = config.experiment("ResNet50_binary_classification", _overrides(tmp_path, dataset))
    m = run_experiment(exp, log=lambda *_: None)
    assert m["classes"] == ["Covid-19", "No_findings"]
    assert m["roc"]["kind"] == "binary" and m["roc"]["auc"] is not None
    assert m["n_train"] + m["n_test"] == 12
    model = PipelineModel.load(str(tmp_path / "results" / exp.name / "model"))
    assert [type(s).__name__ for s in model.stages] == [
        "StringIndexerModel", "KerasImageFeaturizer", "LogisticRegressionModel", "IndexToString"
    ]
    assert model.stages[2].numClasses == 2
    assert np.isfinite(m["lr_objective_history"]).all()


def test_experiment_with_handle_invalid_error_stops_before_featurizing(spark, tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=2)
    (tmp_path / "raw" / "No_findings" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    overrides = [
        "weights=random", f"dataset.raw_dir={raw}", f"dataset.resized_dir={tmp_path / 'resized'}",
        "dataset.image_size=32", f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
    ]
    exp = load_config(os.path.join(ROOT, "config.yaml")).experiment("ResNet50_binary_classification", overrides)
    bad = os.path.join(raw, "No_findings", "broken.jpg")
    # First run: the resize step names the bad file and stops; second run: the resize output is
    # current, and the bad file recorded in its manifest still stops the run.
    for resizes in (True, False):
        logs: list[str] = []
        with pytest.raises(DataError, match=f"^invalid image {bad}: .*handleInvalid=skip"):
            run_experiment(exp, log=logs.append)
        assert any(line.startswith("resize: ") for line in logs) == resizes
        assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
        for cls in ("Covid-19", "No_findings"):  # the good files were kept
            assert sorted(os.listdir(tmp_path / "resized" / cls)) == ["img0.png", "img1.png"]
