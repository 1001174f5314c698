"""Client against cluster versions: one clear line for a mismatch."""

from __future__ import annotations

import platform
import types

import pyspark
import pytest

from xray import compat


def test_mismatch_is_an_error_across_major_versions_and_a_warning_within_one():
    assert compat.mismatch("4.3.0", "4.3.0", "the server") is None
    kind, message = compat.mismatch("4.3.0", "4.0.1", "the Spark Connect server")
    assert kind == "warning" and message.startswith("the Spark Connect server runs 4.0.1, this client pyspark 4.3.0")
    assert "pip install pyspark==4.0.1" in message
    kind, message = compat.mismatch("4.3.0", "3.5.4", "the Spark Connect server")
    assert kind == "error" and "tested" not in message


def test_connect_server_version_is_checked_against_the_client():
    warnings = []
    compat.check_connect_versions(types.SimpleNamespace(version=pyspark.__version__), warn=warnings.append)
    assert warnings == []
    compat.check_connect_versions(types.SimpleNamespace(version="4.0.0"), warn=warnings.append)
    assert len(warnings) == 1 and "runs 4.0.0" in warnings[0]
    with pytest.raises(compat.VersionMismatchError, match="runs 3.5.1, this client pyspark"):
        compat.check_connect_versions(types.SimpleNamespace(version="3.5.1"), warn=warnings.append)


def test_executors_report_their_python_and_pyspark(spark):
    assert compat.executor_versions(spark) == {(platform.python_version(), pyspark.__version__)}
    warnings = []
    compat.check_cluster_versions(spark, warn=warnings.append)
    assert warnings == []


def test_a_failing_first_python_task_names_the_drivers_versions():
    class Broken:
        def range(self, *args, **kwargs):
            raise RuntimeError("Python in worker has different version (3, 10) than that in driver 3.11")

    with pytest.raises(compat.VersionMismatchError) as info:
        compat.check_cluster_versions(Broken())
    text = str(info.value)
    assert "different version (3, 10)" in text and f"Python {platform.python_version()} and pyspark" in text
