"""The benchmarks end to end on a few tiny generated images (slow tier): one real run per script,
with the fewest images, runs and sides its output needs. Their figures are checked for what they
measured (images counted, the printed tables matching the JSON), not for any speed or device.
What they compute from repeated runs (alternation, best, min / median / max, ratios) is checked on
made-up measurements in tests/test_benchmark_figures.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, xray_like
from imagefeaturizer import backbones

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import procinfo  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "featurize.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    # Its own process: the benchmark stops and starts SparkContexts, which the shared fixture must not see.
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=900)


def _table_row(stdout: str, header_start: str) -> str:
    """The first row of the printed table whose header starts with ``header_start`` (words; the
    columns' padding ignored)."""
    lines = stdout.splitlines()
    return next(lines[i + 1] for i, line in enumerate(lines) if " ".join(line.split()).startswith(header_start))


@pytest.mark.slow
def test_benchmark_measures_keras_and_spark_on_the_same_images(tmp_path):
    data = tmp_path / "imgs"
    (data / "b").mkdir(parents=True)
    (data / "a").mkdir()
    for i in range(5):
        xray_like(i % 3, seed=i, size=(60, 50)).save(data / ("a" if i % 2 else "b") / f"im{i}.png")
    (data / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "out" / "bench.json"

    proc = _run("--data", str(data), "--models", "ResNet50", "--images", "4", "--batch-size", "3",
                "--master", "local[1]", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"]["images"] == 4 and f"wrote {out}" in proc.stdout
    (row,) = report["results"]
    keras, spark = row["keras"], row["spark"]
    # 4 of the 5 images (not the text file); the plain Keras process counts the feature rows it got.
    assert row["model"] == "ResNet50" and keras["images"] == 4 and spark["images"] == 4
    assert spark["master"] == "local[1]" and spark["partitions"] >= 1  # what the SparkContext reported
    # One run of each side (the best of --repeat runs: test_benchmark_figures.py), and the ratios of its figures.
    assert row["all_runs_images_per_s"] == {"keras": [keras["images_per_s"]], "spark": [spark["images_per_s"]]}
    assert row["ratio"] == pytest.approx(spark["images_per_s"] / keras["images_per_s"])
    assert row["decode_resize"]["input_size"] == backbones.get_backbone("ResNet50").input_size
    # The printed tables show the JSON's figures.
    speed = _table_row(proc.stdout, "backbone")
    assert speed.startswith("ResNet50") and keras["device"] in speed
    assert f"{row['ratio']:.2f}" in speed and f"{row['ratio_predict_loop']:.2f}" in speed
    if procinfo.HAVE_PROC:  # memory and CPU come from /proc
        assert spark["python_processes"] >= 1  # the Python workers were found under the JVM
        assert spark["worker_peak_rss_mib"] > 0 and spark["driver_jvm_peak_rss_mib"] > 0
        assert set(spark["cpu_s_parts"]) == {"jvm", "python_workers", "driver_python"}
        memory = _table_row(proc.stdout, "peak RSS MiB")
        assert memory.startswith("ResNet50") and f"{spark['worker_peak_rss_mib']:.0f}" in memory


def test_benchmark_user_errors_are_one_line(tmp_path, capsys):
    """In this process: both errors come before any Spark or child process."""
    import featurize  # benchmarks/featurize.py

    capsys.readouterr()
    assert featurize.main(["--data", str(tmp_path / "nowhere"), "--models", "ResNet50"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1 and "nowhere" in err

    (tmp_path / "x.png").write_bytes(b"")
    assert featurize.main(["--data", str(tmp_path), "--models", "AlexNet"]) == 2
    err = capsys.readouterr().err
    assert "AlexNet" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sweep_benchmark_times_the_sweep_against_single_passes_on_a_generated_set(spark, tmp_path, capsys):
    """The script in this process: it starts no Spark itself (its resize job, single pass and
    sweep are processes of their own), so a process of its own would only add a Python start.
    The generated set and its resized images are made first, here, on the tests' session: the
    benchmark reuses both, as its later runs on the same data do, so its resize job (a process
    of its own) finds nothing to do and starts no Spark."""
    import sweep  # benchmarks/sweep.py

    from conftest import make_dataset
    from xray.config import load_config
    from xray.resize import run_resize

    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=2)
    out, report_path = tmp_path / "out", tmp_path / "sweep.json"
    # One core: the single pass (its warm-up context and its own) and the sweep each start one Python
    # worker and build the model once, not twice.
    sets = ["dataset.image_size=64", "classifier.maxIter=5", "test_fraction=0.34", "batch_size=8",
            "spark.master=local[1]"]
    generated = sweep.generate(raw, 2, str(out), ["Covid-19", "No_findings"], log=lambda *_: None)
    resized = [f"dataset.raw_dir={generated}", f"dataset.resized_dir={out / 'resized-2x'}"]
    experiment = load_config(os.path.join(ROOT, "config.yaml")).experiment("ResNet50_binary_classification",
                                                                           ["weights=random", *sets, *resized])
    run_resize(experiment, spark=spark, log=lambda *_: None)
    capsys.readouterr()
    code = sweep.main(["--data", raw, "--pattern", "ResNet50_binary_classification", "--scale", "2", "--out", str(out),
                       "--json", str(report_path), *sum((["--set", s] for s in sets), [])])
    proc = capsys.readouterr()
    assert code == 0, proc.err[-2000:]
    report = json.loads(report_path.read_text())
    generated = out / "data-2x"
    for cls in ("Covid-19", "No_findings"):  # each source image and one variant of it, same formats
        names = sorted(os.listdir(generated / cls))
        assert len(names) == 4 and sum("--v1." in n for n in names) == 2
        assert {os.path.splitext(n)[1] for n in names} == {os.path.splitext(n)[1] for n in os.listdir(os.path.join(raw, cls))}
    (exp,) = report["experiments"]
    assert exp["experiment"] == "ResNet50_binary_classification" and exp["n_images"] == 8
    assert exp["images_featurized"] == 8  # variants have content of their own: nothing shared in the cache
    (single,) = report["single_passes"]
    assert single["model"] == "ResNet50" and single["images"] == 8 and single["seconds"] > 0
    assert report["sweep_seconds"] > report["sweep_featurization_seconds"] > 0  # the sweep's time holds its featurization
    # The printed summary shows the JSON's figures.
    assert "resize job: " in proc.out and "is up to date" in open(os.path.join(report["work"], "resize.log")).read()
    assert f"sweep: {report['sweep_seconds']:.1f} s" in proc.out and f"ratio {report['sweep_ratio']:.3f}" in proc.out
    if procinfo.HAVE_PROC:  # memory comes from /proc
        memory = report["memory"]
        assert 0 < memory["driver_python_peak_rss_mib"] < memory["driver_peak_rss_mib"]  # the driver's JVM was found
        # Python workers found: an OpenVINO worker holds about 300 MiB with ResNet50, a TensorFlow one over 1 GiB.
        assert memory["driver_jvm_peak_rss_mib"] > 100 and memory["python_worker_peak_rss_mib"] > 100
        assert f"together {memory['driver_peak_rss_mib']:.0f} MiB" in proc.out
    assert not os.path.exists(os.path.join(report["work"], "cache"))  # the run's feature cache is removed


def test_sweep_benchmark_user_errors_are_one_line(tmp_path, capsys):
    """In this process: both errors come before any Spark or child process."""
    import sweep  # benchmarks/sweep.py

    capsys.readouterr()
    assert sweep.main(["--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("error: ") and "nowhere" in err and len(err.strip().splitlines()) == 1
    assert sweep.main(["--data", str(tmp_path), "--pattern", "AlexNet_*"]) == 2
    err = capsys.readouterr().err
    assert "AlexNet_*" in err and len(err.strip().splitlines()) == 1


def _three_images(tmp_path, **kwargs):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(3):
        xray_like(i, seed=i, **kwargs).save(data / f"im{i}.png")
    return data


@pytest.mark.slow
def test_engines_benchmark_times_every_side_cold_and_warm_on_the_same_images(tmp_path, capsys):
    """The script in this process: each side runs in a fresh process of its own anyway (what
    cold means); the script itself only exports the model and starts them."""
    import engines  # benchmarks/engines.py

    data = _three_images(tmp_path, size=(60, 50))
    out = tmp_path / "engines.json"
    capsys.readouterr()
    code = engines.main(["--data", str(data), "--models", "ResNet50", "--rounds", "1",
                         "--sides", "keras,openvino,spark-openvino", "--batch-size", "2",
                         "--master", "local[1]", "--json", str(out)])
    proc = capsys.readouterr()
    assert code == 0, proc.err[-2000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "ResNet50" and row["images"] == 3
    for side, runs in row["runs"].items():  # one round of each side, every image in each pass
        (run,) = runs
        assert run["images"] == 3
        # cold ends with the first pass, after the model was ready (same clock); warm is the second pass
        assert run["warm_seconds"] > 0 and (run["ready_seconds"] or 0) < run["cold_seconds"]
        cold = run["cold_images_per_s"]
        assert row["summary"][side]["cold"] == {"min": cold, "median": cold, "max": cold}
    assert not any(r["tensorflow_imported"] for r in row["runs"]["openvino"])  # the engine alone, no TensorFlow
    assert {r["engine"]["engine"] for r in row["runs"]["spark-openvino"]} == {"openvino"}
    assert row["exports"]["openvino"]["source"].endswith(".xml")
    ratios, summary = row["ratios"], row["summary"]
    default = ratios["default_side"]  # spark-openvino, or on a GPU spark-tensorflow (not run here: no ratios)
    if default not in summary:
        assert ratios == {}
        return
    assert ratios["vs_keras_cold"] == pytest.approx(summary[default]["cold"]["median"] / summary["keras"]["cold"]["median"])
    fastest = ratios["fastest_single_warm"]
    assert fastest in ("keras", "openvino") and summary[fastest]["warm"]["median"] == max(
        summary[s]["warm"]["median"] for s in ("keras", "openvino"))
    assert f"{ratios['vs_keras_cold']:.2f}" in _table_row(proc.out, "backbone featurizer")


@pytest.mark.slow
def test_feature_check_compares_the_featurizer_with_keras_own_model_on_a_weights_file(spark, tmp_path, capsys):
    """In this process, on the tests' session (the script takes a running one instead of starting
    its own): a process of its own would start Spark and TensorFlow once more."""
    import check_features  # benchmarks/check_features.py

    data = _three_images(tmp_path, size=(70, 60), mode="RGB")
    out = tmp_path / "check.json"
    capsys.readouterr()
    code = check_features.main(["--data", str(data), "--models", "VGG16", "--json", str(out)], spark=spark)
    proc = capsys.readouterr()
    assert code == 0, proc.out[-2000:] + proc.err[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["model"], r["pooling"], r["images"]) for r in results] == [("VGG16", "avg", 3), ("VGG16", "max", 3)]
    assert all(r["ok"] and 0 <= r["max_abs_diff_over_max_abs"] <= 1e-4 for r in results)
    assert f"{results[0]['max_abs_diff_over_max_abs']:.2e}" in proc.out


@pytest.mark.slow
def test_explain_benchmark_times_featurize_predict_and_explain_on_the_same_images(spark, tmp_path, capsys):
    """In this process (the script starts no Spark application of its own: it takes the session
    there is, as it would take a new local one)."""
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import IndexToString, StringIndexer
    from pyspark.sql import functions as F

    from conftest import make_dataset
    from imagefeaturizer.featurizer import KerasImageFeaturizer

    raw = make_dataset(tmp_path / "raw", classes=("a", "b"), per_class=3)
    images = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(raw)
    images = images.withColumn("label", F.regexp_extract("path", r"/([^/]+)/[^/]+$", 1))
    stages = [StringIndexer(inputCol="label", outputCol="label_index"),
              KerasImageFeaturizer(modelName="ResNet50", weights="random", batchSize=4),
              LogisticRegression(labelCol="label_index", maxIter=5)]
    fitted = Pipeline(stages=stages).fit(images)
    converter = IndexToString(inputCol="prediction", outputCol="predicted_label", labels=fitted.stages[0].labels)
    PipelineModel(fitted.stages + [converter]).save(str(tmp_path / "model"))
    report_path = tmp_path / "explain.json"
    import explain  # benchmarks/explain.py

    capsys.readouterr()
    assert explain.main(["--model", str(tmp_path / "model"), "--images", raw, "--limit", "5", "--master", "local[2]",
                         "--json", str(report_path)]) == 0
    stdout = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["settings"]["images"] == 5
    runs = report["all_runs_seconds"]
    assert all(runs[k] == [report["seconds"][k]] for k in ("featurize", "maps", "predict", "explain"))  # one run each
    assert report["ratio_explain_to_predict"] == pytest.approx(report["seconds"]["explain"] / report["seconds"]["predict"])
    assert f"explain / predict {report['ratio_explain_to_predict']:.2f}" in stdout
    table = [line.split() for line in stdout.splitlines()]
    rows = {cells[0]: cells[1] for cells in table if len(cells) == 3 and cells[0] in report["seconds"]}
    assert rows == {k: f"{v:.1f}" for k, v in report["seconds"].items()}  # the printed table shows the JSON's figures


@pytest.mark.slow
def test_finetune_benchmark_trains_both_sides_on_the_same_images(spark, tmp_path, capsys):
    """Both sides in this process (the project's in the test's Spark session: its training process
    is the trainer's own child); the script's fresh processes and rounds are not run here."""
    import time

    import finetune  # benchmarks/finetune.py

    args = finetune.parse_args(["--images", "10", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
                                "--no-augment"])
    rows = finetune.marked(finetune.generated_images(str(tmp_path), 10, 40))
    spec = finetune.train_spec(args, rows)
    assert (spec.network.model_name, spec.unfreeze, spec.patience) == ("SmallCNN", 0, 2)  # no stage stops early
    runs = {}
    for side, train in (("project", lambda: finetune.side_project(spark, spec, rows)),
                        ("keras", lambda: finetune.side_keras(spec, rows))):
        started = time.time()
        runs[side] = [finetune.run_figures(train(), started)]
    for (run,) in runs.values():  # 2 of 5 images a class validate; both epochs of the one stage recorded
        assert (run["n_fit"], run["n_validation"]) == (8, 2) and [e["epoch"] for e in run["epochs"]] == [1, 2]
        assert run["steady_images_per_s"] > 0 and run["training_peak_rss_mib"] > 0
    result = finetune.summarise(runs, {})
    assert result["ratios"]["steady"] == pytest.approx(
        runs["project"][0]["steady_images_per_s"] / runs["keras"][0]["steady_images_per_s"])
    capsys.readouterr()
    finetune.print_tables({"result": result})
    out = capsys.readouterr().out
    assert f"steady {result['ratios']['steady']:.2f} (target >= 0.9" in out


@pytest.mark.slow
def test_near_duplicate_benchmark_finds_the_planted_rows(spark, tmp_path, capsys):
    """In this process, on the tests' session (the script takes a running one instead of starting its own)."""
    from pyspark import cloudpickle

    import near_duplicates  # benchmarks/near_duplicates.py

    # Imported, not run as a script: its row generator goes to the Python workers by value, as
    # from a script (benchmarks/ is not on the workers' path).
    cloudpickle.register_pickle_by_value(near_duplicates)
    out = tmp_path / "nd.json"
    capsys.readouterr()
    try:
        code = near_duplicates.main(["--images", "60,125", "--dim", "16", "--planted", "4", "--json", str(out)],
                                    spark=spark)
    finally:
        cloudpickle.unregister_pickle_by_value(near_duplicates)
    proc = capsys.readouterr()
    assert code == 0, proc.err[-2000:]
    first, second = json.loads(out.read_text())["results"]
    assert (first["images"], first["train"], first["test"], first["pairs_compared"]) == (60, 48, 12, 576)
    assert (second["train"], second["test"]) == (100, 25)
    assert first["planted_found"] == first["planted"] == 4 == second["planted_found"]
    for r in (first, second):  # the printed line shows the JSON's figures
        assert (f"{r['images']:>7} images ({r['train']} train x {r['test']} test = {r['pairs_compared']:,} pairs): "
                f"{r['seconds']:.1f} s; found {r['pairs_found']} (planted 4 of 4)") in proc.out
    assert f"wrote {out}" in proc.out
