"""``wrapper.sh predict <experiment or model folder> <image or folder>``: classify new images.

The saved ``PipelineModel`` of an experiment (``results/<experiment>/model``) is loaded in this
process and applied to the image files listed (:func:`xray.data.load_images`: every file, whatever
its name; folders may hold glob characters). Each image is first
normalised exactly as the resize job normalised the training images (the same
:func:`xray.resize.normalize_image`) (one mode, one square size,
settings read from the ``config.json`` snapshot beside the model), so a new image reaches the
backbone the way the training images did. One line per image is printed (path, predicted class,
probability of each class) and the same rows are written to a CSV. ``explain``
(:mod:`xray.explain`) loads, normalises and reports through the same functions.
"""

from __future__ import annotations

import csv
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imagefeaturizer.images import InvalidImageError

from .atomic import write_text_atomic
from .config import Config, ConfigError, Experiment
from .data import list_images, load_images
from .errors import DataError
from .evaluation import wilson_interval
from .paths import local_path, spark_literal
from .progress import Progress
from .resize import normalize_image
from .session import spark_session

PREDICTIONS = "predictions.csv"
IMAGE_STAGES = ("KerasImageFeaturizer", "KerasImageClassifier")  # a linear probe's, a trained network's


def _normalize_udf(size: int, mode: str, max_pixels: int):
    """Executor-side normalisation: (content, path) -> struct(content, error); bad images get a reason."""

    @F.pandas_udf("content binary, error string")
    def normalize(contents: pd.Series, paths: pd.Series) -> pd.DataFrame:
        out, errors = [], []
        for raw, path in zip(contents, paths):
            if raw is None:
                out.append(None)
                errors.append("cannot read file")
                continue
            try:
                out.append(normalize_image(bytes(raw), size=size, mode=mode, max_pixels=max_pixels, origin=path))
                errors.append(None)
            except InvalidImageError as exc:
                out.append(None)
                errors.append(exc.reason)
        return pd.DataFrame({"content": out, "error": errors})

    return normalize


def resolve_model(config: Config, target: str, overrides: list[str]) -> tuple[str, Experiment | None]:
    """(model folder, the config's experiment if ``target`` names one) for an experiment name or a folder."""
    if target in config.names:
        exp = config.experiment(target, overrides)
        if exp.job != "experiment":
            raise ConfigError(f"{target} is a {exp.job} job, not an experiment with a model")
        model_dir = os.path.join(exp.results_dir, "model")
        if not os.path.isdir(model_dir):
            raise DataError(f"no saved model for {target} in {model_dir}: run ./wrapper.sh run {target} first")
        return model_dir, exp
    if os.path.isdir(target):
        for candidate in (target, os.path.join(target, "model")):
            if os.path.isdir(os.path.join(candidate, "metadata")) and os.path.isdir(os.path.join(candidate, "stages")):
                return os.path.abspath(candidate), None
        raise DataError(
            f"{target} is not a saved model folder: expected results/<experiment>/model "
            f"(with metadata/ and stages/) or its results/<experiment> folder"
        )
    raise ConfigError(
        f"{target!r} is neither an experiment in {config.path} nor a folder: give an experiment name "
        f"(see ./wrapper.sh list) or a saved model folder such as results/<experiment>/model"
    )


def _snapshot(model_dir: str) -> dict | None:
    """What the model was trained with: config.json (or metrics.json) beside the model folder."""
    parent = os.path.dirname(os.path.abspath(model_dir))
    for name, key in (("config.json", "settings"), ("metrics.json", "config")):
        try:
            with open(os.path.join(parent, name), encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(saved.get(key), dict):
            return {"experiment": saved.get("experiment"), "settings": saved[key]}
    return None


def _reported_test_accuracy(model_dir: str) -> dict | None:
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(model_dir)), "metrics.json"), encoding="utf-8") as f:
            m = json.load(f)
        return {"accuracy": m["accuracy"], "ci95": m["accuracy_ci95"], "n_test": m["n_test"]}
    except (OSError, ValueError, KeyError):
        return None


def model_classes(model) -> list[str]:
    for stage in reversed(model.stages):
        labels = stage.getOrDefault("labels") if stage.hasParam("labels") and stage.isDefined("labels") else None
        if labels:
            return list(labels)
        if hasattr(stage, "labels") and not callable(stage.labels):
            return list(stage.labels)
    raise DataError("the saved model has no class labels (expected a StringIndexer/IndexToString stage)")


def load_model(model_dir: str):
    from pyspark.ml import PipelineModel

    try:
        model = PipelineModel.load(spark_literal(model_dir))
    except Exception as exc:  # noqa: BLE001 - any load failure is a damaged or foreign folder
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise DataError(f"cannot load the saved model in {model_dir}: {first.strip()[:200]}") from None
    if not any(type(s).__name__ in IMAGE_STAGES for s in model.stages):
        raise DataError(f"{model_dir} holds no {' or '.join(IMAGE_STAGES)} stage: not a model saved by ./wrapper.sh run")
    return model


@contextmanager
def normalized_images(spark, paths: list[str], *, size: int, mode: str, max_pixels: int
                      ) -> Iterator[tuple[DataFrame, dict[str, str]]]:
    """(path, content) of the files that normalise, as the training images were, and
    {path: reason} of those that do not; the normalised images stay cached inside the block."""
    raw: DataFrame = load_images(spark, [(p, None) for p in paths])
    normalized = raw.select("path", _normalize_udf(size, mode, max_pixels)(F.col("content"), F.col("path")).alias("n"))
    normalized = normalized.select("path", F.col("n.content").alias("content"), F.col("n.error").alias("error")).persist()
    try:
        errors = {local_path(r.path): r.error for r in normalized.filter(F.col("error").isNotNull()).select("path", "error").collect()}
        yield normalized.filter(F.col("error").isNull()).select("path", "content"), errors
    finally:
        normalized.unpersist()


def predict_images(spark, model, paths: list[str], *, size: int, mode: str, max_pixels: int,
                   log: Callable[[str], object] = print) -> pd.DataFrame:
    """Predictions for image files: one row per path (in ``paths`` order).

    Columns: path (absolute), predicted_class, one ``p_<class>`` per class, error (None when
    predicted; the reason when the file could not be read or decoded).
    """
    with normalized_images(spark, paths, size=size, mode=mode, max_pixels=max_pixels) as (good, errors):
        n_good = sum(1 for p in paths if p not in errors)
        with Progress(spark, n_good, log, what="predicting"):
            out = model.transform(good).select("path", "predicted_label", "probability").collect()
    found = {local_path(r.path): (r.predicted_label, r.probability.toArray()) for r in out}
    return result_table(paths, found, errors, model_classes(model))


def result_table(paths: list[str], found: dict[str, tuple[str, np.ndarray]], errors: dict[str, str],
                 classes: list[str]) -> pd.DataFrame:
    """One row per path: predicted class and probabilities from ``found``, else the error."""
    rows = []
    for p in paths:
        key = os.path.normpath(p)
        row: dict = {"path": p, "predicted_class": None, **{f"p_{c}": None for c in classes}, "error": None}
        if key in found:
            label, prob = found[key]
            row["predicted_class"] = label
            row.update({f"p_{c}": float(v) for c, v in zip(classes, prob)})
        else:
            row["error"] = errors.get(key) or "not classified (the model returned no row for it)"
        rows.append(row)
    return pd.DataFrame(rows, columns=["path", "predicted_class", *(f"p_{c}" for c in classes), "error"])


def display_path(path: str, images_path: str) -> str:
    """``path`` as the user named it: below the folder they gave, or the file itself."""
    if os.path.isfile(images_path):
        return images_path
    return os.path.join(images_path, os.path.relpath(path, os.path.abspath(images_path)))


@dataclass
class SavedModel:
    """A saved model loaded for new images, with how to normalise them (as in training)."""

    model_dir: str
    model: Any  # the PipelineModel
    classes: list[str]
    paths: list[str]  # the image files to apply it to
    size: int
    mode: str
    max_pixels: int
    spark: Any

    def normalized(self, paths: list[str]):
        """:func:`normalized_images` of ``paths`` (some of :attr:`paths`) with the model's settings."""
        return normalized_images(self.spark, paths, size=self.size, mode=self.mode, max_pixels=self.max_pixels)


def open_saved_model(config: Config, target: str, images_path: str, overrides: list[str],
                     log: Callable[[str], object]) -> SavedModel:
    """The model of ``target`` (experiment or folder) loaded in this process, and the image files
    of ``images_path``; the settings it was trained with say how to normalise them."""
    model_dir, exp = resolve_model(config, target, overrides)
    paths = list_images(images_path)
    exp, trained = trained_settings(config, model_dir, exp, overrides, log)
    size, mode = trained["dataset"]["image_size"], trained["dataset"]["mode"]
    max_pixels = trained.get("max_image_pixels", exp["max_image_pixels"])
    spark = spark_session(exp.settings)
    model = load_model(model_dir)
    return SavedModel(model_dir, model, model_classes(model), paths, size, mode, max_pixels, spark)


def run_predict(config: Config, target: str, images_path: str, output: str | None = None,
                overrides: list[str] | tuple[str, ...] = (), log: Callable[[str], object] = print) -> int:
    """Classify ``images_path`` (a file or a folder, recursively) with a saved model.

    Prints one line per image, writes the CSV (default: predictions.csv beside the model folder)
    and returns 0, or 1 when some image could not be classified (each listed with its reason).
    When images sit in folders named after the model's classes, their accuracy against those
    names is printed next to the test accuracy the run reported.
    """
    saved = open_saved_model(config, target, images_path, list(overrides), log)
    model_dir, classes = saved.model_dir, saved.classes
    log(f"predicting {len(saved.paths)} image(s) with {model_dir} (classes {', '.join(classes)}; images normalised "
        f"to {saved.size}x{saved.size}, mode {saved.mode}, as in training)")
    table = predict_images(saved.spark, saved.model, saved.paths, size=saved.size, mode=saved.mode,
                           max_pixels=saved.max_pixels, log=log)
    table.insert(1, "folder_class", [_folder_class(p, classes) for p in table["path"]])
    table["path"] = [display_path(p, images_path) for p in table["path"]]
    print_rows(table, classes)
    dest = output or os.path.join(os.path.dirname(model_dir), PREDICTIONS)
    write_csv(table, dest)
    _log_summary(table, classes, model_dir, log)
    log(f"predictions: {dest}")
    return failed_exit_code(table, log, "classified")


def failed_exit_code(table: pd.DataFrame, log: Callable[[str], object], done: str) -> int:
    """1 (and a line saying how many) when some row of ``table`` has an error, else 0."""
    failed = int(table["error"].notna().sum())
    if failed:
        log(f"{failed} image(s) could not be {done} (ERROR lines above)")
        return 1
    return 0


def trained_settings(config: Config, model_dir: str, exp: Experiment | None, overrides: list[str],
                     log: Callable[[str], object]) -> tuple[Experiment, dict]:
    """(the experiment whose Spark settings this run uses, the settings the model was trained with)."""
    snapshot = _snapshot(model_dir)
    if exp is None:
        # Spark settings come from the config: the snapshot's experiment, else any experiment entry.
        name = snapshot["experiment"] if snapshot and snapshot.get("experiment") in config.names else None
        name = name or next((n for n in config.names if config.entries[n].get("job", "experiment") == "experiment"), None)
        if name is None:
            raise ConfigError(f"{config.path} defines no experiment to take Spark settings from")
        exp = config.experiment(name, overrides)
    if snapshot is None:
        log(f"note: no config.json beside {model_dir}: normalising images with dataset.image_size and mode from {config.path}")
    return exp, snapshot["settings"] if snapshot else exp.settings


def _folder_class(path: str, classes: list[str]) -> str:
    """The class named by the image's folder, or "" when the folder is not named after a class."""
    folder = os.path.basename(os.path.dirname(path))
    return folder if folder in classes else ""


def print_rows(table: pd.DataFrame, classes: list[str], extra: Callable[[dict], str] | None = None) -> None:
    """One line per image: path, predicted class, each probability (and ``extra(row)``), or ERROR."""
    for row in table.to_dict("records"):
        if row["error"]:
            print(f"{row['path']}\tERROR\t{row['error']}")
        else:
            probs = "\t".join(f"{c}={row[f'p_{c}']:.3f}" for c in classes)
            print(f"{row['path']}\t{row['predicted_class']}\t{probs}" + (f"\t{extra(row)}" if extra else ""))


def write_csv(table: pd.DataFrame, dest: str) -> None:
    buf = io.StringIO()
    table.to_csv(buf, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL, float_format="%.6f")
    write_text_atomic(dest, buf.getvalue())


def _log_summary(table: pd.DataFrame, classes: list[str], model_dir: str, log: Callable[[str], object]) -> None:
    """Counts per class; accuracy against the class folder names beside the test accuracy reported."""
    ok = table[table["error"].isna()]
    counts = ok["predicted_class"].value_counts()
    log(f"{len(ok)} of {len(table)} image(s) classified: " + ", ".join(f"{c} {int(counts.get(c, 0))}" for c in classes))
    labelled = ok[ok["folder_class"] != ""]
    if not len(labelled):
        return
    correct = int((labelled["predicted_class"] == labelled["folder_class"]).sum())
    lo, hi = wilson_interval(correct, len(labelled))
    line = (f"accuracy against the class folder names: {correct / len(labelled):.3f} (95% CI {lo:.3f}-{hi:.3f}) "
            f"on {len(labelled)} image(s)")
    reported = _reported_test_accuracy(model_dir)
    if reported:
        rlo, rhi = reported["ci95"]
        line += (f"; the run reported test accuracy {reported['accuracy']:.3f} (95% CI {rlo:.3f}-{rhi:.3f}) "
                 f"on {reported['n_test']} image(s)")
    log(line)
