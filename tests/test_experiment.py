"""The linear-probe pipeline on hand-made feature vectors (no backbone): fit, evaluate,
cross-validate, assemble, and saving a model atomically, failures included."""

from __future__ import annotations

import os

import numpy as np
import pytest
from pyspark.ml import PipelineModel
from pyspark.ml.feature import StringIndexer

from imagefeaturizer.featurizer import KerasImageFeaturizer
from conftest import feature_rows
from xray import experiment
from xray.errors import DataError
from xray.split import with_split

CLASSES = ["a", "b", "c"]
SETTINGS = {"classifier": {"regParam": 0.01, "elasticNetParam": 0.0, "maxIter": 10, "tol": 1e-6,
                           "standardization": True}}


def _feature_rows(spark, per_class: int = 6):
    """Three well-separated clusters in 4 dimensions, one per class."""
    return feature_rows(spark, CLASSES, per_class, noise=0.2, seed=0)


def test_fit_evaluate_assemble_and_cross_validate_on_separable_features(spark):
    split = with_split(_feature_rows(spark), seed=1, test_fraction=0.34, cv_folds=2).cache()
    train, test = split.filter("not is_test"), split.filter("is_test")
    head = experiment.fit_head(train, SETTINGS, len(CLASSES))
    assert list(head[0].labels) == CLASSES  # alphabetical: label index i is CLASSES[i]
    assert head[1].numClasses == 3 and head[1].numFeatures == 4
    metrics, pred = experiment.evaluate(head, test, CLASSES)
    assert metrics["n_test"] == 6 and metrics["accuracy"] == 1.0
    assert pred["probability"].shape == (6, 3)
    assert np.array_equal(pred["y_pred"], pred["probability"].argmax(axis=1))
    assert all(path.split("/")[-2] == CLASSES[y] for path, y in zip(pred["path"], pred["y_true"]))
    model = experiment.assemble(head, KerasImageFeaturizer(inputCol="content", outputCol="features",
                                                           modelName="ResNet50", weights="random"))
    assert [type(s).__name__ for s in model.stages] == [
        "StringIndexerModel", "KerasImageFeaturizer", "LogisticRegressionModel", "IndexToString"]
    assert model.stages[3].getLabels() == CLASSES

    cv = experiment.cross_validate(train, SETTINGS, CLASSES, 2)
    assert [f["fold"] for f in cv["per_fold"]] == [0, 1]
    assert sum(f["n_validation"] for f in cv["per_fold"]) == 12  # the folds partition the training split
    assert all(f["n_train"] + f["n_validation"] == 12 for f in cv["per_fold"])
    assert cv["accuracy"]["mean"] == pytest.approx(np.mean([f["accuracy"] for f in cv["per_fold"]]))
    assert set(cv["recall"]) == set(CLASSES)
    with pytest.raises(DataError, match=r"cv_folds=5 needs at least 5 training images per class \(a has 4, b has 4, c has 4\)"):
        experiment.cross_validate(train, SETTINGS, CLASSES, 5)
    split.unpersist()


def _indexer_model(spark, labels: list[str]):
    df = spark.createDataFrame([(x,) for x in labels], "label string")
    return PipelineModel([StringIndexer(inputCol="label", outputCol="i", stringOrderType="alphabetAsc").fit(df)])


class _FailingWriter:
    """A model whose save writes part of the folder, then fails (as a full disk would)."""

    def write(self):
        return self

    def save(self, path: str) -> None:
        os.makedirs(os.path.join(path, "metadata"))
        with open(os.path.join(path, "metadata", "part-00000"), "w") as f:
            f.write("{")
        raise OSError(28, "No space left on device")


def test_save_model_failures_leave_the_previous_model(spark, tmp_path, monkeypatch):
    dest = str(tmp_path / "results" / "model")
    experiment.save_model_atomic(_indexer_model(spark, ["x", "y"]), dest)

    def labels() -> list[str]:
        return list(PipelineModel.load(dest).stages[0].labels)

    # The writer fails half-way: the previous model stays, loadable, and nothing else is left.
    with pytest.raises(OSError, match="No space left"):
        experiment.save_model_atomic(_FailingWriter(), dest)
    assert labels() == ["x", "y"] and os.listdir(tmp_path / "results") == ["model"]

    # The last rename fails (the old model was already moved aside): the old model is put back.
    real_replace = os.replace

    def failing_replace(src, dst):
        name = os.path.basename(str(src))
        if name.startswith(".tmp-") and "-model-" in name:  # the staged model (temporaries name their owner first)
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match="Input/output error"):
            experiment.save_model_atomic(_indexer_model(spark, ["p", "q", "r"]), dest)
    assert labels() == ["x", "y"] and os.listdir(tmp_path / "results") == ["model"]

    # A save that succeeds replaces it.
    experiment.save_model_atomic(_indexer_model(spark, ["p", "q", "r"]), dest)
    assert labels() == ["p", "q", "r"] and os.listdir(tmp_path / "results") == ["model"]
