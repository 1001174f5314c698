"""The class archive of Spark's jars: one file per Java and Spark install, built whole or not at all,
and used by the driver JVMs of runs once it exists."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from xray import class_archive, cluster, session
from xray.atomic import owner_tag


@pytest.fixture
def install(tmp_path, monkeypatch):
    """A fake Java and Spark install: ``bin/java`` and two jars."""
    java_home, spark_home = tmp_path / "jdk", tmp_path / "spark"
    (java_home / "bin").mkdir(parents=True)
    (java_home / "bin" / "java").write_text("#!/bin/sh\n")
    (spark_home / "jars").mkdir(parents=True)
    for name in ("spark-core.jar", "spark-sql.jar"):
        (spark_home / "jars" / name).write_bytes(b"jar")
    monkeypatch.setenv("JAVA_HOME", str(java_home))
    monkeypatch.setattr("pyspark.find_spark_home._find_spark_home", lambda: str(spark_home))
    return java_home, spark_home


def test_the_archive_is_named_after_this_java_and_these_jars(install, tmp_path, monkeypatch):
    java_home, spark_home = install
    first = class_archive.archive_path(str(tmp_path / "jvm"))
    assert first == class_archive.archive_path(str(tmp_path / "jvm"))
    assert os.path.dirname(first) == str(tmp_path / "jvm") and first.endswith(".jsa")
    (spark_home / "jars" / "spark-sql.jar").write_bytes(b"a reinstalled jar")
    second = class_archive.archive_path(str(tmp_path / "jvm"))
    assert second != first
    os.utime(java_home / "bin" / "java", ns=(1, 1))  # another Java at the same place
    assert class_archive.archive_path(str(tmp_path / "jvm")) not in (first, second)
    assert not class_archive.java_has_base_archive()  # nothing to build on
    (java_home / "lib" / "server").mkdir(parents=True)
    (java_home / "lib" / "server" / "classes.jsa").write_bytes(b"the JDK's own classes")
    assert class_archive.java_has_base_archive()
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    assert class_archive.archive_path(str(tmp_path / "jvm")) is None and not class_archive.java_has_base_archive()


def _fake_child(writes: bool, seen: list):
    """subprocess.run for build(): the child's JVM writes the file named in its options, or not."""

    def run(cmd, env, **kwargs):
        target = env["SPARK_SUBMIT_OPTS"].split("-XX:ArchiveClassesAtExit=")[1].split()[0]
        seen.append((cmd, target, os.listdir(os.path.dirname(target))))
        if writes:
            with open(target, "wb") as f:
                f.write(b"classes")
        return subprocess.CompletedProcess(cmd, 0 if writes else 1)

    return run


def test_build_puts_a_whole_archive_in_place_once_and_clears_other_ones(tmp_path, monkeypatch):
    folder = tmp_path / "jvm"
    folder.mkdir()
    (folder / "spark-0000.jsa").write_bytes(b"another install's")
    host, boot, pid, start = owner_tag().split(".")
    died = f".tmp-{host}.{boot}.{pid}.{int(start) + 1}-spark-0000.jsa-0123"  # a previous process's build
    (folder / died).write_bytes(b"a build that died")
    running = f".tmp-{owner_tag()}-spark-2222.jsa-4567"  # a build under way (this process: alive)
    (folder / running).write_bytes(b"a build under way elsewhere")
    seen: list = []
    monkeypatch.setattr(class_archive.subprocess, "run", _fake_child(True, seen))
    path = str(folder / "spark-1111.jsa")
    assert class_archive.build(path) and open(path, "rb").read() == b"classes"
    [(cmd, target, present)] = seen
    assert cmd[-2:] == ["xray.class_archive", "--job"] and os.path.dirname(target) == str(folder)
    assert sorted(present) == [".lock", running]  # others gone before the build
    assert sorted(os.listdir(folder)) == [".lock", running, "spark-1111.jsa"]
    assert class_archive.build(path) and len(seen) == 1  # there already: no second build
    assert class_archive.java_options(path) == f"-XX:SharedArchiveFile={path} {class_archive.QUIET}"


def test_a_child_that_writes_no_archive_leaves_none(tmp_path, monkeypatch):
    seen: list = []
    monkeypatch.setattr(class_archive.subprocess, "run", _fake_child(False, seen))
    path = str(tmp_path / "jvm" / "spark-1111.jsa")
    assert not class_archive.build(path)
    assert len(seen) == 1 and os.listdir(tmp_path / "jvm") == [".lock"]
    assert class_archive.java_options(path) == ""


def test_the_drivers_options_use_the_archive_once_it_exists(tmp_path, monkeypatch):
    path = tmp_path / "spark-1111.jsa"
    monkeypatch.setattr(class_archive, "archive_path", lambda: str(path))
    monkeypatch.setattr(session, "_log_file", None)
    assert session._java_options({"spark.driver.extraJavaOptions": "-Dmine=1"}) == "-Dmine=1"
    path.write_bytes(b"classes")
    options = session._java_options({"spark.driver.extraJavaOptions": "-Dmine=1"})
    assert options == f"-Dmine=1 -XX:SharedArchiveFile={path} {class_archive.QUIET}"
    assert session._java_options({}) == f"-XX:SharedArchiveFile={path} {class_archive.QUIET}"
    assert session._java_options({"spark.driver.extraJavaOptions": options}) == options  # there already: once


def test_a_cluster_of_this_machine_starts_its_daemons_and_executors_from_the_archive(tmp_path, monkeypatch):
    path = tmp_path / "spark-1111.jsa"
    path.write_bytes(b"classes")
    archive = f"-XX:SharedArchiveFile={path} {class_archive.QUIET}"
    monkeypatch.setattr(class_archive, "archive_path", lambda: str(path))
    monkeypatch.setattr(session, "_log_file", None)
    options = session._jvm_options("spark://127.0.0.1:7077", {"spark.executor.extraJavaOptions": "-Dmine=1"})
    assert options == {"spark.driver.extraJavaOptions": archive, "spark.executor.extraJavaOptions": f"-Dmine=1 {archive}"}
    assert session._jvm_options("local[2]", {}) == {"spark.driver.extraJavaOptions": archive}
    assert "spark.executor.extraJavaOptions" not in session._jvm_options("spark://10.0.0.5:7077", {})
    monkeypatch.setenv("SPARK_DAEMON_JAVA_OPTS", "-Dmine=1")
    settings = cluster.ClusterSettings(state_dir=str(tmp_path / "state"))
    assert cluster._daemon_env(settings, {})["SPARK_DAEMON_JAVA_OPTS"] == f"-Dmine=1 {archive}"
    path.unlink()
    assert session._jvm_options("spark://127.0.0.1:7077", {"spark.executor.extraJavaOptions": "-Dmine=1"}) == {}
    assert cluster._daemon_env(settings, {})["SPARK_DAEMON_JAVA_OPTS"] == "-Dmine=1"


@pytest.mark.slow
def test_a_spark_driver_loads_spark_classes_from_the_built_archive(tmp_path):
    """This machine's archive (built now if the suite's background build has not yet) is valid for
    Spark's driver: the JVM maps Spark's classes from it instead of reading the jars."""
    path = class_archive.archive_path()
    assert path is not None, "java and pyspark are on this machine: the archive has a name"
    if not class_archive.java_has_base_archive():
        pytest.skip("this JDK has no CDS archive of its own (lib/server/classes.jsa): no class archive can be"
                    " built on it, and runs start without one")
    start = time.time()
    assert class_archive.build(path), f"no archive after {time.time() - start:.0f} s"
    log = tmp_path / "classes.log"
    job = ("from pyspark.sql import SparkSession\n"
           "s = SparkSession.builder.master('local[1]').config('spark.ui.enabled', 'false')"
           ".config('spark.driver.host', '127.0.0.1').config('spark.driver.bindAddress', '127.0.0.1').getOrCreate()\n"
           "assert s.range(5).count() == 5\ns.stop()\n")
    env = dict(os.environ, SPARK_SUBMIT_OPTS=f"{class_archive.java_options(path)} -Xlog:class+load=info:file={log}")
    subprocess.run([sys.executable, "-c", job], env=env, check=True, timeout=300, capture_output=True)
    loaded = [line for line in log.read_text().splitlines() if " org.apache.spark.SparkContext " in line]
    assert loaded and "shared objects file (top)" in loaded[0], loaded
