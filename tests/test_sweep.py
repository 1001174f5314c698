"""A sweep's Ctrl-C, in process and without Spark: the experiments' Spark work is replaced by
stand-ins, so that the point of the interruption is exact (tests/test_interrupt.py presses a real
Ctrl-C on a real run)."""

from __future__ import annotations

import csv
import os
import threading

import pytest

from conftest import ROOT
from xray import session, sweep
from xray.config import load_config


class _Prepared:
    """Stands for a prepared experiment (its staging folder): records whether it was dropped."""

    def __init__(self, on_discard=None) -> None:
        self.discarded = False
        self._on_discard = on_discard

    def discard(self) -> None:
        self.discarded = True
        if self._on_discard:
            self._on_discard()


def test_ctrl_c_in_a_sweep_is_no_experiments_failure_and_drops_the_runs_not_started(tmp_path, monkeypatch):
    """Two experiments fit on the sweep's threads, a third waits for one; Ctrl-C stops Spark
    while the fourth featurizes (its error is the interruption's): the sweep ends with that error,
    no experiment is recorded as failed, and only the waiting one's staging folder is dropped
    (the running ones drop theirs themselves, see xray.run.fit_and_report)."""
    assert sweep.HEAD_THREADS == 2
    fitting = [threading.Event() for _ in range(2)]
    release = threading.Event()
    prepared = []

    def prepare(exp, log, also_classes):
        if len(prepared) == 3:
            assert all(started.wait(60) for started in fitting)  # the two first are running, the third waits
            session._interrupted.set()  # noqa: SLF001 - what Ctrl-C sets before stopping Spark
            raise RuntimeError("An error occurred while calling o42.parquet: Py4J connection closed")
        prepared.append(_Prepared(on_discard=release.set if len(prepared) == 2 else None))
        return prepared[-1]

    def fit(board, i, p):
        fitting[i].set()
        assert release.wait(60)  # until the sweep has dropped the waiting experiment

    monkeypatch.setattr(sweep, "prepare_features", prepare)
    monkeypatch.setattr(sweep, "_fit_and_record", fit)
    config, lines = load_config(os.path.join(ROOT, "config.yaml")), []
    try:
        with pytest.raises(RuntimeError, match="Py4J connection closed"):
            sweep.run_sweep(config, "*_binary_classification", [f"results_dir={tmp_path}", "weights=random"],
                            log=lines.append)
    finally:
        session._interrupted.clear()  # noqa: SLF001
    assert [p.discarded for p in prepared] == [False, False, True]
    assert not any("FAILED" in line for line in lines), lines
    summary = tmp_path / "summary.csv"
    assert not summary.exists() or all(r["status"] != "failed" for r in csv.DictReader(open(summary, encoding="utf-8")))
