"""Sweep, cross-validation, reproducibility and prediction, end to end on tiny generated images.

One sweep (two ResNet50 experiments with random weights and a broken one) is run per module and
shared by the tests; the feature cache makes every later run cheap.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from pyspark.ml import PipelineModel

from conftest import ROOT, make_dataset, png_bytes, xray_like
from xray import progress
from xray.cli import main
from xray.config import load_config
from xray.errors import ConfigError, DataError
from xray.predict import run_predict
from xray.reports import format_result
from xray.run import run_experiment
from xray.sweep import run_sweep

pytestmark = pytest.mark.slow  # every test shares a whole sweep

BINARY, MULTI, BROKEN = "ResNet50_binary_classification", "ResNet50_multiclass_classification", "ResNet50_broken_classification"
FOLDS = "ResNet50_folds_classification"  # fails after featurization, on a fitting thread
TUNED = "ResNet50_tuned_classification"  # the tuned head on the binary entry's cached features
SCRATCH = "SmallCNN_binary_scratch"  # trained from scratch in a Spark barrier task: 1 epoch, 32x32
SWEPT = (BINARY, MULTI, BROKEN, FOLDS, TUNED, SCRATCH)
# Timing and cache bookkeeping differ between runs; everything else must not.
VOLATILE = {"wall_seconds", "featurization_seconds", "images_featurized", "images_from_cache", "images_per_second",
            "images_per_second_source", "images_featurized_for_other_tasks", "phase_seconds"}


def _overrides(root, raw):
    return [
        "weights=random",
        f"dataset.raw_dir={raw}",
        f"dataset.resized_dir={root / 'resized'}",
        "dataset.image_size=64",
        f"results_dir={root / 'results'}",
        f"cache_dir={root / 'cache'}",
        "test_fraction=0.34",
        "batch_size=8",
        "classifier.maxIter=5",  # tiny separable data: LR would run all 200 iterations, one Spark job each
    ]


def _config():
    config = load_config(os.path.join(ROOT, "config.yaml"))
    config.defaults["cv_folds"] = 2  # a default, not an override, so the FOLDS entry's own value wins
    config.tasks["broken"] = ["Covid-19", "Missing"]
    config.entries[BROKEN] = {"model": "ResNet50", "task": "broken"}
    config.entries[FOLDS] = {"model": "ResNet50", "task": "binary", "cv_folds": 5}  # 4 training images a class
    config.entries[TUNED] = {"model": "ResNet50", "task": "binary", "classifier": {"grid": {"regParam": [0.01, 100.0]}}}
    config.entries[SCRATCH] = {"model": "SmallCNN", "task": "binary", "train": "scratch",
                               "training": {"epochs": 1, "image_size": 32, "batch_size": 4}}
    return config


@pytest.fixture(scope="module")
def swept(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    raw = make_dataset(root / "raw")
    config, overrides = _config(), _overrides(root, raw)
    logs: list[str] = []
    only_swept = dataclasses.replace(config, entries={name: config.entries[name] for name in SWEPT})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(progress, "PROGRESS_EVERY_S", 0.5)
        code = run_sweep(only_swept, "*", overrides, log=logs.append)
    return {"root": root, "raw": raw, "config": config, "overrides": overrides, "code": code, "logs": logs}


def _metrics(swept, name):
    return json.loads((swept["root"] / "results" / name / "metrics.json").read_text())


def test_sweep_writes_summary_and_survives_a_failure(swept):
    root, logs = swept["root"], swept["logs"]
    assert swept["code"] == 1  # two experiments failed
    rows = list(csv.DictReader(open(root / "results" / "summary.csv", encoding="utf-8")))
    assert [(r["experiment"], r["status"], r["method"]) for r in rows] == [
        (BINARY, "ok", "linear probe"), (MULTI, "ok", "linear probe"), (BROKEN, "failed", ""),
        (FOLDS, "failed", ""), (TUNED, "ok", "tuned probe"), (SCRATCH, "ok", "scratch")]
    assert rows[3]["error"].startswith("cv_folds=5 needs at least 5 training images per class")
    assert any(line.startswith(f"FAILED {FOLDS}: cv_folds=5") for line in logs)
    # fits and reports run on other threads: their lines name the experiment
    assert any(line.startswith(f"[{MULTI}] features: 18 images") for line in logs), logs
    for r in rows[:2] + rows[4:]:
        m = _metrics(swept, r["experiment"])
        assert float(r["accuracy"]) == pytest.approx(m["accuracy"])
        assert float(r["ci95_low"]) == pytest.approx(m["accuracy_ci95"][0])
        assert float(r["recall_Covid-19"]) == pytest.approx(m["per_class"]["Covid-19"]["recall"])
        assert r["method"] == "scratch" or float(r["images_per_second"]) > 0
        assert sorted(f for f in os.listdir(root / "results" / r["experiment"]) if not f.startswith(".")) == [
            "config.json", "confusion_matrix.png", "learning_curve.png", "metrics.json", "model", "roc.png"]
    assert rows[0]["recall_Pneumonia"] == "" and rows[1]["recall_Pneumonia"] != ""
    assert "lacks class folder(s) Missing" in rows[2]["error"]

    md = (root / "results" / "summary.md").read_text()
    assert f"| {BINARY} | ResNet50 | binary | linear probe |" in md and f"| {SCRATCH} | SmallCNN | binary | scratch |" in md
    assert f"| {BROKEN} | ResNet50 | broken |  | FAILED |" in md
    assert re.search(rf"## Failed\n\n- {BROKEN}: data folder .* lacks class folder\(s\) Missing", md)
    assert (root / "results" / "summary.png").stat().st_size > 10_000
    assert [f for f in os.listdir(root / "results") if f.startswith(".tmp")] == []
    assert any(line.startswith(f"FAILED {BROKEN}: ") for line in logs)
    # One featurization pass for the backbone: the binary experiment also featurizes the Pneumonia
    # images the multiclass one needs (and skips the broken task's missing folder).
    binary, multi = _metrics(swept, BINARY), _metrics(swept, MULTI)
    assert (binary["images_featurized"], binary["images_featurized_for_other_tasks"], binary["n_images"]) == (12, 6, 12)
    assert (multi["images_featurized"], multi["images_from_cache"], multi["n_images"]) == (0, 18, 18)
    assert any(line.startswith("featurizing 18 images with ResNet50 (0 of 12 already cached, 6 of them for other tasks)")
               for line in logs), logs
    # progress of the featurization job: images done of total, images/s, time left
    assert any(re.fullmatch(r"featurizing: \d+ of 18 images, (starting \(\d+ s\)|[\d.]+ images/s, about \d+ s left)", line)
               for line in logs), logs


def test_tuned_head_records_its_grid_and_choice_and_saves_the_usual_model(swept):
    m = _metrics(swept, TUNED)
    record = m["tuning"]
    assert m["method"] == "tuned probe" and m["images_featurized"] == 0  # the binary entry's cached features
    assert record["grid"] == {"regParam": [0.01, 100.0]} and record["folds"] == 2 and record["fits"] == 5
    assert [c["params"]["regParam"] for c in record["candidates"]] == [0.01, 100.0]
    assert all(c["mean"] > 0 and c["std"] >= 0 for c in record["candidates"])
    assert record["chosen"] == min(record["candidates"], key=lambda c: c["mean"])["params"]
    assert m["config"]["classifier"]["grid"] == {"regParam": [0.01, 100.0]} and record["seconds"] > 0
    model = PipelineModel.load(str(swept["root"] / "results" / TUNED / "model"))
    assert [type(s).__name__ for s in model.stages] == [
        "StringIndexerModel", "KerasImageFeaturizer", "LogisticRegressionModel", "IndexToString"]
    assert model.stages[2].getRegParam() == record["chosen"]["regParam"]


def test_network_trained_from_scratch_reports_like_a_probe(swept):
    m, probe = _metrics(swept, SCRATCH), _metrics(swept, BINARY)
    assert m["method"] == "scratch" and not m["transfer_learning"] and m["weights"] == "none"
    assert set(probe) - set(m) <= {"cross_validation"}  # metrics.json has the probe's keys
    assert (m["n_train"], m["n_test"]) == (probe["n_train"], probe["n_test"])  # the same split
    t = m["training"]
    assert t["n_fit"] + t["n_validation"] == m["n_train"] and t["n_validation"] >= 2  # one a class at least
    assert [e["epoch"] for e in t["epochs"]] == [1] and t["chosen_epoch"] == 1 and t["network"]["image_size"] == 32
    assert all(k in t["epochs"][0] for k in ("loss", "accuracy", "val_loss", "val_accuracy"))
    assert t["images_per_second"] > 0 and t["cached_images"] == {"train": t["n_fit"], "validation": t["n_validation"]}
    assert set(t["class_weight"]) == {"Covid-19", "No_findings"}
    assert sum(map(sum, m["confusion_matrix"]["rows_true_columns_predicted"])) == m["n_test"]
    lines = format_result(m, str(swept["root"] / "results")).splitlines()
    assert "[trained from scratch: NOT transfer learning]" in lines[0]
    assert any(line.startswith(f"  training (scratch): {t['n_fit']} images, 1 epoch(s) in 1 stage(s), chosen epoch 1")
               for line in lines), lines


def test_cross_validation_on_training_folds(swept):
    m = _metrics(swept, MULTI)
    cv = m["cross_validation"]
    assert cv["folds"] == 2 and len(cv["per_fold"]) == 2
    assert sum(f["n_validation"] for f in cv["per_fold"]) == m["n_train"]  # folds partition the training split
    assert all(f["n_train"] + f["n_validation"] == m["n_train"] for f in cv["per_fold"])
    accs = [f["accuracy"] for f in cv["per_fold"]]
    assert cv["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert cv["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert set(cv["recall"]) == {"Covid-19", "No_findings", "Pneumonia"}


def test_rerun_reproduces_metrics_exactly(swept):
    exp = swept["config"].experiment(BINARY, swept["overrides"])
    first = _metrics(swept, BINARY)
    again = json.loads(json.dumps(run_experiment(exp, log=lambda *_: None), default=str))
    assert again["images_from_cache"] == again["n_images"]  # features came from the cache
    assert {k: v for k, v in again.items() if k not in VOLATILE} == {k: v for k, v in first.items() if k not in VOLATILE}


def test_sweep_rejects_unknown_pattern_and_bad_set(swept):
    with pytest.raises(ConfigError, match="no experiment matches 'Nope\\*'"):
        run_sweep(swept["config"], "Nope*", swept["overrides"], log=lambda *_: None)
    with pytest.raises(ConfigError, match="unknown key 'wieghts'"):
        run_sweep(swept["config"], "ResNet50_*", ["wieghts=random"], log=lambda *_: None)


def test_predict_folder_matches_training_preprocessing(spark, swept, tmp_path, capsys):
    new = tmp_path / "new"
    shutil.copytree(swept["raw"], new)
    (new / "Covid-19" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (new / "Covid-19" / ".hidden.png").write_bytes(png_bytes(xray_like(0, 1)))
    (new / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.csv"
    code = run_predict(swept["config"], MULTI, str(new), str(out), swept["overrides"], log=print)
    printed = capsys.readouterr().out
    assert code == 1  # the broken file could not be classified

    lines = [line for line in printed.splitlines() if line.startswith(str(new))]
    assert len(lines) == 19 and not any("hidden" in line or "notes" in line for line in lines)
    assert re.search(r"broken\.png\tERROR\t\S", printed)
    ok = [line.split("\t") for line in lines if "\tERROR\t" not in line]
    assert all(len(p) == 5 and p[1] in ("Covid-19", "No_findings", "Pneumonia") for p in ok)
    assert "accuracy against the class folder names" in printed and "the run reported test accuracy" in printed

    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == 19
    assert [r for r in rows if r["error"]][0]["path"].endswith("broken.png")
    good = [r for r in rows if not r["error"]]
    assert all(abs(sum(float(r[f"p_{c}"]) for c in ("Covid-19", "No_findings", "Pneumonia")) - 1) < 1e-5 for r in good)
    assert all(r["folder_class"] == os.path.basename(os.path.dirname(r["path"])) for r in good)

    # The raw files, normalised by predict, get the probabilities the model gives the resized training files.
    model = PipelineModel.load(str(swept["root"] / "results" / MULTI / "model"))
    resized = spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", "*.png").load(
        str(swept["root"] / "resized"))
    expected = {
        tuple(r.path.rsplit("/", 2)[-2:]): r.probability.toArray()
        for r in model.transform(resized).select("path", "probability").collect()
    }
    for r in good:
        cls, name = r["path"].rsplit("/", 2)[-2:]
        key = (cls, os.path.splitext(name)[0] + ".png")
        assert np.allclose([float(r[f"p_{c}"]) for c in ("Covid-19", "No_findings", "Pneumonia")], expected[key], atol=1e-5)


def test_predict_one_file_with_a_model_folder(swept, capsys):
    model_dir = swept["root"] / "results" / BINARY / "model"
    image = os.path.join(swept["raw"], "No_findings", "img3.png")
    assert run_predict(swept["config"], str(model_dir), image, None, swept["overrides"], log=print) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(image)]
    assert len(lines) == 1 and re.fullmatch(rf"{re.escape(image)}\t\S+\tCovid-19=[\d.]+\tNo_findings=[\d.]+", lines[0])
    rows = list(csv.DictReader(open(model_dir.parent / "predictions.csv", encoding="utf-8")))
    assert [r["path"] for r in rows] == [image] and rows[0]["folder_class"] == "No_findings"


def test_predict_with_a_trained_network_matches_its_saved_model(spark, swept, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert run_predict(swept["config"], SCRATCH, str(swept["raw"]), str(out), swept["overrides"], log=print) == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == 18 and not any(r["error"] for r in rows)  # the Pneumonia folder too: any image
    model = PipelineModel.load(str(swept["root"] / "results" / SCRATCH / "model"))
    assert [type(s).__name__ for s in model.stages] == ["StringIndexerModel", "KerasImageClassifier", "IndexToString"]
    resized = spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", "*.png").load(
        str(swept["root"] / "resized"))
    expected = {tuple(r.path.rsplit("/", 2)[-2:]): (r.predicted_label, r.probability.toArray())
                for r in model.transform(resized).select("path", "predicted_label", "probability").collect()}
    for r in rows:
        cls, name = r["path"].rsplit("/", 2)[-2:]
        label, probability = expected[(cls, os.path.splitext(name)[0] + ".png")]
        assert r["predicted_class"] == label
        assert np.allclose([float(r["p_Covid-19"]), float(r["p_No_findings"])], probability, atol=1e-5)


def test_predict_errors_are_one_line(swept, tmp_path, capsys):
    config, overrides = swept["config"], swept["overrides"]
    with pytest.raises(ConfigError, match="neither an experiment"):
        run_predict(config, "NoSuchThing", str(tmp_path), None, overrides)
    with pytest.raises(DataError, match="no saved model for VGG16_binary_classification .* run ./wrapper.sh run VGG16"):
        run_predict(config, "VGG16_binary_classification", str(tmp_path), None, overrides)
    with pytest.raises(DataError, match="not a saved model folder"):
        run_predict(config, str(tmp_path), str(tmp_path), None, overrides)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        run_predict(config, BINARY, str(tmp_path / "empty"), None, overrides)

    results = f"results_dir={swept['root'] / 'results'}"
    code = main(["--config", os.path.join(ROOT, "config.yaml"), "predict", BINARY, str(tmp_path / "missing"), "--set", results])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "missing" in err
