"""The featurize benchmark end to end on a few tiny images, and the extractor's speed-related paths."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Iterator

import numpy as np
import pytest
import pandas as pd
from pyspark.sql import functions as F

from conftest import ROOT, xray_like
from imagefeaturizer.featurizer import GPU_MIN_BATCH, FeatureExtractor

SCRIPT = os.path.join(ROOT, "benchmarks", "featurize.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    # Its own process: the benchmark stops and starts SparkContexts, which the shared fixture must not see.
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)


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
    assert report["settings"]["images"] == 4
    (row,) = report["results"]
    keras, spark = row["keras"], row["spark"]
    assert row["model"] == "ResNet50" and keras["images"] == spark["images"] == 4
    assert keras["device"] == "CPU" and keras["model_build_s"] > 0 and keras["tensorflow_import_s"] > 0
    assert spark["master"] == "local[1]" and spark["partitions"] >= 1
    assert keras["images_per_s"] > 0 and spark["images_per_s"] > 0
    assert np.isclose(row["ratio"], spark["images_per_s"] / keras["images_per_s"])
    # End to end, plain Keras' time includes its TensorFlow import and model build; the loop alone does not.
    assert keras["seconds"] == pytest.approx(keras["tensorflow_import_s"] + keras["model_build_s"] + keras["predict_seconds"])
    assert np.isclose(row["ratio_predict_loop"], spark["images_per_s"] / keras["predict_images_per_s"])
    assert row["ratio_predict_loop"] < row["ratio"]
    assert row["decode_resize"]["input_size"] == 224 and row["decode_resize"]["images_per_s"] > 0
    if sys.platform.startswith("linux"):  # memory comes from /proc
        assert spark["python_processes"] >= 1  # the Python workers were found under the JVM
        # A worker holds TensorFlow and ResNet50: several hundred MiB at least. (The driver's own
        # peak depends on what this process did before, so the two are not compared.)
        assert spark["worker_peak_rss_mib"] > 300 and row["driver_python_peak_rss_mib"] > 0
        assert spark["driver_jvm_peak_rss_mib"] > 0 and keras["peak_rss_mib"] > 0
    assert "ResNet50" in proc.stdout and "ratio" in proc.stdout


def test_benchmark_user_errors_are_one_line(tmp_path):
    missing = _run("--data", str(tmp_path / "nowhere"), "--models", "ResNet50")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: ") and len(missing.stderr.strip().splitlines()) == 1
    assert "nowhere" in missing.stderr

    (tmp_path / "x.png").write_bytes(b"")
    unknown = _run("--data", str(tmp_path), "--models", "AlexNet")
    assert unknown.returncode == 2 and "AlexNet" in unknown.stderr and "Traceback" not in unknown.stderr


def test_extractor_traces_once_for_every_batch_size():
    extractor = FeatureExtractor("ResNet50", None, "avg")
    arrays = [extractor.prepare(xray_like(i % 3, seed=i, size=(40, 30), mode="RGB")) for i in range(5)]
    split = extractor.predict(arrays, batch_size=2)  # batches of 2, 2 and 1
    whole = extractor.predict(arrays, batch_size=5)
    np.testing.assert_allclose(split, whole, rtol=1e-4, atol=1e-4)
    assert extractor.device == "CPU"  # the test machines have no GPU
    if extractor._run.graph is not None:  # TensorFlow backend
        assert extractor._run.graph.experimental_get_tracing_count() == 1


def test_spark_workers_freeze_what_the_model_needs_and_the_driver_does_not(spark):
    """Spark's daemon runs gc.collect() after every task: a worker's model objects must be frozen."""
    @F.pandas_udf("long")
    def frozen(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import gc

        from imagefeaturizer.featurizer import get_extractor

        for batch in batches:
            get_extractor("ResNet50", None, "avg")
            yield pd.Series([gc.get_freeze_count()] * len(batch))

    counts = [row[0] for row in spark.range(0, 4, numPartitions=2).select(frozen("id")).collect()]
    assert len(counts) == 4 and min(counts) > 10_000  # TensorFlow and the model: hundreds of thousands

    from imagefeaturizer.featurizer import get_extractor

    get_extractor("ResNet50", None, "avg")  # outside a Spark task: nothing is frozen
    assert gc.get_freeze_count() == 0


def test_gpu_batches_are_at_least_the_gpu_minimum():
    extractor = FeatureExtractor.__new__(FeatureExtractor)  # no model needed for the batch rule
    extractor.device = "CPU"
    assert extractor.batch_size(8) == 8
    extractor.device = "GPU"
    assert extractor.batch_size(8) == GPU_MIN_BATCH and extractor.batch_size(512) == 512


SWEEP_SCRIPT = os.path.join(ROOT, "benchmarks", "sweep.py")


def test_sweep_benchmark_times_the_sweep_against_single_passes_on_a_generated_set(tmp_path):
    from conftest import make_dataset

    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=6)
    out, report_path = tmp_path / "out", tmp_path / "sweep.json"
    sets = ["dataset.image_size=64", "classifier.maxIter=5", "test_fraction=0.34", "batch_size=8"]
    proc = subprocess.run([sys.executable, SWEEP_SCRIPT, "--data", raw, "--pattern", "ResNet50_binary*", "--scale", "2",
                           "--out", str(out), "--json", str(report_path), *sum((["--set", s] for s in sets), [])],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(report_path.read_text())
    generated = out / "data-2x"
    for cls in ("Covid-19", "No_findings"):  # each source image and one variant of it, same formats
        names = sorted(os.listdir(generated / cls))
        assert len(names) == 12 and sum("--v1." in n for n in names) == 6
        assert {os.path.splitext(n)[1] for n in names} == {os.path.splitext(n)[1] for n in os.listdir(os.path.join(raw, cls))}
    (exp,) = report["experiments"]
    assert exp["experiment"] == "ResNet50_binary_classification" and exp["n_images"] == 24
    assert exp["images_featurized"] == 24  # variants have content of their own: nothing shared in the cache
    (single,) = report["single_passes"]
    assert single["model"] == "ResNet50" and single["images"] == 24 and single["seconds"] > 0
    assert report["sweep_ratio"] == pytest.approx(report["sweep_seconds"] / single["seconds"])
    assert report["sweep_seconds"] > report["sweep_featurization_seconds"] > 0
    if sys.platform.startswith("linux"):
        memory = report["memory"]
        assert 50 < memory["driver_python_peak_rss_mib"] < memory["driver_peak_rss_mib"]
        assert memory["driver_jvm_peak_rss_mib"] > 100 and memory["python_worker_peak_rss_mib"] > 300
    assert "ratio" in proc.stdout and "driver peak RSS" in proc.stdout
    assert not os.path.exists(os.path.join(report["work"], "cache"))  # the run's feature cache is removed


def test_sweep_benchmark_user_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, SWEEP_SCRIPT, "--data", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "nowhere" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    bad = subprocess.run([sys.executable, SWEEP_SCRIPT, "--data", str(tmp_path), "--pattern", "AlexNet_*"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "AlexNet_*" in bad.stderr and "Traceback" not in bad.stderr
