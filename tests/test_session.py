"""The SparkSession helpers: which masters share this machine, and the code zip shipped once per application."""

from __future__ import annotations

import os
import signal
import subprocess
import zipfile

import pytest

from xray import session
from xray.errors import UserError


def test_masters_on_this_machine():
    assert session.is_local("local[2]") and session.on_this_machine("local[*]")
    assert session.on_this_machine("spark://127.0.0.1:7077") and not session.is_local("spark://127.0.0.1:7077")
    assert not session.on_this_machine("yarn") and not session.on_this_machine("spark://10.0.0.5:7077")


class _Context:
    """What ship_code uses of a SparkContext: its application id and addPyFile."""

    def __init__(self, app_id: str) -> None:
        self.applicationId = app_id
        self.shipped: list[set[str]] = []

    def addPyFile(self, path: str) -> None:  # noqa: N802 - SparkContext's name
        with zipfile.ZipFile(path) as zf:
            self.shipped.append(set(zf.namelist()))


def test_code_is_shipped_once_per_application():
    first = _Context("app-test-1")
    assert session.ship_code(first) is True
    assert len(first.shipped) == 1
    assert {"imagefeaturizer/__init__.py", "xray/__init__.py", "xray/session.py"} <= first.shipped[0]
    assert session.ship_code(first) is False and len(first.shipped) == 1  # the same application: not again
    again = _Context("app-test-2")  # a new SparkContext (after stop()) needs the zip again
    assert session.ship_code(again) is True and len(again.shipped) == 1


# --------------------------------------------------------------------------- Ctrl-C and the JVM's output


class _Spark:
    """What the Ctrl-C handler uses of the running SparkContext."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def cancelAllJobs(self) -> None:  # noqa: N802 - SparkContext's name
        self.calls.append("cancel")

    def stop(self) -> None:
        self.calls.append("stop")


def test_ctrl_c_cancels_and_stops_spark_then_interrupts(monkeypatch):
    from pyspark import SparkContext

    running = _Spark()
    monkeypatch.setattr(SparkContext, "_active_spark_context", running)
    before = signal.getsignal(signal.SIGINT)
    with session.interrupts_stop_spark():
        assert not session.interrupted()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert running.calls == ["cancel", "stop"] and session.interrupted()
        with pytest.raises(KeyboardInterrupt):  # never a new session after Ctrl-C
            session._start(_Builder())
    assert signal.getsignal(signal.SIGINT) is before and not session.interrupted()


class _Builder:
    """A SparkSession builder whose start does what PySpark's does to SIGINT, and may write to
    stderr as a JVM would."""

    def __init__(self, jvm_says: str = "", fails: bool = False) -> None:
        self.jvm_says, self.fails = jvm_says, fails

    def getOrCreate(self):  # noqa: N802 - the builder's name
        signal.signal(signal.SIGINT, lambda *a: None)  # PySpark's SparkContext installs its own handler
        if self.jvm_says:
            subprocess.run(["sh", "-c", f"echo '{self.jvm_says}' >&2"], check=True)  # a child, as the JVM is
        if self.fails:
            raise RuntimeError("[JAVA_GATEWAY_EXITED] Java gateway process exited before sending its port number.")
        return "session"


def test_the_jvm_writes_into_the_log_and_the_sigint_handler_stays(tmp_path, capfd, monkeypatch):
    log = tmp_path / "logs" / "run.log"
    monkeypatch.setattr(session, "_log_file", str(log))
    before = signal.getsignal(signal.SIGINT)
    assert session._start(_Builder(jvm_says="WARN NativeCodeLoader: Unable to load native-hadoop library")) == "session"
    assert signal.getsignal(signal.SIGINT) is before
    assert "NativeCodeLoader" in log.read_text() and "NativeCodeLoader" not in capfd.readouterr().err
    options = session._java_options({"spark.driver.extraJavaOptions": "-Dmine=1"})
    assert options.startswith("-Dmine=1 ") and f"-Dlog4j2.configurationFile={session.LOG4J2_CONFIG}" in options
    assert os.path.isfile(session.LOG4J2_CONFIG)


def test_a_jvm_that_does_not_start_is_one_line_quoting_it(tmp_path, monkeypatch):
    log = tmp_path / "run.log"
    monkeypatch.setattr(session, "_log_file", str(log))
    jvm = _Builder(jvm_says="Invalid maximum heap size: -Xmxabc", fails=True)
    with pytest.raises(UserError, match=f"Spark's JVM did not start: Invalid maximum heap size: -Xmxabc; its output: {log}"):
        session._start(jvm)
