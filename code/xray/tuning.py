"""The tuned head: ``classifier.grid`` chooses LogisticRegression's settings by cross-validation.

Spark ML's own ``CrossValidator`` and ``ParamGridBuilder`` run on the training split only, over
the ``fold`` column of :func:`xray.split.with_split` (``foldCol``: the project's seeded folds,
not Spark's random ones; the test split stays untouched). Every candidate is fitted on all folds
but one and scored on that one; the candidate with the lowest mean **log loss** wins and
CrossValidator refits it on the whole training split. The head then has the same stages as an
untuned one, so the saved ``PipelineModel`` has the same shape.

Why log loss: it scores the predicted probabilities, not only their argmax. On small validation
folds accuracy moves in steps of one image and ties between regularization strengths are common;
log loss separates them, and it is what ``regParam`` trades off (confident fits against
overfitting). It is also the quantity LogisticRegression minimizes, so the choice is consistent
with the fit. Cross-validation sees features only (from the feature cache): a candidate costs
``folds`` LogisticRegression fits and no featurization.
"""

from __future__ import annotations

import time

from pyspark.ml.evaluation import MulticlassClassificationEvaluator
from pyspark.ml.feature import StringIndexer
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder
from pyspark.sql import DataFrame

from . import experiment
from .data import LABEL

DEFAULT_FOLDS = 3  # folds for the grid when cv_folds < 2
METRIC = "logLoss"
PROBE, TUNED_PROBE = "linear probe", "tuned probe"


def grid_of(settings: dict) -> dict[str, list]:
    """The ``classifier.grid`` of an experiment: setting -> candidate values (empty: no tuning)."""
    return {k: list(v) for k, v in (settings["classifier"].get("grid") or {}).items() if v}


def fold_count(settings: dict) -> int:
    """Folds of the training split's ``fold`` column: ``cv_folds``, or :data:`DEFAULT_FOLDS` when
    a grid needs folds and ``cv_folds`` < 2."""
    folds = settings["cv_folds"]
    return folds if folds > 1 or not grid_of(settings) else DEFAULT_FOLDS


def method(settings: dict) -> str:
    return TUNED_PROBE if grid_of(settings) else PROBE


def fit_head(train: DataFrame, settings: dict, classes: list[str], log=print) -> tuple[tuple, dict | None]:
    """(the fitted head, the tuning record or None) on feature rows with ``fold``.

    Without a grid this is :func:`xray.experiment.fit_head`. With one, the record holds every
    candidate's mean and standard deviation of the validation log loss over the folds, the
    choice, the refit's settings and the seconds spent (tuning and the refit together).
    """
    grid = grid_of(settings)
    if not grid:
        return experiment.fit_head(train, settings, len(classes)), None
    folds = fold_count(settings)
    experiment.check_fold_sizes(train, classes, folds, f"classifier.grid over {folds} folds")
    started = time.perf_counter()
    rows = experiment.fit_rows(train.select(LABEL, "features", "fold"))
    indexer = StringIndexer(inputCol=LABEL, outputCol=experiment.LABEL_INDEX, stringOrderType="alphabetAsc").fit(rows)
    lr = experiment.make_classifier(settings, len(classes))
    builder = ParamGridBuilder()
    for name, values in grid.items():
        builder.addGrid(lr.getParam(name), values)
    maps = builder.build()
    evaluator = MulticlassClassificationEvaluator(labelCol=experiment.LABEL_INDEX, metricName=METRIC)
    log(f"tuning the head: {len(maps)} candidates x {folds} folds of the training split, by {METRIC}")
    cv = CrossValidator(estimator=lr, estimatorParamMaps=maps, evaluator=evaluator, numFolds=folds,
                        foldCol="fold", seed=settings["seed"]).fit(indexer.transform(rows))
    record = _record(maps, cv.avgMetrics, cv.stdMetrics, settings, folds, time.perf_counter() - started)
    log(f"tuning: chose {record['chosen']} (mean {METRIC} {record['chosen_mean']:.4f}) in {record['seconds']:.1f} s")
    converter = experiment.index_to_string(indexer)
    return (indexer, cv.bestModel, converter), record


def _record(maps, means, stds, settings: dict, folds: int, seconds: float) -> dict:
    # std: Spark's stdMetrics, the population standard deviation over the folds (ddof 0)
    candidates = [{"params": {p.name: v for p, v in m.items()}, "mean": float(mu), "std": float(sd)}
                  for m, mu, sd in zip(maps, means, stds)]
    best = min(range(len(candidates)), key=lambda i: candidates[i]["mean"])  # log loss: lower is better
    chosen = candidates[best]["params"]
    return {
        "metric": METRIC,
        "lower_is_better": True,
        "spread": "std over the folds (population, as Spark's CrossValidatorModel.stdMetrics)",
        "folds": folds,
        "on": "training split (test split held out); foldCol 'fold'",
        "grid": grid_of(settings),
        "candidates": candidates,
        "chosen": chosen,
        "chosen_mean": candidates[best]["mean"],
        "chosen_std": candidates[best]["std"],
        "classifier": {**{k: v for k, v in settings["classifier"].items() if k != "grid"}, **chosen},
        "fits": len(candidates) * folds + 1,
        "seconds": round(seconds, 3),
    }


def chosen_settings(settings: dict, record: dict | None) -> dict:
    """``settings`` with the classifier the tuning chose (unchanged without tuning)."""
    return settings if record is None else {**settings, "classifier": record["classifier"]}
