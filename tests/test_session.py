"""The SparkSession helpers: which masters share this machine, and the code zip shipped once per application."""

from __future__ import annotations

import zipfile

from xray import session


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
