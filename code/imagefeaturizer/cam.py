"""Class activation maps (CAM, Zhou et al. 2016) of a featurizer + LogisticRegression pipeline.

With ``pooling="avg"`` and a linear head the map is exact, not an approximation. The features
are the spatial mean of the last feature maps, ``x_k = mean_xy f_k(x, y)``, so the score
(``rawPrediction``) of class ``c`` is

    b_c + sum_k w_ck x_k = mean_xy M_c(x, y),   M_c(x, y) = b_c + sum_k w_ck f_k(x, y)

with ``w_c`` and ``b_c`` the LogisticRegression's coefficients and intercept. Spark keeps them on
the scale of the unstandardised features also when it trains with ``standardization=True``.
Binomial models have one coefficient vector ``w`` and intercept ``b``, and ``rawPrediction`` is
``[-m, m]`` with ``m = b + w.x``: class 1's map is ``b + w.f(x, y)`` and class 0's its negative.
Multinomial models: ``coefficientMatrix`` (classes x features) and ``interceptVector``.

With ``pooling="max"`` a map's mean is not the score: :func:`class_activation_maps` refuses, with
the fix, rather than draw a map that is not what the model computed.

- :func:`class_activation_maps`: a fitted ``PipelineModel`` (a :class:`KerasImageFeaturizer`
  whose output goes straight into a ``LogisticRegressionModel``) applied to a DataFrame of
  images; adds a column with every class's map at feature-map resolution, from the forward pass
  that gives the features (the featurizer's ``mapsCol``).
- numpy helpers on one map: :func:`upsample` (bilinear, to the image's height and width),
  :func:`peak_location` and :func:`border_share`.

Map cell ``(i, j)`` covers rows ``i/h .. (i+1)/h`` and columns ``j/w .. (j+1)/w`` of the image the
backbone saw (the image resized to its square input), so a map lies on the image as rows and
columns, whatever the image's own size. Receptive fields need not be centred on their cell
(ResNet50's stride-2 layers take the top-left pixel of each 2x2 block: its evidence sits about
half a cell down-right of the detail that caused it); maps are not shifted to correct for that.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegressionModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from .featurizer import KerasImageFeaturizer

CAMS_COL = "cams"
BORDER = 0.15
"""Default width of the border (as a share of the image's width and height) :func:`border_share` measures."""

_MAPS = "__cam_maps"


class CamUnavailableError(ValueError):
    """The model has no exact class activation map (pooling, missing or rewired stages)."""


def head_of(model: PipelineModel) -> tuple[KerasImageFeaturizer, LogisticRegressionModel]:
    """The featurizer and the LogisticRegression of ``model``, checked to give exact maps.

    Raises :class:`CamUnavailableError` naming the fix: one stage of each kind, the featurizer's
    output read by the LogisticRegression as is, ``pooling="avg"``.
    """
    featurizers = [s for s in model.stages if isinstance(s, KerasImageFeaturizer)]
    heads = [s for s in model.stages if isinstance(s, LogisticRegressionModel)]
    if len(featurizers) != 1 or len(heads) != 1:
        raise CamUnavailableError(
            f"class activation maps need a PipelineModel with one KerasImageFeaturizer and one "
            f"LogisticRegressionModel, found {len(featurizers)} and {len(heads)}"
        )
    featurizer, head = featurizers[0], heads[0]
    if head.getFeaturesCol() != featurizer.getOutputCol():
        raise CamUnavailableError(
            f"the LogisticRegression reads {head.getFeaturesCol()!r}, not the featurizer's output "
            f"{featurizer.getOutputCol()!r}: class activation maps need the features to go straight "
            f"into the LogisticRegression"
        )
    if featurizer.getPooling() != "avg":
        raise CamUnavailableError(
            f"class activation maps need pooling=avg, the model uses pooling={featurizer.getPooling()} "
            f"(a map's mean is then not the class score): refit the model with pooling=avg"
        )
    return featurizer, head


def linear_head(head: LogisticRegressionModel) -> tuple[np.ndarray, np.ndarray]:
    """(weights (classes, features), biases (classes,)): ``rawPrediction = weights @ x + biases``."""
    weights = head.coefficientMatrix.toArray()
    biases = head.interceptVector.toArray()
    if weights.shape[0] == 1 and head.numClasses == 2:  # binomial: rawPrediction = [-m, m]
        weights, biases = np.vstack([-weights, weights]), np.concatenate([-biases, biases])
    return weights.astype(np.float64), biases.astype(np.float64)


def maps_to_cams(maps: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """Feature maps (n, h, w, channels) and a linear head -> class maps (n, classes, h, w)."""
    cams = np.einsum("nhwk,ck->nchw", maps.astype(np.float64), weights)
    return cams + biases[None, :, None, None]


def class_activation_maps(model: PipelineModel, dataset: DataFrame, camsCol: str = CAMS_COL) -> DataFrame:
    """``model.transform(dataset)`` plus ``camsCol``: each image's class maps, (classes, h, w).

    ``camsCol`` is an ``array<array<array<double>>>``: ``cams[c]`` is class ``c``'s map (class
    order as in ``probability``), rows top to bottom and columns left to right of the image, at
    feature-map resolution (``featurizer.backbone.map_shape``). The spatial mean of ``cams[c]``
    is ``rawPrediction[c]``. The maps come from the featurizer's forward pass (no second model
    per worker); the feature maps themselves never reach the driver.
    """
    featurizer, head = head_of(model)
    weights, biases = linear_head(head)
    h, w, channels = featurizer.backbone.map_shape

    @F.pandas_udf(T.ArrayType(T.ArrayType(T.ArrayType(T.DoubleType()))))
    def to_cams(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for maps in batches:
            grid = np.stack(maps.to_numpy()).reshape(len(maps), h, w, channels) if len(maps) else np.zeros((0, h, w, channels))
            yield pd.Series([c.tolist() for c in maps_to_cams(grid, weights, biases)], dtype=object)

    result = dataset
    for stage in model.stages:
        if stage is featurizer:
            stage = featurizer.copy({featurizer.mapsCol: _MAPS})
        result = stage.transform(result)
        if stage is head:
            result = result.withColumn(camsCol, to_cams(F.col(_MAPS))).drop(_MAPS)
    return result


# --------------------------------------------------------------------------- one map, numpy


def upsample(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map (h, w) resized to (height, width) by bilinear interpolation, float32.

    Map cell centres sit at the centres of the image blocks they cover (half-pixel convention,
    edges held constant), as Pillow's and TensorFlow's bilinear resize place them.
    """
    cam = np.asarray(cam, dtype=np.float64)
    if cam.ndim != 2:
        raise ValueError(f"a map is 2-D (rows, columns), got shape {cam.shape}")
    r0, r1, fr = _sample_points(height, cam.shape[0])
    c0, c1, fc = _sample_points(width, cam.shape[1])
    rows = cam[r0] * (1 - fr)[:, None] + cam[r1] * fr[:, None]
    return (rows[:, c0] * (1 - fc) + rows[:, c1] * fc).astype(np.float32)


def _sample_points(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output pixel: the two input cells around its centre and the weight of the second."""
    centre = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    first = np.floor(centre).astype(int)
    return first, np.minimum(first + 1, n_in - 1), centre - first


def peak_location(cam: np.ndarray) -> tuple[float, float]:
    """(x, y) of the map's maximum as fractions of the image's width and height (cell centre)."""
    cam = np.asarray(cam)
    row, col = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return (col + 0.5) / cam.shape[1], (row + 0.5) / cam.shape[0]


def border_share(cam: np.ndarray, border: float = BORDER) -> float | None:
    """Share of the map's positive mass in the outer ``border`` of the image (each side).

    Give an upsampled map (image resolution). The border of 15% covers 51% of the image's area:
    evidence spread evenly gives about 0.51. None when the map has no positive value.
    """
    positive = np.clip(np.asarray(cam, dtype=np.float64), 0, None)
    total = positive.sum()
    if total <= 0:
        return None
    height, width = positive.shape
    dy, dx = int(round(border * height)), int(round(border * width))
    inner = positive[dy:height - dy, dx:width - dx].sum()
    return float((total - inner) / total)
