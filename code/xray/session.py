"""The SparkSession for a job: local by default, any master from config, or a Spark Connect server
(``spark.remote``); the code shipped to executors, and the cluster's versions checked against ours.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
import warnings
import zipfile

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from imagefeaturizer.shipping import is_connect, mark_package_shipped

from .compat import check_cluster_versions, check_connect_versions

_CODE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("imagefeaturizer", "xray")


def is_local(master: str) -> bool:
    return master.startswith("local")


def on_this_machine(master: str) -> bool:
    """Local mode, or a cluster on 127.0.0.1 (``cluster start``): executors share this file system."""
    return is_local(master) or "127.0.0.1" in master or "localhost" in master


def code_zip(dest_dir: str) -> str:
    """The project's packages as one zip for ``--py-files`` / ``addPyFile``."""
    path = os.path.join(dest_dir, "xray_featurizer_code.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in PACKAGES:
            root = os.path.join(_CODE_DIR, package)
            for dirpath, dirnames, names in os.walk(root):
                dirnames[:] = [d for d in dirnames if d != "__pycache__"]
                for name in names:
                    if name.endswith(".py"):
                        full = os.path.join(dirpath, name)
                        zf.write(full, os.path.relpath(full, _CODE_DIR))
    return path


def spark_session(settings: dict) -> SparkSession:
    """Build (or reuse) the session from the ``spark`` section of an experiment's settings.

    Executors run the Python named by ``spark.conf.spark.pyspark.python`` when set; otherwise, on
    this machine, this very interpreter. Off local mode the project's code reaches them only as
    the zip shipped with ``addPyFile`` (never through a PYTHONPATH of this machine).
    """
    spark_cfg = settings["spark"]
    master = spark_cfg["master"]
    conf = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in spark_cfg.get("conf", {}).items()}
    if spark_cfg.get("remote"):
        return connect_session(spark_cfg, conf)
    # PySpark sends executors the driver's PYSPARK_PYTHON; spark.pyspark.python alone only works
    # through spark-submit, so honour it here too.
    if "spark.pyspark.python" in conf:
        os.environ["PYSPARK_PYTHON"] = conf["spark.pyspark.python"]
    elif on_this_machine(master):
        os.environ["PYSPARK_PYTHON"] = sys.executable
        conf["spark.pyspark.python"] = sys.executable
    else:
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName(spark_cfg["app_name"])
        .config("spark.driver.memory", spark_cfg["driver_memory"])
    )
    if is_local(master):
        # Python workers import the project from the same folder as the driver.
        builder = builder.config(
            "spark.executorEnv.PYTHONPATH", os.pathsep.join([_CODE_DIR, os.environ.get("PYTHONPATH", "")])
        )
    if on_this_machine(master):
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    if not is_local(master):
        ship_code(spark.sparkContext)
        mark_package_shipped(spark)
        check_cluster_versions(spark)
    return spark


def connect_session(spark_cfg: dict, conf: dict[str, str]) -> SparkSession:
    """A Spark Connect session: ``spark.remote`` ``sc://host:15002``, or ``local`` (``local[N]``):
    a local Connect server started by pyspark with ``spark.master`` (local mode).

    Settings that only apply when a server starts (memory, the workers' Python) go to a local one;
    an existing server takes the runtime (SQL) settings only. The code reaches the server as an
    artifact (a Python dependency of this session), also for a local server.
    """
    remote, master = str(spark_cfg["remote"]), spark_cfg["master"]
    url = master if remote == "local" and is_local(master) else remote
    builder = SparkSession.builder.remote(url).appName(spark_cfg["app_name"])
    if is_local(url):
        os.environ["PYSPARK_PYTHON"] = conf.get("spark.pyspark.python", sys.executable)
        builder = (builder.config("spark.driver.memory", spark_cfg["driver_memory"]).config("spark.log.level", "ERROR")
                   .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1"))
    for key, value in conf.items():
        builder = builder.config(key, value)
    with warnings.catch_warnings():
        if is_local(url):  # pyspark sets the options once more after the start: static ones warn
            warnings.filterwarnings("ignore", message="Failed to set", category=UserWarning)
        spark = builder.getOrCreate()
    check_connect_versions(spark)
    _ship_once(spark.session_id, lambda path: spark.addArtifacts(path, pyfile=True))
    mark_package_shipped(spark)
    return spark


def default_parallelism(spark) -> int:
    """How many tasks Spark runs at once by default: the SparkContext's in classic mode; on Spark
    Connect (no SparkContext) the partitions Spark gives a range."""
    if is_connect(spark):
        return spark.range(0, 4096).select(F.spark_partition_id().alias("p")).agg(F.max("p")).first()[0] + 1
    return spark.sparkContext.defaultParallelism


_shipped: set[str] = set()  # applicationIds of SparkContexts, Spark Connect session ids, with the code zip
_shipping = threading.Lock()


def ship_code(sc) -> bool:
    """Add the project's code zip to ``sc`` once per application (a session reused by later
    experiments, or by a sweep's threads, ships nothing again); True when it shipped now."""
    return _ship_once(sc.applicationId, sc.addPyFile)


def _ship_once(key: str, add) -> bool:
    """``add(code zip)`` unless done for ``key`` (an application, a Spark Connect session)."""
    with _shipping:
        if key in _shipped:
            return False
        # Spark serves the file from this folder while the application runs.
        folder = tempfile.mkdtemp(prefix="xray-code-")
        atexit.register(shutil.rmtree, folder, True)
        add(code_zip(folder))
        _shipped.add(key)
        return True
