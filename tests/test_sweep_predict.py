"""Sweep, cross-validation, reproducibility, prediction and explanation, end to end on tiny
generated images.

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
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pyspark.ml import PipelineModel

from conftest import ROOT, make_dataset, png_bytes, png_files, xray_like
from xray import explain, progress, reports, tracking
from xray.cli import main
from xray.config import load_config
from xray.errors import ConfigError, DataError
from xray.explain import run_explain
from xray.predict import run_predict
from xray.reports import format_result
from xray.run import run_experiment
from xray.sweep import run_sweep

pytestmark = pytest.mark.slow  # every test shares a whole sweep

BINARY, MULTI, BROKEN = "ResNet50_binary_classification", "ResNet50_multiclass_classification", "ResNet50_broken_classification"
FOLDS = "ResNet50_folds_classification"  # too few images a class for its folds: fails before Spark
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
    logged: dict[str, tuple] = {}  # what MLflow tracking would log, seen when it is called

    def log_experiment(exp, result, model, log):
        files = [getattr(s, "getModelFile", lambda: None)() for s in model.stages]
        logged[exp.name] = (os.path.isfile(os.path.join(exp.results_dir, "metrics.json")), result["method"],
                            [type(s).__name__ for s in model.stages], all(f is None or os.path.isfile(f) for f in files))

    only_swept = dataclasses.replace(config, entries={name: config.entries[name] for name in SWEPT})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(progress, "PROGRESS_EVERY_S", 0.5)
        mp.setattr(tracking, "log_experiment", log_experiment)
        code = run_sweep(only_swept, "*", overrides, log=logs.append)
    return {"root": root, "raw": raw, "config": config, "overrides": overrides, "code": code, "logs": logs,
            "logged": logged}


def _metrics(swept, name):
    return json.loads((swept["root"] / "results" / name / "metrics.json").read_text())


def _split_csv(swept, name):
    return list(csv.DictReader(open(swept["root"] / "results" / name / "split.csv", encoding="utf-8")))


def test_sweep_writes_summary_and_survives_a_failure(swept):
    root, logs = swept["root"], swept["logs"]
    assert swept["code"] == 1  # two experiments failed
    rows = list(csv.DictReader(open(root / "results" / "summary.csv", encoding="utf-8")))
    assert [(r["experiment"], r["status"], r["method"]) for r in rows] == [
        (BINARY, "ok", "linear probe"), (MULTI, "ok", "linear probe"), (BROKEN, "failed", ""),
        (FOLDS, "failed", ""), (TUNED, "ok", "tuned probe"), (SCRATCH, "ok", "scratch")]
    assert rows[3]["error"].startswith("class Covid-19 needs at least 7 images")  # 2 test and 5 training images
    assert any(line.startswith(f"FAILED {FOLDS}: class Covid-19 needs at least 7 images") for line in logs)
    # fits and reports run on other threads: their lines name the experiment
    assert any(line.startswith(f"[{MULTI}] features: 18 images") for line in logs), logs
    for r in rows[:2] + rows[4:]:
        m = _metrics(swept, r["experiment"])
        assert float(r["accuracy"]) == pytest.approx(m["accuracy"])
        assert float(r["ci95_low"]) == pytest.approx(m["accuracy_ci95"][0])
        assert float(r["recall_Covid-19"]) == pytest.approx(m["per_class"]["Covid-19"]["recall"])
        files = sorted(f for f in os.listdir(root / "results" / r["experiment"]) if not f.startswith("."))
        if r["method"] == "scratch":  # no features: no near-duplicates, no class activation maps
            assert files == ["config.json", "confusion_matrix.png", "learning_curve.png", "metrics.json", "model",
                             "roc.png", "split.csv"]
            assert r["near_duplicates"] == "" and r["border_share_Covid-19"] == ""
            continue
        assert float(r["images_per_second"]) > 0
        assert files == ["cam_gallery.png", "config.json", "confusion_matrix.png", "learning_curve.png", "metrics.json",
                         "model", "near_duplicates.csv", "roc.png", "split.csv"]
        shares = m["explanations"]["per_class"]
        assert [float(r[f"border_share_{c}"]) for c in shares] == pytest.approx([v["border_share"] for v in shares.values()])
    assert rows[0]["recall_Pneumonia"] == "" and rows[1]["recall_Pneumonia"] != ""
    assert "lacks class folder(s) Missing" in rows[2]["error"]

    md = (root / "results" / "summary.md").read_text()
    assert f"| {BINARY} | ResNet50 | binary | linear probe |" in md and f"| {SCRATCH} | SmallCNN | binary | scratch |" in md
    assert re.search(rf"\| {SCRATCH} \|[^\n]* \| n/a \|", md)  # near-dups: a trained network has no features
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
    # The probe's grouped split, its training side cut into fitting and validation rows (split.csv).
    split = {r["path"]: r["side"] for r in _split_csv(swept, SCRATCH)}
    assert Counter(split.values()) == {"train": t["n_fit"], "validation": t["n_validation"], "test": m["n_test"]}
    assert {p: "train" if s == "validation" else s for p, s in split.items()} == {
        r["path"]: r["side"] for r in _split_csv(swept, BINARY)}
    assert m["split"]["grouped"] and m["split"]["groups"] == len(split) and m["near_duplicates"]["pairs"] is None
    assert "skipped" in m["explanations"] and m["engine"]["engine"] == "keras"
    # MLflow tracking gets the run after its folder is in place, with the model's .keras file still readable.
    assert swept["logged"][SCRATCH] == (True, "scratch", ["StringIndexerModel", "KerasImageClassifier", "IndexToString"],
                                        True)
    assert swept["logged"][TUNED][:2] == (True, "tuned probe")
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


def _assert_same_metrics(again, first, *also_volatile):
    exact = VOLATILE | {"explanations", *also_volatile}
    assert {k: v for k, v in again.items() if k not in exact} == {k: v for k, v in first.items() if k not in exact}
    # The explanations' own seconds vary; their statistics are the same.
    assert {k: v for k, v in again["explanations"].items() if k != "seconds"} == {
        k: v for k, v in first["explanations"].items() if k != "seconds"}


def test_rerun_reproduces_metrics_exactly(swept):
    """A second run reads every feature from the cache and reproduces the metrics and split.csv
    exactly (the multiclass experiment here; the binary one's rerun is the next test's)."""
    exp = swept["config"].experiment(MULTI, swept["overrides"])
    first, table = _metrics(swept, MULTI), _split_csv(swept, MULTI)
    again = json.loads(json.dumps(run_experiment(exp, log=lambda *_: None), default=str))
    assert again["images_from_cache"] == again["n_images"] == 18 and again["images_featurized"] == 0
    _assert_same_metrics(again, first)
    assert _split_csv(swept, MULTI) == table


def _files(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def test_binary_uses_two_classes_and_binomial_and_its_results_folder_is_one_runs_whole(swept, tmp_path, monkeypatch):
    """The binary experiment's head is binomial over its two classes. Its results folder is one
    run's whole, checked on a copy of it (features from the sweep's cache: these reruns fit and
    write only): a rerun that dies right after saving its model leaves the folder as it was
    (model, metrics.json and config.json of one run); a rerun that succeeds replaces all of it,
    with the first run's metrics exactly."""
    m = _metrics(swept, BINARY)
    assert m["classes"] == ["Covid-19", "No_findings"]
    assert m["roc"]["kind"] == "binary" and m["roc"]["auc"] is not None
    assert m["n_train"] + m["n_test"] == 12
    model = PipelineModel.load(str(swept["root"] / "results" / BINARY / "model"))
    assert [type(s).__name__ for s in model.stages] == [
        "StringIndexerModel", "KerasImageFeaturizer", "LogisticRegressionModel", "IndexToString"]
    assert model.stages[2].numClasses == 2
    assert np.isfinite(m["lr_objective_history"]).all()

    results = tmp_path / "results"
    folder = results / BINARY
    # the folder as the sweep's run left it (later tests here add predictions and explanations)
    shutil.copytree(swept["root"] / "results" / BINARY, folder,
                    ignore=shutil.ignore_patterns("predictions.csv", "explanations"))
    first = _files(folder)
    assert {"metrics.json", "config.json"} <= set(first) and any(p.startswith("model/") for p in first)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops here: its model is saved, nothing else yet

    here = [*swept["overrides"], f"results_dir={results}"]
    monkeypatch.setattr(reports, "write_experiment_reports", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(swept["config"].experiment(BINARY, [*here, "classifier.regParam=0.5", "cv_folds=0"]), log=lambda *_: None)
    assert _files(folder) == first
    assert os.listdir(results) == [BINARY]  # no staging or old folder left

    monkeypatch.undo()
    (folder / "predictions.csv").write_text("of the first model\n")
    again = json.loads(json.dumps(run_experiment(swept["config"].experiment(BINARY, here), log=lambda *_: None),
                                  default=str))
    second = _files(folder)
    assert sorted({p.split(os.sep)[0] for p in second}) == sorted({p.split(os.sep)[0] for p in first})  # no stale file
    for name, key in (("metrics.json", "config"), ("config.json", "settings")):  # the new run's, not the copied ones
        assert json.loads(first[name])[key]["results_dir"] == str(swept["root"] / "results")
        assert json.loads(second[name])[key]["results_dir"] == str(results) == again["config"]["results_dir"]
    assert again["images_from_cache"] == again["n_images"] == 12 and again["images_featurized"] == 0
    _assert_same_metrics(again, m, "config")
    assert {**again["config"], "results_dir": ""} == {**m["config"], "results_dir": ""}


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
    resized = png_files(spark, str(swept["root"] / "resized"))
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
    # The Pneumonia folder: any image, also of a class the network does not know (6 images: a
    # trained network's predict is the same code for every folder).
    assert run_predict(swept["config"], SCRATCH, os.path.join(swept["raw"], "Pneumonia"), str(out), swept["overrides"],
                       log=print) == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == 6 and not any(r["error"] for r in rows)
    model = PipelineModel.load(str(swept["root"] / "results" / SCRATCH / "model"))
    assert [type(s).__name__ for s in model.stages] == ["StringIndexerModel", "KerasImageClassifier", "IndexToString"]
    resized = png_files(spark, str(swept["root"] / "resized" / "Pneumonia"))
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


def test_predict_any_name_in_folders_with_glob_characters(swept, tmp_path, capsys):
    """'_'-named files are predicted (Spark's file sources would skip them), an empty file says
    so, and a model and images in folders whose names Spark would read as globs load."""
    models = tmp_path / "models [1] {a,b} *?\\"
    shutil.copytree(swept["root"] / "results" / BINARY, models / BINARY)
    images = tmp_path / "new [2]" / "No_findings"
    images.mkdir(parents=True)
    for name in ("_lead.png", "x[1].png", ".hidden.png"):
        (images / name).write_bytes(open(os.path.join(swept["raw"], "No_findings", "img1.png"), "rb").read())
    (images / "empty.png").write_bytes(b"")
    out = tmp_path / "out [3].csv"
    code = run_predict(swept["config"], str(models / BINARY), str(images.parent), str(out), swept["overrides"], log=print)
    assert code == 1
    rows = {r["path"]: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    assert sorted(rows) == sorted(str(images / n) for n in ("_lead.png", "x[1].png", "empty.png"))
    assert rows[str(images / "empty.png")]["error"] == "empty file (0 bytes)"
    for name in ("_lead.png", "x[1].png"):
        assert rows[str(images / name)]["predicted_class"] in ("Covid-19", "No_findings") and not rows[str(images / name)]["error"]
    assert "empty file (0 bytes)" in capsys.readouterr().out


def test_explain_writes_maps_overlays_and_a_table(spark, swept, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(explain, "MIN_CHUNK", 4)  # 20 files: four chunks of 5, written while the next is mapped
    new = tmp_path / "new"
    shutil.copytree(swept["raw"], new)  # Covid-19/img1.jpg and Covid-19/img0.png ... in every class folder
    (new / "Covid-19" / "img0.jpg").write_bytes((new / "Covid-19" / "img1.jpg").read_bytes())  # img0: png and jpg
    (new / "No_findings" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "maps"
    code = run_explain(swept["config"], MULTI, str(new), str(out), None, swept["overrides"], log=print)
    printed = capsys.readouterr().out
    assert code == 1 and re.search(r"broken\.png\tERROR\t\S", printed)
    assert [x for x in printed.splitlines() if x.startswith("explained ")] == [f"explained {n} of 20 images" for n in (5, 10, 15, 20)]

    rows = list(csv.DictReader(open(out / "explanations.csv", encoding="utf-8")))
    assert len(rows) == 20 and [r["path"] for r in rows if r["error"]] == [str(new / "No_findings" / "broken.png")]
    good = [r for r in rows if not r["error"]]
    names = {r["cam_npy"] for r in good}
    assert len(names) == 19  # same stems in one folder and across folders: no output written twice
    assert {"Covid-19/img0_png.cam.npy", "Covid-19/img0_jpg.cam.npy", "No_findings/img0.cam.npy"} <= names
    for r in good:
        cam = np.load(out / r["cam_npy"])
        assert cam.shape == (64, 64) and cam.dtype == np.float32  # the normalised image's height x width
        with Image.open(out / r["cam_png"]) as im:
            im.verify()
        assert r["map_class"] == r["predicted_class"] and 0 <= float(r["border_share"]) <= 1
        # The peak in the table is where the saved map peaks (its cell's centre).
        row, col = np.unravel_index(cam.argmax(), cam.shape)
        assert abs((col + 0.5) / 64 - float(r["peak_x"])) <= 1 / 7 and abs((row + 0.5) / 64 - float(r["peak_y"])) <= 1 / 7
    line = next(x for x in printed.splitlines() if x.startswith(good[0]["path"] + "\t"))
    assert f"map of {good[0]['map_class']}: peak x=" in line and line.endswith(good[0]["cam_png"])


def test_explain_another_class_into_the_default_folder_and_refusals(spark, swept, tmp_path, capsys):
    model_dir = swept["root"] / "results" / BINARY / "model"
    image = os.path.join(swept["raw"], "No_findings", "img3.png")
    lines = []
    assert run_explain(swept["config"], str(model_dir), image, None, "Covid-19", swept["overrides"], log=lines.append) == 0
    default = model_dir.parent / "explanations"
    assert any(str(default) in line for line in lines)  # the output folder is stated
    rows = list(csv.DictReader(open(default / "explanations.csv", encoding="utf-8")))
    assert [(r["path"], r["map_class"], r["cam_npy"]) for r in rows] == [(image, "Covid-19", "img3.cam.npy")]
    run_explain(swept["config"], str(model_dir), image, str(tmp_path / "other"), "No_findings", swept["overrides"],
                log=lines.append)
    by_class = {"Covid-19": np.load(default / "img3.cam.npy"), "No_findings": np.load(tmp_path / "other" / "img3.cam.npy")}
    np.testing.assert_allclose(by_class["Covid-19"], -by_class["No_findings"], atol=1e-5)  # binomial: [-m, m]
    with pytest.raises(ConfigError, match="--class 'Lungs' is not a class of the model: expected one of Covid-19, No_findings"):
        run_explain(swept["config"], str(model_dir), image, None, "Lungs", swept["overrides"])
    with pytest.raises(DataError, match=r"holds a trained network .* linear probes only \(train: probe\)"):
        run_explain(swept["config"], SCRATCH, image, str(tmp_path / "scratch"), None, swept["overrides"])
    assert not (tmp_path / "scratch").exists()

    model = PipelineModel.load(str(model_dir))
    featurizer = model.stages[1]
    PipelineModel([model.stages[0], featurizer.copy({featurizer.pooling: "max"}), *model.stages[2:]]).save(
        str(tmp_path / "max" / "model"))
    code = main(["--config", os.path.join(ROOT, "config.yaml"), "explain", str(tmp_path / "max"), image,
                 *(arg for o in swept["overrides"] for arg in ("--set", o))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "need pooling=avg" in err and "refit the model with pooling=avg" in err
