"""An experiment end to end through the Python API, on generated images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pyspark.ml import PipelineModel
from PIL import Image

from conftest import ROOT
from xray.config import load_config
from pyspark.sql import functions as F

from xray.experiment import run_experiment, split_rows, with_split


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
    assert saved["accuracy"] == m["accuracy"]
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
                            "evaluate", "save_model", "reports"]
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(saved["wall_seconds"], abs=0.5)

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


def _keys(counts):
    return [(f"file:/data/{label}/img{i:03d}.png", label) for label, n in counts.items() for i in range(n)]


def test_split_is_stratified_exact_and_seeded():
    keys = _keys({"Covid-19": 25, "No_findings": 103, "Pneumonia": 1})
    rows = split_rows(keys, seed=42, test_fraction=0.2, cv_folds=3)
    assert sorted(p for p, _, _ in rows) == sorted(p for p, _ in keys)
    label_of = dict(keys)
    tests = {c: sum(t for p, t, _ in rows if label_of[p] == c) for c in ("Covid-19", "No_findings", "Pneumonia")}
    assert tests == {"Covid-19": 5, "No_findings": 21, "Pneumonia": 1}  # round(20.6) = 21; at least one a class
    assert all(f == -1 for _, t, f in rows if t)
    # training files are dealt to the folds in turn, per class: fold sizes differ by at most one
    for c in ("Covid-19", "No_findings"):
        sizes = np.bincount([f for p, t, f in rows if not t and label_of[p] == c], minlength=3)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == {"Covid-19": 20, "No_findings": 82}[c]
    # order of the input does not matter; the seed does; the same seed gives the same split
    assert sorted(split_rows(list(reversed(keys)), 42, 0.2, 3)) == sorted(rows)
    other = {p for p, t, _ in split_rows(keys, 7, 0.2, 3) if t}
    assert other != {p for p, t, _ in rows if t}
    # the split of a file does not depend on the folder above its class (a moved data set)
    moved = [(p.replace("file:/data/", "hdfs://nn/x/"), c) for p, c in keys]
    assert {p.rsplit("/", 1)[-1] for p, t, _ in split_rows(moved, 42, 0.2, 3) if t} == \
        {p.rsplit("/", 1)[-1] for p, t, _ in rows if t}


def test_with_split_joins_the_same_split_on_any_partitioning(spark):
    keys = _keys({"a": 9, "b": 14})
    rows = {p: (t, f) for p, t, f in split_rows(keys, 3, 0.34, 2)}
    df = spark.createDataFrame([(p, c, float(i)) for i, (p, c) in enumerate(keys)], "path string, label string, x double")
    for frame in (df, df.repartition(5)):
        got = {r.path: (r.is_test, r.fold) for r in with_split(frame, 3, 0.34, 2).collect()}
        assert got == rows
    # keys given by the caller (an experiment has them) give the same rows without a collect
    assert {r.path: (r.is_test, r.fold) for r in with_split(df, 3, 0.34, 2, keys=keys).collect()} == rows
