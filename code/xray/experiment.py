"""One experiment: data -> features -> LogisticRegression -> metrics and a saved PipelineModel.

The fitted model is one Spark ML ``PipelineModel``:
``StringIndexer`` (class folder names -> label index) -> ``KerasImageFeaturizer`` ->
``LogisticRegression`` -> ``IndexToString`` (prediction -> class name). It is saved with
``write().save()`` and loads with ``PipelineModel.load()`` in any process.

Fitting is ``Pipeline.fit`` spelled out so that each image is featurized once (through the
feature cache) and then shared by training and evaluation: the featurizer is a Transformer with
nothing to learn, so the assembled model is the very same one ``Pipeline.fit`` would return.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import IndexToString, StringIndexer
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer

from . import data, reports
from .data import LABEL
from .split import with_split
from .config import Experiment
from .errors import DataError, UserError
from .evaluation import classification_metrics
from .features import FeaturizeStats, featurize_cached, weights_id
from .session import spark_session

LABEL_INDEX, PREDICTED = "label_index", "predicted_label"


def load_images(spark: SparkSession, root: str, classes: list[str]) -> DataFrame:
    """(path, label, content) for the PNGs of each class folder; read by executors."""
    frames = [
        spark.read.format("binaryFile")
        .option("pathGlobFilter", "*.png")
        .option("recursiveFileLookup", "true")
        .load(os.path.join(root, cls))
        .select("path", F.lit(cls).alias(LABEL), "content")
        for cls in classes
    ]
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame)
    return result


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


ROWS_PER_FIT_PARTITION = 20_000  # 2048 doubles a row: about 330 MB of training rows a partition


def fit_head(train: DataFrame, settings: dict, n_classes: int) -> tuple:
    """(StringIndexerModel, LogisticRegressionModel, IndexToString) fitted on feature rows.

    Each L-BFGS iteration of Spark's LogisticRegression is one Spark job over the training rows
    (which it caches itself, as blocks): they come in as few partitions as their size allows (one
    up to :data:`ROWS_PER_FIT_PARTITION` rows), so an iteration costs one task, not one per
    shuffle partition of the feature join (about 2.5 times faster fits here; two partitions on
    two cores were slower than one).
    """
    rows = train.select(LABEL, "features")
    partitions = max(1, min(rows.rdd.getNumPartitions(), -(-rows.count() // ROWS_PER_FIT_PARTITION)))
    rows = rows.coalesce(partitions)
    indexer = StringIndexer(inputCol=LABEL, outputCol=LABEL_INDEX, stringOrderType="alphabetAsc")
    fitted = Pipeline(stages=[indexer, make_classifier(settings, n_classes)]).fit(rows)
    indexer_model, lr_model = fitted.stages
    converter = IndexToString(inputCol="prediction", outputCol=PREDICTED, labels=indexer_model.labels)
    return indexer_model, lr_model, converter


def predict_rows(stages: list, df: DataFrame) -> dict[str, np.ndarray]:
    """Apply fitted head stages to feature rows; collect the (small) prediction columns."""
    out = PipelineModel(stages).transform(df).select("path", LABEL_INDEX, "prediction", "probability").toPandas()
    return {
        "path": out["path"].to_numpy(),
        "y_true": out[LABEL_INDEX].to_numpy(dtype=int),
        "y_pred": out["prediction"].to_numpy(dtype=int),
        "probability": np.stack([np.asarray(p.toArray()) for p in out["probability"]]) if len(out) else np.zeros((0, 0)),
    }


def _auc(m: dict) -> float | None:
    """The binary AUC, or the macro one-vs-rest AUC for more classes."""
    return m["roc"].get("auc") if m["roc"]["kind"] == "binary" else m["roc"].get("macro_auc")


def _spread(values: list[float | None]) -> dict | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    arr = np.asarray(known, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n_folds": len(known),
    }


def cross_validate(train: DataFrame, settings: dict, classes: list[str], folds: int) -> dict:
    """Stratified k-fold cross-validation on the training split (the ``fold`` column of with_split).

    Fold ``f`` is validated by a head fitted on the other folds; the test split is never used.
    Returns the per-fold metrics and their mean, standard deviation (ddof=1), min and max.
    """
    counts = {r[LABEL]: r["count"] for r in train.groupBy(LABEL).count().collect()}
    short = {c: counts.get(c, 0) for c in classes if counts.get(c, 0) < folds}
    if short:
        found = ", ".join(f"{c} has {n}" for c, n in short.items())
        raise DataError(f"cv_folds={folds} needs at least {folds} training images per class ({found}): lower cv_folds")
    per_fold = []
    for f in range(folds):
        fit_rows, held = train.filter(F.col("fold") != f), train.filter(F.col("fold") == f)
        indexer_model, lr_model, converter = fit_head(fit_rows, settings, len(classes))
        pred = predict_rows([indexer_model, lr_model, converter], held)
        m = classification_metrics(pred["y_true"], pred["y_pred"], pred["probability"], classes)
        per_fold.append({
            "fold": f,
            "n_train": fit_rows.count(),
            "n_validation": m["n_test"],
            "accuracy": m["accuracy"],
            "balanced_accuracy": m["balanced_accuracy"],
            "auc": _auc(m),
            "recall": {c: v["recall"] for c, v in m["per_class"].items()},
        })
    return {
        "folds": folds,
        "stratified": True,
        "on": "training split (test split held out)",
        "accuracy": _spread([p["accuracy"] for p in per_fold]),
        "balanced_accuracy": _spread([p["balanced_accuracy"] for p in per_fold]),
        "auc": _spread([p["auc"] for p in per_fold]),
        "recall": {c: _spread([p["recall"][c] for p in per_fold]) for c in classes},
        "per_fold": per_fold,
    }


def save_model_atomic(model: PipelineModel, dest: str) -> None:
    """Save next to ``dest`` and rename into place: a reader sees the old model or the new one."""
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-model-{uuid.uuid4().hex}")
    old = os.path.join(parent, f".old-model-{uuid.uuid4().hex}")
    try:
        model.write().save(tmp)
        if os.path.exists(dest):
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("pyspark", "tensorflow-cpu", "tensorflow", "keras", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def ensure_resized(spark: SparkSession, exp: Experiment, log=print) -> None:
    """Run the resize job when ``resized_dir`` is missing or stale."""
    ds = exp["dataset"]
    if data.is_resized_current(exp.raw_dir, exp.resized_dir, ds["image_size"], ds["mode"], exp["max_image_pixels"]):
        return
    log(f"{exp.resized_dir} is missing or stale: running the resize step first")
    run_resize(exp, spark=spark, log=log)


def run_resize(exp: Experiment, spark: SparkSession | None = None, log=print) -> data.ResizeReport:
    """The dataset_resize job; Spark starts only when some file needs processing."""
    ds = exp["dataset"]
    listing = data.list_dataset(exp.raw_dir)  # fail before Spark starts when the folder is wrong
    ignored = data.describe_ignored(listing)
    if ignored:
        log(ignored)
    return data.resize_dataset(
        spark or (lambda: spark_session(exp.settings)),
        exp.raw_dir,
        exp.resized_dir,
        size=ds["image_size"],
        mode=ds["mode"],
        max_pixels=exp["max_image_pixels"],
        handle_invalid=exp["handleInvalid"],
        log=log,
    )


class Phases:
    """Wall seconds of an experiment's steps, in order: ``mark(name)`` closes the step that ran
    since the previous mark. Written to metrics.json as ``phase_seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now


@dataclass
class Prepared:
    """An experiment with its data checked and its features ready (in the feature cache or in
    Spark's): what :func:`fit_and_report` needs. The feature DataFrame is lazy and small to hold."""

    exp: Experiment
    featurizer: KerasImageFeaturizer
    feats: DataFrame
    fstats: FeaturizeStats
    audit: dict
    cue_warning: str | None
    invalid_raw: dict
    phases: Phases
    started: float


def run_experiment(exp: Experiment, log=print, also_classes: list[str] | tuple[str, ...] = ()) -> dict:
    """Run one named experiment end to end; returns the metrics written to metrics.json.

    ``also_classes``: more class folders of the resized data set to featurize into the feature
    cache in the same pass (a sweep's later experiments with this backbone); missing ones are
    left out. They take no part in this experiment.
    """
    return fit_and_report(prepare_features(exp, log, also_classes), log)


def prepare_features(exp: Experiment, log=print, also_classes: list[str] | tuple[str, ...] = ()) -> Prepared:
    """The first half of :func:`run_experiment`: checks, resize when stale, featurization.

    Featurization (the only long Spark job) happens here; a sweep runs these in order and hands
    each result to :func:`fit_and_report`, which may run on another thread.
    """
    started = time.perf_counter()
    phases = Phases()
    if not os.path.isdir(exp.raw_dir):  # no raw data yet: fetch the public data set
        from .download import run_download

        log(f"data folder {exp.raw_dir} not found: fetching the public data set into it")
        try:
            run_download(exp, log=log)
        except UserError as exc:
            raise DataError(f"data folder {exp.raw_dir} not found, and fetching it failed: {exc}") from None
    ignored = data.describe_ignored(data.list_dataset(exp.raw_dir, exp.classes))  # checks before any Spark work
    if ignored:
        log(ignored)
    backbones.resolve_weights(exp.model, exp.weights)  # offline ImageNet fails here, in one line
    random_weights = exp["weights"] == backbones.RANDOM
    if random_weights:
        log("NOTE: weights=random: features come from an untrained network; this is NOT transfer learning")

    phases.mark("checks")
    spark = spark_session(exp.settings)
    phases.mark("spark_session")
    ensure_resized(spark, exp, log)
    audit, cue_warning, invalid_raw = data.audit_for(exp.raw_dir, exp.resized_dir, exp.classes)
    data.check_invalid(exp.raw_dir, invalid_raw, exp["handleInvalid"], log)  # error: stop; skip: name them
    if cue_warning:
        log(cue_warning + " (this run uses the resized data set)")

    phases.mark("data_checks")
    featurizer = KerasImageFeaturizer(
        inputCol="content",
        outputCol="features",
        modelName=exp.model,
        weights=exp.weights,
        pooling=exp["pooling"],
        batchSize=exp["batch_size"],
        handleInvalid=exp["handleInvalid"],
        maxImagePixels=exp["max_image_pixels"],
    )
    extra = [c for c in dict.fromkeys(also_classes)
             if c not in exp.classes and os.path.isdir(os.path.join(exp.resized_dir, c))] if exp.cache_dir else []
    images = load_images(spark, exp.resized_dir, [*exp.classes, *extra])
    feats, fstats = featurize_cached(spark, images, featurizer, exp.cache_dir, log=log,
                                     keep=list(exp.classes) if extra else None)
    phases.mark("featurize")
    return Prepared(exp, featurizer, feats, fstats, audit, cue_warning, invalid_raw, phases, started)


def fit_and_report(p: Prepared, log=print) -> dict:
    """The second half of :func:`run_experiment`: split, fit, evaluate, save the model and reports.

    Thread-safe for different experiments on one SparkSession (a sweep runs two at a time)."""
    exp, featurizer, feats, fstats, phases = p.exp, p.featurizer, p.feats, p.fstats, p.phases
    phases.mark("waiting")  # from featurization's end to here: a sweep's queue of fits, else ~0
    invalid_raw = p.invalid_raw
    classes = sorted(exp.classes)
    random_weights = exp["weights"] == backbones.RANDOM
    split = with_split(feats, exp["seed"], exp["test_fraction"], exp["cv_folds"], keys=fstats.keys).cache()
    train, test = split.filter(~F.col("is_test")), split.filter(F.col("is_test"))
    sizes = {r["is_test"]: r["count"] for r in split.groupBy("is_test").count().collect()}
    n_train, n_test = sizes.get(False, 0), sizes.get(True, 0)
    lost = fstats.images - n_train - n_test
    log(f"features: {fstats.images} images, {fstats.featurized} featurized in {fstats.seconds:.1f} s, {fstats.from_cache} from cache; train {n_train}, test {n_test}")

    phases.mark("split")
    indexer_model, lr_model, converter = fit_head(train, exp.settings, len(classes))
    phases.mark("fit")
    if list(indexer_model.labels) != classes:
        raise DataError(f"training split lacks a class: has {indexer_model.labels}, task needs {classes}")
    pred = predict_rows([indexer_model, lr_model, converter], test)
    metrics = classification_metrics(pred["y_true"], pred["y_pred"], pred["probability"], classes)
    phases.mark("evaluate")
    cv = None
    if exp["cv_folds"] > 1:
        log(f"cross-validation: {exp['cv_folds']} stratified folds of the training split")
        cv = cross_validate(train, exp.settings, classes, exp["cv_folds"])
        acc = cv["accuracy"]
        log(f"cross-validation accuracy: mean {acc['mean']:.3f}, std {acc['std']:.3f} over {cv['folds']} folds")

        phases.mark("cross_validation")
    model = PipelineModel([indexer_model, featurizer, lr_model, converter])
    save_model_atomic(model, os.path.join(exp.results_dir, "model"))
    phases.mark("save_model")

    result = {
        "experiment": exp.name,
        "model": exp.model,
        "task": exp.task,
        "classes": classes,
        "weights": exp["weights"],
        "weights_id": weights_id(exp.model, exp.weights),
        "transfer_learning": not random_weights,
        **({"note": "weights=random: untrained backbone, not transfer learning"} if random_weights else {}),
        "accuracy": metrics.pop("accuracy"),
        **metrics,
        "n_train": n_train,
        "n_test": n_test,
        "n_images": fstats.images,
        "images_skipped": lost + len(invalid_raw),
        "invalid_files": {os.path.join(exp.raw_dir, k): v for k, v in invalid_raw.items()},
        "featurization_seconds": fstats.seconds,
        "images_featurized": fstats.featurized,
        "images_featurized_for_other_tasks": fstats.featurized_for_others,
        "images_from_cache": fstats.from_cache,
        "images_per_second": fstats.images_per_second,
        "images_per_second_source": fstats.rate_source,
        "lr_iterations": int(lr_model.summary.totalIterations) if lr_model.hasSummary else None,
        "lr_objective_history": [float(v) for v in lr_model.summary.objectiveHistory] if lr_model.hasSummary else [],
        "data_audit": p.audit,
        "data_warning": p.cue_warning,
        "split": {"seed": exp["seed"], "test_fraction": exp["test_fraction"], "stratified": True},
        **({"cross_validation": cv} if cv is not None else {}),
        "config": exp.settings,
        "versions": versions(),
    }
    result["reports"] = reports.write_experiment_reports(exp.results_dir, result, pred["y_true"], pred["probability"])
    phases.mark("reports")
    result["phase_seconds"] = phases.seconds
    result["wall_seconds"] = time.perf_counter() - p.started
    data.write_json_atomic(os.path.join(exp.results_dir, "metrics.json"), result)
    split.unpersist()
    return result
