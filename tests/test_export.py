"""Exported models: the cache (key, reuse, damage, concurrency, failures), the engine plan (auto,
fallback, errors), thread settings per engine, and the OpenVINO engine's features against
TensorFlow's for every backbone (slow: each backbone exported in this process from the TensorFlow
engine's own model, two images; one real child-process export)."""

from __future__ import annotations

import json
import os
import sys
import threading

import numpy as np
import pytest

from conftest import FakeSession, xray_like
from imagefeaturizer import backbones, engines, export, runtime
from imagefeaturizer.engines import OpenVinoEngine, TensorFlowEngine, ThreadSettings, create_engine
from imagefeaturizer.export import EngineError, ExportError, exported_model, plan_engine


def close_to(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|: the equality measure (1e-4 is the bar). A relative
    error per element does not fit: post-ReLU maps have elements near zero."""
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture
def fake_exporter(monkeypatch):
    """Replaces the child-process export: writes the engine's files (content from a counter)."""
    calls = []

    def fake(model_name, weights_path, engine, folder, stem):
        calls.append((model_name, engine))
        for name in engines.engine_class(engine).export_files(stem):
            with open(os.path.join(folder, name), "w") as f:
                f.write(f"{name} {len(calls)}")
        return 0.5

    monkeypatch.setattr(export, "run_exporter", fake)
    return calls


# ---------------------------------------------------------------------------------------------
# The key and the cache
# ---------------------------------------------------------------------------------------------
def test_the_key_covers_weights_engine_and_versions_but_not_the_pooling(monkeypatch):
    random = export.export_key("ResNet50", None, "openvino")
    assert random["weights"] == f"random:{backbones.RANDOM_WEIGHTS_SEED}:keras-{backbones.keras_version()}"
    assert random["engine_version"] == OpenVinoEngine.version() and random["format"] == export.EXPORT_FORMAT
    assert "pooling" not in random  # one export serves avg, max and the maps
    names = {export.folder_name(random), export.folder_name(export.export_key("ResNet50", "ab" * 32, "openvino")),
             export.folder_name(export.export_key("VGG16", None, "openvino"))}
    monkeypatch.setattr(OpenVinoEngine, "version", classmethod(lambda cls: "0.0"))
    names.add(export.folder_name(export.export_key("ResNet50", None, "openvino")))
    monkeypatch.setattr(export, "EXPORT_FORMAT", 99)
    names.add(export.folder_name(export.export_key("ResNet50", None, "openvino")))
    assert len(names) == 5 and all(n.startswith(("ResNet50-openvino-", "VGG16-openvino-")) for n in names)


def test_a_second_call_reuses_the_export(tmp_path, fake_exporter):
    first = exported_model("VGG16", None, None, "openvino", str(tmp_path))
    second = exported_model("VGG16", None, None, "openvino", str(tmp_path))
    assert fake_exporter == [("VGG16", "openvino")]
    assert first.exported_now and not second.exported_now
    assert (first.folder, first.files, first.sha256) == (second.folder, second.files, second.sha256)
    assert [os.path.basename(f) for f in first.files] == [f"{os.path.basename(first.folder)}.{e}" for e in ("xml", "bin")]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first.folder)]  # no temporary folder left
    manifest = json.loads(open(os.path.join(first.folder, export.MANIFEST)).read())
    assert list(manifest["files"].values()) == [backbones.file_sha256(f) for f in first.files]


@pytest.mark.parametrize("damage", ["changed byte", "missing file", "broken manifest"])
def test_a_damaged_export_is_detected_and_exported_again(tmp_path, fake_exporter, damage):
    first = exported_model("VGG16", None, None, "openvino", str(tmp_path))
    if damage == "changed byte":
        with open(first.files[1], "r+b") as f:
            f.write(b"X")
    elif damage == "missing file":
        os.remove(first.files[0])
    else:
        with open(os.path.join(first.folder, export.MANIFEST), "w") as f:
            f.write("{not json")
    logs = []
    again = exported_model("VGG16", None, None, "openvino", str(tmp_path), log=logs.append)
    assert len(fake_exporter) == 2 and again.exported_now and again.folder == first.folder
    assert any("is damaged" in line and "exporting it again" in line for line in logs)
    assert [backbones.file_sha256(f) for f in again.files] == list(again.sha256)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first.folder)]  # the damaged copy is gone


def test_a_second_exporter_of_the_same_model_waits_and_uses_the_first_ones_export(tmp_path, monkeypatch):
    """Two exporters at once (threads here; processes take the same file lock): the second says it
    waits, the export runs once, both get it, and no lock or temporary file is left."""
    exporting, second_waits = threading.Event(), threading.Event()
    calls = []

    def held(model_name, weights_path, engine, folder, stem):
        calls.append(folder)
        exporting.set()
        assert second_waits.wait(timeout=60)  # the second exporter is blocked on the lock by now
        for name in OpenVinoEngine.export_files(stem):
            with open(os.path.join(folder, name), "w") as f:
                f.write(name)
        return 0.1

    monkeypatch.setattr(export, "run_exporter", held)
    results, lines = {}, []

    def second_log(line):
        lines.append(line)
        if "waiting for it" in line:
            second_waits.set()

    first = threading.Thread(target=lambda: results.update(first=exported_model("VGG16", None, None, "openvino",
                                                                                str(tmp_path))))
    first.start()
    assert exporting.wait(timeout=60)
    second = threading.Thread(target=lambda: results.update(second=exported_model("VGG16", None, None, "openvino",
                                                                                  str(tmp_path), log=second_log)))
    second.start()
    for t in (first, second):
        t.join(timeout=120)
    assert len(calls) == 1 and results["first"].exported_now and not results["second"].exported_now
    assert results["first"].sha256 == results["second"].sha256
    assert any(line.startswith("another process is exporting ") for line in lines)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(results["first"].folder)]
    assert [backbones.file_sha256(f) for f in results["first"].files] == list(results["first"].sha256)


def test_an_export_put_in_place_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    """Without the lock (no ``fcntl``), two exporters may both export: the first rename wins and the
    other exporter drops its own folder and uses the winner's."""
    monkeypatch.setattr(export, "fcntl", None)

    def raced(model_name, weights_path, engine, folder, stem):
        final = os.path.join(os.path.dirname(folder), stem)
        if not os.path.exists(final):  # another exporter finishes first, with other content
            winner = tmp_path / "winner"
            winner.mkdir()
            for name in OpenVinoEngine.export_files(stem):
                (winner / name).write_text(f"{name} of the winner")
            export._write_manifest(str(winner), export.export_key(model_name, None, engine), engine, stem, 0.2)
            os.rename(winner, final)
        for name in OpenVinoEngine.export_files(stem):
            with open(os.path.join(folder, name), "w") as f:
                f.write(f"{name} of the loser")
        return 0.1

    monkeypatch.setattr(export, "run_exporter", raced)
    got = exported_model("VGG16", None, None, "openvino", str(tmp_path))
    assert got.exported_now and all(open(f).read().endswith("of the winner") for f in got.files)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(got.folder)]  # the loser's folder is gone


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing(*args):
        raise ExportError("exporting VGG16 for the openvino engine failed: MemoryError")

    monkeypatch.setattr(export, "run_exporter", failing)
    with pytest.raises(ExportError, match="MemoryError"):
        exported_model("VGG16", None, None, "openvino", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_cache_dir_setting_then_environment_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(export.MODEL_CACHE_ENV, str(tmp_path / "env"))
    assert export.cache_dir(str(tmp_path / "param")) == str(tmp_path / "param")
    assert export.cache_dir("") == str(tmp_path / "env")
    monkeypatch.delenv(export.MODEL_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert export.cache_dir() == str(tmp_path / "xdg" / "imagefeaturizer" / "models")


# ---------------------------------------------------------------------------------------------
# Which engine runs
# ---------------------------------------------------------------------------------------------
def test_auto_is_openvino_without_a_gpu_and_tensorflow_with_one(monkeypatch, tmp_path, fake_exporter):
    monkeypatch.setattr(engines, "tensorflow_sees_gpu", lambda: False)
    plan = plan_engine("auto", "VGG16", None, None, str(tmp_path))
    assert (plan.engine, plan.fallback) == ("openvino", None) and plan.model.files[0].endswith(".xml")
    assert plan.as_dict()["version"] == OpenVinoEngine.version() and "engine: openvino (auto:" in plan.describe()
    monkeypatch.setattr(engines, "tensorflow_sees_gpu", lambda: True)
    on_gpu = plan_engine("auto", "VGG16", None, None, str(tmp_path))
    assert (on_gpu.engine, on_gpu.model, on_gpu.shipped_files(None)) == ("tensorflow", None, ())
    assert plan_engine("tensorflow", "VGG16", None, None, str(tmp_path)).model is None
    assert len(fake_exporter) == 1  # TensorFlow needs no export


def test_gpu_probe_needs_no_tensorflow_import(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.setattr(engines.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    monkeypatch.setattr(engines, "_distribution_version", lambda *names: "2.21.0")  # a CUDA-capable build
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert engines.tensorflow_sees_gpu() is True
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert engines.tensorflow_sees_gpu() is False
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(engines, "_distribution_version", lambda *names: "not installed")  # tensorflow-cpu only
    assert engines.tensorflow_sees_gpu() is False
    monkeypatch.setattr(engines.glob, "glob", lambda pattern: [])
    assert engines.tensorflow_sees_gpu() is False
    assert "tensorflow" not in sys.modules


def test_auto_falls_back_to_tensorflow_saying_why(monkeypatch, tmp_path):
    monkeypatch.setattr(engines, "tensorflow_sees_gpu", lambda: False)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: import fails, find_spec is None
    assert not OpenVinoEngine.installed()
    logs = []
    plan = plan_engine("auto", "VGG16", None, None, str(tmp_path), log=logs.append)
    assert (plan.engine, plan.model) == ("tensorflow", None)
    assert "pip install openvino" in plan.fallback and plan.as_dict()["fallback"] == plan.fallback
    assert logs == [f"WARNING: {plan.fallback}"] and "falling back to TensorFlow" in plan.describe()

    monkeypatch.setattr(OpenVinoEngine, "installed", classmethod(lambda cls: True))
    monkeypatch.setattr(export, "run_exporter", lambda *a: (_ for _ in ()).throw(ExportError("export broke: why")))
    failed = plan_engine("auto", "VGG16", None, None, str(tmp_path), log=logs.append)
    assert failed.engine == "tensorflow" and "export broke: why" in failed.fallback


def test_an_engine_named_that_cannot_run_is_one_line_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed: import fails, find_spec is None
    with pytest.raises(EngineError, match=r"needs the openvino package.*pip install openvino.*or set engine=tensorflow"):
        plan_engine("openvino", "VGG16", None, None, str(tmp_path))
    with pytest.raises(ValueError, match="unknown engine 'onnx'"):
        plan_engine("onnx", "VGG16", None, None, str(tmp_path))


def test_the_plan_is_made_once_per_context_and_again_when_a_file_changes(tmp_path, fake_exporter):
    sc = FakeSession("local[2]", app_id=f"app-{tmp_path.name}")  # the plans are kept per session
    first = export.plan_for_context(sc, "openvino", "VGG16", None, None, str(tmp_path))
    assert export.plan_for_context(sc, "openvino", "VGG16", None, None, str(tmp_path)) is first
    with open(first.model.files[1], "a") as f:
        f.write("damage")
    again = export.plan_for_context(sc, "openvino", "VGG16", None, None, str(tmp_path))
    assert again is not first and again.model.exported_now and len(fake_exporter) == 2
    assert again.shipped_files(sc) == tuple(zip(again.model.files, again.model.sha256))
    assert sc.artifacts == []  # local mode: the workers read the driver's files
    cluster = FakeSession(app_id=f"cluster-{tmp_path.name}")
    again.shipped_files(cluster)  # off local mode each file ships once, under its own name
    assert [os.path.basename(p) for p, _ in cluster.artifacts] == [os.path.basename(f) for f in again.model.files]


# ---------------------------------------------------------------------------------------------
# Threads per engine
# ---------------------------------------------------------------------------------------------
def test_thread_settings_per_engine(monkeypatch):
    import pyspark

    assert TensorFlowEngine.thread_settings(4) == ThreadSettings(intra_op=4, inter_op=2)
    assert OpenVinoEngine.thread_settings(4) == ThreadSettings(intra_op=4, inter_op=1)  # one stream
    assert runtime.task_threads("openvino") is None  # outside a Spark task: the engine's default

    class Task:
        def cpus(self):
            return 3

    monkeypatch.setattr(pyspark.TaskContext, "get", staticmethod(lambda: Task()))
    assert runtime.task_threads("openvino") == ThreadSettings(intra_op=3, inter_op=1)
    assert runtime.task_threads("tensorflow") == ThreadSettings(intra_op=3, inter_op=2)


# ---------------------------------------------------------------------------------------------
# The real export and OpenVINO's features (slow)
# ---------------------------------------------------------------------------------------------
def _images(size: int) -> np.ndarray:
    """One X-ray-like image and one of noise, at the backbone's input size (the export's only size)."""
    smooth = np.asarray(xray_like(0, seed=0, size=(90, 80), mode="RGB").resize((size, size)))
    noise = np.random.default_rng(7).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.stack([smooth, noise]).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(backbones.BACKBONES))
def test_openvino_features_and_maps_equal_tensorflows(name, tmp_path, random_extractor):
    """The TensorFlow engine's Keras model exported in this process (the graph and conversion a
    child exporter runs, without its TensorFlow import and second model build: the child process
    is checked once below), then OpenVINO's avg features and maps against TensorFlow's."""
    reference = random_extractor(name).engine  # create_engine("tensorflow", name, None, "avg"), built once per session
    function = export.serving_function(reference.model, reference.backbone).get_concrete_function()
    OpenVinoEngine.write_export(function, str(tmp_path), name)
    batch = _images(reference.backbone.input_size)
    avg, maps = reference.run_with_maps(batch)
    engine = create_engine("openvino", name, str(tmp_path / f"{name}.xml"), "avg", ThreadSettings(1, 1))
    features, ov_maps = engine.run_with_maps(batch)
    assert close_to(features, avg) <= 1e-4 and close_to(ov_maps, maps) <= 1e-4, name
    np.testing.assert_array_equal(engine.run(batch), features)
    assert not np.allclose(avg[0], avg[1], rtol=1e-3)  # different images, different features


@pytest.mark.slow
def test_a_fresh_export_runs_in_a_child_process_and_is_reused(tmp_path, monkeypatch, random_extractor):
    """The real exporter (a child process building the model from the seed) once; its avg and
    max engines against TensorFlow's features and maps in this process."""
    first = exported_model("VGG16", None, None, "openvino", str(tmp_path))
    assert first.exported_now and first.export_seconds > 0
    monkeypatch.setattr(export, "run_exporter", lambda *a: pytest.fail("the second call must not export"))
    second = exported_model("VGG16", None, None, "openvino", str(tmp_path))
    assert not second.exported_now and second.sha256 == first.sha256
    batch = _images(224)
    avg, maps = random_extractor("VGG16").engine.run_with_maps(batch)  # TensorFlow's, built once per session
    for pooling, expected in (("avg", avg), ("max", maps.max(axis=(1, 2)))):
        features = create_engine("openvino", "VGG16", second.files[0], pooling).run(batch)
        assert features.shape == (2, 512) and close_to(features, expected) <= 1e-4, pooling
