"""One experiment end to end, step by step: checks -> resize -> features -> split -> fit ->
evaluate -> save the model -> reports and ``metrics.json``.

:func:`run_experiment` is the two halves in a row: :func:`prepare_features` (checks, the resize
job when stale, featurization: the long Spark job) and :func:`fit_and_report` (everything after,
which a sweep runs on another thread while the next experiment featurizes).

A results folder is one run's, whole: every file of a run is written into a staging folder
beside ``results/<experiment>`` (``Prepared.out_dir``: the one place any writer of a run
writes), which takes the place of the old folder in one swap at the very end. A run that fails
or is killed before leaves the previous results as they were.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass, field

from pyspark.ml import PipelineModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer

from . import experiment, reports, tracking, tuning
from .atomic import StagedFolder, write_json_atomic
from .config import Experiment
from .data import describe_ignored, list_dataset, load_images
from .download import run_download
from .errors import DataError, UserError, worker_error_message
from .explain import explain_test_images
from .features import FeaturizeStats, featurize_cached, weights_id
from .resize import damaged_output, ensure_resized, forget_outputs, resized_images, task_data_checks
from .session import spark_session
from .near_duplicates import NearDuplicates, find_near_duplicates
from .split import SplitRow, assign_split, describe_split, fold_gaps, join_split, min_class_size, split_summary


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
    Spark's): what :func:`fit_and_report` needs. The feature DataFrame is lazy and small to hold.

    ``out_dir``: the staging folder of this run's results, where every writer of the run writes;
    :meth:`commit` puts it in place of ``results/<experiment>``, :meth:`discard` drops it."""

    exp: Experiment
    staging: StagedFolder
    featurizer: KerasImageFeaturizer
    feats: DataFrame
    fstats: FeaturizeStats
    audit: dict
    cue_warning: str | None
    invalid_raw: dict
    phases: Phases
    started: float
    engine: dict = field(default_factory=dict)  # which engine featurized (EnginePlan.as_dict)

    @property
    def out_dir(self) -> str:
        return self.staging.path

    def commit(self) -> None:
        self.staging.commit()

    def discard(self) -> None:
        self.staging.discard()


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
    staging = StagedFolder(exp.results_dir)
    try:
        return _prepare(exp, log, also_classes, staging, phases, started)
    except BaseException:
        staging.discard()
        raise


def _prepare(exp: Experiment, log, also_classes, staging: StagedFolder, phases: Phases, started: float) -> Prepared:
    spark = spark_session(exp.settings)
    phases.mark("spark_session")
    ensure_resized(spark, exp, log)
    audit, cue_warning, invalid_raw = task_data_checks(exp, log)  # handleInvalid=error stops here
    _check_class_sizes(exp, {c: (a["count"] - a["invalid"], a["invalid"]) for c, a in audit.items()})
    phases.mark("data_checks")
    featurizer = experiment.make_featurizer(exp)
    engine = experiment.prepare_engine(spark, featurizer, log).as_dict()  # exports the model once
    extra = _extra_classes(exp, also_classes)
    images = load_images(spark, resized_images(exp.resized_dir, [*exp.classes, *extra], log))
    feats, fstats = _featurize(spark, images, featurizer, exp, log, keep=list(exp.classes) if extra else None)
    phases.mark("featurize")
    return Prepared(exp, staging, featurizer, feats, fstats, audit, cue_warning, invalid_raw, phases, started, engine)


def _featurize(spark, images, featurizer, exp: Experiment, log, keep) -> tuple:
    """featurize_cached; resized outputs that do not decode (changed in place, size and mtime
    kept, so the resize step could not tell) are made again by the next run, which the error says."""
    try:
        feats, fstats = featurize_cached(spark, images, featurizer, exp.cache_dir, log=log, keep=keep)
    except Exception as exc:  # noqa: BLE001 - only an invalid resized output is turned into a DataError
        message = worker_error_message(exc) or ""
        bad = damaged_output(message, exp.resized_dir)
        if bad is None or not forget_outputs(exp.resized_dir, [bad]):
            raise
        raise DataError(f"{message}: it is a resized output, not the raw file; the next run makes it again "
                        f"from its raw file: run again") from None
    forgotten = forget_outputs(exp.resized_dir, fstats.skipped)
    if forgotten:
        log(f"the next run makes {len(forgotten)} resized output(s) that did not decode again from their raw files: "
            f"{', '.join(forgotten[:10])}")
    return feats, fstats


def check_before_spark(exp: Experiment, log) -> None:
    """Data there (fetched when missing), the task's class folders, the weights: no Spark yet."""
    if not os.path.isdir(exp.raw_dir):  # no raw data yet: fetch the public data set
        log(f"data folder {exp.raw_dir} not found: fetching the public data set into it")
        try:
            run_download(exp, log=log)
        except UserError as exc:
            raise DataError(f"data folder {exp.raw_dir} not found, and fetching it failed: {exc}") from None
    listing = list_dataset(exp.raw_dir, exp.classes)
    ignored = describe_ignored(listing)
    if ignored:
        log(ignored)
    _check_class_sizes(exp, {c: (len(files), 0) for c, files in listing.files.items()})
    tracking.check_store(exp)  # tracking on and the MLflow store unreachable: one line, no Spark yet
    if exp.model not in backbones.BACKBONES:
        return  # a network trained from scratch: no weights
    backbones.resolve_weights(exp.model, exp.weights)  # offline ImageNet fails here, in one line
    if exp["weights"] == backbones.RANDOM:
        log("NOTE: weights=random: features come from an untrained network; this is NOT transfer learning")


def _check_class_sizes(exp: Experiment, sizes: dict[str, tuple[int, int]]) -> None:
    """Each class has enough images for the split (and the folds), before any work on them:
    ``sizes`` is class -> (usable images, invalid ones left out)."""
    tf, folds = exp["test_fraction"], split_folds(exp)
    need = min_class_size(tf, folds)
    for cls, (n, invalid) in sizes.items():
        if n < need:
            usable = f" usable ({invalid} invalid left out)" if invalid else ""
            why = f"cv_folds={folds}" if exp["cv_folds"] == folds else f"the {folds} folds of classifier.grid"
            train = f"{folds} for training ({why})" if folds > 1 else "one for training"
            raise DataError(
                f"class {cls} needs at least {need} images, {os.path.join(exp.raw_dir, cls)} has {n}{usable}: "
                f"the test split takes at least one (test_fraction={tf}) and {train}; add images to it")


def split_folds(exp: Experiment) -> int:
    """The folds the split deals: a probe's ``cv_folds``, or its ``classifier.grid``'s folds; none
    for a trained network (``train: finetune|scratch`` carves a validation split instead)."""
    return tuning.fold_count(exp.settings) if exp.settings.get("train", "probe") == "probe" else 0


def _extra_classes(exp: Experiment, also_classes) -> list[str]:
    """The classes of ``also_classes`` to featurize into the cache alongside (with a cache only)."""
    if not exp.cache_dir:
        return []
    return [c for c in dict.fromkeys(also_classes)
            if c not in exp.classes and os.path.isdir(os.path.join(exp.resized_dir, c))]


# --------------------------------------------------------------------------- second half: fit, report


def fit_and_report(p: Prepared, log=print) -> dict:
    """The second half of :func:`run_experiment`: split, fit, evaluate, save the model and reports
    into the staging folder, then put it in place of ``results/<experiment>``.

    Thread-safe for different experiments on one SparkSession (a sweep runs two at a time)."""
    try:
        result, model = _fit_and_write(p, log)
    except BaseException:
        p.discard()
        raise
    p.commit()
    tracking.log_experiment(p.exp, result, model, log)  # the run's files in place; with tracking.mlflow on, a failure only warns
    return result


def _fit_and_write(p: Prepared, log) -> tuple[dict, PipelineModel]:
    exp, fstats, phases = p.exp, p.fstats, p.phases
    phases.mark("waiting")  # from featurization's end to here: a sweep's queue of fits, else ~0
    classes = sorted(exp.classes)
    rows, split_info = assign_experiment_split(exp, fstats.keys, classes, log)
    split = join_split(p.feats, rows).cache()
    train, test = split.filter(~F.col("is_test")), split.filter(F.col("is_test"))
    sizes = _split_sizes(split)
    log(f"features: {fstats.images} images, {fstats.featurized} featurized in {fstats.seconds:.1f} s, "
        f"{fstats.from_cache} from cache; train {sizes['n_train']}, test {sizes['n_test']}")
    phases.mark("split")
    near = _near_duplicates(exp, split, log)
    phases.mark("near_duplicates")
    head, tuned = tuning.fit_head(train, exp.settings, classes, log)  # a grid: CrossValidator, then the refit
    phases.mark("fit")
    if list(head[0].labels) != classes:
        raise DataError(f"training split lacks a class: has {head[0].labels}, task needs {classes}")
    metrics, pred = experiment.evaluate(head, test, classes)
    phases.mark("evaluate")
    cv = _cross_validation(exp, train, rows, classes, log, phases, tuning.chosen_settings(exp.settings, tuned))
    model = experiment.assemble(head, p.featurizer)
    experiment.save_model_atomic(model, os.path.join(p.out_dir, "model"))
    phases.mark("save_model")
    result = _result(p, classes, metrics, sizes, head[1], cv, split_info, near)
    result.update(method=tuning.method(exp.settings), **({"tuning": tuned} if tuned else {}))
    result["reports"] = {**reports.write_experiment_reports(p.out_dir, result, pred["y_true"], pred["probability"]),
                         **_write_split_reports(p.out_dir, rows, near)}
    phases.mark("reports")
    result["explanations"] = explain_test_images(split.sparkSession, model, pred, classes, exp.settings,
                                                 p.out_dir, exp.name, log)
    if "gallery" in result["explanations"]:
        result["reports"]["cam_gallery"] = result["explanations"]["gallery"]
    phases.mark("explanations")
    result["phase_seconds"] = phases.seconds
    result["wall_seconds"] = time.perf_counter() - p.started
    write_json_atomic(os.path.join(p.out_dir, "metrics.json"), result)
    split.unpersist()
    return result, model


def assign_experiment_split(exp: Experiment, keys, classes: list[str], log) -> tuple[list[SplitRow], dict]:
    """The grouped split of the experiment's images (pure Python on the driver, :func:`split_folds`
    folds) and what metrics.json says of it; a split with no test image is a DataError."""
    rows = assign_split(keys, exp["seed"], exp["test_fraction"], split_folds(exp), exp.group_pattern)
    info = split_summary(rows, classes, exp.group_pattern)
    log(describe_split(info))
    if not any(r.is_test for r in rows):
        raise DataError(f"the split left the test side empty: the {info['groups']} group(s) of "
                        f"split.group_pattern are too few or too large: change the pattern or raise test_fraction")
    empty = [c for c, v in info["per_class"].items() if v["images"] and not v["test_images"]]
    if empty:
        log(f"warning: no test image of {', '.join(empty)}: their groups are too large for test_fraction "
            f"{exp['test_fraction']}; their test metrics are empty")
    if tuning.grid_of(exp.settings):  # the tuned head's CrossValidator validates on these folds
        _check_fold_gaps(rows, split_folds(exp), f"classifier.grid over {split_folds(exp)} folds",
                         "lower cv_folds (the grid's folds when > 1, else 3) or remove classifier.grid")
    return rows, info


def _near_duplicates(exp: Experiment, split: DataFrame, log) -> NearDuplicates:
    """Train-test pairs of near-duplicate images, from the features already in ``split``."""
    near = find_near_duplicates(split, exp.near_duplicate_threshold)
    warning = near.warning(os.path.join(exp.results_dir, reports.NEAR_DUPLICATES_CSV))
    log(warning or f"near-duplicates: no train-test pair at cosine similarity of standardised features >= {near.threshold}")
    return near


def _write_split_reports(folder: str, rows: list[SplitRow], near: NearDuplicates) -> dict[str, str]:
    """split.csv and near_duplicates.csv in ``folder``; returns {what: file name}."""
    return {"split": reports.write_split_csv(folder, rows),
            "near_duplicates": reports.write_near_duplicates_csv(folder, near.listed)}


def _split_sizes(split: DataFrame) -> dict[str, int]:
    sizes = {r["is_test"]: r["count"] for r in split.groupBy("is_test").count().collect()}
    return {"n_train": sizes.get(False, 0), "n_test": sizes.get(True, 0)}


def _check_fold_gaps(rows: list[SplitRow], folds: int, what: str, fix: str = "lower cv_folds") -> None:
    """Every fold's training part (the other folds) holds every class."""
    gaps = fold_gaps(rows, folds)
    if gaps:
        f, missing = next(iter(gaps.items()))
        raise DataError(f"{what}: fold {f} would be validated by a model trained without "
                        f"{', '.join(missing)}: the groups of split.group_pattern are too few or too large "
                        f"for {folds} folds: {fix}")


def _cross_validation(exp: Experiment, train: DataFrame, rows: list[SplitRow], classes: list[str], log,
                      phases: Phases, settings: dict | None = None) -> dict | None:
    """``cv_folds`` > 1: the head (with ``settings``, e.g. the tuned head's choice; default the
    experiment's) cross-validated over the training split's group folds."""
    folds = exp["cv_folds"]
    if folds <= 1:
        return None
    _check_fold_gaps(rows, folds, f"cv_folds={folds}")
    kind = "group folds" if exp.group_pattern else "folds"
    log(f"cross-validation: {folds} stratified {kind} of the training split")
    cv = {**experiment.cross_validate(train, settings or exp.settings, classes, folds), "grouped": bool(exp.group_pattern)}
    acc = cv["accuracy"]
    log(f"cross-validation accuracy: mean {acc['mean']:.3f}, std {acc['std']:.3f} over {cv['folds']} folds")
    phases.mark("cross_validation")
    return cv


def _result(p: Prepared, classes: list[str], metrics: dict, sizes: dict[str, int], lr_model, cv: dict | None,
            split_info: dict, near: NearDuplicates) -> dict:
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
        "invalid_files": {**{os.path.join(exp.raw_dir, k): v for k, v in p.invalid_raw.items()}, **fstats.skipped},
        "featurization_seconds": fstats.seconds,
        "images_featurized": fstats.featurized,
        "images_featurized_for_other_tasks": fstats.featurized_for_others,
        "images_from_cache": fstats.from_cache,
        "images_per_second": fstats.images_per_second,
        "images_per_second_source": fstats.rate_source,
        "engine": p.engine,
        "lr_iterations": int(lr_model.summary.totalIterations) if lr_model.hasSummary else None,
        "lr_objective_history": [float(v) for v in lr_model.summary.objectiveHistory] if lr_model.hasSummary else [],
        "data_audit": p.audit,
        "data_warning": p.cue_warning,
        "split": {"seed": exp["seed"], "test_fraction": exp["test_fraction"], "stratified": True,
                  "grouped": bool(exp.group_pattern), **split_info},
        "near_duplicates": near.summary(),
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
