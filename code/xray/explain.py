"""Where the model looks: class activation maps of new images (``wrapper.sh explain``) and of
every run's test images (``cam_gallery.png`` and ``explanations`` in ``metrics.json``).

The maps are exact (:mod:`imagefeaturizer.cam`): with ``pooling=avg`` and the LogisticRegression
head, the mean of class ``c``'s map is the model's score for ``c``. They come from the forward
pass that gives the features.

``explain`` loads and normalises images exactly as ``predict`` does (:mod:`xray.predict`) and
writes, per image, ``<name>.cam.png`` (the normalised image under a heat map of the predicted
class's map, or of ``--class``), ``<name>.cam.npy`` (that map, float32, upsampled to the
normalised image's height x width, rows and columns as the image's) and a row of
``explanations.csv``. ``<name>`` is the file's path below the folder given, without its
extension: sub-folders are mirrored, and files of one folder that share a stem keep their
extension in the name (``a_png``, ``a_jpg``), so no output is written twice.

A run explains a bounded set of test images, not all of them (a maps pass over every test image
costs about a fifth of featurization): the gallery's images and a seeded sample of up to
``explain.sample_per_class`` test images per class, over which the statistics are taken.
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from PIL import Image

from imagefeaturizer.cam import BORDER, CamUnavailableError, border_share, class_activation_maps, head_of, peak_location, upsample
from imagefeaturizer.classifier import KerasImageClassifier

from .atomic import atomic_file
from .charts import cam_gallery_chart, cam_png, heat_overlay
from .config import Config, ConfigError
from .data import load_images
from .errors import DataError
from .paths import local_path
from .predict import (
    SavedModel,
    display_path,
    failed_exit_code,
    open_saved_model,
    print_rows,
    result_table,
    write_csv,
)

EXPLANATIONS_CSV = "explanations.csv"
EXPLANATIONS_DIR = "explanations"  # explain's default output folder, beside the model folder
CAM_GALLERY = "cam_gallery.png"
CHUNK = 256  # at most this many images explain brings to the driver at a time (their normalised PNGs and maps)
MIN_CHUNK = 32  # at least this many a chunk (each chunk is a Spark job)
WRITERS = 2  # threads writing .cam.png/.cam.npy files (PNG encoding and numpy release the GIL)
BORDER_AREA = 1 - (1 - 2 * BORDER) ** 2  # the share of the image the border covers (0.51)
EXPLAIN_DEFAULTS = {"sample_per_class": 16, "gallery_per_class": 3, "gallery_misclassified": 6, "border_warning": 0.7}
"""The ``explain`` section's values when a config file has none (config.yaml documents them)."""
_COLUMNS = ["map_class", "peak_x", "peak_y", "border_share", "cam_png", "cam_npy"]


# --------------------------------------------------------------------------- wrapper.sh explain


def run_explain(config: Config, target: str, images_path: str, output: str | None = None, class_name: str | None = None,
                overrides: list[str] | tuple[str, ...] = (), log: Callable[[str], object] = print) -> int:
    """Explain ``images_path`` (a file or a folder, recursively) with a saved model.

    Writes the maps, overlays and ``explanations.csv`` into ``output`` (default: ``explanations/``
    beside the model folder), prints one line per image and returns 0, or 1 when some image could
    not be explained (each listed with ERROR and its reason; the others are explained).
    """
    saved = open_saved_model(config, target, images_path, list(overrides), log)
    _check_explainable(saved, class_name)
    out_dir = os.path.abspath(output or os.path.join(os.path.dirname(saved.model_dir), EXPLANATIONS_DIR))
    log(f"explaining {len(saved.paths)} image(s) with {saved.model_dir} (classes {', '.join(saved.classes)}; map of "
        f"{class_name or 'the predicted class'}; images normalised to {saved.size}x{saved.size}, mode {saved.mode}, "
        f"as in training); output folder: {out_dir}")
    table = explain_images(saved, output_names(saved.paths, images_path), out_dir, class_name, images_path, log)
    table["path"] = [display_path(p, images_path) for p in table["path"]]
    print_rows(table, saved.classes, extra=_describe)
    write_csv(table, os.path.join(out_dir, EXPLANATIONS_CSV))
    log(f"explanations: {out_dir} (<name>.cam.png, <name>.cam.npy, {EXPLANATIONS_CSV})")
    return failed_exit_code(table, log, "explained")


def _check_explainable(saved: SavedModel, class_name: str | None) -> None:
    if any(isinstance(s, KerasImageClassifier) for s in saved.model.stages):
        raise DataError(f"cannot explain with {saved.model_dir}: it holds a trained network (train: finetune or "
                        f"scratch), and class activation maps are made for linear probes only (train: probe): "
                        f"explain a linear probe's model, e.g. results/<Backbone>_<task>_classification")
    try:
        head_of(saved.model)
    except CamUnavailableError as exc:
        raise DataError(f"cannot explain with {saved.model_dir}: {exc}") from None
    if class_name is not None and class_name not in saved.classes:
        raise ConfigError(f"--class {class_name!r} is not a class of the model: expected one of {', '.join(saved.classes)}")


def _describe(row: dict) -> str:
    share = "none" if pd.isna(row["border_share"]) else f"{row['border_share']:.2f}"
    return (f"map of {row['map_class']}: peak x={row['peak_x']:.2f} y={row['peak_y']:.2f}, border share {share}"
            f"\t{row['cam_png']}")


def output_names(paths: list[str], images_path: str) -> dict[str, str]:
    """Absolute image path -> its output name below the output folder (without ``.cam.png``).

    The path below the folder given, without the extension; where files of one folder share a
    stem, each keeps its extension (``scan_png``, ``scan_jpg``)."""
    base = os.path.abspath(images_path if os.path.isdir(images_path) else os.path.dirname(images_path))
    relative = {p: os.path.relpath(p, base) for p in paths}
    stems = Counter(os.path.splitext(r)[0] for r in relative.values())
    names = {}
    for path, rel in relative.items():
        stem, ext = os.path.splitext(rel)
        names[path] = stem if stems[stem] == 1 else f"{stem}_{ext.lstrip('.').lower()}"
    return names


def explain_images(saved: SavedModel, names: dict[str, str], out_dir: str, class_name: str | None, images_path: str,
                   log: Callable[[str], object] = print) -> pd.DataFrame:
    """Maps, overlays and one table row per image (``predict``'s columns, then the map's).

    The images go through Spark in chunks (:func:`chunk_size`), so the driver holds a bounded
    number of them; while one chunk's files are written (by :data:`WRITERS` threads), Spark
    already computes the next chunk's maps."""
    found, errors, details = {}, {}, {}
    size = chunk_size(len(saved.paths))
    chunks = [saved.paths[i:i + size] for i in range(0, len(saved.paths), size)]
    done = 0
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="cam-writer") as writers:
        for rows, bad in _prefetched(lambda paths: _maps_chunk(saved, paths), chunks):
            errors.update(bad)
            pending = {}
            for r in rows:
                key = local_path(r.path)
                found[key] = (r.predicted_label, r.probability.toArray())
                title = [display_path(key, images_path)] + _title(saved.classes, r.predicted_label, found[key][1])
                shown = class_name or r.predicted_label
                pending[key] = writers.submit(_write_one, r, names[key], out_dir, saved.classes, shown, title)
            details.update({key: future.result() for key, future in pending.items()})
            done += len(rows) + len(bad)
            if len(chunks) > 1:
                log(f"explained {done} of {len(saved.paths)} images")
    table = result_table(saved.paths, found, errors, saved.classes)
    for column in _COLUMNS:
        table.insert(len(table.columns) - 1, column, [details.get(os.path.normpath(p), {}).get(column) for p in saved.paths])
    return table


def chunk_size(n: int) -> int:
    """Images a chunk: a quarter of ``n`` (so that writing overlaps the next chunk's maps), at
    least :data:`MIN_CHUNK` (a Spark job's start costs), at most :data:`CHUNK` (driver memory)."""
    return max(MIN_CHUNK, min(CHUNK, -(-n // 4)))


def _maps_chunk(saved: SavedModel, paths: list[str]) -> tuple[list, dict[str, str]]:
    """The rows (path, normalised PNG, prediction, class maps) of the files of ``paths`` that
    normalise, and {path: reason} of those that do not."""
    with saved.normalized(paths) as (good, bad):
        rows = class_activation_maps(saved.model, good).select(
            "path", "content", "predicted_label", "probability", "cams").collect()
    return rows, bad


def _prefetched(compute: Callable, items: list) -> Iterator:
    """``compute(item)`` for each item in order, the next one computed (in a thread) while the
    caller works on the current one's result."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cam-chunks") as ahead:
        future = ahead.submit(compute, items[0])
        for following in [*items[1:], None]:
            result = future.result()
            future = ahead.submit(compute, following) if following is not None else None
            yield result


def _title(classes: list[str], predicted: str, probability: np.ndarray) -> list[str]:
    return ["predicted " + predicted + ": " + ", ".join(f"{c} {p:.3f}" for c, p in zip(classes, probability))]


def _write_one(row, name: str, out_dir: str, classes: list[str], shown: str, title: list[str]) -> dict:
    """``<name>.cam.npy`` and ``<name>.cam.png`` of one image; its columns of the table."""
    image = np.asarray(Image.open(io.BytesIO(row.content)))
    cam = np.asarray(row.cams)[classes.index(shown)]
    big = upsample(cam, image.shape[0], image.shape[1])
    peak, share = peak_location(cam), border_share(big)
    npy, png = os.path.join(out_dir, name + ".cam.npy"), os.path.join(out_dir, name + ".cam.png")
    with atomic_file(npy) as f:
        np.save(f, big)
    title = title + [f"map of {shown} (mean {cam.mean():.3f} = its score); peak x={peak[0]:.2f} y={peak[1]:.2f}"]
    cam_png(image, big, title, peak, png)
    return {"map_class": shown, "peak_x": peak[0], "peak_y": peak[1], "border_share": share,
            "cam_png": os.path.relpath(png, out_dir), "cam_npy": os.path.relpath(npy, out_dir)}


# --------------------------------------------------------------------------- every run: gallery and statistics


def explain_test_images(spark, model, pred: dict[str, np.ndarray], classes: list[str], settings: dict, out_dir: str,
                        title: str, log: Callable[[str], object] = print) -> dict:
    """``cam_gallery.png`` into ``out_dir`` and the ``explanations`` entry of metrics.json.

    ``pred``: the test split's predictions (path, y_true, y_pred, probability). Maps are computed
    for the gallery's images and a seeded sample of up to ``explain.sample_per_class`` test images
    per class; the statistics (per true class, of the true class's map) are over that sample.
    """
    started = time.perf_counter()
    try:
        head_of(model)
    except CamUnavailableError as exc:
        log(f"explanations skipped: {exc}")
        return {"skipped": str(exc)}
    cfg = {**EXPLAIN_DEFAULTS, **settings.get("explain", {})}
    gallery = gallery_choice(pred, len(classes), cfg["gallery_per_class"], cfg["gallery_misclassified"])
    sample = sample_choice(pred, len(classes), cfg["sample_per_class"], settings["seed"])
    maps = _maps_of(spark, model, sorted({pred["path"][i] for i in gallery + sample}))
    panels = [_panel(maps[local_path(pred["path"][i])], pred, i, classes) for i in gallery]
    cam_gallery_chart(panels, f"{title}: class activation maps of the predicted class\n(test images: the "
                      f"{cfg['gallery_per_class']} most confident correct ones of each class, then up to "
                      f"{cfg['gallery_misclassified']} misclassified ones, most confident first)",
                      os.path.join(out_dir, CAM_GALLERY))
    result = {
        "method": "class activation maps, exact (pooling=avg, linear head: a map's mean is the class score)",
        "statistics_over": f"a seeded sample of up to {cfg['sample_per_class']} test images per class, "
                           f"each with its true class's map",
        "sample_per_class": cfg["sample_per_class"], "seed": settings["seed"], "border": BORDER,
        "border_area_share": round(BORDER_AREA, 4), "border_warning": cfg["border_warning"],
        "per_class": class_statistics(maps, pred, sample, classes),
        "gallery": CAM_GALLERY, "gallery_images": len(gallery),
    }
    result["warning"] = border_warning(result["per_class"], cfg["border_warning"])
    if result["warning"]:
        log(result["warning"])
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def gallery_choice(pred: dict[str, np.ndarray], n_classes: int, per_class: int, misclassified: int) -> list[int]:
    """Rows of ``pred`` for the gallery: the ``per_class`` most confident correct ones of each
    class, then the ``misclassified`` ones with the most confident wrong prediction."""
    confidence = pred["probability"].max(axis=1) if len(pred["path"]) else np.zeros(0)
    order = sorted(range(len(pred["path"])), key=lambda i: (-confidence[i], pred["path"][i]))
    correct = pred["y_true"] == pred["y_pred"]
    chosen = []
    for c in range(n_classes):
        chosen += [int(i) for i in order if correct[i] and pred["y_true"][i] == c][:per_class]
    return chosen + [int(i) for i in order if not correct[i]][:misclassified]


def sample_choice(pred: dict[str, np.ndarray], n_classes: int, per_class: int, seed: int) -> list[int]:
    """Up to ``per_class`` rows of each true class, drawn with ``seed`` from the rows in path
    order (so the same split gives the same sample, whatever order Spark returned the rows in)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(n_classes):
        rows = sorted(np.flatnonzero(pred["y_true"] == c), key=lambda i: pred["path"][i])
        chosen += sorted(int(i) for i in rng.permutation(rows)[:per_class]) if rows else []
    return chosen


def _maps_of(spark, model, paths: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Local path -> (the image as the model saw it, its class maps) for image files ``paths``."""
    if not paths:
        return {}
    images = load_images(spark, [(local_path(p), None) for p in paths])  # paths may be file: URIs (a run's rows)
    rows = class_activation_maps(model, images).select("path", "content", "cams").collect()
    return {local_path(r.path): (np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(r.cams)) for r in rows}


def _panel(found: tuple[np.ndarray, np.ndarray], pred: dict[str, np.ndarray], i: int, classes: list[str]) -> dict:
    image, cams = found
    t, p = int(pred["y_true"][i]), int(pred["y_pred"][i])
    overlay = heat_overlay(image, upsample(cams[p], image.shape[0], image.shape[1]))
    label = f"true {classes[t]}\npredicted {classes[p]} ({pred['probability'][i][p]:.2f})"
    return {"overlay": overlay, "label": label, "correct": t == p}


def class_statistics(maps: dict, pred: dict[str, np.ndarray], sample: list[int], classes: list[str]) -> dict[str, dict]:
    """Per true class, over the sample: images, mean border share and mean peak of the true class's map."""
    shares: dict[int, list] = {c: [] for c in range(len(classes))}
    peaks: dict[int, list] = {c: [] for c in range(len(classes))}
    for i in sample:
        image, cams = maps[local_path(pred["path"][i])]
        c = int(pred["y_true"][i])
        shares[c].append(border_share(upsample(cams[c], image.shape[0], image.shape[1])))
        peaks[c].append(peak_location(cams[c]))
    out = {}
    for c, name in enumerate(classes):
        known = [s for s in shares[c] if s is not None]
        xy = np.asarray(peaks[c]).reshape(-1, 2)
        out[name] = {"images": len(shares[c]), "border_share": round(float(np.mean(known)), 4) if known else None,
                     "peak_x": round(float(xy[:, 0].mean()), 4) if len(xy) else None,
                     "peak_y": round(float(xy[:, 1].mean()), 4) if len(xy) else None}
    return out


def border_warning(per_class: dict[str, dict], threshold: float) -> str | None:
    """The warning line when a class's evidence sits mostly at the border (mean share >= threshold)."""
    at_border = {c: v["border_share"] for c, v in per_class.items()
                 if v["border_share"] is not None and v["border_share"] >= threshold}
    if not at_border:
        return None
    listed = ", ".join(f"{c} {share:.0%}" for c, share in at_border.items())
    return (f"WARNING: the evidence for {', '.join(at_border)} sits mostly at the image border ({listed} of the positive "
            f"map mass in the outer {BORDER:.0%} band, which covers {BORDER_AREA:.0%} of the image; warning from "
            f"{threshold:.0%}): what a shortcut (text, markers, borders) looks like; see {CAM_GALLERY}")
