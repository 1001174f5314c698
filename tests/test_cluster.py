"""Cluster mode: a real Spark standalone cluster (master + two workers) on 127.0.0.1.

The experiment runs as a user runs it (``python -m xray run ... --set spark.master=spark://...``)
in a subprocess on the cluster, where it loses a worker in the middle of featurization, and must
agree with the same experiment in local mode (in this process' session). Both use a weights file
(not ``random``): the executors get the copy the driver shipped, named by its sha256, byte for
byte. One cluster run carries both sets of checks (each run costs a Spark driver and executors
that import the engine). The cluster uses free ports and its own folder, so a user's cluster on
7077/8080 is never touched, and it is always stopped, even when a test fails.

Also: how executors find the weights file (driver path or SparkFiles copy, sha256 checked), and
the cluster command's errors.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from conftest import CODE, ROOT, FakeSession, cached_features, make_dataset
from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer
from imagefeaturizer.images import decode_to_pil
from imagefeaturizer.runtime import SHIP_WEIGHTS_CONF, shipped_name
from imagefeaturizer.runtime import local_weights as _local_weights
from xray import cluster
from xray.cli import main as xray_main
from xray.config import load_config
from xray.run import run_experiment

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import procinfo  # noqa: E402 - the one copy of the /proc walking, in benchmarks/

EXPERIMENT, BACKBONE = "ResNet50_binary_classification", "ResNet50"
RUN_TIMEOUT_S = 900
GATE_DAEMON_DIR = os.path.join(ROOT, "tests", "spark_gate")


# ---------------------------------------------------------------------------------------------
# Weights on executors
# ---------------------------------------------------------------------------------------------
def _weights_file(folder, content: bytes = b"pretend these are Keras weights") -> str:
    """A stand-in weights file with a unique name (SparkFiles names must not repeat)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), f"weights-{uuid.uuid4().hex}.h5")
    with open(path, "wb") as f:
        f.write(content)
    return path


def test_local_weights_uses_a_visible_path_and_checks_it(tmp_path):
    path = _weights_file(tmp_path)
    assert _local_weights(path, backbones.file_sha256(path)) == path
    assert _local_weights(None, None) is None
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(backbones.WeightsError, match="does not match the driver's copy"):
        _local_weights(path, "0" * 64)


def test_executor_without_the_path_uses_the_shipped_copy(spark, tmp_path):
    shipped = _weights_file(tmp_path / "driver-only")
    sha = backbones.file_sha256(shipped)
    spark.sparkContext.addFile(shipped)
    # The path the executor is told about does not exist there (another machine's disk).
    unseen = os.path.join(str(tmp_path / "not-on-this-node"), os.path.basename(shipped))

    def on_executor(_):
        from imagefeaturizer.runtime import local_weights as _local_weights

        local = _local_weights(unseen, sha)
        with open(local, "rb") as f:
            return local, f.read()

    local, content = spark.sparkContext.parallelize([0], 1).map(on_executor).collect()[0]
    assert local != unseen and os.path.basename(local) == os.path.basename(shipped)
    with open(shipped, "rb") as f:
        assert content == f.read()


def test_executor_rejects_a_tampered_or_missing_copy(spark, tmp_path):
    shipped = _weights_file(tmp_path / "driver-only")
    spark.sparkContext.addFile(shipped)
    unseen = os.path.join(str(tmp_path / "elsewhere"), os.path.basename(shipped))
    with pytest.raises(backbones.WeightsError, match=r"does not match the driver's copy \(sha256"):
        _local_weights(unseen, "f" * 64)  # the copy differs from what the driver hashed
    never_shipped = os.path.join(str(tmp_path / "elsewhere"), "never-shipped.h5")
    with pytest.raises(backbones.WeightsError, match="not readable on .* no copy was shipped"):
        _local_weights(never_shipped, "f" * 64)


@pytest.mark.parametrize(
    "master, conf, ships",
    [
        ("spark://10.0.0.1:7077", {}, True),
        ("yarn", {SHIP_WEIGHTS_CONF: "false"}, False),  # weights on shared storage
        ("local[2]", {}, False),
    ],
)
def test_driver_ships_weights_off_local_mode_once(tmp_path, monkeypatch, master, conf, ships):
    monkeypatch.setattr(backbones, "check_weights_file", lambda *args: None)  # a stand-in file (tested in test_backbones)
    path = _weights_file(tmp_path)
    featurizer = KerasImageFeaturizer(modelName="ResNet50", weights=path)
    fake_spark = FakeSession(master, conf, app_id=f"app-{uuid.uuid4().hex}")
    for _ in range(2):
        assert featurizer._resolved_weights(fake_spark) == (path, backbones.file_sha256(path))
    shipped = [p for p, kind in fake_spark.artifacts if kind == "file"]
    assert len(shipped) == (1 if ships else 0)
    for copy in shipped:  # the same file (a hard link, or a copy), named by its sha256
        assert backbones.file_sha256(copy) == backbones.file_sha256(path)
        assert os.path.basename(copy) == shipped_name(path, backbones.file_sha256(path))
    random = KerasImageFeaturizer(modelName="ResNet50", weights="random")
    assert random._resolved_weights(fake_spark) == (None, None)


# ---------------------------------------------------------------------------------------------
# The cluster command without a cluster: settings and errors
# ---------------------------------------------------------------------------------------------
def test_cluster_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XRAY_CLUSTER_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("XRAY_CLUSTER_PORT", "17177")
    monkeypatch.setenv("XRAY_CLUSTER_WEBUI_PORT", "18180")
    monkeypatch.setenv("XRAY_CLUSTER_WORKER_MEMORY", "1536m")
    settings = cluster.ClusterSettings.from_env()
    assert settings.master_url == "spark://127.0.0.1:17177" and settings.webui_url == "http://127.0.0.1:18180"
    assert (settings.state_dir, settings.worker_cores, settings.worker_memory) == (str(tmp_path / "c"), 1, "1536m")
    for name, bad in (("XRAY_CLUSTER_PORT", "70000"), ("XRAY_CLUSTER_WORKER_CORES", "two"), ("XRAY_CLUSTER_WORKER_MEMORY", "2x")):
        with monkeypatch.context() as m:
            m.setenv(name, bad)
            with pytest.raises(cluster.ClusterError, match=name):
                cluster.ClusterSettings.from_env()


def test_status_and_stop_without_a_cluster(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XRAY_CLUSTER_DIR", str(tmp_path / "none"))
    assert xray_main(["cluster", "status"]) == 1
    assert "no Spark master running" in capsys.readouterr().out
    assert xray_main(["cluster", "stop"]) == 0
    assert capsys.readouterr().err == ""
    assert xray_main(["cluster", "start", "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --workers 0: expected at least 1"
    assert not os.path.exists(tmp_path / "none")


def test_missing_java_is_one_clear_error_before_anything_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    settings = cluster.ClusterSettings(state_dir=str(tmp_path / "c"), port=_free_port(), webui_port=_free_port())
    with pytest.raises(cluster.ClusterError, match=r"Java not found \(JAVA_HOME=.*no-jdk has no bin/java\).*set JAVA_HOME"):
        cluster.start(1, settings, log=lambda *_: None)
    assert not os.path.exists(settings.state_dir)


def test_a_used_port_is_named_and_nothing_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = cluster.ClusterSettings(state_dir=str(tmp_path / "c"), port=port, webui_port=_free_port())
        with pytest.raises(cluster.ClusterError, match=f"port {port} on 127.0.0.1 is in use.*XRAY_CLUSTER_PORT=PORT"):
            cluster.start(1, settings, log=lambda *_: None)
    assert not os.path.exists(settings.pid_file("master")) and cluster.worker_names(settings) == []


# ---------------------------------------------------------------------------------------------
# A real standalone cluster
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(settings: cluster.ClusterSettings) -> list[int]:
    """Every running process of the cluster: master, workers, their executors and Python workers."""
    pids: list[int] = []
    for name in ["master", *cluster.worker_names(settings)]:
        pid = cluster.running_pid(settings, name)
        if pid is not None:
            pids += [pid, *procinfo.descendants(pid)]
    return pids


def _kill_worker(settings: cluster.ClusterSettings, name: str) -> list[int]:
    """SIGKILL one worker with its executors and Python workers, as if its machine died."""
    pid = cluster.running_pid(settings, name)
    assert pid is not None, f"{name} is not running"
    targets = [pid, *procinfo.descendants(pid)]  # parents first: none of them starts another
    for target in targets:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return targets


def _wait_until(what: str, ready, proc: subprocess.Popen | None = None) -> None:
    """Until ``ready()`` (an event, not a time); fails when ``proc`` ends first or after RUN_TIMEOUT_S."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ready():
        assert proc is None or proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {RUN_TIMEOUT_S} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster_settings(tmp_path_factory):
    """Two workers (one core each) on free ports; stopped at the end whatever happened."""
    settings = cluster.ClusterSettings(
        state_dir=str(tmp_path_factory.mktemp("cluster")),
        port=_free_port(),
        webui_port=_free_port(),
        worker_cores=1,
        worker_memory="1g",
    )
    pids: list[int] = []
    try:
        cluster.start(2, settings, log=lambda *_: None)
        yield settings
    finally:
        pids = _cluster_pids(settings)
        cluster.stop(settings, log=lambda *_: None)
    # Executors end with their worker; their Python workers follow when the executor is gone.
    _wait_until("the cluster's processes to exit", lambda: not [p for p in pids if procinfo.alive(p)])
    assert pids


@pytest.fixture
def cluster_up(cluster_settings):
    """The module's cluster with both workers alive: a test that killed one leaves it to the next
    test that needs it (``cluster.start`` starts only what is not running)."""
    cluster.start(2, cluster_settings, log=lambda *_: None)
    return cluster_settings


@pytest.fixture(scope="module")
def raw_images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("raw"), classes=("Covid-19", "No_findings"), per_class=8)


def _overrides(raw: str, out, weights: str) -> list[str]:
    return [
        f"weights={weights}",
        f"dataset.raw_dir={raw}",
        f"dataset.resized_dir={out / 'resized'}",
        "dataset.image_size=64",
        f"results_dir={out / 'results'}",
        f"cache_dir={out / 'cache'}",
        "test_fraction=0.25",
        "batch_size=4",
        "classifier.maxIter=5",  # tiny separable data: LR would run ~30 iterations, one Spark job each
    ]


def _command(raw: str, out, weights: str, master: str, spark_conf: dict[str, str] | None = None) -> list[str]:
    overrides = [
        *_overrides(raw, out, weights),
        f"spark.master={master}",
        "spark.driver_memory=1g",
        "spark.conf.spark.ui.enabled=false",
        *(f"spark.conf.{key}={value}" for key, value in (spark_conf or {}).items()),
    ]
    return [sys.executable, "-m", "xray", "run", EXPERIMENT, *(arg for o in overrides for arg in ("--set", o))]


def _env() -> dict[str, str]:
    # The driver imports the project from code/; executors must not (they get the shipped zip).
    return {**os.environ, "PYTHONPATH": CODE, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _start_run(raw: str, out, weights: str, master: str, spark_conf=None) -> subprocess.Popen:
    """The experiment in its own process; its output goes to files (a full pipe would stall it)."""
    os.makedirs(out, exist_ok=True)
    with open(out / "stdout.log", "w") as stdout, open(out / "stderr.log", "w") as stderr:
        return subprocess.Popen(
            _command(raw, out, weights, master, spark_conf), cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=stderr, text=True,
        )


def _finish(proc: subprocess.Popen, out) -> dict:
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = (open(out / name, encoding="utf-8", errors="replace").read() for name in ("stdout.log", "stderr.log"))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    with open(out / "results" / EXPERIMENT / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    metrics["_stdout"], metrics["_stderr"] = stdout, stderr
    return metrics


def _assert_same_results(got: dict, want: dict, out_got, out_want) -> None:
    """Same split, same metrics, same features (up to float noise between processes)."""
    for key in ("n_images", "n_train", "n_test", "classes", "split", "confusion_matrix"):
        assert got[key] == want[key], key
    for key in ("accuracy", "balanced_accuracy"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    for cls, values in want["per_class"].items():
        assert got["per_class"][cls] == pytest.approx(values, abs=1e-9), cls
    assert got["roc"]["auc"] == pytest.approx(want["roc"]["auc"], abs=1e-6)
    # The class activation maps of the test images were computed on the executors too.
    for cls, values in want["explanations"]["per_class"].items():
        assert got["explanations"]["per_class"][cls] == pytest.approx(values, abs=1e-3), cls
    assert (out_got / "results" / EXPERIMENT / "cam_gallery.png").is_file()
    got_f, want_f = cached_features(out_got), cached_features(out_want)
    assert len(want_f) == want["n_images"] and set(got_f) == set(want_f)
    for sha, vector in want_f.items():
        np.testing.assert_allclose(got_f[sha], vector, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    """The experiment's backbone without top, saved by Keras, with weights unlike ``weights="random"``."""
    path = str(tmp_path_factory.mktemp("weights") / f"resnet50-{uuid.uuid4().hex[:8]}.weights.h5")
    model = backbones.build_model(BACKBONE, None)
    weights = model.get_weights()
    weights[0] = weights[0] * 0.5  # the first convolution's kernel
    model.set_weights(weights)
    model.save_weights(path)
    return path


@pytest.fixture(scope="module")
def local_run(spark, raw_images, weights_file, tmp_path_factory):
    """The experiment in local mode, in this process' session (local[2]): what the cluster must give."""
    out = tmp_path_factory.mktemp("local")
    exp = load_config(os.path.join(ROOT, "config.yaml")).experiment(EXPERIMENT, _overrides(raw_images, out, weights_file))
    run_experiment(exp, log=lambda *_: None)
    with open(out / "results" / EXPERIMENT / "metrics.json", encoding="utf-8") as f:
        return json.load(f), out


@pytest.mark.slow
def test_cli_start_is_idempotent_and_a_used_port_is_a_clear_error(cluster_up, tmp_path):
    cluster_settings = cluster_up
    env = {
        **_env(),
        "XRAY_CLUSTER_DIR": cluster_settings.state_dir,
        "XRAY_CLUSTER_PORT": str(cluster_settings.port),
        "XRAY_CLUSTER_WEBUI_PORT": str(cluster_settings.webui_port),
    }
    xray = [sys.executable, "-m", "xray", "cluster"]
    again = subprocess.run([*xray, "start", "--workers", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout and cluster_settings.master_url in again.stdout
    state = cluster.master_state(cluster_settings)
    assert len(cluster.alive_workers(state)) == 2  # no third worker appeared

    shown = subprocess.run([*xray, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "worker-1" in shown.stdout and "worker-2" in shown.stdout
    assert "master reports 2 alive worker(s)" in shown.stdout

    # Another cluster folder on the same port: one clear line, and nothing of this cluster touched.
    other = {**env, "XRAY_CLUSTER_DIR": str(tmp_path / "other")}
    clash = subprocess.run([*xray, "start"], env=other, capture_output=True, text=True, timeout=120)
    assert clash.returncode == 2
    lines = clash.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {cluster_settings.port}" in lines[0] and "XRAY_CLUSTER_PORT" in lines[0]
    # The same folder with another port: the running cluster is named, not a second one started.
    moved = {**env, "XRAY_CLUSTER_PORT": str(_free_port())}
    twice = subprocess.run([*xray, "start"], env=moved, capture_output=True, text=True, timeout=120)
    assert twice.returncode == 2 and cluster_settings.master_url in twice.stderr
    assert len(cluster.alive_workers(cluster.master_state(cluster_settings))) == 2


def _gate_records(gate, kind: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(str(gate), kind, "*.json"))):
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
    return records


def _worker_of(record: dict, settings: cluster.ClusterSettings) -> str:
    """``worker-N`` whose executor ran the task (its working folder is work/worker-N/app-*/N)."""
    return os.path.relpath(record["cwd"], os.path.join(settings.state_dir, "work")).split(os.sep)[0]


@pytest.mark.slow
def test_a_worker_killed_during_featurization_changes_nothing(cluster_up, raw_images, weights_file, local_run,
                                                              tmp_path, random_extractor):
    """The experiment on the cluster (resize job, featurization, fit, explanations) matches local
    mode, although a worker dies while it holds a featurization task, at a point the job itself
    signals; its weights file reaches every executor as the copy the driver shipped.

    The Python tasks run under ``spark_gate/gate_daemon.py``: once one featurization task has
    finished, every task sent to a Python worker waits for the test's ``open`` file. The test
    kills the worker of a waiting task (so that task is lost for sure), then opens the gate:
    Spark must run it again elsewhere.
    """
    cluster_settings = cluster_up
    want, out_local = local_run
    gate = tmp_path / "gate"
    gate.mkdir()
    conf = {
        "spark.python.daemon.module": "gate_daemon",
        "spark.executorEnv.PYTHONPATH": GATE_DAEMON_DIR,  # the gate only: the project comes as the zip
        "spark.executorEnv.XRAY_TEST_GATE": str(gate),
        "spark.default.parallelism": "16",  # images listed in 16 tasks (xray.data.load_images): one per featurization task
    }
    driver_sha = backbones.file_sha256(weights_file)
    shipped_as = shipped_name(weights_file, driver_sha)  # named by its sha256: no clash with another file's name
    # The whole experiment on the cluster, its resize job included (no Python task waits before
    # a featurization task is done).
    proc = _start_run(raw_images, tmp_path, weights_file, cluster_settings.master_url, spark_conf=conf)
    try:
        _wait_until("a featurization task held at the gate", lambda: _gate_records(gate, "waiting"), proc)
        featurizing = glob.glob(str(tmp_path / "cache" / "*" / ".tmp-*"))  # the job's output folder
        victim = _worker_of(_gate_records(gate, "waiting")[0], cluster_settings)
        # the victim's shipped files, before its worker and folders go
        zips = _shipped(cluster_settings, "xray_featurizer_code.zip")
        copies = _shipped_hashes(cluster_settings, shipped_as)
        killed = _kill_worker(cluster_settings, victim)
        (gate / "open").touch()
        got = _finish(proc, tmp_path)
    finally:
        (gate / "open").touch()
        if proc.poll() is None:
            proc.kill()

    assert featurizing and killed, (
        f"the worker was not killed inside the featurization job: gate {_gate_records(gate, 'done')}, "
        f"{_gate_records(gate, 'waiting')}; run output: {got['_stdout'][-3000:]}")
    reruns = [r for r in _gate_records(gate, "done") if r["attempt"] >= 1]
    assert reruns and victim not in {_worker_of(r, cluster_settings) for r in reruns}  # the lost task, elsewhere
    jvm_log = "".join(open(p, encoding="utf-8", errors="replace").read() for p in glob.glob(str(tmp_path / "results" / "logs" / "*.log")))
    assert "Lost executor" in jvm_log  # Spark saw the executor go (the JVM's output goes to the command's log)
    assert got["images_featurized"] == want["images_featurized"] == want["n_images"]
    _assert_same_results(got, want, tmp_path, out_local)
    _assert_not_random_features(out_local, random_extractor)  # the weights file was used

    # It really ran on the cluster's executors, which got the project as the zip the driver
    # shipped (the workers run without PYTHONPATH, so nothing else could have imported it): the
    # victim's executor before the kill, the other one's, which ran the lost task again, after.
    # Each got the weights file the same way: the driver's copy, byte for byte.
    state = cluster.master_state(cluster_settings)
    assert any(app["name"] == "xray-featurizer" for app in state["completedapps"])
    rerun_by = _worker_of(reruns[0], cluster_settings)
    assert {victim, *(_worker_of(r, cluster_settings) for r in reruns)} == {"worker-1", "worker-2"}
    assert zips.get(victim) and _shipped(cluster_settings, "xray_featurizer_code.zip").get(rerun_by)
    assert copies.get(victim) == {driver_sha}
    assert _shipped_hashes(cluster_settings, shipped_as).get(rerun_by) == {driver_sha}


def _assert_not_random_features(out, random_extractor) -> None:
    """The features cached under ``out`` (by the sha256 of each resized image) are not the
    features of ``weights="random"`` (this process' extractor: no Spark job, no exported model)."""
    reference = random_extractor(BACKBONE)
    resized = sorted(glob.glob(str(out / "resized" / "*" / "*.png")))
    from_random = reference.predict([reference.prepare(decode_to_pil(open(p, "rb").read())) for p in resized], 8)
    cached = cached_features(out)
    assert len(resized) == len(cached)
    for path, vector in zip(resized, from_random):
        assert not np.allclose(cached[backbones.file_sha256(path)], vector, rtol=1e-3, atol=1e-3), path


def _shipped_hashes(settings: cluster.ClusterSettings, name: str) -> dict[str, set[str]]:
    """``worker-N`` -> the sha256 of each file called ``name`` in its executors' working folders."""
    return {worker: {backbones.file_sha256(p) for p in paths} for worker, paths in _shipped(settings, name).items()}


def _shipped(settings: cluster.ClusterSettings, name: str) -> dict[str, list[str]]:
    """``worker-N`` -> the files called ``name`` in its executors' working folders."""
    found: dict[str, list[str]] = {}
    for path in glob.glob(os.path.join(settings.state_dir, "work", "worker-*", "app-*", "*", name)):
        found.setdefault(path.split(os.sep)[-4], []).append(path)
    return found
