"""Progress of a Spark job: the share of finished tasks of its group's widest stage, and the line."""

from __future__ import annotations

import time

from xray.progress import Progress


def test_fraction_counts_the_finished_tasks_of_the_group(spark):
    sc = spark.sparkContext
    sc.setJobGroup("outer", "the caller's own group")
    try:
        with Progress(spark, 40, log=lambda line: None, every=3600) as progress:
            assert progress.fraction() == 0.0  # no job of the group yet
            assert sc.getLocalProperty("spark.jobGroup.id") == progress.group
            sc.parallelize(range(40), 4).map(lambda x: x * x).sum()  # one stage of 4 tasks, finished
            # Spark's status store takes the tasks' end events from its listener bus a moment after
            # the job returns (seconds on a busy machine): wait for them, then every task counts.
            waited = time.monotonic() + 60
            while progress.fraction() < 1.0 and time.monotonic() < waited:
                time.sleep(0.05)
            assert progress.fraction() == 1.0
        assert sc.getLocalProperty("spark.jobGroup.id") == "outer"  # the caller's group is back
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)


def test_progress_line(spark):
    progress = Progress(spark, 1000, what="predicting")
    assert progress.line(320, 32.0) == "predicting: 320 of 1000 images, 10.0 images/s, about 68 s left"
    assert progress.line(0, 4.2) == "predicting: 0 of 1000 images, starting (4 s)"


class _ConnectSession:
    """What the Spark Connect tracker uses of a session: tags and progress handlers."""

    def __init__(self) -> None:
        self.tags: set[str] = set()
        self.handlers: list = []
        self.interrupted: list[str] = []

    def addTag(self, tag):  # noqa: N802 - Spark's names
        self.tags.add(tag)

    def removeTag(self, tag):  # noqa: N802
        self.tags.discard(tag)

    def registerProgressHandler(self, handler):  # noqa: N802
        self.handlers.append(handler)

    def removeProgressHandler(self, handler):  # noqa: N802
        self.handlers.remove(handler)

    def interruptTag(self, tag):  # noqa: N802
        self.interrupted.append(tag)


def _report(session, stages):
    from pyspark.sql.connect.shell.progress import StageInfo

    for handler in session.handlers:
        handler(stages=[StageInfo(i, n, done, 0, done == n) for i, (n, done) in stages.items()],
                inflight_tasks=0, operation_id="op", done=False)


def test_connect_tracker_reads_the_stages_of_this_threads_operations():
    import threading

    from xray.progress import ConnectTracker

    session = _ConnectSession()
    tracker = ConnectTracker(session, "xray-progress-test")
    tracker.start("featurizing 40 images")
    assert session.tags == {"xray-progress-test"} and session.handlers == [tracker]
    _report(session, {1: (1, 1), 2: (8, 2)})  # a small side job done, 2 of 8 featurization tasks
    assert tracker.fraction() == 0.25
    other = threading.Thread(target=_report, args=(session, {3: (100, 100)}))  # a fit on another thread
    other.start()
    other.join()
    assert tracker.fraction() == 0.25
    tracker.stop(failed=False)
    assert session.tags == set() and session.handlers == [] and session.interrupted == []
    tracker.start("again")
    tracker.stop(failed=True)  # leaving with an error interrupts what still runs under the tag
    assert session.interrupted == ["xray-progress-test"]
