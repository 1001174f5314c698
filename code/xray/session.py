"""The SparkSession for a job: local by default, any master from config, or a Spark Connect server
(``spark.remote``); the code shipped to executors, and the cluster's versions checked against ours.

For the command line (:mod:`xray.cli`) it also keeps the terminal for the app's own lines:

- :func:`log_to`: the JVM's output (Spark's log4j lines, the JVM's own warnings, the Python
  workers' stderr) goes into a log file, with the project's ``log4j2.properties``;
- :func:`interrupts_stop_spark`: Ctrl-C (SIGINT) cancels the Spark jobs and stops the session from a
  helper thread, then raises ``KeyboardInterrupt`` in the main thread; :func:`interrupted` tells
  later code (a sweep's fitting threads) that errors from then on are the interruption's.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import warnings
import zipfile
from typing import TYPE_CHECKING

from . import class_archive
from .errors import UserError

if TYPE_CHECKING:  # pyspark, pandas (by shipping and compat) load when a session starts: the CLI's list stays quick
    from pyspark.sql import SparkSession

_CODE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("imagefeaturizer", "xray")
LOG4J2_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")
STOP_WAIT_S = 60.0  # at most this long a Ctrl-C waits for Spark to stop before the process exits


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
    from pyspark.sql import SparkSession

    from imagefeaturizer.shipping import mark_package_shipped

    from .compat import check_cluster_versions

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
    for key, value in _jvm_options(master, conf).items():
        builder = builder.config(key, value)
    spark = _start(builder)
    if not _log_file:
        spark.sparkContext.setLogLevel("ERROR")  # no log file: keep the terminal to errors
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
    from pyspark.sql import SparkSession

    from imagefeaturizer.shipping import mark_package_shipped

    from .compat import check_connect_versions

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
    from pyspark.sql import functions as F

    from imagefeaturizer.shipping import is_connect

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


# --------------------------------------------------------------------------- the command line's log and Ctrl-C

_log_file: str | None = None
_interrupted = threading.Event()


def log_to(path: str | None) -> None:
    """Sessions started from now on write the JVM's output into ``path`` (None: the terminal)."""
    global _log_file
    _log_file = path


def _jvm_options(master: str, conf: dict) -> dict[str, str]:
    """The JVM options that differ from the user's: the driver's (:func:`_java_options`) and, on a
    cluster of this machine (``cluster start``), its executors' class archive."""
    options = {"spark.driver.extraJavaOptions": _java_options(conf)}
    if on_this_machine(master) and not is_local(master):
        options["spark.executor.extraJavaOptions"] = class_archive.with_archive(
            conf.get("spark.executor.extraJavaOptions", ""), class_archive.archive_path())
    return {key: value for key, value in options.items() if value != conf.get(key, "")}


def _java_options(conf: dict) -> str:
    """The driver JVM's options: the user's; with a log file, the project's log4j2 configuration
    (to stderr: the log file); with a class archive of Spark's jars, the options that use it."""
    ours = [f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}"] if _log_file else []
    options = " ".join(part for part in [conf.get("spark.driver.extraJavaOptions", ""), *ours] if part)
    return class_archive.with_archive(options, class_archive.archive_path())


def _start(builder) -> SparkSession:
    """``getOrCreate``, keeping the SIGINT handler in place and the JVM's output in the log file.

    PySpark's SparkContext installs a SIGINT handler that calls the JVM from inside the handler,
    on the main thread's Py4J connection, which is then busy with the very call Ctrl-C
    interrupted: five Py4J tracebacks and exit 1. The handler that was there stays instead.
    """
    if interrupted():
        raise KeyboardInterrupt  # never a new session after Ctrl-C (e.g. a sweep's next experiment)
    with _sigint_handler(), _jvm_output_to(_log_file) as offset:
        try:
            return builder.getOrCreate()
        except Exception as exc:
            if "JAVA_GATEWAY_EXITED" not in str(exc) and "gateway process exited" not in str(exc):
                raise
            raise UserError(f"Spark's JVM did not start: {_jvm_error(_log_file, offset)}"
                            f" (check Java 17+, JAVA_HOME and the spark settings)") from None


@contextlib.contextmanager
def _sigint_handler(handler=None):
    """Inside the block SIGINT has ``handler`` (None: whatever code sets), the handler from
    before it comes back after; on the main thread only (no other thread may set one)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    if main and handler is not None:
        signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _jvm_output_to(path: str | None):
    """Point this process's stderr (fd 2) at ``path`` while the JVM starts: the JVM inherits it
    for its life, and so do the Python workers it starts. Yields the log's size before."""
    if path is None:
        yield 0
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield os.fstat(fd).st_size
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def _jvm_error(path: str | None, offset: int) -> str:
    """The JVM's own reason, from what it wrote into the log while starting."""
    if path is None:
        return "its output is above"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        lines = []
    reasons = [line for line in lines if re.search(r"error|exception|invalid|unrecognized", line, re.I)]
    first = (reasons or lines or ["no output"])[0]
    return f"{first[:300]}; its output: {path}"


def interrupted() -> bool:
    """True once Ctrl-C was pressed under :func:`interrupts_stop_spark`."""
    return _interrupted.is_set()


@contextlib.contextmanager
def interrupts_stop_spark():
    """Ctrl-C for a command line run, inside the ``with`` block (main thread only).

    The first SIGINT cancels every Spark job and stops the session on a helper thread (its own
    Py4J connection), waits for that (at most :data:`STOP_WAIT_S`), then raises
    ``KeyboardInterrupt`` in the main thread; a second SIGINT raises at once. The handler that
    was there before comes back at the end, and :func:`interrupted` is False again.
    """
    _interrupted.clear()
    try:
        with _sigint_handler(_on_sigint):
            yield
    finally:
        _interrupted.clear()


def _on_sigint(signum, frame) -> None:
    if _interrupted.is_set():
        raise KeyboardInterrupt  # a second Ctrl-C: do not wait for Spark
    _interrupted.set()
    stopper = threading.Thread(target=_stop_spark, name="xray-interrupt", daemon=True)
    stopper.start()
    stopper.join(STOP_WAIT_S)
    raise KeyboardInterrupt


def _stop_spark() -> None:
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context  # noqa: SLF001 - the only handle on the running context
    if sc is None:
        return
    try:
        sc.cancelAllJobs()
        sc.stop()
    except Exception:  # noqa: BLE001 - stopping anyway; the details go to the log
        logging.getLogger(__name__).warning("stopping Spark after Ctrl-C failed", exc_info=True)
