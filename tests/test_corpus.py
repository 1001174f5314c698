"""A corpus of good and bad files in every mode and format, through the command line.

The same picture (a ramp with noise: rotations and mirrors show) is stored in every mode and
format the decoder supports; each resized output must equal the resized picture (exactly for
lossless formats, within JPEG loss otherwise). Bad files of every kind must be named with their
reason, with ``handleInvalid`` error and skip, and no traceback may appear.

Three runs of the command line's ``main`` in this process (its Spark session; wrapper.sh and a
fresh process are tested in tests/test_cli.py and tests/test_interrupt.py): the resize job with
handleInvalid=error, again with skip, and a binary experiment whose raw data is first downloaded
from an archive served on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, png_bytes
from imagefeaturizer.images import resize_pil
from test_download import Server
from xray.cli import main

SIZE = 32  # dataset.image_size of the runs
MAX_PIXELS = 1_000_000  # max_image_pixels of the runs: the bomb's header claims 9 million
CLASSES = ("Covid-19", "No_findings")


def _base(seed: int) -> Image.Image:
    """48x40 grayscale picture using the full 0..255 range (so 16-bit rescaling is exact)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:48]
    pixels = 255.0 * (0.7 * yy / 39 + 0.3 * xx / 47) + rng.normal(0, 10, (40, 48))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    pixels[0, 0], pixels[-1, -1] = 0, 255
    return Image.fromarray(pixels, "L")


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _good_files(base: Image.Image) -> dict[str, tuple[bytes, Image.Image, float]]:
    """name -> (file bytes, expected grayscale picture, allowed mean abs difference after resizing)."""
    arr = np.asarray(base)
    rgb = base.convert("RGB")
    other = Image.fromarray(255 - arr, "L")  # a different second frame
    # Transparent left quarter over garbage: composited onto black.
    masked = arr.copy()
    masked[:, :12] = 0
    alpha = np.full(arr.shape, 255, np.uint8)
    alpha[:, :12] = 0
    garbage = np.where(alpha == 0, 200, arr).astype(np.uint8)
    rgba = Image.merge("RGBA", [Image.fromarray(garbage)] * 3 + [Image.fromarray(alpha)])
    la = Image.merge("LA", [Image.fromarray(garbage), Image.fromarray(alpha)])
    # Palette: 255 grays plus one transparent index, used on the left quarter.
    pal_idx = np.where(alpha == 0, 255, np.minimum(arr, 254)).astype(np.uint8)
    palette = [v for g in range(255) for v in (g, g, g)] + [200, 0, 0]
    p_trans = Image.fromarray(pal_idx, "P")
    p_trans.putpalette(palette)
    p_trans.info["transparency"] = 255
    p_expected = Image.fromarray(np.where(alpha == 0, 0, np.minimum(arr, 254)).astype(np.uint8), "L")
    gray_p = base.convert("P")  # (an L image's palette is its grays)
    gray_p.putpalette([v for g in range(256) for v in (g, g, g)])
    one = base.convert("1")  # dithered black and white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = rgb.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: turned the other way
    i16 = Image.fromarray(arr.astype(np.uint16) * 257 // 4 + 1000)  # 1000..17318 of 0..65535: not clipped
    cmyk = rgb.convert("CMYK")
    return {
        "l.png": (_save(base, "PNG"), base, 0),
        "la.png": (_save(la, "PNG"), Image.fromarray(masked), 0),
        "one_bit.png": (_save(one, "PNG"), one.convert("L"), 0),
        "palette.png": (_save(gray_p, "PNG"), base, 0),
        "palette_transparent.png": (_save(p_trans, "PNG", transparency=255), p_expected, 0),
        "rgb.png": (_save(rgb, "PNG"), base, 0),
        "rgba.png": (_save(rgba, "PNG"), Image.fromarray(masked), 0),
        "gray16.png": (_save(i16, "PNG"), base, 0),
        "gray.jpg": (_save(base, "JPEG", quality=95), base, 3),
        "rgb.jpeg": (_save(rgb, "JPEG", quality=95), base, 3),
        "cmyk.jpg": (_save(cmyk, "JPEG", quality=95), base, 3),
        "exif_rotated.jpg": (_save(stored, "JPEG", quality=95, exif=exif), base, 3),
        "rgb.bmp": (_save(rgb, "BMP"), base, 0),
        "gray.bmp": (_save(base, "BMP"), base, 0),
        "gray.tif": (_save(base, "TIFF"), base, 0),
        "rgb_lzw.tiff": (_save(rgb, "TIFF", compression="tiff_lzw"), base, 0),
        "frames.tif": (_save(base, "TIFF", save_all=True, append_images=[other]), base, 0),
        "rgb.webp": (_save(rgb, "WEBP", lossless=True), base, 0),
        "rgba.webp": (_save(rgba, "WEBP", lossless=True, exact=True), Image.fromarray(masked), 0),
        "gray.gif": (_save(gray_p, "GIF"), base, 0),
        "frames.gif": (_save(gray_p, "GIF", save_all=True, append_images=[other.convert("P")]), base, 0),
        "transparent.gif": (_save(p_trans, "GIF", transparency=255), p_expected, 0),
    }


def _bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the reason the run must give)."""
    full_png = png_bytes(_base(9))
    full_jpg = _save(_base(9).convert("RGB"), "JPEG", quality=90)
    return {
        "empty.png": (b"", "empty file (0 bytes)"),
        "cut.png": (full_png[: len(full_png) // 2], "truncated image data"),
        "cut.jpg": (full_jpg[: len(full_jpg) // 2], "truncated image data"),
        "not_an_image.jpg": (b"<html>this is a web page</html>\n", "not an image (unrecognised format)"),
        "bomb.png": (
            _save(Image.new("L", (3000, 3000)), "PNG"),
            f"image too large: 3000x3000 = 9000000 pixels > limit {MAX_PIXELS}",
        ),
        "one_pixel.png": (_save(Image.new("L", (1, 1), 128), "PNG"), "image too small: 1x1"),
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """raw/<class>/<file>: every good and bad file in each class; a hidden and a text file."""
    root = tmp_path_factory.mktemp("corpus")
    raw = root / "raw"
    expected: dict[str, tuple[Image.Image, float]] = {}
    bad: dict[str, str] = {}
    for k, cls in enumerate(CLASSES):
        folder = raw / cls
        folder.mkdir(parents=True)
        for name, (content, picture, tolerance) in _good_files(_base(k)).items():
            (folder / name).write_bytes(content)
            expected[os.path.join(cls, name)] = (picture, tolerance)
        for name, (content, reason) in _bad_files().items():
            (folder / name).write_bytes(content)
            bad[os.path.join(cls, name)] = reason
    (raw / CLASSES[0] / "notes.txt").write_text("not an image")
    (raw / CLASSES[1] / ".DS_Store").write_bytes(b"\0\0")
    assert not (bad.keys() & expected.keys())
    return {"root": root, "raw": str(raw), "expected": expected, "bad": bad}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``wrapper.sh --config config.yaml ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["--config", os.path.join(ROOT, "config.yaml"), *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return code, out, err


def _output_name(rel: str) -> str:
    """Output of a raw file: <stem>.png, or <stem>_<ext>.png when two files share a stem."""
    folder, name = os.path.split(rel)
    stem, ext = os.path.splitext(name)
    shared = {"rgb", "gray", "rgba", "frames", "cut"}  # stems used by more than one file of a class
    return os.path.join(folder, f"{stem}_{ext[1:].lower()}.png" if stem in shared else f"{stem}.png")


def _check_outputs(out_dir: str, expected: dict) -> None:
    made = {
        os.path.relpath(os.path.join(d, n), out_dir) for d, _, names in os.walk(out_dir) for n in names
        if n.endswith(".png") and not n.startswith(".")
    }
    assert made == {_output_name(rel) for rel in expected}  # every good file came out, nothing else
    for rel, (picture, tolerance) in expected.items():
        with Image.open(os.path.join(out_dir, _output_name(rel))) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (SIZE, SIZE)), rel
            got = np.asarray(im, dtype=float)
        want = np.asarray(resize_pil(picture, (SIZE, SIZE)), dtype=float)
        diff = np.abs(got - want).mean()
        assert diff <= tolerance, f"{rel}: mean difference {diff:.2f} > {tolerance}"


def _resize_args(corpus, *extra: str) -> list[str]:
    return [
        "run", "dataset_resize",
        "--set", f"dataset.raw_dir={corpus['raw']}",
        "--set", f"dataset.resized_dir={corpus['root'] / 'resized'}",
        "--set", f"results_dir={corpus['root'] / 'results'}",  # its log
        "--set", f"dataset.image_size={SIZE}",
        "--set", f"max_image_pixels={MAX_PIXELS}",
        "--set", "spark.master=local[2]",
        *extra,
    ]


@pytest.mark.slow
def test_resize_job_error_then_skip(spark, corpus, capsys):
    raw, out = corpus["raw"], str(corpus["root"] / "resized")
    bad = corpus["bad"]

    # handleInvalid=error (the default): every bad file named with its reason, then a one-line error.
    rc, stdout, stderr = _cli(capsys, *_resize_args(corpus))
    assert rc == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    first = sorted(bad)[0]
    assert errors == [stderr.strip().splitlines()[-1]]
    assert errors[0].startswith(f"error: invalid image {os.path.join(raw, first)}: {bad[first]}")
    assert f"(and {len(bad) - 1} more invalid file(s))" in errors[0] and "handleInvalid=skip" in errors[0]
    for rel, reason in bad.items():
        assert f"  invalid image {os.path.join(raw, rel)}: {reason}" in stdout, rel
    assert "notes.txt (not an image file extension)" in stdout and ".DS_Store (hidden)" in stdout
    # Nothing done is lost: every good file was written before the run stopped.
    _check_outputs(out, corpus["expected"])

    # handleInvalid=skip: nothing to redo (Spark is not even started); every bad file listed.
    rc, stdout, stderr = _cli(capsys, *_resize_args(corpus, "--set", "handleInvalid=skip"))
    assert rc == 0, stderr
    assert "is up to date" in stdout
    for rel, reason in bad.items():
        assert f"  skipped image {os.path.join(raw, rel)}: {reason}" in stdout, rel
    n_good = len(corpus["expected"]) // len(CLASSES)
    n_bad = len(bad) // len(CLASSES)
    for cls in CLASSES:
        assert f"{cls}: 0 written, {n_good} unchanged, {n_bad} invalid" in stdout
    _check_outputs(out, corpus["expected"])
    audit = json.loads((corpus["root"] / "resized" / "data-audit.json").read_text())
    assert {k: v[: len(bad[os.path.relpath(k, raw)])] for k, v in audit["invalid"].items()} == {
        os.path.join(raw, rel): reason for rel, reason in bad.items()
    }
    assert audit["classes"]["Covid-19"]["formats"] == {"PNG": 8, "JPEG": 4, "BMP": 2, "TIFF": 3, "WEBP": 2, "GIF": 3}
    assert set(audit["classes"]["Covid-19"]["modes"]) == {"L", "LA", "1", "P", "RGB", "RGBA", "I;16", "CMYK"}


@pytest.mark.slow
def test_experiment_downloads_the_corpus_and_skips_bad_files(spark, corpus, capsys):
    # The corpus, as the public archive lays it out, served from 127.0.0.1.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for dirpath, _, names in os.walk(corpus["raw"]):
            for name in names:
                full = os.path.join(dirpath, name)
                zf.write(full, f"COVID-19-master/X-Ray Image DataSet/{os.path.relpath(full, corpus['raw'])}")
    server = Server({"/master.zip": buf.getvalue()})
    root = corpus["root"]
    raw = str(root / "downloaded" / "raw")
    try:
        rc, stdout, stderr = _cli(
            capsys, "run", "ResNet50_binary_classification",
            "--set", "weights=random",
            "--set", "handleInvalid=skip",
            "--set", f"dataset.raw_dir={raw}",
            "--set", f"dataset.download_url={server.url('/master.zip')}",
            "--set", f"dataset.resized_dir={root / 'resized2'}",
            "--set", f"dataset.image_size={SIZE}",
            "--set", f"max_image_pixels={MAX_PIXELS}",
            "--set", f"results_dir={root / 'results'}",
            "--set", f"cache_dir={root / 'cache'}",
            "--set", "batch_size=16",
            "--set", "classifier.maxIter=5",  # a few LR iterations: each is a Spark job
            "--set", "spark.master=local[2]",
        )
    finally:
        server.close()
    assert rc == 0, stdout + stderr
    assert server.requests == ["/master.zip"] and "download: " in stdout
    bad = corpus["bad"]
    for rel, reason in bad.items():  # named while resizing, and again by the experiment
        assert f"  skipped image {os.path.join(raw, rel)}: {reason}" in stdout, rel
    assert f"left out {len(bad)} invalid image(s) (handleInvalid=skip)" in stdout
    _check_outputs(str(root / "resized2"), corpus["expected"])

    metrics = json.loads((root / "results" / "ResNet50_binary_classification" / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_test"] == len(corpus["expected"])  # every good file was used
    assert metrics["n_images"] == len(corpus["expected"])
    assert {k: v[: len(bad[os.path.relpath(k, raw)])] for k, v in metrics["invalid_files"].items()} == {
        os.path.join(raw, rel): reason for rel, reason in bad.items()
    }
    assert metrics["data_audit"]["Covid-19"]["ignored"] == [os.path.join("Covid-19", "notes.txt")]
    assert metrics["data_audit"]["No_findings"]["ignored"] == [os.path.join("No_findings", ".DS_Store")]
    assert metrics["data_audit"]["No_findings"]["invalid"] == len(bad) // 2
