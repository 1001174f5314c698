"""The linear probe: build, fit, evaluate and save one Spark ML pipeline on a frozen backbone.

The fitted model is one Spark ML ``PipelineModel``:
``StringIndexer`` (class folder names -> label index) -> ``KerasImageFeaturizer`` ->
``LogisticRegression`` -> ``IndexToString`` (prediction -> class name). It is saved with
``write().save()`` and loads with ``PipelineModel.load()`` in any process.

Fitting is ``Pipeline.fit`` spelled out so that each image is featurized once (through the
feature cache) and then shared by training and evaluation: the featurizer is a Transformer with
nothing to learn, so :func:`assemble` gives the very same model ``Pipeline.fit`` would return.
The run of a whole experiment, step by step, is :mod:`xray.run`.
"""

from __future__ import annotations

import numpy as np
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression, LogisticRegressionModel
from pyspark.ml.feature import IndexToString, StringIndexer, StringIndexerModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer.export import EngineError, EnginePlan
from imagefeaturizer.featurizer import KerasImageFeaturizer

from .atomic import atomic_folder
from .config import Experiment
from .data import LABEL
from .errors import ConfigError, DataError
from .evaluation import auc, classification_metrics, spread

LABEL_INDEX, PREDICTED = "label_index", "predicted_label"
ROWS_PER_FIT_PARTITION = 20_000  # 2048 doubles a row: about 330 MB of training rows a partition


def make_featurizer(exp: Experiment) -> KerasImageFeaturizer:
    """The featurizer stage of an experiment: image bytes (``content``) -> ``features``."""
    return KerasImageFeaturizer(
        inputCol="content",
        outputCol="features",
        modelName=exp.model,
        weights=exp.weights,
        pooling=exp["pooling"],
        batchSize=exp["batch_size"],
        handleInvalid=exp["handleInvalid"],
        maxImagePixels=exp["max_image_pixels"],
        engine=exp.settings.get("engine", "auto"),
        modelCacheDir=exp.model_cache_dir,
    )


def prepare_engine(spark, featurizer: KerasImageFeaturizer, log=print) -> EnginePlan:
    """Which engine runs the featurizer (exporting its model first when needed), said in ``log``;
    an engine named in the config that cannot run is a one-line :class:`ConfigError`."""
    try:
        plan = featurizer.resolveEngine(spark, log=log)
    except EngineError as exc:
        raise ConfigError(str(exc)) from None
    log(plan.describe())
    return plan


def make_classifier(settings: dict, n_classes: int) -> LogisticRegression:
    c = settings["classifier"]
    return LogisticRegression(
        featuresCol="features",
        labelCol=LABEL_INDEX,
        family="binomial" if n_classes == 2 else "multinomial",
        regParam=c["regParam"],
        elasticNetParam=c["elasticNetParam"],
        maxIter=c["maxIter"],
        tol=c["tol"],
        standardization=c["standardization"],
    )


def fit_head(train: DataFrame, settings: dict, n_classes: int
             ) -> tuple[StringIndexerModel, LogisticRegressionModel, IndexToString]:
    """(StringIndexerModel, LogisticRegressionModel, IndexToString) fitted on feature rows.

    Each L-BFGS iteration of Spark's LogisticRegression is one Spark job over the training rows
    (which it caches itself, as blocks): they come in as few partitions as their size allows (one
    up to :data:`ROWS_PER_FIT_PARTITION` rows), so an iteration costs one task, not one per
    shuffle partition of the feature join (about 2.5 times faster fits here; two partitions on
    two cores were slower than one).
    """
    rows = fit_rows(train.select(LABEL, "features"))
    indexer = StringIndexer(inputCol=LABEL, outputCol=LABEL_INDEX, stringOrderType="alphabetAsc")
    fitted = Pipeline(stages=[indexer, make_classifier(settings, n_classes)]).fit(rows)
    indexer_model, lr_model = fitted.stages
    return indexer_model, lr_model, index_to_string(indexer_model)


def fit_rows(rows: DataFrame) -> DataFrame:
    """Training rows in as few partitions as their size allows (see :func:`fit_head`)."""
    return rows.coalesce(max(1, -(-rows.count() // ROWS_PER_FIT_PARTITION)))  # never more than they have


def index_to_string(indexer_model: StringIndexerModel) -> IndexToString:
    """The last stage: the predicted index back to the class name."""
    return IndexToString(inputCol="prediction", outputCol=PREDICTED, labels=indexer_model.labels)


def assemble(head: tuple, featurizer: KerasImageFeaturizer) -> PipelineModel:
    """The whole model, which takes image bytes: the fitted head with the featurizer in place."""
    indexer_model, lr_model, converter = head
    return PipelineModel([indexer_model, featurizer, lr_model, converter])


def predict_rows(stages: list, df: DataFrame) -> dict[str, np.ndarray]:
    """Apply fitted head stages to feature rows; collect the (small) prediction columns."""
    out = PipelineModel(stages).transform(df).select("path", LABEL_INDEX, "prediction", "probability").toPandas()
    return {
        "path": out["path"].to_numpy(),
        "y_true": out[LABEL_INDEX].to_numpy(dtype=int),
        "y_pred": out["prediction"].to_numpy(dtype=int),
        "probability": np.stack([np.asarray(p.toArray()) for p in out["probability"]]) if len(out) else np.zeros((0, 0)),
    }


def evaluate(head: tuple, rows: DataFrame, classes: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """(metrics, predictions) of a fitted head on feature rows."""
    pred = predict_rows(list(head), rows)
    return classification_metrics(pred["y_true"], pred["y_pred"], pred["probability"], classes), pred


def cross_validate(train: DataFrame, settings: dict, classes: list[str], folds: int) -> dict:
    """Stratified k-fold cross-validation on the training split (the ``fold`` column of
    :func:`xray.split.assign_split`: group folds, each group in one fold).

    Fold ``f`` is validated by a head fitted on the other folds; the test split is never used.
    Returns the per-fold metrics and their mean, standard deviation (ddof=1), min and max.
    """
    check_fold_sizes(train, classes, folds)
    per_fold = [_fold(train, settings, classes, f) for f in range(folds)]
    return {
        "folds": folds,
        "stratified": True,
        "on": "training split (test split held out)",
        "accuracy": spread([p["accuracy"] for p in per_fold]),
        "balanced_accuracy": spread([p["balanced_accuracy"] for p in per_fold]),
        "auc": spread([p["auc"] for p in per_fold]),
        "recall": {c: spread([p["recall"][c] for p in per_fold]) for c in classes},
        "per_fold": per_fold,
    }


def check_fold_sizes(train: DataFrame, classes: list[str], folds: int, what: str | None = None) -> None:
    """Every class needs at least one training image per fold, or a fold's fit lacks it."""
    counts = {r[LABEL]: r["count"] for r in train.groupBy(LABEL).count().collect()}
    short = {c: counts.get(c, 0) for c in classes if counts.get(c, 0) < folds}
    if short:
        found = ", ".join(f"{c} has {n}" for c, n in short.items())
        raise DataError(f"{what or f'cv_folds={folds}'} needs at least {folds} training images per class ({found}): "
                        f"lower cv_folds")


def _fold(train: DataFrame, settings: dict, classes: list[str], f: int) -> dict:
    """Fit on every fold but ``f``, validate on ``f``."""
    fit_rows, held = train.filter(F.col("fold") != f), train.filter(F.col("fold") == f)
    m, _ = evaluate(fit_head(fit_rows, settings, len(classes)), held, classes)
    return {
        "fold": f,
        "n_train": fit_rows.count(),
        "n_validation": m["n_test"],
        "accuracy": m["accuracy"],
        "balanced_accuracy": m["balanced_accuracy"],
        "auc": auc(m),
        "recall": {c: v["recall"] for c, v in m["per_class"].items()},
    }


def save_model_atomic(model: PipelineModel, dest: str) -> None:
    """Save next to ``dest`` and rename into place: a reader sees the old model or the new one,
    and a failed save leaves the old one in place."""
    with atomic_folder(dest) as tmp:
        model.write().save(tmp)
