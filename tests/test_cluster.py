"""Cluster mode: a real Spark standalone cluster (master + two workers) on 127.0.0.1.

The experiment runs as a user runs it (``python -m xray run ... --set spark.master=spark://...``)
in a subprocess, once in local mode and once on the cluster, and the results must agree; a second
cluster run loses a worker in the middle of featurization and must still agree. The cluster uses
free ports and its own folder, so a user's cluster on 7077/8080 is never touched, and it is always
stopped, even when a test fails.

Also: how executors find the weights file (driver path or SparkFiles copy, sha256 checked).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import CODE, ROOT, make_dataset
from imagefeaturizer import backbones
from imagefeaturizer.featurizer import SHIP_WEIGHTS_CONF, KerasImageFeaturizer, _local_weights
from xray import cluster

EXPERIMENT = "ResNet50_binary_classification"
RUN_TIMEOUT_S = 900


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
        from imagefeaturizer.featurizer import _local_weights

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


class _FakeContext:
    """Just what ``_resolved_weights`` uses of a SparkContext."""

    def __init__(self, master: str, conf: dict[str, str] | None = None):
        self.master = master
        self.added: list[str] = []
        self._conf = conf or {}

    def addFile(self, path: str) -> None:  # noqa: N802 - Spark's name
        self.added.append(path)

    def getConf(self):  # noqa: N802 - Spark's name
        return types.SimpleNamespace(get=lambda key, default=None: self._conf.get(key, default))


@pytest.mark.parametrize(
    "master, conf, ships",
    [
        ("spark://10.0.0.1:7077", {}, True),
        ("yarn", {SHIP_WEIGHTS_CONF: "false"}, False),  # weights on shared storage
        ("local[2]", {}, False),
    ],
)
def test_driver_ships_weights_off_local_mode_once(tmp_path, master, conf, ships):
    path = _weights_file(tmp_path)
    featurizer = KerasImageFeaturizer(modelName="ResNet50", weights=path)
    sc = _FakeContext(master, conf)
    fake_spark = types.SimpleNamespace(sparkContext=sc)
    for _ in range(2):
        assert featurizer._resolved_weights(fake_spark) == (path, backbones.file_sha256(path))
    assert sc.added == ([path] if ships else [])
    random = KerasImageFeaturizer(modelName="ResNet50", weights="random")
    assert random._resolved_weights(fake_spark) == (None, None)


# ---------------------------------------------------------------------------------------------
# A real standalone cluster
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


def test_status_and_stop_without_a_cluster(tmp_path):
    env = {**_env(), "XRAY_CLUSTER_DIR": str(tmp_path / "none")}
    xray = [sys.executable, "-m", "xray", "cluster"]
    status = subprocess.run([*xray, "status"], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 1 and "no Spark master running" in status.stdout
    stop = subprocess.run([*xray, "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and stop.stderr == ""
    bad = subprocess.run([*xray, "start", "--workers", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --workers 0: expected at least 1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        pids = cluster.cluster_pids(settings)
        cluster.stop(settings, log=lambda *_: None)
    left = [p for p in pids if cluster._alive(p)]
    assert pids and not left, f"cluster processes still running after stop: {left}"


@pytest.fixture(scope="module")
def raw_images(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("raw"), classes=("Covid-19", "No_findings"), per_class=8)


def _command(raw: str, out, master: str, resized=None) -> list[str]:
    return [
        sys.executable, "-m", "xray", "run", EXPERIMENT,
        "--set", "weights=random",
        "--set", f"dataset.raw_dir={raw}",
        "--set", f"dataset.resized_dir={resized or out / 'resized'}",
        "--set", "dataset.image_size=64",
        "--set", f"results_dir={out / 'results'}",
        "--set", f"cache_dir={out / 'cache'}",
        "--set", "test_fraction=0.25",
        "--set", "batch_size=4",
        "--set", f"spark.master={master}",
        "--set", "spark.driver_memory=1g",
        "--set", "spark.conf.spark.ui.enabled=false",
        # Several featurization tasks (not one coalesced partition), so a worker can die mid-way.
        "--set", "spark.conf.spark.sql.adaptive.coalescePartitions.enabled=false",
        "--set", "spark.conf.spark.sql.shuffle.partitions=6",
    ]


def _env() -> dict[str, str]:
    # The driver imports the project from code/; executors must not (they get the shipped zip).
    return {**os.environ, "PYTHONPATH": CODE, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _start_run(raw: str, out, master: str, resized=None) -> subprocess.Popen:
    return subprocess.Popen(
        _command(raw, out, master, resized), cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen, out) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    with open(out / "results" / EXPERIMENT / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)
    metrics["_stderr"] = stderr
    return metrics


def _features(out) -> dict[str, np.ndarray]:
    """sha256 of each image -> its cached feature vector."""
    found = {}
    for part in glob.glob(str(out / "cache" / "*" / "part-*")):
        table = pq.read_table(part).to_pydict()
        for sha, vector in zip(table["sha256"], table["features"]):
            found[sha] = np.asarray(vector["values"], dtype=np.float64)
    return found


def _assert_same_results(got: dict, want: dict, out_got, out_want) -> None:
    """Same split, same metrics, same features (up to float noise between processes)."""
    for key in ("n_images", "n_train", "n_test", "classes", "split", "confusion_matrix"):
        assert got[key] == want[key], key
    for key in ("accuracy", "balanced_accuracy"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    for cls, values in want["per_class"].items():
        assert got["per_class"][cls] == pytest.approx(values, abs=1e-9), cls
    assert got["roc"]["auc"] == pytest.approx(want["roc"]["auc"], abs=1e-6)
    got_f, want_f = _features(out_got), _features(out_want)
    assert len(want_f) == want["n_images"] and set(got_f) == set(want_f)
    for sha, vector in want_f.items():
        np.testing.assert_allclose(got_f[sha], vector, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def local_run(raw_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return _finish(_start_run(raw_images, out, "local[2]"), out), out


@pytest.mark.slow
def test_cli_start_is_idempotent_and_a_used_port_is_a_clear_error(cluster_settings, tmp_path):
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


@pytest.mark.slow
def test_experiment_on_the_cluster_matches_local_mode(cluster_settings, raw_images, local_run, tmp_path):
    want, out_local = local_run
    got = _finish(_start_run(raw_images, tmp_path, cluster_settings.master_url), tmp_path)
    _assert_same_results(got, want, tmp_path, out_local)

    # It really ran on the cluster's executors, which got the project as the zip the driver
    # shipped (the workers run without PYTHONPATH, so nothing else could have imported it).
    state = cluster.master_state(cluster_settings)
    assert any(app["name"] == "xray-featurizer" for app in state["completedapps"])
    shipped = glob.glob(os.path.join(cluster_settings.state_dir, "work", "worker-*", "app-*", "*", "xray_featurizer_code.zip"))
    assert {p.split(os.sep)[-4] for p in shipped} == {"worker-1", "worker-2"}


@pytest.mark.slow
def test_a_worker_killed_during_featurization_changes_nothing(cluster_settings, raw_images, local_run, tmp_path):
    want, out_local = local_run
    # The resize job on the cluster is covered above; here the local run's resized images serve.
    proc = _start_run(raw_images, tmp_path, cluster_settings.master_url, resized=out_local / "resized")
    killed: dict = {}

    def kill_after_first_featurization_task():
        # The featurization job writes Parquet to <cache>/<key>/.tmp-*/; each finished task moves
        # its output to _temporary/0/task_*. Kill a worker as soon as one task is done.
        pattern = str(tmp_path / "cache" / "*" / ".tmp-*" / "_temporary" / "0" / "task_*")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            done = glob.glob(pattern)
            if done:
                killed["pids"] = cluster.kill_worker("worker-1", cluster_settings)
                temporary = os.path.dirname(os.path.dirname(done[0]))
                killed["job_still_running"] = os.path.isdir(temporary) and proc.poll() is None
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_featurization_task, daemon=True)
    killer.start()
    try:
        got = _finish(proc, tmp_path)
    finally:
        killer.join(timeout=30)
        cluster.start(2, cluster_settings, log=lambda *_: None)  # bring worker-1 back for later tests

    assert killed.get("pids"), "no featurization task finished before the run ended"
    assert killed["job_still_running"], "the worker died after featurization was over"
    assert "Lost executor" in got["_stderr"]  # Spark saw the executor go and re-ran its tasks
    assert got["images_featurized"] == want["images_featurized"] == want["n_images"]
    _assert_same_results(got, want, tmp_path, out_local)
