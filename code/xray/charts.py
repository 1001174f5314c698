"""Charts of experiments and sweeps, each written atomically as PNG.

Per experiment: the confusion matrix, the ROC curve(s), the learning curve (the
LogisticRegression objective per iteration) and the gallery of class activation maps; per sweep:
the backbones side by side. Charts use matplotlib's Agg renderer through
``matplotlib.figure.Figure`` (no pyplot, no display, no global state); matplotlib is imported only
when a chart is drawn. One image's class activation map (``explain``) is drawn with Pillow: many
of them are written at a time, and a matplotlib figure each would cost more than the map.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_file
from .evaluation import roc_auc, roc_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_TASK_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save_figure_atomic(fig: "Figure", path: str) -> None:
    """Save a figure as PNG next to ``path``, then rename it into place."""
    with atomic_file(path) as f:
        fig.savefig(f, format="png")


def _subtitle(m: dict) -> str:
    lo, hi = m["accuracy_ci95"]
    text = f"accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), {m['n_test']} test images"
    if not m.get("transfer_learning", True):
        text += ("\ntrained from scratch, NOT transfer learning" if m.get("method") == "scratch"
                 else "\nweights=random: untrained backbone, NOT transfer learning")
    return text


def confusion_matrix_chart(m: dict, path: str) -> "Figure":
    """Counts and row percentages (recall of each true class), class names on both axes."""
    labels = m["confusion_matrix"]["labels"]
    cm = np.asarray(m["confusion_matrix"]["rows_true_columns_predicted"], dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(labels)
    fig = _figure(2.2 + 1.6 * k, 1.9 + 1.4 * k)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=12,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), labels, rotation=90, va="center")
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"{m['experiment']}: confusion matrix (test set)\n{_subtitle(m)}", fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the true class (row)")
    save_figure_atomic(fig, path)
    return fig


def roc_chart(m: dict, y_true: np.ndarray, probability: np.ndarray, path: str) -> "Figure":
    """ROC of the positive class (two classes) or one curve per class, one vs rest (more)."""
    classes = m["classes"]
    y_true = np.asarray(y_true, dtype=int)
    probability = np.asarray(probability, dtype=float).reshape(len(y_true), len(classes))
    fig = _figure(6.4, 5.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance (AUC 0.5)")
    shown = [0] if len(classes) == 2 else range(len(classes))
    for i in shown:
        positives = y_true == i
        name = classes[i]
        if positives.all() or not positives.any():
            ax.plot([], [], " ", label=f"{name}: not defined (test set lacks positives or negatives)")
            continue
        fpr, tpr = roc_curve(probability[:, i], positives)
        auc = roc_auc(probability[:, i], positives)
        label = f"{name} (positive class), AUC {auc:.3f}" if len(classes) == 2 else f"{name} vs rest, AUC {auc:.3f}"
        ax.plot(fpr, tpr, drawstyle="default", linewidth=2, color=_TASK_COLOURS[i % len(_TASK_COLOURS)], label=label)
    kind = "binary" if len(classes) == 2 else "one vs rest"
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(f"{m['experiment']}: ROC ({kind}, test set)\n{_subtitle(m)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    save_figure_atomic(fig, path)
    return fig


def learning_curve_chart(m: dict, path: str) -> "Figure":
    """The LogisticRegression objective (loss + regularization) at each L-BFGS iteration; for a
    trained network, :func:`training_curve_chart`."""
    if m.get("training"):
        return training_curve_chart(m, path)
    history = np.asarray(m.get("lr_objective_history") or [], dtype=float)
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    if len(history):
        ax.plot(np.arange(len(history)), history, marker="." if len(history) < 60 else None, linewidth=1.5)
        if (history > 0).all() and history.max() / history.min() > 20:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no objective history recorded", ha="center", va="center", transform=ax.transAxes)
    clf = m.get("config", {}).get("classifier", {})
    iterations = m.get("lr_iterations")
    note = f"{iterations} iterations" if iterations is not None else ""
    if clf and iterations is not None and iterations >= clf.get("maxIter", float("inf")):
        note += f": stopped at maxIter={clf['maxIter']} before reaching tol={clf.get('tol')}"
    elif clf:
        note += f" (maxIter {clf.get('maxIter')}, tol {clf.get('tol')}, regParam {clf.get('regParam')})"
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Iteration (L-BFGS)")
    ax.set_ylabel("Objective: log loss + regularization")
    ax.set_title(f"{m['experiment']}: LogisticRegression training objective\n{note}", fontsize=10)
    ax.grid(alpha=0.3)
    save_figure_atomic(fig, path)
    return fig


def training_curve_chart(m: dict, path: str) -> "Figure":
    """Loss and accuracy per epoch, training and validation, stages marked, the chosen epoch ringed."""
    t = m["training"]
    epochs = t["epochs"]
    x = [e["epoch"] for e in epochs]
    fig = _figure(8.8, 4.4)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "loss", "Loss (cross-entropy)"), (axes[1], "accuracy", "Accuracy")):
        ax.plot(x, [e.get(key) for e in epochs], marker="o", label=f"training ({key})")
        ax.plot(x, [e.get(f"val_{key}") for e in epochs], marker="s", label=f"validation (val_{key})")
        chosen = next((e for e in epochs if e["epoch"] == t["chosen_epoch"]), None)
        if chosen is not None and chosen.get(f"val_{key}") is not None:
            ax.plot([chosen["epoch"]], [chosen[f"val_{key}"]], "o", markersize=14, fillstyle="none", color="black",
                    label=f"chosen epoch {chosen['epoch']}")
        for stage in t["stages"][1:]:
            first = min(e["epoch"] for e in epochs if e["stage"] == stage["stage"])
            ax.axvline(first - 0.5, color="grey", linestyle="--", linewidth=1, label=f"stage {stage['stage']} starts")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rate = t.get("images_per_second")
    fig.suptitle(f"{m['experiment']}: {m.get('method', 'training')} learning curve\n"
                 f"training images/s {rate if rate is not None else 'n/a'}; early stopping on validation loss",
                 fontsize=10)
    save_figure_atomic(fig, path)
    return fig


def summary_chart(rows: list[dict[str, Any]], path: str) -> "Figure":
    """Grouped bars: backbone on x, one bar per task; test accuracy with its 95% interval and AUC.

    ``rows`` are sweep summary rows (keys experiment, model, task, status, accuracy, ci95_low,
    ci95_high, auc, majority_baseline). Failed experiments show as an empty bar marked "failed".
    """
    from matplotlib.patches import Patch

    tasks = list(dict.fromkeys(r["task"] or "?" for r in rows))
    cells = _summary_cells(rows)
    groups = list(dict.fromkeys(k[0] for k in cells))
    width = 0.8 / max(1, len(tasks))
    fig = _figure(max(7.0, 1.5 * len(groups) + 3), 8.2)
    ax_acc, ax_auc = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    x = np.arange(len(groups))
    handles: list = []
    for t, task in enumerate(tasks):
        colour = _TASK_COLOURS[t % len(_TASK_COLOURS)]
        offset = (t - (len(tasks) - 1) / 2) * width
        for g, group in enumerate(groups):
            r = cells.get((group, task))
            if r is not None:
                _summary_bars(ax_acc, ax_auc, r, x[g] + offset, width * 0.95, colour)
        handles.append(Patch(color=colour, label=task))
        baselines = [r["majority_baseline"] for r in rows
                     if (r["task"] or "?") == task and r["status"] == "ok" and r.get("majority_baseline") is not None]
        if baselines:
            handles.append(ax_acc.axhline(max(baselines), color=colour, linestyle="--", linewidth=1,
                                          label=f"{task}: majority-class baseline {max(baselines):.2f}"))
    _summary_axes(ax_acc, ax_auc, x, groups)
    if any(r["status"] != "ok" for r in rows):
        handles.append(Patch(fill=False, hatch="//", label="failed (see summary.md)"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncol=min(3, len(handles)))
    fig.suptitle(_summary_title(rows), fontsize=11)
    save_figure_atomic(fig, path)
    return fig


def _summary_cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict]:
    """(backbone, task) -> row; two experiments with the same model and task: labelled by experiment."""
    seen: set[tuple] = set()
    cells: dict[tuple[str, str], dict] = {}
    for r in rows:
        method = r.get("method") or "linear probe"
        group = r["model"] or r["experiment"]
        key = (group if method == "linear probe" else f"{group}\n{method}", r["task"] or "?")
        if key in seen:
            key = (r["experiment"], key[1])
        seen.add(key)
        cells[key] = r
    return cells


def _summary_bars(ax_acc, ax_auc, r: dict[str, Any], pos: float, width: float, colour: str) -> None:
    """One experiment's bars: accuracy with its interval above, AUC below (or "failed" in both)."""
    if r["status"] != "ok":
        for ax in (ax_acc, ax_auc):
            ax.bar(pos, 1.0, width, fill=False, hatch="//", edgecolor=colour)
            ax.text(pos, 0.5, "failed", rotation=90, ha="center", va="center", fontsize=9)
        return
    acc, lo, hi = r["accuracy"], r["ci95_low"], r["ci95_high"]
    ax_acc.bar(pos, acc, width, color=colour, yerr=[[acc - lo], [hi - acc]], capsize=4,
               error_kw={"elinewidth": 1.2, "ecolor": "black"})
    ax_acc.text(pos, hi + 0.01, f"{acc:.2f}", ha="center", va="bottom", fontsize=8)
    if r.get("auc") is not None:
        ax_auc.bar(pos, r["auc"], width, color=colour)
        ax_auc.text(pos, r["auc"] + 0.01, f"{r['auc']:.2f}", ha="center", va="bottom", fontsize=8)


def _summary_axes(ax_acc, ax_auc, x: np.ndarray, groups: list[str]) -> None:
    ax_auc.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax_acc.set_ylim(0, 1.12)
    ax_auc.set_ylim(0, 1.12)
    ax_acc.set_ylabel("Test accuracy (bars: 95% CI)")
    ax_auc.set_ylabel("ROC AUC\n(binary; macro one-vs-rest)")
    ax_auc.set_xticks(x, groups)
    ax_auc.set_xlabel("Backbone (and method, when not a linear probe)")
    for ax in (ax_acc, ax_auc):
        ax.grid(axis="y", alpha=0.3)


def _summary_title(rows: list[dict[str, Any]]) -> str:
    weights = sorted({str(r.get("weights")) for r in rows if r.get("weights")})
    title = "Backbones compared on each task: test accuracy and ROC AUC"
    if weights:
        title += f"\nweights={', '.join(weights)}"
        if "random" in weights:
            title += " (random: untrained backbones, NOT transfer learning)"
    return title


# --------------------------------------------------------------------------- class activation maps

HEAT_ALPHA = 0.45  # weight of the heat colours over the image


_ALPHA = round(HEAT_ALPHA * 256)  # the heat's weight in 256ths: overlays are mixed in integers


@functools.lru_cache(maxsize=1)
def _jet_table() -> np.ndarray:
    """Matplotlib's "jet" colours at its 256 levels, each channel (0..255) times ``_ALPHA``:
    (256, 3) uint16, so that an overlay is one table lookup and one integer mix per pixel."""
    from matplotlib import colormaps

    colours = np.rint(colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0)
    return (colours * _ALPHA).astype(np.uint16)


def heat_overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The image (H, W) or (H, W, 3) uint8 under a "jet" heat map of ``cam`` (H, W), from the
    map's minimum (blue) to its maximum (red) in matplotlib's 256 levels, mixed with weight
    :data:`HEAT_ALPHA` (to within one grey level); (H, W, 3) uint8."""
    lo, hi = float(cam.min()), float(cam.max())
    scaled = (cam - lo) * (256.0 / (hi - lo)) if hi > lo else np.zeros(cam.shape, np.float32)
    level = np.minimum(scaled, 255).astype(np.uint8)  # as matplotlib's colormap picks its level
    base = image[..., None] if image.ndim == 2 else image[..., :3]
    mixed = base.astype(np.uint16) * (256 - _ALPHA) + np.take(_jet_table(), level, axis=0)
    return ((mixed + 128) >> 8).astype(np.uint8)  # rounded


PNG_COMPRESS_LEVEL = 1  # zlib level of the overlays: 1 writes them several times faster than the default 6
CAM_PNG_MIN_SIDE = 384  # overlays of smaller images are enlarged to this width for reading


def cam_png(image: np.ndarray, cam: np.ndarray, title: list[str], peak: tuple[float, float], path: str) -> None:
    """One image with its map: title lines above, the overlay with the peak marked (a white cross,
    the image enlarged to :data:`CAM_PNG_MIN_SIDE` pixels wide when smaller), a colour bar with the
    map's range below; written atomically as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    overlay = Image.fromarray(heat_overlay(image, cam))
    if overlay.width < CAM_PNG_MIN_SIDE:
        scale = CAM_PNG_MIN_SIDE / overlay.width
        overlay = overlay.resize((CAM_PNG_MIN_SIDE, round(overlay.height * scale)), Image.Resampling.BILINEAR)
    line = 17
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = int(max([overlay.width + 12] + [probe.textlength(t, font=font) + 12 for t in title]))
    canvas = Image.new("RGB", (width, line * len(title) + overlay.height + 12 + 2 * line + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title):
        draw.text((6, 3 + i * line), text, fill="black", font=font)
    left, top = (width - overlay.width) // 2, line * len(title) + 6
    canvas.paste(overlay, (left, top))
    x, y = left + peak[0] * overlay.width, top + peak[1] * overlay.height
    draw.line([(x - 7, y), (x + 7, y)], fill="white", width=2)
    draw.line([(x, y - 7), (x, y + 7)], fill="white", width=2)
    _colour_bar(canvas, draw, font, (left, top + overlay.height + 6, overlay.width), (float(cam.min()), float(cam.max())))
    with atomic_file(path) as f:
        canvas.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def _colour_bar(canvas, draw, font, box: tuple[int, int, int], value_range: tuple[float, float]) -> None:
    """The heat colours from the map's minimum to its maximum, both values below its ends."""
    from matplotlib import colormaps
    from PIL import Image

    left, top, width = box
    ramp = (colormaps["jet"](np.linspace(0, 1, width))[None, :, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp, 10, axis=0)), (left, top))
    lo, hi = f"{value_range[0]:.3g}", f"{value_range[1]:.3g}"
    draw.text((left, top + 12), lo, fill="black", font=font)
    draw.text((left + width - draw.textlength(hi, font=font), top + 12), hi, fill="black", font=font)
    note = "map value (its mean over the image is the class score)"
    draw.text((left + (width - draw.textlength(note, font=font)) / 2, top + 29), note, fill="black", font=font)


def cam_gallery_chart(panels: list[dict], title: str, path: str, columns: int = 5) -> "Figure":
    """A grid of overlays (``heat_overlay`` arrays), each titled with its ``label``, green when
    ``correct`` and red when not. ``panels``: dicts with keys overlay, label, correct."""
    cols = max(1, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig = _figure(2.4 * cols + 0.4, 2.75 * rows + 0.9)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, panel in zip(axes, panels):
        ax.imshow(panel["overlay"])
        ax.set_title(panel["label"], fontsize=8, color="#1a7f37" if panel["correct"] else "#c62828")
    if not panels:
        axes[0].text(0.5, 0.5, "no test images to show", ha="center", va="center", transform=axes[0].transAxes)
    fig.suptitle(title, fontsize=10)
    save_figure_atomic(fig, path)
    return fig
