"""Fine-tuning a backbone (``train: finetune``) or training SmallCNN (``train: scratch``), end to end.

The same steps as a linear probe (:mod:`xray.run`) with training in place of featurization:
checks (config, data, split sizes: before Spark) -> resize when stale -> the split (the project's
stratified, seeded :func:`xray.split.split_rows`; the validation split is carved from the
training split by the same function) -> training in one Spark barrier task
(:func:`imagefeaturizer.trainer.fit_on_spark`) -> evaluation of the held-out test split through the
saved model's own stages -> the ``PipelineModel`` (``StringIndexerModel``, ``KerasImageClassifier``
holding the ``.keras`` file, ``IndexToString``), reports and ``metrics.json``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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

from . import experiment, reports
from .atomic import write_json_atomic
from .config import ConfigError, Experiment
from .data import LABEL, list_dataset, load_images
from .errors import DataError
from .features import weights_id
from .resize import ensure_resized, task_data_checks
from .run import Phases, check_before_spark, versions
from .session import spark_session
from .split import split_rows

METHODS = {networks.FINETUNE: "fine-tune", networks.SCRATCH: "scratch"}


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


def split_table(keys, exp: Experiment) -> list[tuple[str, bool, bool]]:
    """``(path, is_test, is_validation)`` for ``(path, label)`` pairs; raises DataError when a class
    has no image left to train on or the validation split would take a class's last one."""
    test = {path: is_test for path, is_test, _ in split_rows(keys, exp["seed"], exp["test_fraction"])}
    train_keys = [(path, label) for path, label in keys if not test[path]]
    fraction = exp["training"]["validation_fraction"]
    validation = {path: is_val for path, is_val, _ in split_rows(train_keys, exp["seed"], fraction)}
    _check_counts(Counter(label for _, label in train_keys),
                  Counter(label for path, label in train_keys if validation[path]), exp)
    return [(path, test[path], validation.get(path, False)) for path, _ in keys]


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
    """Train, evaluate and save one experiment with ``train: finetune|scratch``; returns metrics.json."""
    started, phases = time.perf_counter(), Phases()
    p = check_before_training(exp, log)
    phases.mark("checks")
    spark = spark_session(exp.settings)
    phases.mark("spark_session")
    ensure_resized(spark, exp, log)
    audit, cue_warning, invalid_raw = task_data_checks(exp, log)
    phases.mark("data_checks")
    classes = sorted(exp.classes)
    rows, sizes = _split(spark, load_images(spark, exp.resized_dir, exp.classes), exp)
    phases.mark("split")
    indexer = StringIndexerModel.from_labels(classes, inputCol=LABEL, outputCol=experiment.LABEL_INDEX)
    spec = _spec(exp, p, sizes["fit_counts"], classes)
    log(f"training {exp.model} ({METHODS[p.kind]}) on {sizes['n_fit']} images, validating on "
        f"{sizes['n_validation']}, in one Spark barrier task; input {p.image_size}x{p.image_size}")
    trained = fit_on_spark(indexer.transform(rows.filter(~F.col("is_test"))), spec)
    phases.mark("train")
    workdir = tempfile.mkdtemp(prefix="xray-model-")
    try:
        head = _head(exp, indexer, trained.model_bytes, workdir, p.image_size)
        metrics, pred = experiment.evaluate(head, rows.filter(F.col("is_test")), classes)
        phases.mark("evaluate")
        experiment.save_model_atomic(PipelineModel(list(head)), os.path.join(exp.results_dir, "model"))
        phases.mark("save_model")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = _result(exp, p, spec, classes, metrics, sizes, trained.history, audit, cue_warning, invalid_raw)
    result["reports"] = reports.write_experiment_reports(exp.results_dir, result, pred["y_true"], pred["probability"])
    phases.mark("reports")
    result["phase_seconds"] = phases.seconds
    result["wall_seconds"] = time.perf_counter() - started
    write_json_atomic(os.path.join(exp.results_dir, "metrics.json"), result)
    return result


def _split(spark, images: DataFrame, exp: Experiment) -> tuple[DataFrame, dict]:
    """The image rows with ``is_test`` and ``is_validation`` (a broadcast table of the driver's
    split: only paths and labels reach the driver), and the sizes."""
    keys = [(r["path"], r[LABEL]) for r in images.select("path", LABEL).collect()]
    table = split_table(keys, exp)
    marks = spark.createDataFrame(table, "path string, is_test boolean, is_validation boolean")
    label = dict(keys)
    fit = Counter(label[path] for path, is_test, is_val in table if not is_test and not is_val)
    n_test = sum(1 for _, is_test, _ in table if is_test)
    n_val = sum(1 for _, is_test, is_val in table if not is_test and is_val)
    sizes = {"n_train": len(table) - n_test, "n_test": n_test, "n_validation": n_val,
             "n_fit": sum(fit.values()), "fit_counts": dict(fit), "n_images": len(table)}
    return images.join(F.broadcast(marks), "path"), sizes


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
        "split": {"seed": exp["seed"], "test_fraction": exp["test_fraction"], "stratified": True,
                  "validation_fraction": exp["training"]["validation_fraction"]},
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
        "cached_images": history.get("counts"),
    }
