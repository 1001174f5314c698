"""The tuned head on hand-made feature vectors: Spark's CrossValidator over the split's folds, the
record of every candidate, the choice and the refit on the whole training split."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.sql import functions as F

from conftest import feature_rows
from xray import experiment, tuning
from xray.errors import DataError
from xray.split import with_split

CLASSES = ["a", "b", "c"]
CLASSIFIER = {"regParam": 0.01, "elasticNetParam": 0.0, "maxIter": 5, "tol": 1e-6, "standardization": True}


def _settings(grid=None, cv_folds=0):
    return {"seed": 3, "cv_folds": cv_folds, "classifier": {**CLASSIFIER, **({"grid": grid} if grid else {})}}


def _feature_rows(spark, per_class: int = 12):
    """Three clusters in 4 dimensions that overlap a little."""
    return feature_rows(spark, CLASSES, per_class, noise=1.0, seed=1)


def test_no_grid_is_the_plain_probe():
    settings = _settings(cv_folds=0)
    assert tuning.grid_of(settings) == {} and tuning.method(settings) == "linear probe"
    assert tuning.fold_count(settings) == 0 and tuning.chosen_settings(settings, None) is settings
    tuned = _settings({"regParam": [0.1, 1.0]})
    assert tuning.method(tuned) == "tuned probe" and tuning.fold_count(tuned) == tuning.DEFAULT_FOLDS
    assert tuning.fold_count(_settings({"regParam": [0.1]}, cv_folds=5)) == 5


@pytest.mark.slow  # 7 LogisticRegression fits in Spark, each a few Spark jobs an iteration
def test_cross_validator_scores_each_candidate_on_the_folds_and_refits_the_best(spark):
    grid = {"regParam": [0.01, 30.0]}
    settings = _settings(grid, cv_folds=2)  # 2 candidates x 2 folds + the refit: 5 fits
    folds = tuning.fold_count(settings)
    split = with_split(_feature_rows(spark), seed=3, test_fraction=0.25, cv_folds=folds).cache()
    train = split.filter(~F.col("is_test"))
    head, record = tuning.fit_head(train, settings, CLASSES, log=lambda *_: None)

    assert [c["params"] for c in record["candidates"]] == [{"regParam": r} for r in grid["regParam"]]
    assert record["metric"] == "logLoss" and record["folds"] == folds and record["fits"] == 2 * folds + 1
    best = min(record["candidates"], key=lambda c: c["mean"])
    assert record["chosen"] == best["params"] and record["chosen_mean"] == best["mean"]
    assert record["chosen"] == {"regParam": 0.01}  # near-uniform probabilities (30.0) lose on log loss
    # The chosen candidate's mean and spread are what fitting on the other folds and scoring the
    # held-out fold give, fold by fold (our own loop over the same fold column).
    evaluator = MulticlassClassificationEvaluator(labelCol=experiment.LABEL_INDEX, metricName="logLoss")
    losses = []
    for f in range(folds):
        fold_settings = {"classifier": {**CLASSIFIER, **best["params"]}}
        fitted = experiment.fit_head(train.filter(F.col("fold") != f), fold_settings, len(CLASSES))
        held = fitted[0].transform(train.filter(F.col("fold") == f))
        losses.append(evaluator.evaluate(fitted[1].transform(held)))
    assert best["mean"] == pytest.approx(np.mean(losses), rel=1e-3)
    assert best["std"] == pytest.approx(np.std(losses), rel=1e-2, abs=1e-4)  # Spark's: over the folds, ddof 0

    # The head has the untuned shape, its LogisticRegression refitted on the whole training split.
    indexer, lr_model, converter = head
    assert list(indexer.labels) == CLASSES and converter.getLabels() == CLASSES
    assert lr_model.getRegParam() == record["chosen"]["regParam"]
    assert lr_model.summary.predictions.count() == train.count()
    assert tuning.chosen_settings(settings, record)["classifier"]["regParam"] == record["chosen"]["regParam"]
    metrics, _ = experiment.evaluate(head, split.filter("is_test"), CLASSES)
    assert metrics["n_test"] == split.filter("is_test").count()
    split.unpersist()


def test_grid_needs_images_in_every_fold(spark):
    settings = _settings({"regParam": [0.1, 1.0]}, cv_folds=5)
    train = with_split(_feature_rows(spark, per_class=4), seed=3, test_fraction=0.25, cv_folds=5).filter("not is_test")
    with pytest.raises(DataError, match=r"classifier.grid over 5 folds needs at least 5 training images per class"):
        tuning.fit_head(train, settings, CLASSES, log=lambda *_: None)


# A whole run with a grid (the record in metrics.json, the saved model's shape) is checked in the
# shared sweep of tests/test_sweep_predict.py, on cached features.


def test_grid_over_group_folds_that_lack_a_class_stops_before_any_fit():
    """With split.group_pattern one patient's images share a fold: a grid's fold whose training
    part would lack a class is named in one line by the split, before CrossValidator runs."""
    import os

    from conftest import ROOT
    from xray.config import load_config
    from xray.run import assign_experiment_split, split_folds

    exp = load_config(os.path.join(ROOT, "config.yaml")).experiment(
        "ResNet50_binary_classification", ["classifier.grid.regParam=[0.1,1.0]"])
    assert split_folds(exp) == tuning.DEFAULT_FOLDS
    keys = [(f"file:/d/Covid-19/00000001_{i:03d}.png", "Covid-19") for i in range(6)]  # one patient
    keys += [(f"file:/d/No_findings/n{i}.png", "No_findings") for i in range(12)]
    with pytest.raises(DataError, match=r"^classifier.grid over 3 folds: fold \d would be validated by a model "
                                        r"trained without Covid-19: .*: lower cv_folds .* or remove classifier.grid$"):
        assign_experiment_split(exp, keys, ["Covid-19", "No_findings"], log=lambda *_: None)
