"""Progress of long Spark jobs on the driver: featurization (:mod:`xray.features`) and
``predict`` report through :class:`Progress`: "featurizing: 320 of 1000 images, 12.1 images/s,
about 56 s left", at most every :data:`PROGRESS_EVERY_S` seconds, nothing for short jobs.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

PROGRESS_EVERY_S = 10.0  # seconds between progress lines; none for steps shorter than this


class Progress:
    """Progress of the Spark jobs run inside ``with Progress(...)``, logged from a driver thread.

    The jobs get their own job group; a thread polls ``statusTracker()`` and scales the share of
    finished tasks of the group's widest stage to ``total`` items: "featurizing: 320 of 1000
    images, 12.1 images/s, about 56 s left". Nothing is logged before ``every`` seconds, so short
    steps (and tests) stay quiet. The estimate is per task: Spark reports no finer progress.
    """

    def __init__(self, spark, total: int, log: Callable[[str], object] = print, what: str = "featurizing",
                 every: float | None = None) -> None:
        self.sc = spark.sparkContext
        self.total, self.log, self.what = total, log, what
        self.every = PROGRESS_EVERY_S if every is None else every
        self.group = f"xray-progress-{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_group: str | None = None

    def __enter__(self) -> "Progress":
        self._previous_group = self.sc.getLocalProperty("spark.jobGroup.id")
        self.sc.setJobGroup(self.group, f"{self.what} {self.total} images")
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="xray-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sc.setLocalProperty("spark.jobGroup.id", self._previous_group)
        self.sc.setLocalProperty("spark.job.description", None)

    def fraction(self) -> float:
        """Share of finished tasks of the group's widest stage (0 when none).

        The widest stage is the featurization; small side jobs of the group (a broadcast, a
        count) finish early and must not read as "all done".
        """
        tracker = self.sc.statusTracker()
        best = None
        for job_id in tracker.getJobIdsForGroup(self.group):
            info = tracker.getJobInfo(job_id)
            for stage_id in (info.stageIds if info else ()):
                stage = tracker.getStageInfo(stage_id)
                if stage is not None and stage.numTasks and (best is None or stage.numTasks > best.numTasks):
                    best = stage
        return min(1.0, best.numCompletedTasks / best.numTasks) if best is not None else 0.0

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
