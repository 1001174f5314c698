"""The incremental resize job: outputs, manifest, audit, handleInvalid, the raw folder only read."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from PIL import Image

from conftest import make_dataset, png_bytes, xray_like
from test_download import _tree
from xray import atomic, data, resize
from xray.errors import DataError
from xray.resize import normalize_image, resize_dataset


def _hash_tree(root) -> dict[str, tuple[str, int]]:
    """Every file and its content hash and mtime: the raw folder must never change."""
    return {rel: (hashlib.sha256(data).hexdigest(), os.stat(os.path.join(root, rel)).st_mtime_ns)
            for rel, data in _tree(root).items()}


def _outputs(out_dir) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, n), out_dir)
        for d, _, names in os.walk(out_dir)
        for n in names
        if not n.startswith(".") and n != resize.AUDIT_FILE
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
    # Each output is byte for byte what normalize_image (predict's step too) makes of its raw file.
    for raw_rel, out_rel in ((os.path.join("A", "img1.jpg"), os.path.join("A", "img1.png")),
                             (os.path.join("B", "img2.png"), os.path.join("B", "img2.png"))):
        with open(os.path.join(raw, raw_rel), "rb") as f:
            expected = normalize_image(f.read(), size=40, mode="L", max_pixels=10_000)
        assert (out / out_rel).read_bytes() == expected
    assert "A: 4 written, 0 unchanged, 0 invalid; B: 3 written, 0 unchanged, 0 invalid" in logs[-1]
    audit = json.loads((out / resize.AUDIT_FILE).read_text())
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
    assert resize.is_resized_current(raw, str(out), 32, "L", 10_000)
    assert not resize.is_resized_current(raw, str(out), 40, "L", 10_000)


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
    manifest = resize.read_manifest(str(out))
    assert len(manifest["files"]) == 4 and set(manifest["invalid"]) == set(bad)
    assert json.loads((out / resize.AUDIT_FILE).read_text())["classes"]["B"]["invalid"] == 3

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


def _dead_owner_tag() -> str:
    """An owner tag of this host whose process is gone: this pid with another start time."""
    host, boot, pid, start = atomic.owner_tag().split(".")
    return f"{host}.{boot}.{pid}.{int(start) + 1}"


def test_a_damaged_output_is_made_again_from_its_raw_file(spark, tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=("A", "B"), per_class=2)
    out = tmp_path / "out"
    kw = dict(size=40, mode="L", max_pixels=10_000, handle_invalid="skip")
    resize_dataset(spark, raw, str(out), log=lambda line: None, **kw)
    good = {n: (out / n).read_bytes() for n in _outputs(out)}
    cut, overwritten = out / "A" / "img0.png", out / "B" / "img1.png"
    cut.write_bytes(good[os.path.join("A", "img0.png")][:100])
    written = os.stat(overwritten).st_mtime_ns
    overwritten.write_bytes(b"x" * len(good[os.path.join("B", "img1.png")]))  # same size, written later
    os.utime(overwritten, ns=(written, written + 10**9))
    assert not resize.is_resized_current(raw, str(out), 40, "L", 10_000)

    logs: list[str] = []
    report = resize_dataset(spark, raw, str(out), log=logs.append, **kw)
    assert dict(report.written) == {"A": 1, "B": 1} and report.invalid == {}
    assert {n: (out / n).read_bytes() for n in _outputs(out)} == good
    assert resize.is_resized_current(raw, str(out), 40, "L", 10_000)
    assert logs[0].startswith("resize: 2 of 4 images to write") and logs[0].endswith(
        f"2 output(s) missing or changed since written: {os.path.join('A', 'img0.png')}, {os.path.join('B', 'img1.png')}")

    # Changed in place with size and mtime kept: only decoding tells. The featurizer's error
    # (or its skip) names the file; the run marks it, and the next resize makes it again.
    stat = os.stat(cut)
    cut.write_bytes(b"x" * stat.st_size)
    os.utime(cut, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resize.is_resized_current(raw, str(out), 40, "L", 10_000)
    message = f"invalid image: file:{cut}: not an image (unrecognised format)"
    assert resize.damaged_output(message, str(out)) == str(cut)
    assert resize.damaged_output(f"invalid image: file:{raw}/A/img0.png: x", str(out)) is None
    assert resize.forget_outputs(str(out), [f"file:{cut}", str(raw)]) == [os.path.join("A", "img0.png")]
    assert not resize.is_resized_current(raw, str(out), 40, "L", 10_000)
    report = resize_dataset(spark, raw, str(out), log=lambda line: None, **kw)
    assert report.written["A"] == 1 and sum(report.written.values()) == 1
    assert {n: (out / n).read_bytes() for n in _outputs(out)} == good


def test_only_outputs_of_the_manifest_are_loaded_strays_are_named_orphans_removed(spark, tmp_path):
    raw = make_dataset(tmp_path / "raw", classes=("A", "B"), per_class=2)
    (tmp_path / "raw" / "A" / "_lead.png").write_bytes(png_bytes(xray_like(0, 9)))
    out = tmp_path / "out"
    kw = dict(size=40, mode="L", max_pixels=10_000)
    resize_dataset(spark, raw, str(out), log=lambda line: None, **kw)
    stray = out / "B" / "stray.png"  # not made by the resize step: never loaded, never deleted
    stray.write_bytes(png_bytes(xray_like(1, 1)))
    orphan = out / "A" / f".tmp-{_dead_owner_tag()}-k1ll3d.png"  # a killed run's half-written output
    orphan.write_bytes(b"\x89PNG half")
    live = out / "A" / f".tmp-{atomic.owner_tag()}-busy.png"  # a running writer's (this process)
    live.write_bytes(b"\x89PNG being written")

    logs: list[str] = []
    files = resize.resized_images(str(out), ["A", "B"], log=logs.append)
    assert sorted(files) == sorted([(str(out / "A" / n), "A") for n in ("_lead.png", "img0.png", "img1.png")]
                                   + [(str(out / "B" / n), "B") for n in ("img0.png", "img1.png")])
    assert not orphan.exists() and live.exists() and stray.exists()
    assert any(line.startswith("removed 1 temporary file(s) left by an interrupted run") and str(orphan) in line
               for line in logs)
    (line,) = [line for line in logs if "stray.png" in line]
    assert "not made by the resize step" in line and "left out" in line

    orphan.write_bytes(b"\x89PNG half")
    logs.clear()
    resize_dataset(_no_spark, raw, str(out), log=logs.append, **kw)  # the resize job cleans up too
    assert not orphan.exists() and live.exists() and stray.exists()
    assert any("stray.png" in line for line in logs)


def test_folders_with_glob_characters(spark, tmp_path):
    root = tmp_path / "data [1] {a,b} *?\\"
    raw = make_dataset(root / "raw", classes=("A", "B"), per_class=2)
    out = root / "resized"
    resize_dataset(spark, raw, str(out), size=40, mode="L", max_pixels=10_000, log=lambda line: None)
    files = resize.resized_images(str(out), ["A", "B"], log=lambda line: None)
    rows = data.load_images(spark, files).collect()
    assert sorted(r.path for r in rows) == sorted(f"file:{p}" for p, _ in files) and len(rows) == 4
