"""What the app does with class activation maps, without Spark: output names, the gallery's and
the sample's images, the per-class statistics and the border warning. (The maps themselves:
test_cam.py; explain and the run's gallery end to end: test_sweep_predict.py, test_run.py and
the planted-marker run below.)"""

from __future__ import annotations

import numpy as np
import pytest

from xray.explain import border_warning, class_statistics, gallery_choice, output_names, sample_choice


def test_output_names_mirror_folders_and_keep_same_stems_apart(tmp_path):
    paths = [str(tmp_path / p) for p in ("a/scan.png", "a/scan.jpg", "b/scan.png", "c.png")]
    names = output_names(paths, str(tmp_path))
    assert names == {paths[0]: "a/scan_png", paths[1]: "a/scan_jpg", paths[2]: "b/scan", paths[3]: "c"}
    (tmp_path / "c.png").write_bytes(b"")
    assert output_names([paths[3]], paths[3]) == {paths[3]: "c"}  # one file given: its stem


def _pred(y_true, y_pred, confidence, paths=None):
    n = len(y_true)
    probability = np.stack([1 - np.asarray(confidence), np.asarray(confidence)], axis=1)
    probability[np.asarray(y_pred) == 0] = probability[np.asarray(y_pred) == 0][:, ::-1]
    return {"path": np.asarray(paths or [f"file:/t/{i:02d}.png" for i in range(n)], dtype=object),
            "y_true": np.asarray(y_true), "y_pred": np.asarray(y_pred), "probability": probability}


def test_gallery_takes_the_most_confident_correct_per_class_then_the_misclassified():
    pred = _pred(y_true=[0, 0, 0, 1, 1, 1, 0, 1], y_pred=[0, 0, 0, 1, 1, 0, 1, 0],
                 confidence=[0.6, 0.9, 0.8, 0.7, 0.95, 0.55, 0.99, 0.6])
    assert gallery_choice(pred, 2, per_class=2, misclassified=2) == [1, 2, 4, 3, 6, 7]
    assert gallery_choice(pred, 2, per_class=0, misclassified=1) == [6]


def test_sample_is_seeded_per_class_and_independent_of_row_order():
    pred = _pred(y_true=[0] * 10 + [1] * 3, y_pred=[0] * 13, confidence=[0.7] * 13)
    sample = sample_choice(pred, 2, per_class=4, seed=7)
    assert len(sample) == 4 + 3 and sum(pred["y_true"][sample] == 1) == 3
    assert sample == sample_choice(pred, 2, per_class=4, seed=7)
    assert sample != sample_choice(pred, 2, per_class=4, seed=8)
    shuffled = {k: v[::-1] for k, v in pred.items()}  # Spark may return the rows in another order
    assert sorted(shuffled["path"][sample_choice(shuffled, 2, 4, 7)]) == sorted(pred["path"][sample])


def test_class_statistics_use_the_true_class_map_and_warn_at_the_border():
    edge = np.zeros((7, 7))
    edge[:, 0] = 1.0  # class 0's map: all evidence in the left column
    centre = np.zeros((7, 7))
    centre[3, 3] = 1.0
    cams = np.stack([edge, centre])  # (classes, h, w)
    pred = _pred(y_true=[0, 1], y_pred=[0, 1], confidence=[0.9, 0.9])
    maps = {"/t/00.png": (np.zeros((70, 70), np.uint8), cams), "/t/01.png": (np.zeros((70, 70), np.uint8), cams)}
    stats = class_statistics(maps, pred, [0, 1], ["left", "middle"])
    assert stats["left"]["images"] == 1 and stats["left"]["border_share"] > 0.9
    assert stats["left"]["peak_x"] == pytest.approx(1 / 14, abs=1e-4) and stats["middle"]["peak_y"] == 0.5
    assert stats["middle"]["border_share"] < 0.1
    warning = border_warning(stats, 0.7)
    assert warning.startswith("WARNING: the evidence for left sits mostly at the image border") and "middle" not in warning
    assert border_warning(stats, 0.999) is None


# --------------------------------------------------------------------------- a planted marker, as a user runs it

def _marked_raw(root, per_class: int = 24) -> dict[str, tuple[float, float]]:
    """Raw non-square grey images in two classes: Marked (a small white square at a random place)
    and Plain; returns the marker's centre (x, y as fractions) of each marked file name."""
    from PIL import Image

    centres = {}
    for cls in ("Marked", "Plain"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng(1000 * (cls == "Marked") + i)
            h, w = 110, 140
            yy, xx = np.mgrid[0:h, 0:w]
            cy, cx = rng.uniform(0.3, 0.7, 2)
            pixels = 90 + 60 * np.exp(-((xx / w - cx) ** 2 + (yy / h - cy) ** 2) / 0.08) + rng.normal(0, 10, (h, w))
            if cls == "Marked":
                side = 12
                row, col = rng.integers(side, h - 2 * side), rng.integers(side, w - 2 * side)
                pixels[row:row + side, col:col + side] = 255
                centres[f"m{i:02d}.png"] = ((col + side / 2) / w, (row + side / 2) / h)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").save(root / cls / f"{cls[0].lower()}{i:02d}.png")
    return centres


@pytest.mark.slow
def test_a_planted_marker_is_found_through_run_and_explain_with_another_config(spark, tmp_path, capsys):
    """The issue's check on generated images: ``--config other.yaml run`` then ``explain`` on the
    marked test images (the CLI in-process, on the tests' Spark session; wrapper.sh's passing of
    ``--config``: test_cli.py); the peak of each ``.cam.npy`` lies near the marker for at least 80%.
    Random weights (no network in tests); other.yaml names its own task and experiment."""
    import json
    import os
    import shutil

    import yaml

    from conftest import MODEL_CACHE, ROOT
    from xray.cli import main
    from xray.split import split_rows

    centres = _marked_raw(tmp_path / "raw")
    base = yaml.safe_load(open(os.path.join(ROOT, "config.yaml"), encoding="utf-8"))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"defaults": base["defaults"], "tasks": {"marker": ["Marked", "Plain"]},
                                     "experiments": {"Marker_probe": {"model": "ResNet50", "task": "marker"}}}))
    sets = [f"weights=random", f"dataset.raw_dir={tmp_path / 'raw'}", f"dataset.resized_dir={tmp_path / 'resized'}",
            f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}", "dataset.image_size=112",
            "test_fraction=0.25", "spark.master=local[2]", "classifier.maxIter=5",
            f"model_cache_dir={MODEL_CACHE}"]  # the session's exports (relative, it would be under tmp_path)
    args = [arg for s in sets for arg in ("--set", s)]

    assert main(["--config", str(other), "run", "Marker_probe", *args]) == 0
    metrics = json.loads((tmp_path / "results" / "Marker_probe" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.9 and (tmp_path / "results" / "Marker_probe" / "cam_gallery.png").is_file()

    keys = [(f"/{cls}/{name}", cls) for cls in ("Marked", "Plain") for name in os.listdir(tmp_path / "resized" / cls)]
    test = sorted(path.rsplit("/", 1)[1] for path, is_test, _ in split_rows(keys, 42, 0.25) if is_test and "Marked" in path)
    assert len(test) == 6
    (tmp_path / "marked_test").mkdir()
    for name in test:
        shutil.copy(tmp_path / "raw" / "Marked" / name, tmp_path / "marked_test" / name)
    capsys.readouterr()
    assert main(["--config", str(other), "explain", "Marker_probe", str(tmp_path / "marked_test"), "--class", "Marked",
                 *args]) == 0
    out = tmp_path / "results" / "Marker_probe" / "explanations"
    assert f"output folder: {out}" in capsys.readouterr().out
    near = []
    for name in test:
        cam = np.load(out / name.replace(".png", ".cam.npy"))
        assert cam.shape == (112, 112)
        row, col = np.unravel_index(cam.argmax(), cam.shape)
        x, y = centres[name]
        near.append(max(abs((col + 0.5) / 112 - x), abs((row + 0.5) / 112 - y)) <= 1.5 / 7)  # within 1.5 map cells
    assert sum(near) >= 0.8 * len(near), near
