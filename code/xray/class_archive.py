"""A class-data-sharing (CDS) archive of the classes Spark's driver JVM loads, so that it starts sooner.

A Spark application's JVM loads and verifies some ten thousand classes from Spark's jars before the
first job runs. Java 17 can keep them, parsed and verified, in an archive that later JVMs map from
disk (``-XX:SharedArchiveFile``). On a quiet 2-core machine a small local job (session, a pandas
UDF, a LogisticRegression) took 15-16 s with the archive against 21-25 s without it.

- :func:`archive_path`: where the archive of this Java and these Spark jars lives
  (``cache/jvm`` of the project; another Java or Spark gets another file);
- :func:`java_options`: the driver's options that use it, or nothing while there is none;
- :func:`build`: one small Spark job in a child process whose JVM writes the archive when it
  exits (about a minute); ``python -m xray.class_archive`` runs it (``./wrapper.sh env-setup`` does).

A JVM whose Java or class path differs from the archive's ignores it and starts as before; the
options silence its CDS warnings, so nothing reaches the terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from . import atomic

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "cache", "jvm")
QUIET = "-Xlog:cds=off -Xlog:cds+dynamic=off"  # a JVM that cannot use the archive says nothing
BUILD_TIMEOUT_S = 900


def spark_java() -> str | None:
    """The java that spark-class runs: ``$JAVA_HOME/bin/java``, else the one on PATH (None when
    there is none on PATH; the JAVA_HOME one may not exist)."""
    java_home = os.environ.get("JAVA_HOME", "").strip()
    return os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")


def _java() -> str | None:
    """:func:`spark_java`, links resolved, when it exists."""
    java = spark_java()
    return os.path.realpath(java) if java and os.path.exists(java) else None


def archive_path(folder: str = FOLDER) -> str | None:
    """The archive's file for this Java and these Spark jars (None without java or pyspark)."""
    try:
        from pyspark.find_spark_home import _find_spark_home
    except ImportError:
        return None
    java, jars = _java(), os.path.join(_find_spark_home(), "jars")
    if java is None or not os.path.isdir(jars):
        return None
    key = hashlib.sha256(f"{java} {os.stat(java).st_mtime_ns}".encode())
    for name in sorted(os.listdir(jars)):
        stat = os.stat(os.path.join(jars, name))
        key.update(f"\n{name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return os.path.join(folder, f"spark-{key.hexdigest()[:16]}.jsa")


def java_has_base_archive() -> bool:
    """Whether this Java has its own (default) CDS archive, on which an archive of Spark's classes
    is built: a JDK without ``lib/server/classes.jsa`` cannot write one."""
    java = _java()
    return java is not None and os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(java)), "lib", "server",
                                                            "classes.jsa"))


def java_options(path: str | None) -> str:
    """The JVM options that map the archive at ``path``; empty while it does not exist."""
    return f"-XX:SharedArchiveFile={path} {QUIET}" if path and os.path.isfile(path) else ""


def with_archive(options: str, path: str | None) -> str:
    """JVM ``options`` followed by :func:`java_options` of ``path``, unless they are there already."""
    ours = java_options(path)
    return f"{options} {ours}".strip() if ours and ours not in options else options


def build(path: str) -> bool:
    """Write the archive at ``path`` unless it is there; True when it is there afterwards.

    The child's JVM writes it into a temporary file on its way out, renamed into place once whole.
    Builders take turns (the folder's lock).
    """
    folder = os.path.dirname(path)
    with atomic.folder_lock(folder):
        if os.path.isfile(path):
            return True
        _remove_others(path)
        tmp = atomic.owned_path(path)  # a JVM that writes after its child died leaves an orphan
        env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
        env["SPARK_SUBMIT_OPTS"] = f"{env.get('SPARK_SUBMIT_OPTS', '')} -XX:ArchiveClassesAtExit={tmp} {QUIET}".strip()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH")) if p)
        try:
            done = subprocess.run([sys.executable, "-m", "xray.class_archive", "--job"], env=env, timeout=BUILD_TIMEOUT_S,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if done.returncode == 0 and os.path.isfile(tmp) and os.path.getsize(tmp) > 0:
                os.replace(tmp, path)
        except subprocess.TimeoutExpired:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return os.path.isfile(path)


def _remove_others(path: str) -> None:
    """Archives of another Java or Spark (each some 200 MB; a reinstalled environment's jars make
    a new one), and what builds whose process is gone left behind."""
    folder = os.path.dirname(path)
    for name in os.listdir(folder):
        if name.startswith("spark-") and name.endswith(".jsa") and name != os.path.basename(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    atomic.remove_orphans(folder)


def _job() -> None:
    """The classes to keep: a local session and the kinds of work this project gives Spark."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("xray-class-archive")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    with tempfile.TemporaryDirectory() as folder:
        _work(spark, folder)
    spark.stop()
    jvm = SparkContext._gateway.proc  # the JVM writes the archive when it exits, on its stdin's end
    jvm.stdin.close()
    jvm.wait(timeout=BUILD_TIMEOUT_S)


def _work(spark, folder: str) -> None:
    """Files read whole, a pandas UDF over Arrow, Parquet, a LogisticRegression pipeline saved,
    loaded and evaluated: what a run does, on 64 rows."""
    import pandas as pd
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.evaluation import BinaryClassificationEvaluator, MulticlassClassificationEvaluator
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    files = os.path.join(folder, "files")
    os.makedirs(files)
    for i in range(64):
        with open(os.path.join(files, f"{i}.bin"), "wb") as f:
            f.write(bytes([i, i % 2]) * 32)

    def numbers(content):
        return content.map(lambda b: [float(b[0]), float(b[1]) + b[0] % 3])

    numbers.__annotations__ = {"content": pd.Series, "return": pd.Series}  # pandas is not a module global
    numbers = F.pandas_udf(numbers, "array<float>")

    df = spark.read.format("binaryFile").load(files).repartition(2)
    df = df.select("path", array_to_vector(numbers("content")).alias("features"),
                   (F.element_at(numbers("content"), 2) % 2).cast("double").alias("label"))
    df.write.parquet(os.path.join(folder, "features"))
    df = spark.read.parquet(os.path.join(folder, "features")).cache()
    Pipeline(stages=[LogisticRegression(maxIter=5)]).fit(df).write().save(os.path.join(folder, "model"))
    scored = PipelineModel.load(os.path.join(folder, "model")).transform(df)
    BinaryClassificationEvaluator().evaluate(scored)
    MulticlassClassificationEvaluator(metricName="f1").evaluate(scored)
    scored.groupBy("label", "prediction").count().toPandas()


def main(argv: list[str] | None = None) -> int:
    """``python -m xray.class_archive``: build this machine's archive; exit 1 when there is none."""
    if (argv if argv is not None else sys.argv[1:]) == ["--job"]:
        _job()
        return 0
    path = archive_path()
    if path is None:
        print("class archive: no java or pyspark found; Spark starts without one", file=sys.stderr)
        return 1
    name = os.path.relpath(path)
    if os.path.isfile(path):
        print(f"class archive up to date ({name})")
        return 0
    print("class archive of Spark's jars: building it (once per Java and Spark install; about a minute) ...", flush=True)
    start = time.time()
    if not java_has_base_archive():
        print(f"class archive: {_java()} has no CDS archive of its own (lib/server/classes.jsa) to build on;"
              " Spark starts without one", file=sys.stderr)
        return 1
    if not build(path):
        print(f"class archive: this Java wrote none (tried {BUILD_TIMEOUT_S // 60} min at most); Spark starts"
              " without one. Rerun ./wrapper.sh env-setup to try again", file=sys.stderr)
        return 1
    print(f"class archive built in {time.time() - start:.0f} s ({name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
