"""Class folders: listing and its one-line errors, image listing, bad-file policy, audit and the source cue."""

from __future__ import annotations

import os

import pytest

from conftest import make_dataset, png_bytes, xray_like
from xray import data
from xray.data import check_invalid, list_dataset, list_images, source_cue_warning
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


# --------------------------------------------------------------------------- load_images


def test_load_images_reads_every_file_it_is_given_whatever_its_name(spark, tmp_path):
    """Spark's file sources leave out names starting with '_' or '.' and read []{}*?\\ as a glob;
    every file given must come back, with binaryFile's path (a file: URI) and its bytes."""
    folder = tmp_path / "resized [1] {a,b} *?\\" / "No_findings"
    folder.mkdir(parents=True)
    names = ["plain.png", "_lead.png", ".dot.png", "x[1].png", "a b %20 é.png", "*?.png"]
    contents = {}
    for i, name in enumerate(names):
        contents[name] = png_bytes(xray_like(1, i))
        (folder / name).write_bytes(contents[name])
    files = [(str(folder / n), "No_findings") for n in names]
    rows = data.load_images(spark, files).collect()
    assert sorted((r.path, r.label, bytes(r.content)) for r in rows) == sorted(
        (f"file:{folder / n}", "No_findings", contents[n]) for n in names)
    # The same path string as Spark's binaryFile source, where that source reads the file at all.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.png").write_bytes(contents["plain.png"])
    (expected,) = spark.read.format("binaryFile").load(str(tmp_path / "plain")).select("path").collect()
    (got,) = data.load_images(spark, [(str(tmp_path / "plain" / "a.png"), None)]).select("path").collect()
    assert got.path == expected.path


@pytest.mark.parametrize("files, cores, tasks", [
    (96, 2, 4),     # 3 tasks of 32 would leave one core idle through the last one
    (1012, 2, 32),  # 32 files a task already gives an even count
    (1012, 16, 32),
    (100, 16, 16),
    (5, 2, 2),      # at least one task a core
    (3, 4, 3),      # never more tasks than files
    (1, 2, 1),
    (0, 2, 1),
])
def test_images_load_in_a_multiple_of_the_cores_tasks(files, cores, tasks):
    assert data.load_tasks(files, cores) == tasks
