"""Fine-tuning a backbone (``train: finetune``) or training SmallCNN (``train: scratch``), end to end.

The same steps as a linear probe (:mod:`xray.run`) with training in place of featurization:
checks (config, data, split sizes: before Spark) -> resize when stale -> the split (the probe's
grouped, stratified, seeded split of :func:`xray.run.assign_experiment_split`, ``split.group_pattern``
included; the validation split is carved from the training split by the same rule, each group
whole on one side) -> training in one Spark barrier task (:func:`imagefeaturizer.trainer.fit_on_spark`)
-> evaluation of the held-out test split through the saved model's own stages -> the
``PipelineModel`` (``StringIndexerModel``, ``KerasImageClassifier`` holding the ``.keras`` file,
``IndexToString``), reports, ``split.csv`` and ``metrics.json``, all written into a staging folder
that takes the place of ``results/<experiment>`` at the end (as a probe's), then MLflow tracking.

A trained network has no features: no near-duplicate search (``near_duplicates`` in
metrics.json says n/a) and no class activation maps (those are exact for linear probes only).
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass

from pyspark.ml import PipelineModel
from pyspark.ml.feature import StringIndexerModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer import backbones, networks
from imagefeaturizer.classifier import KerasImageClassifier
from imagefeaturizer.trainer import TrainSpec, fit_on_spark

from . import experiment, reports, tracking
from .atomic import StagedFolder, owned_folder, write_json_atomic
from .config import ConfigError, Experiment
from .data import LABEL, list_dataset, load_images
from .errors import DataError
from .features import weights_id
from .paths import file_uri
from .resize import ensure_resized, resized_images, task_data_checks
from .run import Phases, assign_experiment_split, check_before_spark, versions
from .session import spark_session
from .split import SplitRow, assign_split

METHODS = {networks.FINETUNE: "fine-tune", networks.SCRATCH: "scratch"}
NO_FEATURES = "a trained network featurizes nothing: no features to compare (a linear probe of the same images lists them)"
NO_MAPS = "class activation maps are made for linear probes (train: probe) only"


def is_trained(exp: Experiment) -> bool:
    """A network trained by the run (fine-tuned or from scratch), not a linear probe."""
    return exp.settings.get("train", "probe") in METHODS


# --------------------------------------------------------------------------- checks before Spark


@dataclass(frozen=True)
class Plan:
    kind: str  # networks.FINETUNE | networks.SCRATCH
    image_size: int
    units: int  # the backbone's units (0 from scratch)


def plan(exp: Experiment) -> Plan:
    """The network's input size and units, checked against the config: no Spark, no TensorFlow."""
    kind, model, t = exp["train"], exp.model, exp["training"]
    size = t["image_size"] or networks.default_input_size(kind, model)
    smallest = networks.min_input_size(kind, model)
    if size < smallest:
        raise ConfigError(f"{exp.name}: training.image_size={size} is too small for {model}: set it to "
                          f"{smallest} or more (0: {networks.default_input_size(kind, model)})")
    units = networks.UNITS.get(model, 0) if kind == networks.FINETUNE else 0
    unfreeze = exp["finetune"]["unfreeze"]
    if kind == networks.FINETUNE and unfreeze > units:
        raise ConfigError(f"{exp.name}: finetune.unfreeze={unfreeze} is larger than {model}, which has {units} "
                          f"units (blocks): set finetune.unfreeze to 0..{units}")
    return Plan(kind, size, units)


@dataclass(frozen=True)
class TrainingSplit:
    """The grouped train/test split and the validation paths carved from its training side."""

    rows: list[SplitRow]  # every image: group, side (fold 0 on training rows: no cross-validation)
    validation: frozenset[str]  # paths of the training rows that only validate (early stopping)
    info: dict  # xray.split.split_summary of the train/test split

    def marks(self) -> list[tuple[str, bool, bool]]:
        """``(path, is_test, is_validation)`` per image."""
        return [(r.path, r.is_test, r.path in self.validation) for r in self.rows]

    def sizes(self) -> dict:
        fit = Counter(r.label for r in self.rows if not r.is_test and r.path not in self.validation)
        n_test = sum(r.is_test for r in self.rows)
        return {"n_train": len(self.rows) - n_test, "n_test": n_test, "n_validation": len(self.validation),
                "n_fit": sum(fit.values()), "fit_counts": dict(fit), "n_images": len(self.rows)}


def split_table(keys, exp: Experiment, log=lambda line: None) -> TrainingSplit:
    """The split of ``(path, label)`` pairs; raises DataError when a class has no image left to
    train on or the validation split would take a class's last one."""
    rows, info = assign_experiment_split(exp, keys, sorted(exp.classes), log)
    train_keys = [(r.path, r.label) for r in rows if not r.is_test]
    fraction = exp["training"]["validation_fraction"]
    validation = frozenset(r.path for r in assign_split(train_keys, exp["seed"], fraction, 0, exp.group_pattern)
                           if r.is_test)
    _check_counts(Counter(label for _, label in train_keys),
                  Counter(label for path, label in train_keys if path in validation), exp)
    return TrainingSplit(rows, validation, info)


def _check_counts(train: Counter, validation: Counter, exp: Experiment) -> None:
    for cls in exp.classes:
        if train[cls] == 0:
            raise DataError(f"class {cls} has no training image: the test split (test_fraction="
                            f"{exp['test_fraction']}) takes all of them: add images of {cls}")
        if train[cls] - validation[cls] < 1:
            raise DataError(f"too few images of {cls} for the validation split: {train[cls]} training image(s), "
                            f"the validation split (training.validation_fraction="
                            f"{exp['training']['validation_fraction']}) takes {validation[cls]} and leaves none to fit: "
                            f"add images of {cls} or lower test_fraction")


def check_before_training(exp: Experiment, log) -> Plan:
    """Everything checkable without Spark: config, data folder, weights, split sizes."""
    p = plan(exp)
    check_before_spark(exp, log)
    listing = list_dataset(exp.raw_dir, exp.classes)
    split_table([(rel, cls) for cls, rels in listing.files.items() for rel in rels], exp)
    if exp["cv_folds"] > 1:
        log(f"note: cv_folds={exp['cv_folds']} is not used by train: {exp['train']} (each fold would be a training)")
    return p


# --------------------------------------------------------------------------- the run


def run_training(exp: Experiment, log=print) -> dict:
    """Train, evaluate and save one experiment with ``train: finetune|scratch``; returns metrics.json.

    Every file goes into a staging folder that takes the place of ``results/<experiment>`` only
    when all are written; then the run is logged to MLflow (``tracking.mlflow``)."""
    started, phases = time.perf_counter(), Phases()
    p = check_before_training(exp, log)
    phases.mark("checks")
    staging = StagedFolder(exp.results_dir)  # removes what killed runs left beside it, model folders too
    out_dir = staging.path  # made first: a results/ it creates is then its to remove on failure
    workdir = owned_folder(exp.results_dir, "model")  # the .keras file, until MLflow has logged it
    try:
        try:
            result, model = _train_and_write(exp, p, out_dir, workdir, phases, log)
            result["wall_seconds"] = time.perf_counter() - started
            write_json_atomic(os.path.join(out_dir, "metrics.json"), result)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)  # first: the staging folder's parent may go too
            staging.discard()
            raise
        staging.commit()
        tracking.log_experiment(exp, result, model, log)  # the model's .keras file is still in workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _train_and_write(exp: Experiment, p: Plan, out_dir: str, workdir: str, phases: Phases, log
                     ) -> tuple[dict, PipelineModel]:
    spark = spark_session(exp.settings)
    phases.mark("spark_session")
    ensure_resized(spark, exp, log)
    audit, cue_warning, invalid_raw = task_data_checks(exp, log)
    phases.mark("data_checks")
    classes = sorted(exp.classes)
    files = resized_images(exp.resized_dir, exp.classes, log)
    split = split_table([(file_uri(path), cls) for path, cls in files], exp, log)
    rows, sizes = _with_split(load_images(spark, files), split), split.sizes()
    phases.mark("split")
    indexer = StringIndexerModel.from_labels(classes, inputCol=LABEL, outputCol=experiment.LABEL_INDEX)
    spec = _spec(exp, p, sizes["fit_counts"], classes)
    log(f"training {exp.model} ({METHODS[p.kind]}) on {sizes['n_fit']} images, validating on "
        f"{sizes['n_validation']}, in one Spark barrier task; input {p.image_size}x{p.image_size}")
    trained = fit_on_spark(indexer.transform(rows.filter(~F.col("is_test"))), spec)
    phases.mark("train")
    head = _head(exp, indexer, trained.model_bytes, workdir, p.image_size)
    metrics, pred = experiment.evaluate(head, rows.filter(F.col("is_test")), classes)
    phases.mark("evaluate")
    model = PipelineModel(list(head))
    experiment.save_model_atomic(model, os.path.join(out_dir, "model"))
    phases.mark("save_model")
    result = _result(exp, p, spec, classes, metrics, sizes, trained.history, audit, cue_warning, invalid_raw)
    result["split"].update(split.info)
    result["reports"] = {**reports.write_experiment_reports(out_dir, result, pred["y_true"], pred["probability"]),
                         "split": reports.write_split_csv(out_dir, split.rows, split.validation)}
    phases.mark("reports")
    result["phase_seconds"] = phases.seconds
    return result, model


def _with_split(images: DataFrame, split: TrainingSplit) -> DataFrame:
    """The image rows with ``is_test`` and ``is_validation``: a broadcast table of the driver's
    split (only paths and labels were on the driver)."""
    marks = images.sparkSession.createDataFrame(split.marks(), "path string, is_test boolean, is_validation boolean")
    return images.join(F.broadcast(marks), "path")


def _spec(exp: Experiment, p: Plan, fit_counts: dict[str, int], classes: list[str]) -> TrainSpec:
    t = exp["training"]
    weights_path = backbones.resolve_weights(exp.model, exp.weights) if p.kind == networks.FINETUNE else None
    network = networks.NetworkSpec(kind=p.kind, model_name=exp.model, n_classes=len(classes), image_size=p.image_size,
                                   weights_path=weights_path, pooling=exp["pooling"], dropout=t["dropout"],
                                   augment=t["augment"], seed=exp["seed"])
    return TrainSpec(network=network, epochs=t["epochs"], batch_size=t["batch_size"], learning_rate=t["learning_rate"],
                     finetune_learning_rate=t["finetune_learning_rate"],
                     unfreeze=exp["finetune"]["unfreeze"] if p.kind == networks.FINETUNE else 0,
                     patience=t["patience"], class_weight=class_weights(fit_counts, classes) if t["class_weights"] else None,
                     seed=exp["seed"], max_pixels=exp["max_image_pixels"])


def class_weights(counts: dict[str, int], classes: list[str]) -> dict[int, float]:
    """Label index -> ``n / (classes x count)``: every class weighs as much in the loss."""
    total = sum(counts.values())
    return {i: total / (len(classes) * counts[c]) for i, c in enumerate(classes)}


def _head(exp: Experiment, indexer, model_bytes: bytes, workdir: str, image_size: int) -> tuple:
    """(StringIndexerModel, KerasImageClassifier, IndexToString): the model's stages."""
    path = os.path.join(workdir, "model.keras")
    with open(path, "wb") as f:
        f.write(model_bytes)
    classifier = KerasImageClassifier(inputCol="content", modelFile=path, imageSize=image_size,
                                      batchSize=exp["batch_size"], handleInvalid=exp["handleInvalid"],
                                      maxImagePixels=exp["max_image_pixels"])
    return indexer, classifier, experiment.index_to_string(indexer)


# --------------------------------------------------------------------------- metrics.json


def _result(exp: Experiment, p: Plan, spec: TrainSpec, classes: list[str], metrics: dict, sizes: dict,
            history: dict, audit: dict, cue_warning: str | None, invalid_raw: dict) -> dict:
    """The metrics.json of a training run: the linear probe's keys, plus ``method`` and ``training``."""
    finetune = p.kind == networks.FINETUNE
    random_weights = finetune and exp["weights"] == backbones.RANDOM
    note = ("trained from scratch: no pretrained weights, not transfer learning" if not finetune else
            "weights=random: untrained backbone, not transfer learning" if random_weights else None)
    metrics = dict(metrics)
    return {
        "experiment": exp.name,
        "model": exp.model,
        "task": exp.task,
        "method": METHODS[p.kind],
        "classes": classes,
        "weights": exp["weights"] if finetune else "none",
        "weights_id": weights_id(exp.model, exp.weights) if finetune else None,
        "transfer_learning": finetune and not random_weights,
        **({"note": note} if note else {}),
        "accuracy": metrics.pop("accuracy"),
        **metrics,
        "n_train": sizes["n_train"],
        "n_test": sizes["n_test"],
        "n_images": sizes["n_images"],
        "images_skipped": len(invalid_raw),
        "invalid_files": {os.path.join(exp.raw_dir, k): v for k, v in invalid_raw.items()},
        "featurization_seconds": 0.0,
        "images_featurized": 0,
        "images_featurized_for_other_tasks": 0,
        "images_from_cache": 0,
        "images_per_second": None,
        "images_per_second_source": "none",
        "lr_iterations": None,
        "lr_objective_history": [],
        "training": training_record(spec, p, sizes, history, classes),
        "data_audit": audit,
        "data_warning": cue_warning,
        "engine": {"requested": exp.settings.get("engine", "auto"), "engine": "keras",
                   "why": "a trained network runs in Keras (training and KerasImageClassifier); the engine "
                          "setting is for a linear probe's featurizer"},
        "split": {"seed": exp["seed"], "test_fraction": exp["test_fraction"], "stratified": True,
                  "grouped": bool(exp.group_pattern), "validation_fraction": exp["training"]["validation_fraction"],
                  "validation": "carved from the training split by the same grouped, stratified rule"},
        "near_duplicates": {"pairs": None, "reason": NO_FEATURES},
        "explanations": {"skipped": NO_MAPS},
        "config": exp.settings,
        "versions": versions(),
    }


def training_record(spec: TrainSpec, p: Plan, sizes: dict, history: dict, classes: list[str]) -> dict:
    """Per epoch (stage, train and validation loss and accuracy, training images/s), the chosen
    epoch and what was trained how."""
    epochs = [e for stage in history["stages"] for e in stage["epochs"]]
    rates = [e["images_per_second"] for e in epochs if e.get("images_per_second")]
    return {
        "network": {k: v for k, v in vars(spec.network).items() if k != "weights_path"},
        "units": p.units,
        "unfreeze": spec.unfreeze,
        "unfrozen_units": history.get("unfrozen_units", []),
        "epochs": epochs,
        "stages": [{k: v for k, v in s.items() if k != "epochs"} | {"epochs_run": len(s["epochs"])}
                   for s in history["stages"]],
        "chosen_epoch": history["chosen_epoch"],
        "chosen_stage": history["chosen_stage"],
        "images_per_second": round(sum(rates) / len(rates), 2) if rates else None,
        "images_per_second_after_first_epoch": round(sum(rates[1:]) / len(rates[1:]), 2) if len(rates) > 1 else None,
        "n_fit": sizes["n_fit"],
        "n_validation": sizes["n_validation"],
        "class_weight": {c: round(spec.class_weight[i], 4) for i, c in enumerate(classes)} if spec.class_weight else None,
        "max_epochs_per_stage": spec.epochs,
        "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate,
        "finetune_learning_rate": spec.finetune_learning_rate if p.kind == networks.FINETUNE else None,
        "patience": spec.patience,
        "parameters": history.get("parameters"),
        "trainable_parameters": history.get("trainable_parameters"),
        "cache_seconds": history.get("cache_seconds"),
        "training_process_peak_rss_mib": history.get("peak_rss_mib"),  # streams from disk: not the data set's size
        "cached_images": history.get("counts"),
    }
