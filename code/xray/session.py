"""The SparkSession for a job: local by default, any master from config, code shipped to executors."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import zipfile

from pyspark.sql import SparkSession

_CODE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("imagefeaturizer", "xray")


def is_local(master: str) -> bool:
    return master.startswith("local")


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
    """Build (or reuse) the session from the ``spark`` section of an experiment's settings."""
    spark_cfg = settings["spark"]
    master = spark_cfg["master"]
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName(spark_cfg["app_name"])
        .config("spark.driver.memory", spark_cfg["driver_memory"])
        # Python workers import the project from the same folder as the driver (local mode).
        .config("spark.executorEnv.PYTHONPATH", os.pathsep.join([_CODE_DIR, os.environ.get("PYTHONPATH", "")]))
    )
    if is_local(master) or "127.0.0.1" in master or "localhost" in master:
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    for key, value in spark_cfg.get("conf", {}).items():
        builder = builder.config(key, str(value).lower() if isinstance(value, bool) else str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    if not is_local(master) and not getattr(spark.sparkContext, "_xray_code_shipped", False):
        # Spark serves the file from this folder while the application runs.
        folder = tempfile.mkdtemp(prefix="xray-code-")
        atexit.register(shutil.rmtree, folder, True)
        spark.sparkContext.addPyFile(code_zip(folder))
        spark.sparkContext._xray_code_shipped = True
    return spark
