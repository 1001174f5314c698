"""Data set checks, image listing, and the incremental resize job with handleInvalid."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from PIL import Image

from conftest import make_dataset, png_bytes, xray_like
from xray import data
from xray.data import check_invalid, list_dataset, list_images, resize_dataset, source_cue_warning
from xray.errors import DataError

# --------------------------------------------------------------------------- list_dataset


def test_listing_ignores_and_reports_hidden_and_non_image_files(tmp_path):
    root = make_dataset(tmp_path / "raw", per_class=2)
    (tmp_path / "raw" / "README.md").write_text("about")
    (tmp_path / "raw" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "raw" / "Covid-19" / "notes.txt").write_text("x")
    (tmp_path / "raw" / "Covid-19" / ".hidden.png").write_bytes(png_bytes(xray_like(0, 1)))
    (tmp_path / "raw" / "Covid-19" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "raw" / "Covid-19" / ".ipynb_checkpoints" / "a.png").write_bytes(png_bytes(xray_like(0, 1)))
    (tmp_path / "raw" / "Pneumonia" / "scans").mkdir()  # images in sub-folders belong to the class
    (tmp_path / "raw" / "Pneumonia" / "scans" / "deep.png").write_bytes(png_bytes(xray_like(2, 9)))
    (tmp_path / "raw" / "Empty").mkdir()

    listing = list_dataset(root)
    assert listing.files == {
        "Covid-19": [os.path.join("Covid-19", "img0.png"), os.path.join("Covid-19", "img1.jpg")],
        "No_findings": [os.path.join("No_findings", f"img{i}.png") for i in range(2)],
        "Pneumonia": [os.path.join("Pneumonia", f"img{i}.png") for i in range(2)]
        + [os.path.join("Pneumonia", "scans", "deep.png")],
    }
    assert listing.ignored == {
        ".DS_Store": "hidden",
        os.path.join("Covid-19", ".hidden.png"): "hidden",
        os.path.join("Covid-19", ".ipynb_checkpoints") + "/": "hidden",
        os.path.join("Covid-19", "notes.txt"): "not an image file extension",
        "Empty/": "class folder without image files",
        "README.md": "not in a class folder",
    }
    line = data.describe_ignored(listing)
    assert line.startswith("ignored 6 entries in") and "notes.txt (not an image file extension)" in line
    assert "\n" not in line

    # A task keeps its own classes; the audit lists what each class folder ignored.
    task = list_dataset(root, ["Covid-19", "No_findings"])
    assert list(task.files) == ["Covid-19", "No_findings"]
    audit = data.audit(task, {})
    assert audit["Covid-19"]["ignored"] == [
        os.path.join("Covid-19", ".hidden.png"),
        os.path.join("Covid-19", ".ipynb_checkpoints") + "/",
        os.path.join("Covid-19", "notes.txt"),
    ]
    assert audit["No_findings"]["ignored"] == []


@pytest.mark.parametrize(
    "setup, classes, message",
    [
        ("missing", None, "not found: set dataset.raw_dir"),
        ("file", None, "is not a folder"),
        ("one-class", None, "has 1 class folder(s) with images: expected at least two"),
        ("flat", None, "has 0 class folder(s) with images"),
        ("full", ["Covid-19", "Normal"], "lacks class folder(s) Normal needed by the task"),
        ("empty-class", ["Covid-19", "No_findings"], "No_findings in .* hold no image files"),
    ],
)
def test_listing_errors_are_one_line(tmp_path, setup, classes, message):
    root = tmp_path / "raw"
    if setup == "file":
        root.write_text("x")
    elif setup == "one-class":
        make_dataset(root, classes=("Covid-19",), per_class=1)
    elif setup == "flat":
        root.mkdir()
        (root / "a.png").write_bytes(png_bytes(xray_like(0, 0)))
    elif setup == "full":
        make_dataset(root, per_class=1)
    elif setup == "empty-class":
        make_dataset(root, classes=("Covid-19", "Pneumonia"), per_class=1)
        (root / "No_findings").mkdir()
        (root / "No_findings" / "list.csv").write_text("x")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        list_dataset(str(root), classes)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- list_images


def test_list_images_single_file_flat_folder_and_nested(tmp_path, monkeypatch):
    one = tmp_path / "one.jpg"
    xray_like(0, 0).save(one)
    assert list_images(str(one)) == [str(one)]

    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.png", "a.PNG", "c.tif"):
        xray_like(1, 0).save(flat / name, format="PNG" if name.lower().endswith("png") else "TIFF")
    (flat / "notes.txt").write_text("x")
    (flat / ".hidden.png").write_bytes(png_bytes(xray_like(0, 0)))
    (flat / "sub").mkdir()
    xray_like(2, 0).save(flat / "sub" / "d.bmp")
    assert list_images(str(flat)) == [str(flat / n) for n in ("a.PNG", "b.png", "c.tif")] + [str(flat / "sub" / "d.bmp")]

    # Relative paths come back absolute.
    monkeypatch.chdir(tmp_path)
    assert list_images("flat/b.png") == [str(flat / "b.png")]


@pytest.mark.parametrize(
    "what, message",
    [("missing", "not found: give an image file or a folder"), ("text", "is not an image file: expected one of"),
     ("empty", "no image files")],
)
def test_list_images_errors(tmp_path, what, message):
    path = tmp_path / what
    if what == "text":
        path.write_text("x")
    elif what == "empty":
        path.mkdir()
        (path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=message):
        list_images(str(path))


# --------------------------------------------------------------------------- resize job


def _hash_tree(root) -> dict[str, str]:
    """Every file and its content hash and mtime: the raw folder must never change."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(full).st_mtime_ns)
    return out


def _outputs(out_dir) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, n), out_dir)
        for d, _, names in os.walk(out_dir)
        for n in names
        if not n.startswith(".") and n != data.AUDIT_FILE
    }


def _no_spark():
    raise AssertionError("Spark was started although nothing needed processing")


def test_resize_is_incremental_and_never_touches_raw(spark, tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=("A", "B"), per_class=3)
    (tmp_path / "raw" / "A" / "img0.jpg").write_bytes((tmp_path / "raw" / "A" / "img1.jpg").read_bytes())
    (tmp_path / "raw" / "B" / "notes.txt").write_text("x")
    out = tmp_path / "out"
    kw = dict(size=40, mode="L", max_pixels=10_000, handle_invalid="error")
    before = _hash_tree(raw)

    logs: list[str] = []
    report = resize_dataset(spark, raw, str(out), log=logs.append, **kw)
    # a.png + a.jpg in one class get distinct outputs
    assert _outputs(out) == {os.path.join("A", n) for n in ("img0_png.png", "img0_jpg.png", "img1.png", "img2.png")} | {
        os.path.join("B", f"img{i}.png") for i in range(3)
    }
    assert dict(report.written) == {"A": 4, "B": 3} and report.invalid == {}
    for name in _outputs(out):
        with Image.open(out / name) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "L", (40, 40))
    assert "A: 4 written, 0 unchanged, 0 invalid; B: 3 written, 0 unchanged, 0 invalid" in logs[-1]
    audit = json.loads((out / data.AUDIT_FILE).read_text())
    assert audit["classes"]["A"]["formats"] == {"PNG": 2, "JPEG": 2} and audit["classes"]["A"]["modes"] == {"L": 2, "RGB": 2}
    assert audit["classes"]["B"]["min_size"] == [64, 60] and audit["classes"]["B"]["max_size"] == [80, 60]
    assert audit["ignored"] == {os.path.join(raw, "B", "notes.txt"): "not an image file extension"}

    # Nothing changed: nothing processed, Spark not even started.
    report = resize_dataset(_no_spark, raw, str(out), log=logs.append, **kw)
    assert sum(report.written.values()) == 0 and dict(report.unchanged) == {"A": 4, "B": 3}
    assert "up to date" in logs[-2]

    # One new file, one changed file, one removed file: only those are touched.
    stamps = {n: os.stat(out / n).st_mtime_ns for n in _outputs(out)}
    xray_like(1, 7, size=(50, 50)).save(tmp_path / "raw" / "B" / "new.png")
    changed = tmp_path / "raw" / "A" / "img2.png"
    xray_like(0, 99, size=(70, 70)).save(changed)
    os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
    os.unlink(tmp_path / "raw" / "B" / "img0.png")
    before = _hash_tree(raw)
    report = resize_dataset(spark, raw, str(out), log=logs.append, **kw)
    assert dict(report.written) == {"A": 1, "B": 1} and dict(report.unchanged) == {"A": 3, "B": 2}
    assert report.removed == 1 and not (out / "B" / "img0.png").exists()
    assert "A: 1 written, 3 unchanged, 0 invalid; B: 1 written, 2 unchanged, 0 invalid; 1 outdated output(s) removed" in logs[-1]
    now = {n: os.stat(out / n).st_mtime_ns for n in _outputs(out)}
    assert {n for n in now if now[n] != stamps.get(n)} == {os.path.join("A", "img2.png"), os.path.join("B", "new.png")}
    with Image.open(out / "A" / "img2.png") as im:
        assert im.size == (40, 40)
    assert _hash_tree(raw) == before  # the raw folder is only read
    assert not [n for d, _, ns in os.walk(out) for n in ns if n.startswith(".tmp-")]  # atomic writes, no leftovers

    # Other settings: everything is made again, in the new size.
    report = resize_dataset(spark, raw, str(out), log=logs.append, **{**kw, "size": 32})
    assert sum(report.written.values()) == 7
    with Image.open(out / "B" / "new.png") as im:
        assert im.size == (32, 32)
    assert data.is_resized_current(raw, str(out), 32, "L", 10_000)
    assert not data.is_resized_current(raw, str(out), 40, "L", 10_000)


def test_handle_invalid_error_keeps_work_done_then_skip_lists_every_file(spark, tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=("A", "B"), per_class=2)
    bad = {
        os.path.join("A", "empty.png"): ("", "empty file (0 bytes)"),
        os.path.join("A", "text.jpg"): ("hello", "not an image (unrecognised format)"),
        os.path.join("B", "cut.png"): ("cut", "truncated image data"),
        os.path.join("B", "dot.png"): ("dot", "image too small: 1x1"),
        os.path.join("B", "huge.png"): ("huge", "image too large: 200x200 = 40000 pixels > limit 10000"),
    }
    for rel, (kind, _) in bad.items():
        path = tmp_path / "raw" / rel
        if kind == "cut":
            path.write_bytes(png_bytes(xray_like(1, 3, (64, 64)))[:300])
        elif kind == "dot":
            Image.new("L", (1, 1)).save(path)
        elif kind == "huge":
            Image.new("L", (200, 200)).save(path)  # 40000 px by its header, a few hundred bytes on disk
        else:
            path.write_text(kind)
    out = tmp_path / "out"
    kw = dict(size=32, mode="RGB", max_pixels=10_000)
    before = _hash_tree(raw)

    logs: list[str] = []
    with pytest.raises(DataError) as info:
        resize_dataset(spark, raw, str(out), handle_invalid="error", log=logs.append, **kw)
    message = str(info.value)
    assert message.startswith(f"invalid image {os.path.join(raw, 'A', 'empty.png')}: empty file (0 bytes) (and 4 more")
    assert "handleInvalid=skip" in message and "\n" not in message
    for rel, (_, reason) in bad.items():  # every bad file named, with its reason, before stopping
        assert any(line.startswith(f"  invalid image {os.path.join(raw, rel)}: {reason}") for line in logs)
    # The good files were written and recorded: nothing done is lost.
    assert _outputs(out) == {os.path.join(c, f"img{i}.png") for c in "AB" for i in range(2)}
    manifest = data.read_manifest(str(out))
    assert len(manifest["files"]) == 4 and set(manifest["invalid"]) == set(bad)
    assert json.loads((out / data.AUDIT_FILE).read_text())["classes"]["B"]["invalid"] == 3

    # skip: no file is processed again; the bad ones are listed with their reasons.
    logs.clear()
    report = resize_dataset(_no_spark, raw, str(out), handle_invalid="skip", log=logs.append, **kw)
    assert {rel: why[: len(bad[rel][1])] for rel, why in report.invalid.items()} == {r: v[1] for r, v in bad.items()}
    assert sum(1 for line in logs if line.startswith("  skipped image")) == 5
    assert "A: 0 written, 2 unchanged, 2 invalid; B: 0 written, 2 unchanged, 3 invalid" in logs[-1]
    assert _hash_tree(raw) == before  # the raw folder is only read, bad files included

    # A fixed file is picked up; the remaining bad ones stay listed.
    xray_like(0, 5).save(tmp_path / "raw" / "A" / "empty.png")
    report = resize_dataset(spark, raw, str(out), handle_invalid="skip", log=logs.append, **kw)
    assert dict(report.written) == {"A": 1} and os.path.join("A", "empty.png") not in report.invalid
    assert (out / "A" / "empty.png").is_file()


def test_resized_dir_inside_raw_dir_is_refused(tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=("A", "B"), per_class=1)
    with pytest.raises(DataError, match="is inside dataset.raw_dir"):
        resize_dataset(_no_spark, raw, os.path.join(raw, "resized"), size=32, mode="L", max_pixels=10_000)


def test_check_invalid():
    reasons = {os.path.join("A", "x.png"): "truncated image data", os.path.join("B", "y.png"): "empty file (0 bytes)"}
    with pytest.raises(DataError, match=r"invalid image /d/A/x.png: truncated image data \(and 1 more"):
        check_invalid("/d", reasons, "error")
    logs: list[str] = []
    check_invalid("/d", reasons, "skip", logs.append)
    assert logs == ["left out 2 invalid image(s) (handleInvalid=skip): /d/A/x.png: truncated image data; "
                    "/d/B/y.png: empty file (0 bytes)"]
    check_invalid("/d", {}, "error")  # nothing invalid: nothing to do


def _listing(per_class: dict[str, list[tuple[str, str]]]):
    files = {c: [os.path.join(c, f"{i}.x") for i in range(len(v))] for c, v in per_class.items()}
    entries = {
        os.path.join(c, f"{i}.x"): {"format": f, "mode": m} for c, v in per_class.items() for i, (f, m) in enumerate(v)
    }
    return data.Listing("/d", files), entries


def test_source_cue_warning():
    # As in the shared data set: Covid-19 JPEG or RGB(A), the other classes grayscale PNG (a few RGBA).
    listing, entries = _listing({
        "Covid-19": [("JPEG", "RGB")] * 87 + [("JPEG", "L")] * 7 + [("PNG", "RGBA")] * 17 + [("PNG", "RGB")],
        "No_findings": [("PNG", "L")] * 450,
        "Pneumonia": [("PNG", "L")] * 446 + [("PNG", "RGBA")] * 4,
    })
    warning = source_cue_warning(listing, entries)
    assert warning == (
        "warning: file format and colour mode alone single out Covid-19 (112 of its 112 files are JPEG/L, "
        "JPEG/RGB, PNG/RGB, PNG/RGBA; 4 of 900 other files are): a model can learn the source instead of the "
        "disease. The resized data set (one mode, one size, PNG) removes this cue."
    )
    # Two classes told apart by their files: both are named.
    listing, entries = _listing({"A": [("JPEG", "RGB")] * 9 + [("PNG", "L")], "B": [("PNG", "L")] * 10})
    assert "single out A (9 of its 10 files are JPEG/RGB; 0 of 10" in source_cue_warning(listing, entries)
    # Mixed the same way in every class, or one kind of file everywhere (however unbalanced): no cue.
    listing, entries = _listing({"A": [("PNG", "L"), ("JPEG", "RGB")] * 5, "B": [("PNG", "L"), ("JPEG", "RGB")] * 5})
    assert source_cue_warning(listing, entries) is None
    listing, entries = _listing({"A": [("PNG", "L")] * 95, "B": [("PNG", "L")] * 5})
    assert source_cue_warning(listing, entries) is None


def test_experiment_with_handle_invalid_error_stops_before_featurizing(spark, tmp_path):
    from conftest import ROOT
    from xray.config import load_config
    from xray.experiment import run_experiment

    raw = make_dataset(tmp_path / "raw", classes=("Covid-19", "No_findings"), per_class=2)
    (tmp_path / "raw" / "No_findings" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    overrides = [
        "weights=random", f"dataset.raw_dir={raw}", f"dataset.resized_dir={tmp_path / 'resized'}",
        "dataset.image_size=32", f"results_dir={tmp_path / 'results'}", f"cache_dir={tmp_path / 'cache'}",
    ]
    exp = load_config(os.path.join(ROOT, "config.yaml")).experiment("ResNet50_binary_classification", overrides)
    bad = os.path.join(raw, "No_findings", "broken.jpg")
    # First run: the resize step names the bad file and stops; second run: the resize output is
    # current, and the bad file recorded in its manifest still stops the run.
    for resizes in (True, False):
        logs: list[str] = []
        with pytest.raises(DataError, match=f"^invalid image {bad}: .*handleInvalid=skip"):
            run_experiment(exp, log=logs.append)
        assert any(line.startswith("resize: ") for line in logs) == resizes
        assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
        assert len(_outputs(tmp_path / "resized")) == 4  # the good files were kept
