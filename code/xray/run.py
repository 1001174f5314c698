"""One experiment end to end, step by step: checks -> resize -> features -> split -> fit ->
evaluate -> save the model -> reports and ``metrics.json``.

:func:`run_experiment` is the two halves in a row: :func:`prepare_features` (checks, the resize
job when stale, featurization: the long Spark job) and :func:`fit_and_report` (everything after,
which a sweep runs on another thread while the next experiment featurizes).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer

from . import experiment, reports, tuning
from .atomic import write_json_atomic
from .config import Experiment
from .data import describe_ignored, list_dataset, load_images
from .download import run_download
from .errors import DataError, UserError
from .features import FeaturizeStats, featurize_cached, weights_id
from .resize import ensure_resized, task_data_checks
from .session import spark_session
from .split import with_split


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


# --------------------------------------------------------------------------- first half: features


def prepare_features(exp: Experiment, log=print, also_classes: list[str] | tuple[str, ...] = ()) -> Prepared:
    """The first half of :func:`run_experiment`: checks, resize when stale, featurization.

    Featurization (the only long Spark job) happens here; a sweep runs these in order and hands
    each result to :func:`fit_and_report`, which may run on another thread.
    """
    started = time.perf_counter()
    phases = Phases()
    check_before_spark(exp, log)
    phases.mark("checks")
    spark = spark_session(exp.settings)
    phases.mark("spark_session")
    ensure_resized(spark, exp, log)
    audit, cue_warning, invalid_raw = task_data_checks(exp, log)  # handleInvalid=error stops here
    phases.mark("data_checks")
    featurizer = experiment.make_featurizer(exp)
    extra = _extra_classes(exp, also_classes)
    images = load_images(spark, exp.resized_dir, [*exp.classes, *extra])
    feats, fstats = featurize_cached(spark, images, featurizer, exp.cache_dir, log=log,
                                     keep=list(exp.classes) if extra else None)
    phases.mark("featurize")
    return Prepared(exp, featurizer, feats, fstats, audit, cue_warning, invalid_raw, phases, started)


def check_before_spark(exp: Experiment, log) -> None:
    """Data there (fetched when missing), the task's class folders, the weights: no Spark yet."""
    if not os.path.isdir(exp.raw_dir):  # no raw data yet: fetch the public data set
        log(f"data folder {exp.raw_dir} not found: fetching the public data set into it")
        try:
            run_download(exp, log=log)
        except UserError as exc:
            raise DataError(f"data folder {exp.raw_dir} not found, and fetching it failed: {exc}") from None
    ignored = describe_ignored(list_dataset(exp.raw_dir, exp.classes))
    if ignored:
        log(ignored)
    if exp.model not in backbones.BACKBONES:
        return  # a network trained from scratch: no weights
    backbones.resolve_weights(exp.model, exp.weights)  # offline ImageNet fails here, in one line
    if exp["weights"] == backbones.RANDOM:
        log("NOTE: weights=random: features come from an untrained network; this is NOT transfer learning")


def _extra_classes(exp: Experiment, also_classes) -> list[str]:
    """The classes of ``also_classes`` to featurize into the cache alongside (with a cache only)."""
    if not exp.cache_dir:
        return []
    return [c for c in dict.fromkeys(also_classes)
            if c not in exp.classes and os.path.isdir(os.path.join(exp.resized_dir, c))]


# --------------------------------------------------------------------------- second half: fit, report


def fit_and_report(p: Prepared, log=print) -> dict:
    """The second half of :func:`run_experiment`: split, fit, evaluate, save the model and reports.

    Thread-safe for different experiments on one SparkSession (a sweep runs two at a time)."""
    exp, fstats, phases = p.exp, p.fstats, p.phases
    phases.mark("waiting")  # from featurization's end to here: a sweep's queue of fits, else ~0
    classes = sorted(exp.classes)
    folds = tuning.fold_count(exp.settings)  # cv_folds, or the tuned head's folds
    split = with_split(p.feats, exp["seed"], exp["test_fraction"], folds, keys=fstats.keys).cache()
    train, test = split.filter(~F.col("is_test")), split.filter(F.col("is_test"))
    sizes = _split_sizes(split)
    log(f"features: {fstats.images} images, {fstats.featurized} featurized in {fstats.seconds:.1f} s, "
        f"{fstats.from_cache} from cache; train {sizes['n_train']}, test {sizes['n_test']}")
    phases.mark("split")
    head, tuned = tuning.fit_head(train, exp.settings, classes, log)  # a grid: CrossValidator, then the refit
    phases.mark("fit")
    if list(head[0].labels) != classes:
        raise DataError(f"training split lacks a class: has {head[0].labels}, task needs {classes}")
    metrics, pred = experiment.evaluate(head, test, classes)
    phases.mark("evaluate")
    cv = _cross_validation(exp, train, classes, log, phases, tuning.chosen_settings(exp.settings, tuned))
    experiment.save_model_atomic(experiment.assemble(head, p.featurizer), os.path.join(exp.results_dir, "model"))
    phases.mark("save_model")
    result = _result(p, classes, metrics, sizes, head[1], cv)
    result.update(method=tuning.method(exp.settings), **({"tuning": tuned} if tuned else {}))
    result["reports"] = reports.write_experiment_reports(exp.results_dir, result, pred["y_true"], pred["probability"])
    phases.mark("reports")
    result["phase_seconds"] = phases.seconds
    result["wall_seconds"] = time.perf_counter() - p.started
    write_json_atomic(os.path.join(exp.results_dir, "metrics.json"), result)
    split.unpersist()
    return result


def _split_sizes(split: DataFrame) -> dict[str, int]:
    sizes = {r["is_test"]: r["count"] for r in split.groupBy("is_test").count().collect()}
    return {"n_train": sizes.get(False, 0), "n_test": sizes.get(True, 0)}


def _cross_validation(exp: Experiment, train: DataFrame, classes: list[str], log, phases: Phases,
                      settings: dict) -> dict | None:
    if exp["cv_folds"] <= 1:
        return None
    log(f"cross-validation: {exp['cv_folds']} stratified folds of the training split")
    cv = experiment.cross_validate(train, settings, classes, exp["cv_folds"])
    acc = cv["accuracy"]
    log(f"cross-validation accuracy: mean {acc['mean']:.3f}, std {acc['std']:.3f} over {cv['folds']} folds")
    phases.mark("cross_validation")
    return cv


def _result(p: Prepared, classes: list[str], metrics: dict, sizes: dict[str, int], lr_model, cv: dict | None) -> dict:
    """The metrics.json of a run (without the reports and timings added at the end)."""
    exp, fstats = p.exp, p.fstats
    random_weights = exp["weights"] == backbones.RANDOM
    metrics = dict(metrics)
    return {
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
        **sizes,
        "n_images": fstats.images,
        "images_skipped": fstats.images - sizes["n_train"] - sizes["n_test"] + len(p.invalid_raw),
        "invalid_files": {os.path.join(exp.raw_dir, k): v for k, v in p.invalid_raw.items()},
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


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("pyspark", "tensorflow-cpu", "tensorflow", "keras", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
