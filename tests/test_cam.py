"""Class activation maps: the exact identity with the LogisticRegression's scores, a planted
shortcut found by its map, the numpy helpers and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pyspark.ml import PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import StringIndexer

from conftest import png_bytes, xray_like
from imagefeaturizer import backbones
from imagefeaturizer.cam import (
    CamUnavailableError,
    border_share,
    class_activation_maps,
    head_of,
    linear_head,
    peak_location,
    upsample,
)
from imagefeaturizer.featurizer import KerasImageFeaturizer

CHEAP = "ResNet50"  # the cheapest backbone on a CPU; the others run in the slow tier
ALL_BACKBONES = [name if name == CHEAP else pytest.param(name, marks=pytest.mark.slow) for name in backbones.BACKBONES]


def _images(spark, kinds: int, per_kind: int = 2):
    """(path, label, content): generated images of ``kinds`` visibly different kinds, one partition
    (one Python worker builds the model)."""
    rows = [(f"img{k}_{i}.png", f"class{k}", png_bytes(xray_like(k, seed=10 * k + i, size=(80, 64))))
            for k in range(kinds) for i in range(per_kind)]
    return spark.createDataFrame(rows, "path string, label string, content binary").coalesce(1)


def _fit(rows, featurizer: KerasImageFeaturizer, family: str, **lr_params) -> PipelineModel:
    """The pipeline model (indexer, featurizer, LogisticRegression) fitted on feature ``rows``."""
    indexer = StringIndexer(inputCol="label", outputCol="label_index").fit(rows)
    # 10 iterations (each a Spark job): the identities hold for any fitted head, and the tiny
    # visibly different classes here are separated well before that
    head = LogisticRegression(featuresCol="features", labelCol="label_index", family=family, maxIter=10,
                              **{"regParam": 0.01, "standardization": True, **lr_params})
    return PipelineModel([indexer, featurizer, head.fit(indexer.transform(rows))])


@pytest.fixture(scope="module")
def featurized(spark):
    """model name -> (featurizer, images of 3 kinds, their feature rows cached): one pass a backbone."""
    done = {}

    def get(model_name: str):
        if model_name not in done:
            featurizer = KerasImageFeaturizer(modelName=model_name, weights="random", batchSize=3)
            images = _images(spark, 3)
            rows = featurizer.transform(images).cache()
            rows.count()
            done[model_name] = featurizer, images, rows
        return done[model_name]

    yield get
    for _, _, rows in done.values():
        rows.unpersist()


@pytest.fixture(scope="module")
def fitted(featurized):
    """(model name, family, standardization) -> the pipeline model fitted on that backbone's feature
    rows (3 classes for multinomial, 2 for binomial): each head fitted once for every test that
    reads it (a Spark LogisticRegression fit costs seconds of CPU)."""
    done = {}

    def get(model_name: str, family: str, standardization: bool = True) -> PipelineModel:
        key = model_name, family, standardization
        if key not in done:
            featurizer, _, rows = featurized(model_name)
            subset = rows if family == "multinomial" else _two_classes(rows)
            done[key] = _fit(subset, featurizer, family, standardization=standardization)
        return done[key]

    return get


def _two_classes(df):
    return df.filter("label != 'class2'")


@pytest.mark.parametrize("model_name", ALL_BACKBONES)
def test_the_mean_of_each_class_map_is_the_logistic_regression_score(featurized, fitted, model_name):
    """CAM identity, binomial and multinomial: mean_xy M_c(x, y) = rawPrediction[c]."""
    _, images, _ = featurized(model_name)
    h, w, _ = backbones.get_backbone(model_name).map_shape
    for family, kinds in (("binomial", 2), ("multinomial", 3)):
        subset = (lambda df: df) if kinds == 3 else _two_classes
        model = fitted(model_name, family)
        out = class_activation_maps(model, subset(images)).select("rawPrediction", "cams").collect()
        assert len(out) == 2 * kinds
        for r in out:
            cams, raw = np.asarray(r.cams), r.rawPrediction.toArray()
            assert cams.shape == (kinds, h, w)
            assert np.abs(raw).max() > 0.1  # a real score, not a degenerate all-zero head
            np.testing.assert_allclose(cams.mean(axis=(1, 2)), raw, rtol=1e-4, atol=1e-4 * np.abs(raw).max())
        if family == "binomial":  # class 0's map is the negative of class 1's, as rawPrediction = [-m, m]
            np.testing.assert_allclose(np.asarray(out[0].cams)[0], -np.asarray(out[0].cams)[1])


def test_coefficients_are_on_the_unstandardised_scale(featurized, fitted):
    """Spark trains on standardised features (standardization=True) but reports coefficients for
    the raw ones: rawPrediction = W x + b on the features as they are. The features' scales differ
    widely, so standardising changes the fit, and a head on the standardised scale would fail."""
    _, _, rows = featurized(CHEAP)
    x_all = np.stack([r.features.toArray() for r in rows.select("features").collect()])
    spread = x_all.std(axis=0)
    assert spread.max() / spread[spread > 0].min() > 10
    heads = {}
    for family, standardization in (("multinomial", True), ("multinomial", False), ("binomial", True)):
        subset = rows if family == "multinomial" else _two_classes(rows)
        model = fitted(CHEAP, family, standardization)
        heads[family, standardization] = weights, biases = linear_head(model.stages[2])
        out = model.stages[2].transform(model.stages[0].transform(subset)).select("features", "rawPrediction").collect()
        x = np.stack([r.features.toArray() for r in out])
        np.testing.assert_allclose(x @ weights.T + biases, np.stack([r.rawPrediction.toArray() for r in out]),
                                   rtol=1e-9, atol=1e-9)
    assert not np.allclose(heads["multinomial", True][0], heads["multinomial", False][0], rtol=0.01)


# --------------------------------------------------------------------------- a planted shortcut

MARK = 0.1  # the marker's side, a share of the image's side


def _scene(seed: int, marked: bool, size: int = 112) -> tuple[bytes, tuple[float, float] | None]:
    """A noisy grey image with a soft bright blob; ``marked``: plus a small white square at a random
    place. Returns the PNG and the marker's centre (x, y as fractions), or None."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    pixels = 90 + 60 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.08) + rng.normal(0, 10, (size, size))
    centre = None
    if marked:
        side = int(MARK * size)
        row, col = rng.integers(side, size - 2 * side, 2)
        pixels[row:row + side, col:col + side] = 255
        centre = ((col + side / 2) / size, (row + side / 2) / size)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    return png_bytes(image), centre


def test_the_map_finds_a_planted_marker(spark):
    """Two classes of similar images, one with a small bright marker at a random place: the
    classifier separates them (on random-weight features), and the marked class's map peaks in the
    map cell of the marker or a neighbouring one for most marked test images. The marker moves, so
    a map that ignored the image (or swapped rows and columns) would fail."""
    scenes = {i: _scene(seed=i, marked=i % 2 == 1) for i in range(28)}
    rows = [(f"s{i}.png", "marked" if c else "plain", data, i >= 16) for i, (data, c) in scenes.items()]
    images = spark.createDataFrame(rows, "path string, label string, content binary, is_test boolean")
    featurizer = KerasImageFeaturizer(modelName=CHEAP, weights="random", batchSize=8)
    model = _fit(featurizer.transform(images.filter("not is_test")), featurizer, "binomial")
    marked = model.stages[0].labels.index("marked")
    test = class_activation_maps(model, images.filter("is_test")).select("path", "label", "prediction", "cams").collect()
    assert sum(model.stages[0].labels[int(r.prediction)] == r.label for r in test) >= 11  # of 12
    h, w = backbones.get_backbone(CHEAP).map_shape[:2]
    found = []
    for r in (r for r in test if r.label == "marked"):
        x, y = scenes[int(r.path[1:-4])][1]
        px, py = peak_location(np.asarray(r.cams)[marked])
        found.append(abs(int(px * w) - int(x * w)) <= 1 and abs(int(py * h) - int(y * h)) <= 1)
    assert len(found) == 6 and sum(found) >= 5, found


# --------------------------------------------------------------------------- refusals


def test_max_pooling_and_rewired_heads_are_refused_with_the_fix(featurized, fitted):
    featurizer, images, _ = featurized(CHEAP)
    indexer, _, head = fitted(CHEAP, "binomial").stages  # a head fitted on the rows, as with max pooling
    model = PipelineModel([indexer, featurizer.copy({featurizer.pooling: "max"}), head])
    with pytest.raises(CamUnavailableError, match="need pooling=avg.*refit the model with pooling=avg"):
        class_activation_maps(model, images)
    avg = PipelineModel([model.stages[0], model.stages[1].copy({model.stages[1].pooling: "avg"}), model.stages[2]])
    assert head_of(avg)[1] is model.stages[2]
    rewired = PipelineModel([avg.stages[1], avg.stages[2].copy({avg.stages[2].featuresCol: "scaled"})])
    with pytest.raises(CamUnavailableError, match="reads 'scaled', not the featurizer's output 'features'"):
        head_of(rewired)
    with pytest.raises(CamUnavailableError, match="one KerasImageFeaturizer and one LogisticRegressionModel"):
        head_of(PipelineModel([avg.stages[0]]))


# --------------------------------------------------------------------------- one map, numpy


def test_upsample_is_pillows_bilinear_resize_and_keeps_orientation():
    rng = np.random.default_rng(0)
    for shape, (height, width) in (((7, 7), (299, 299)), ((2, 3), (20, 30)), ((10, 8), (64, 48))):
        cam = rng.normal(size=shape).astype(np.float32)
        expected = np.asarray(Image.fromarray(cam, "F").resize((width, height), Image.BILINEAR))
        np.testing.assert_allclose(upsample(cam, height, width), expected, atol=1e-5)
    cam = np.zeros((2, 3))
    cam[0, 2] = 1.0  # top row, right column
    big = upsample(cam, 20, 30)
    assert big.shape == (20, 30) and big.dtype == np.float32
    row, col = np.unravel_index(big.argmax(), big.shape)
    assert row < 10 and col >= 20
    assert peak_location(cam) == pytest.approx((5 / 6, 1 / 4))
    with pytest.raises(ValueError, match="2-D"):
        upsample(np.zeros((2, 2, 2)), 4, 4)


def test_border_share_counts_positive_mass_in_the_outer_band():
    flat = np.ones((100, 100))
    assert border_share(flat) == pytest.approx(1 - 0.7 ** 2)  # the 15% band is 51% of the area
    centre = np.full((100, 100), -1.0)
    centre[40:60, 40:60] = 2.0
    assert border_share(centre) == 0.0  # negative evidence at the border does not count
    edge = np.zeros((100, 100))
    edge[:, :10] = 3.0
    assert border_share(edge) == 1.0
    assert border_share(edge, border=0.05) == pytest.approx(1 - 90 * 5 / 1000)  # rows 5-94 of columns 5-9 are inner
    assert border_share(-flat) is None
