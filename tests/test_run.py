"""One experiment run end to end through the Python API (xray.run), on generated images."""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter

import pytest
from PIL import Image
from pyspark.ml import PipelineModel
from pyspark.sql import functions as F

from conftest import ROOT, make_dataset, png_files, tiny_overrides, xray_like
from xray import resize, run
from xray.config import load_config
from xray.data import list_dataset
from xray.errors import DataError
from xray.run import Phases, _cross_validation, run_experiment
from xray.split import assign_split, with_split


def _overrides(tmp_path, raw, *extra):
    # tiny separable data: LR would run ~30-40 iterations, one Spark job each
    return tiny_overrides(tmp_path, raw, "classifier.maxIter=5", *extra)


@pytest.fixture(scope="module")
def config():
    return load_config(os.path.join(ROOT, "config.yaml"))


@pytest.mark.slow
def test_multiclass_experiment_end_to_end(spark, config, tmp_path, dataset):
    exp = config.experiment("ResNet50_multiclass_classification", _overrides(tmp_path, dataset))
    logs = []
    run_experiment(exp, log=logs.append)

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
    assert list(phases) == ["checks", "spark_session", "data_checks", "featurize", "waiting", "split",
                            "near_duplicates", "fit", "evaluate", "save_model", "reports",
                            "explanations"]
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
        png_files(spark, str(tmp_path / "resized"))
        .withColumn("label", F.regexp_extract("path", r"/([^/]+)/[^/]+$", 1))
    )
    test_rows = with_split(images, exp["seed"], exp["test_fraction"], group_pattern=exp.group_pattern)
    test_rows = test_rows.filter("is_test").drop("label")
    rows = model.transform(test_rows).select("path", "predicted_label").collect()
    assert len(rows) == 6
    correct = sum(r.path.rsplit("/", 2)[-2] == r.predicted_label for r in rows)
    assert correct / len(rows) == pytest.approx(saved["accuracy"])

    # split.csv: every image once, with its side; no file name here matches the NIH pattern: a group each
    table = list(csv.DictReader(open(tmp_path / "results" / exp.name / "split.csv", encoding="utf-8")))
    assert len(table) == 18 and sum(r["side"] == "test" for r in table) == 6
    assert all(r["group"] == f"{r['class']}/{r['path'].rsplit('/', 1)[-1]}" for r in table)
    assert saved["split"]["groups"] == 18 and saved["split"]["grouped"] is True
    assert saved["near_duplicates"]["threshold"] == 0.995 and saved["reports"]["split"] == "split.csv"

    # A second run from the feature cache (the same metrics, split.csv) is the shared sweep's rerun of
    # this experiment in tests/test_sweep_predict.py.


# The binary experiment (two classes, binomial head) and its results folder being one run's whole
# are checked on the shared sweep's run of it in tests/test_sweep_predict.py.


def _patients_and_a_planted_copy(raw: str, pattern: str) -> tuple[str, str]:
    """No_findings as NIH names (patient 00000100 to 00000103, two images each, and a pixel-identical
    third image of patient 00000100); a copy of a training image planted as another patient, named
    so that it lands in the test split. Returns (original, copy) file names."""
    folder = os.path.join(raw, "No_findings")
    for i, name in enumerate(sorted(os.listdir(folder))):
        os.rename(os.path.join(folder, name), os.path.join(folder, f"{100 + i // 2:08d}_{i % 2:03d}.png"))
    shutil.copy(os.path.join(folder, "00000100_000.png"), os.path.join(folder, "00000100_002.png"))
    keys = [(f"{cls}/{os.path.splitext(n)[0]}.png", cls) for cls in os.listdir(raw) for n in os.listdir(os.path.join(raw, cls))]
    for k in range(900, 1000):  # the pixel-identical copy of a training image that lands in the test split
        copy = f"{k:08d}_000.png"
        rows = {r.path: r.is_test for r in assign_split([*keys, (f"No_findings/{copy}", "No_findings")], 42, 0.34, 0, pattern)}
        train = sorted(p for p, t in rows.items() if not t and p.startswith("No_findings/") and p != f"No_findings/{copy}")
        if rows[f"No_findings/{copy}"] and train:
            original = train[0].rsplit("/", 1)[1]
            shutil.copy(os.path.join(folder, original), os.path.join(folder, copy))
            return original, copy
    raise AssertionError("no name puts the copy into the test split")


@pytest.mark.slow
def test_patient_groups_and_a_planted_near_duplicate_end_to_end(spark, config, tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=8)
    exp = config.experiment("ResNet50_binary_classification", _overrides(tmp_path, raw))
    original, copy = _patients_and_a_planted_copy(raw, exp.group_pattern)
    logs: list[str] = []
    m = run_experiment(exp, log=logs.append)
    table = list(csv.DictReader(open(tmp_path / "results" / exp.name / "split.csv", encoding="utf-8")))
    assert len(table) == 18 == m["n_train"] + m["n_test"]
    side = {}
    for r in table:  # no group on both sides
        assert side.setdefault(r["group"], r["side"]) == r["side"]
    names = {r["path"].rsplit("/", 1)[1]: r for r in table}
    assert names["00000100_000.png"]["group"] == names["00000100_002.png"]["group"] == "00000100"
    assert names["00000100_000.png"]["side"] == names["00000100_002.png"]["side"]  # identical follow-up: one side
    assert (names[original]["side"], names[copy]["side"]) == ("train", "test")
    assert m["split"]["groups"] == 8 + 5 and m["split"]["per_class"]["No_findings"]["images"] == 10
    # class shares near test_fraction 0.34: exact for Covid-19 (one image a group), within one image of
    # round(10 x 0.34) = 3 for No_findings (groups of 1 to 3 images); metrics.json says the same
    tests = Counter(r["class"] for r in table if r["side"] == "test")
    assert tests["Covid-19"] == 3 and abs(tests["No_findings"] - 3) <= 1
    assert {c: v["test_images"] for c, v in m["split"]["per_class"].items()} == dict(tests)
    # split.csv is the split of its own (path, class) pairs: what a second run would compute from them
    again = assign_split([(r["path"], r["class"]) for r in table], exp["seed"], 0.34, 0, exp.group_pattern)
    assert [(r.path, r.label, r.group, r.side, str(r.fold)) for r in again] == [tuple(r.values()) for r in table]
    # the planted copy is listed, with the right roles; the identical follow-up image is not (same side)
    pairs = list(csv.DictReader(open(tmp_path / "results" / exp.name / "near_duplicates.csv", encoding="utf-8")))
    listed = {(p["train_path"].rsplit("/", 1)[1], p["test_path"].rsplit("/", 1)[1]): float(p["similarity"]) for p in pairs}
    assert listed[(original, copy)] == pytest.approx(1.0, abs=1e-4)
    assert not any("00000100_002.png" in pair and "00000100_000.png" in pair for pair in listed)
    assert m["near_duplicates"]["pairs"] == len(pairs) >= 1
    assert any(line.startswith("warning: ") and "near-duplicate" in line for line in logs)
    assert any(line.startswith("split: 13 groups (groups by split.group_pattern") for line in logs)


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


def test_group_folds_that_train_without_a_class_stop_the_run(config):
    exp = config.experiment("ResNet50_binary_classification", ["cv_folds=2"])
    keys = [(f"file:/d/Covid-19/00000001_{i:03d}.png", "Covid-19") for i in range(6)]  # one patient
    keys += [(f"file:/d/No_findings/n{i}.png", "No_findings") for i in range(12)]
    rows = assign_split(keys, 42, 0.2, 2, exp.group_pattern)
    assert {r.is_test for r in rows if r.label == "Covid-19"} == {False}  # too large for the test side
    with pytest.raises(DataError, match=r"^cv_folds=2: fold [01] would be validated by a model trained without "
                                        r"Covid-19: .*: lower cv_folds$"):
        _cross_validation(exp, None, rows, ["Covid-19", "No_findings"], print, Phases())


@pytest.mark.slow
def test_odd_names_glob_paths_and_damage_between_runs(spark, config, tmp_path):
    """Folders with glob characters, a file whose name starts with '_' (Spark's file sources
    skip such names), then a damaged resized image and a damaged feature-cache part between
    runs: every image reaches the model, and the rerun repairs both and gives the same metrics."""
    root = tmp_path / "runs [1] {a,b} *?\\"
    raw = make_dataset(root / "raw", classes=("Covid-19", "No_findings"), per_class=4)
    xray_like(1, 77).save(root / "raw" / "No_findings" / "_lead.png")
    exp = config.experiment("ResNet50_binary_classification", _overrides(root, raw, "handleInvalid=skip"))
    m = run_experiment(exp, log=lambda line: None)
    assert m["n_images"] == 9 and m["images_skipped"] == 0 and m["n_train"] + m["n_test"] == 9

    resized = root / "resized" / "No_findings" / "img1.png"
    resized.write_bytes(resized.read_bytes()[:200])
    cache = root / "cache"
    (folder,) = [f for f in cache.iterdir() if f.name != "quarantine"]
    (part,) = [p for p in folder.iterdir() if p.name.startswith("part-")]
    data_file = max((f for f in part.iterdir() if f.suffix == ".parquet"), key=lambda f: f.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[:100])

    logs: list[str] = []
    m2 = run_experiment(exp, log=logs.append)
    assert any(line.startswith("resize: 1 of 9 images to write") for line in logs)
    assert any(line.startswith(f"feature cache: part {part} is damaged") for line in logs)
    assert (cache / "quarantine" / folder.name / part.name).is_dir()
    assert m2["images_skipped"] == 0 and m2["invalid_files"] == {} and m2["images_featurized"] == 9
    for key in ("accuracy", "per_class", "confusion_matrix", "roc", "n_train", "n_test", "n_images"):
        assert m2[key] == m[key]


def test_a_resized_output_the_featurizer_cannot_decode_is_named_and_made_again(spark, config, tmp_path, monkeypatch):
    """Changed in place with size and mtime kept, so the resize step sees nothing: the worker's
    error names it; the run marks it in the manifest (one line says so) and the next resize
    makes it again. The featurizer's failure is simulated (its message as workers raise it)."""
    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=2)
    exp = config.experiment("ResNet50_binary_classification", _overrides(tmp_path, raw))
    resize.resize_dataset(spark, raw, exp.resized_dir, size=64, mode="L", max_pixels=10_000, log=lambda line: None)
    bad = os.path.join(exp.resized_dir, "No_findings", "img1.png")
    worker = f"imagefeaturizer.images.InvalidImageError: file:{bad}: not an image (unrecognised format)"

    def fails(*args, message=f"Python worker failed\n{worker}\n", **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(run, "featurize_cached", fails)
    with pytest.raises(DataError) as caught:
        run._featurize(spark, None, None, exp, log=lambda line: None, keep=None)
    assert str(caught.value) == (f"invalid image: file:{bad}: not an image (unrecognised format): it is a resized "
                                 "output, not the raw file; the next run makes it again from its raw file: run again")
    assert resize.resize_todo(list_dataset(raw, exp.classes), exp.resized_dir, 64, "L", 10_000) == [
        os.path.join("No_findings", "img1.png")]
    # Anything else stays as it is.
    monkeypatch.setattr(run, "featurize_cached", lambda *a, **k: fails(message="other failure"))
    with pytest.raises(RuntimeError, match="other failure"):
        run._featurize(spark, None, None, exp, log=lambda line: None, keep=None)
