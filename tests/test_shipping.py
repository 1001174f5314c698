"""What the driver ships to the Python workers: the package where they may not import it."""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path

from conftest import FakeSession
from imagefeaturizer import shipping

ROOT_OF_PACKAGE = os.path.dirname(shipping.PACKAGE_DIR)


def _session(master: str, conf: dict | None = None) -> FakeSession:
    return FakeSession(master, conf, app_id=f"app-{uuid.uuid4().hex}")


def test_the_package_is_shipped_once_where_workers_may_not_import_it(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT_OF_PACKAGE)  # local workers inherit it
    inherited = _session("local[2]")
    assert shipping.ensure_package(inherited) is False and inherited.artifacts == []

    monkeypatch.setenv("PYTHONPATH", "")
    configured = _session("local[2]", {"spark.executorEnv.PYTHONPATH": ROOT_OF_PACKAGE})
    assert shipping.ensure_package(configured) is False and configured.artifacts == []

    bare = _session("local[2]")  # e.g. loaded from an MLflow model's code/ folder
    assert shipping.ensure_package(bare) is True and shipping.ensure_package(bare) is False
    [(path, kind)] = bare.artifacts
    assert kind == "pyfile"
    with zipfile.ZipFile(path) as zf:
        assert {"imagefeaturizer/__init__.py", "imagefeaturizer/featurizer.py", "imagefeaturizer/runtime.py"} <= set(
            zf.namelist())

    cluster = _session("spark://10.0.0.1:7077")  # executors do not see this machine's folders
    assert shipping.ensure_package(cluster) is True and len(cluster.artifacts) == 1
    app_ships_it = _session("spark://10.0.0.1:7077")
    shipping.mark_package_shipped(app_ships_it)  # e.g. xray's own zip holds the package
    assert shipping.ensure_package(app_ships_it) is False and app_ships_it.artifacts == []


def test_the_zip_is_named_by_its_content():
    first, again = shipping.package_zip(), shipping.package_zip()
    assert first == again and os.path.basename(first).startswith("imagefeaturizer-")


class _ConnectSession(FakeSession):
    """What the library sees of a Spark Connect session: its module, a session id, no SparkContext."""

    __module__ = "pyspark.sql.connect.session"

    def __init__(self):
        super().__init__("local[2]")
        self.session_id = uuid.uuid4().hex


def test_spark_connect_gets_the_package_and_weights_as_artifacts(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", ROOT_OF_PACKAGE)  # the server's workers do not see the client's path
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"weights")
    connect = _ConnectSession()
    assert shipping.is_connect(connect) and not shipping.is_connect(_session("local[2]"))
    assert shipping.ensure_package(connect) is True and shipping.ensure_package(connect) is False
    sha = shipping.weights_sha256(connect, str(weights))
    assert shipping.weights_sha256(connect, str(weights)) == sha  # hashed and shipped once
    (package, kind), (shipped, file_kind) = connect.artifacts
    assert (kind, file_kind) == ("pyfile", "file") and os.path.basename(package).startswith("imagefeaturizer-")
    assert os.path.basename(shipped) == f"{sha[:16]}-w.weights.h5" and Path(shipped).read_bytes() == b"weights"
