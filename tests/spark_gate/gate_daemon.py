"""Spark's Python worker daemon with a gate, so that a test acts at a known point of a job.

Used by ``tests/test_cluster.py`` through Spark's own settings, nothing in the project's code:
``spark.python.daemon.module=gate_daemon``, this folder on the executors' Python path
(``spark.executorEnv.PYTHONPATH``; it holds nothing else) and a folder in
``spark.executorEnv.XRAY_TEST_GATE``. Each Python task then:

- once it has been sent to its Python worker, when a featurization task has already finished,
  writes ``<gate>/waiting/<id>.json`` and waits until the file ``<gate>/open`` exists;
- when it finishes, writes ``<gate>/done/<id>.json`` (stage, partition, attempt, and whether it
  featurized: its process has built a featurizer model).

Each file records the task's working folder (its executor's, so its worker's) and pid. Once a
featurization task is done the job cannot finish until the test opens the gate: a test can kill
the worker of a waiting task and know that the featurization job was running and that this task
was lost.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import pyspark.daemon
import pyspark.worker
from pyspark import TaskContext

GATE = os.environ["XRAY_TEST_GATE"]
_run_task = pyspark.worker.main


def _record(kind: str, **fields) -> None:
    folder = os.path.join(GATE, kind)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{uuid.uuid4().hex}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"cwd": os.getcwd(), "pid": os.getpid(), **fields}, f)
    os.replace(path + ".tmp", path)  # the test never reads half a file


def _featurization_finished() -> bool:
    done = os.path.join(GATE, "done")
    for name in os.listdir(done) if os.path.isdir(done) else ():
        if name.endswith(".json"):
            with open(os.path.join(done, name), encoding="utf-8") as f:
                if json.load(f)["featurized"]:
                    return True
    return False


def gated_task(infile, outfile) -> None:
    # A reused worker comes back here as soon as its last task is over: wait for the next task
    # to arrive, so that only a task the executor really runs is held.
    infile.peek(1)
    if not os.path.exists(os.path.join(GATE, "open")) and _featurization_finished():
        _record("waiting")
        while not os.path.exists(os.path.join(GATE, "open")):
            time.sleep(0.05)
    # pyspark's worker fills the TaskContext it finds (or creates) and unsets it at the end:
    # create it here to read the task's identity afterwards.
    context = TaskContext._getOrCreate()
    _run_task(infile, outfile)
    _record("done", stage=context.stageId(), partition=context.partitionId(), attempt=context.attemptNumber(),
            featurized=_has_built_a_model())


def _has_built_a_model() -> bool:
    """This worker process holds a featurizer model: it ran a featurization task. (Importing
    ``imagefeaturizer`` alone says nothing: the app's image loading imports it too.)"""
    runtime = sys.modules.get("imagefeaturizer.runtime")
    return bool(getattr(runtime, "_EXTRACTORS", None))


# The daemon's forked child looks the task runner up in pyspark.worker when it starts (pyspark
# 4.1 and later); older daemons bound it at import as daemon.worker_main. Gate both.
pyspark.worker.main = gated_task
pyspark.daemon.worker_main = gated_task

if __name__ == "__main__":
    pyspark.daemon.manager()
