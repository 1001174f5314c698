"""Progress of long Spark jobs on the driver: featurization (:mod:`xray.features`) and
``predict`` report through :class:`Progress`: "featurizing: 320 of 1000 images, 12.1 images/s,
about 56 s left", at most every :data:`PROGRESS_EVERY_S` seconds, nothing for short jobs.

Classic Spark: the jobs get a job group, polled through ``statusTracker()``. Spark Connect (no
SparkContext): the jobs get an operation tag, and a progress handler receives the stages of the
operations this thread runs (the client calls it on the thread that runs the operation); leaving
the block with an exception interrupts the operations still running under the tag.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

from imagefeaturizer.shipping import is_connect

PROGRESS_EVERY_S = 10.0  # seconds between progress lines; none for steps shorter than this


class Progress:
    """Progress of the Spark jobs run inside ``with Progress(...)``, logged from a driver thread.

    The jobs are marked (a job group, or a Spark Connect tag); a thread scales the share of
    finished tasks of their widest stage to ``total`` items: "featurizing: 320 of 1000 images,
    12.1 images/s, about 56 s left". Nothing is logged before ``every`` seconds, so short steps
    (and tests) stay quiet. The estimate is per task: Spark reports no finer progress.
    """

    def __init__(self, spark, total: int, log: Callable[[str], object] = print, what: str = "featurizing",
                 every: float | None = None) -> None:
        self.total, self.log, self.what = total, log, what
        self.every = PROGRESS_EVERY_S if every is None else every
        self.group = f"xray-progress-{uuid.uuid4().hex}"
        self.tracker = ConnectTracker(spark, self.group) if is_connect(spark) else ClassicTracker(spark, self.group)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        self.tracker.start(f"{self.what} {self.total} images")
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="xray-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.tracker.stop(failed=exc_type is not None)

    def fraction(self) -> float:
        """Share of finished tasks of the widest stage of the marked jobs (0 when none).

        The widest stage is the featurization; small side jobs (a broadcast, a count) finish
        early and must not read as "all done".
        """
        return self.tracker.fraction()

    def line(self, done: int, elapsed: float) -> str:
        """One progress line for ``done`` of ``total`` items after ``elapsed`` seconds."""
        text = f"{self.what}: {done} of {self.total} images"
        if done and elapsed > 0:
            rate = done / elapsed
            text += f", {rate:.1f} images/s, about {(self.total - done) / rate:.0f} s left"
        else:
            text += f", starting ({elapsed:.0f} s)"
        return text

    def _run(self) -> None:
        next_report = self.every
        while not self._stop.wait(min(1.0, self.every)):
            elapsed = time.perf_counter() - self.started
            if elapsed < next_report:
                continue
            next_report = elapsed + self.every
            try:
                done = int(self.fraction() * self.total)
            except Exception:  # noqa: BLE001 - the session may be stopping; progress is optional
                return
            self.log(self.line(done, elapsed))


def _widest(stages) -> float:
    """Finished share of the stage with the most tasks, of (tasks, finished tasks) pairs."""
    best = max(stages, key=lambda st: st[0], default=None)
    return min(1.0, best[1] / best[0]) if best is not None and best[0] else 0.0


class ClassicTracker:
    """A job group on this thread (the caller's group comes back afterwards), polled through
    ``statusTracker()``."""

    def __init__(self, spark, group: str) -> None:
        self.sc, self.group = spark.sparkContext, group
        self._previous_group: str | None = None

    def start(self, description: str) -> None:
        self._previous_group = self.sc.getLocalProperty("spark.jobGroup.id")
        self.sc.setJobGroup(self.group, description)

    def stop(self, failed: bool) -> None:
        self.sc.setLocalProperty("spark.jobGroup.id", self._previous_group)
        self.sc.setLocalProperty("spark.job.description", None)

    def fraction(self) -> float:
        tracker = self.sc.statusTracker()
        stages = []
        for job_id in tracker.getJobIdsForGroup(self.group):
            info = tracker.getJobInfo(job_id)
            for stage_id in (info.stageIds if info else ()):
                stage = tracker.getStageInfo(stage_id)
                if stage is not None:
                    stages.append((stage.numTasks, stage.numCompletedTasks))
        return _widest(stages)


class ConnectTracker:
    """A Spark Connect operation tag on this thread and a progress handler for its operations."""

    def __init__(self, spark, group: str) -> None:
        self.spark, self.group = spark, group
        self.stages: dict[int, tuple[int, int]] = {}  # stage id -> (tasks, finished tasks)
        self._thread_id = threading.get_ident()

    def __call__(self, stages, inflight_tasks: int, operation_id, done: bool) -> None:
        """The progress handler: called for every operation of the session, on its own thread."""
        if threading.get_ident() != self._thread_id:
            return  # another thread's operation (a sweep's fits run alongside)
        for stage in stages or ():
            self.stages[stage.stage_id] = (stage.num_tasks, stage.num_completed_tasks)

    def start(self, description: str) -> None:
        self._thread_id = threading.get_ident()
        self.spark.addTag(self.group)
        self.spark.registerProgressHandler(self)

    def stop(self, failed: bool) -> None:
        self.spark.removeProgressHandler(self)
        self.spark.removeTag(self.group)
        if failed:  # e.g. Ctrl-C: the server would otherwise run the job on
            self.spark.interruptTag(self.group)

    def fraction(self) -> float:
        return _widest(list(self.stages.values()))
