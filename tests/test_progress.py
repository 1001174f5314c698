"""Progress of a Spark job: the share of finished tasks of its group's widest stage, and the line."""

from __future__ import annotations

from xray.progress import Progress


def test_fraction_counts_the_finished_tasks_of_the_group(spark):
    sc = spark.sparkContext
    sc.setJobGroup("outer", "the caller's own group")
    try:
        with Progress(spark, 40, log=lambda line: None, every=3600) as progress:
            assert progress.fraction() == 0.0  # no job of the group yet
            assert sc.getLocalProperty("spark.jobGroup.id") == progress.group
            sc.parallelize(range(40), 4).map(lambda x: x * x).sum()  # one stage of 4 tasks, finished
            assert progress.fraction() == 1.0
        assert sc.getLocalProperty("spark.jobGroup.id") == "outer"  # the caller's group is back
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)


def test_progress_line(spark):
    progress = Progress(spark, 1000, what="predicting")
    assert progress.line(320, 32.0) == "predicting: 320 of 1000 images, 10.0 images/s, about 68 s left"
    assert progress.line(0, 4.2) == "predicting: 0 of 1000 images, starting (4 s)"
