"""The Python-worker runtime: TensorFlow threads, the model cache and its eviction, gc.freeze,
zip finders."""

from __future__ import annotations

import gc
import sys
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from conftest import xray_like
from imagefeaturizer import runtime
from imagefeaturizer.images import InvalidImageError
from imagefeaturizer.runtime import GPU_MIN_BATCH, ThreadSettings, get_extractor


class _FakeTask:
    """What ``configure_threads`` reads of a Spark TaskContext."""

    def __init__(self, cpus: int):
        self._cpus = cpus

    def cpus(self) -> int:
        return self._cpus


@pytest.fixture
def tensorflow_threads(monkeypatch):
    """A process whose threads are not configured yet; records what is set on TensorFlow."""
    import tensorflow as tf

    applied: dict[str, int] = {}
    monkeypatch.setattr(runtime, "_threads_configured", False)
    monkeypatch.setattr(tf.config.threading, "set_intra_op_parallelism_threads", lambda n: applied.update(intra=n))
    monkeypatch.setattr(tf.config.threading, "set_inter_op_parallelism_threads", lambda n: applied.update(inter=n))
    return applied


@pytest.mark.parametrize("cpus, intra, inter", [(1, 1, 1), (2, 2, 2), (4, 4, 2)])
def test_tensorflow_threads_follow_the_cores_of_the_task(monkeypatch, tensorflow_threads, cpus, intra, inter):
    import pyspark

    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: _FakeTask(cpus)))
    assert runtime.configure_threads() == ThreadSettings(intra_op=intra, inter_op=inter)
    assert tensorflow_threads == {"intra": intra, "inter": inter}
    tensorflow_threads.clear()
    assert runtime.configure_threads() is None and tensorflow_threads == {}  # once per process


def test_outside_a_spark_task_tensorflow_keeps_its_defaults(tensorflow_threads):
    assert runtime.configure_threads() is None  # the driver: no TaskContext
    assert tensorflow_threads == {} and runtime._threads_configured is False


def test_threads_fixed_before_are_left_alone(monkeypatch, tensorflow_threads):
    import pyspark
    import tensorflow as tf

    def already_initialised(n):
        raise RuntimeError("Intra op parallelism cannot be modified after initialization.")

    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: _FakeTask(2)))
    monkeypatch.setattr(tf.config.threading, "set_intra_op_parallelism_threads", already_initialised)
    assert runtime.configure_threads() is None and tensorflow_threads == {}


def test_cache_evicts_the_least_recently_used_and_the_survivor_still_works(monkeypatch):
    monkeypatch.setattr(runtime, "_EXTRACTORS", {})  # the process's own cache stays as it is
    monkeypatch.setattr(runtime, "MAX_EXTRACTORS", 2)
    image = xray_like(1, seed=3, size=(50, 40), mode="RGB")

    def features(extractor):
        return extractor.predict([extractor.prepare(image)], 1)

    survivor = get_extractor("VGG19", None, "avg")
    survivor_before = features(survivor)
    evicted = get_extractor("VGG19", None, "max")
    evicted_before = features(evicted)
    assert get_extractor("VGG19", None, "avg") is survivor  # used last: "max" is now the oldest
    newest = get_extractor("VGG16", None, "avg")  # a third: "max" goes, Keras' session is cleared
    assert list(runtime._EXTRACTORS.values()) == [survivor, newest]
    np.testing.assert_allclose(features(survivor), survivor_before, rtol=1e-6, atol=1e-6)
    rebuilt = get_extractor("VGG19", None, "max")  # built again on demand: the same seeded network
    assert rebuilt is not evicted
    np.testing.assert_allclose(features(rebuilt), evicted_before, rtol=1e-5, atol=1e-5)
    assert list(runtime._EXTRACTORS.values()) == [newest, rebuilt]


def test_spark_workers_set_threads_and_freeze_the_model_and_the_driver_does_not(spark):
    """Spark's daemon runs gc.collect() after every task: a worker's model objects must be frozen.
    Each task of local[2] has one core: one TensorFlow thread."""
    @F.pandas_udf("array<long>")
    def worker_state(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import gc

        import tensorflow as tf

        from imagefeaturizer.runtime import get_extractor

        for batch in batches:
            get_extractor("ResNet50", None, "avg")
            threads = tf.config.threading
            state = [gc.get_freeze_count(), threads.get_intra_op_parallelism_threads(),
                     threads.get_inter_op_parallelism_threads()]
            yield pd.Series([state] * len(batch))

    # One partition: one Python worker imports TensorFlow and builds the model (each costs seconds
    # of CPU); what it reports holds for every worker, all run this code.
    states = [row[0] for row in spark.range(0, 4, numPartitions=1).select(worker_state("id")).collect()]
    assert len(states) == 4 and min(s[0] for s in states) > 10_000  # TensorFlow and the model
    assert {(s[1], s[2]) for s in states} == {(1, 1)}

    get_extractor("ResNet50", None, "avg")  # outside a Spark task: nothing is frozen
    assert gc.get_freeze_count() == 0


def test_gpu_batches_are_at_least_the_gpu_minimum(monkeypatch):
    extractor = get_extractor("ResNet50", None, "avg")
    monkeypatch.setattr(extractor.engine, "device", "CPU")
    assert extractor.batch_size(8) == 8
    monkeypatch.setattr(extractor.engine, "device", "GPU")
    assert extractor.batch_size(8) == GPU_MIN_BATCH and extractor.batch_size(512) == 512


def test_featurize_series_keeps_rows_in_place_and_skips_or_raises():
    from conftest import png_bytes

    extractor = get_extractor("ResNet50", None, "avg")  # what featurize_series fetches
    good = [png_bytes(xray_like(k, seed=k, size=(40, 30))) for k in range(2)]
    images = pd.Series([good[0], b"not an image", None, good[1]])
    origins = pd.Series(["a.png", "b.png", None, "d.png"])
    skip = runtime.FeaturizeTask("ResNet50", None, None, handle_invalid="skip", batch_size=4)
    out = runtime.featurize_series(skip, images, origins)
    assert out[1] is None and out[2] is None
    same_images = [xray_like(k, seed=k, size=(40, 30), mode="RGB") for k in range(2)]
    expected = extractor.predict([extractor.prepare(image) for image in same_images], 2)
    np.testing.assert_allclose(np.stack([out[0], out[3]]), expected, rtol=1e-5, atol=1e-5)
    strict = runtime.FeaturizeTask("ResNet50", None, None)
    with pytest.raises(InvalidImageError, match="b.png: not an image"):
        runtime.featurize_series(strict, images, origins)
    with pytest.raises(InvalidImageError, match="row 1 of its batch: no image"):
        runtime.featurize_series(strict, images[[0, 2]], origins[[0, 2]])


def test_a_batch_of_only_invalid_images_builds_no_model(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("no model should be built for a batch without a valid image")

    monkeypatch.setattr(runtime, "get_extractor", no_build)
    skip = runtime.FeaturizeTask("Xception", None, None, handle_invalid="skip")
    out = runtime.featurize_series(skip, pd.Series([b"", None]), pd.Series(["a.png", "b.png"]))
    assert out.tolist() == [None, None]
    with pytest.raises(InvalidImageError, match="a.png: empty file"):
        strict = runtime.FeaturizeTask("Xception", None, None)
        runtime.featurize_series(strict, pd.Series([b""]), pd.Series(["a.png"]))


def test_zip_finders_are_dropped_and_imports_from_the_zip_still_work(tmp_path, monkeypatch):
    """Spark workers import pyspark from a zip; its cached finders are dropped, imports still work."""
    import importlib
    import zipfile
    import zipimport

    archive = tmp_path / "pkgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zpkg_probe/__init__.py", "")
        zf.writestr("zpkg_probe/sub/__init__.py", "")
        zf.writestr("zpkg_probe/sub/a.py", "VALUE = 1\n")
        zf.writestr("zpkg_probe/sub/b.py", "VALUE = 2\n")
    monkeypatch.syspath_prepend(str(archive))
    for name in [m for m in sys.modules if m.startswith("zpkg_probe")]:
        monkeypatch.delitem(sys.modules, name)
    assert importlib.import_module("zpkg_probe.sub.a").VALUE == 1

    def zip_finders():
        return [p for p, f in sys.path_importer_cache.items()
                if isinstance(f, zipimport.zipimporter) and str(archive) in p]

    assert zip_finders(), "importing from the zip should have cached its finders"
    runtime.drop_zip_finders()
    assert zip_finders() == []
    importlib.invalidate_caches()
    assert importlib.import_module("zpkg_probe.sub.b").VALUE == 2  # a new import from the zip works
    for name in [m for m in sys.modules if m.startswith("zpkg_probe")]:
        del sys.modules[name]


class _GpuTask(_FakeTask):
    """A Spark task with GPU scheduling: ``resources()["gpu"].addresses`` (no GPU is needed)."""

    def __init__(self, addresses):
        super().__init__(1)
        self._addresses = addresses

    def resources(self):
        from pyspark.resource import ResourceInformation

        return {"gpu": ResourceInformation("gpu", self._addresses)} if self._addresses else {}


@pytest.mark.parametrize("addresses", [["1"], ["2", "3"]])
def test_a_worker_uses_the_gpus_spark_assigned_to_its_task(monkeypatch, addresses):
    import pyspark

    monkeypatch.setattr(runtime, "_gpus_decided", False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # what the worker saw before
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: _GpuTask(addresses)))
    assert runtime.use_task_gpus() == addresses
    assert runtime.os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(addresses)
    assert runtime.os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # the numbering nvidia-smi reports
    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: _GpuTask(["0"])))
    assert runtime.use_task_gpus() is None  # decided once, before TensorFlow's devices exist
    assert runtime.os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(addresses)


@pytest.mark.parametrize("task", [None, _GpuTask([])])
def test_without_assigned_gpus_the_visible_devices_stay(monkeypatch, task):
    import pyspark

    monkeypatch.setattr(runtime, "_gpus_decided", False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: task))
    assert runtime.use_task_gpus() is None and runtime.os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_the_gpus_are_chosen_before_the_first_model_is_built(monkeypatch):
    steps = []
    monkeypatch.setattr(runtime, "_EXTRACTORS", {})
    monkeypatch.setattr(runtime, "use_task_gpus", lambda: steps.append("gpus"))
    monkeypatch.setattr(runtime, "configure_threads", lambda: steps.append("threads"))
    monkeypatch.setattr(runtime, "configure_gpus", lambda: steps.append("memory growth"))
    monkeypatch.setattr(runtime, "FeatureExtractor", lambda *args: steps.append("build") or object())
    get_extractor("VGG16", None, "avg")
    get_extractor("VGG16", None, "avg")  # cached: nothing again
    assert steps == ["gpus", "threads", "memory growth", "build"]
