"""The data set: class folders, checks and audit, the resize job, loading and the split.

Layout everywhere: one folder per class label, images inside (``raw_dir/Covid-19/x.png``).
The raw folder is only ever read. The resize job writes ``resized_dir`` in the same layout, every
image in one mode and one size, on Spark executors, each file atomically, and is incremental:
a manifest remembers what each output was made from.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import pandas as pd

from imagefeaturizer.images import InvalidImageError, decode_to_pil, image_info, is_image_file, resize_pil

from .errors import DataError

MANIFEST = ".resize-manifest.json"


@dataclass
class Listing:
    """Image files per class folder (paths relative to the root), and what was ignored."""

    root: str
    files: dict[str, list[str]]
    ignored: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.files.values())


def list_dataset(root: str, classes: list[str] | None = None) -> Listing:
    """Class folders of ``root`` and their image files; checks what a task needs.

    Raises DataError when the folder is missing, has fewer than two class folders, lacks a class
    the task needs, or a needed class holds no image. Hidden files and non-image extensions are
    ignored and reported.
    """
    if not os.path.isdir(root):
        raise DataError(
            f"data folder {root} not found: set dataset.raw_dir to a folder with one sub-folder per "
            f"class (--set dataset.raw_dir=PATH), or run ./wrapper.sh run dataset_download"
        )
    files: dict[str, list[str]] = {}
    ignored: list[str] = []
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if entry.startswith("."):
            continue
        if not os.path.isdir(full):
            ignored.append(entry)
            continue
        images = []
        for dirpath, dirnames, names in os.walk(full):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(names):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                (images if is_image_file(name) else ignored).append(rel)
        files[entry] = images
    if len(files) < 2:
        raise DataError(
            f"data folder {root} has {len(files)} class folder(s): expected at least two, one per class "
            f"(e.g. {root}/Covid-19/, {root}/No_findings/)"
        )
    if classes:
        missing = [c for c in classes if c not in files]
        if missing:
            raise DataError(
                f"data folder {root} lacks class folder(s) {', '.join(missing)} needed by the task "
                f"(found: {', '.join(files)})"
            )
        empty = [c for c in classes if not files[c]]
        if empty:
            raise DataError(f"class folder(s) {', '.join(empty)} in {root} hold no image files")
        files = {c: files[c] for c in classes}
    return Listing(root, files, ignored)


# --------------------------------------------------------------------------- resize job


@dataclass
class ResizeReport:
    written: Counter
    unchanged: Counter
    removed: int
    invalid: dict[str, str]  # relative raw path -> reason
    audit: dict[str, dict]
    warning: str | None

    def summary(self) -> str:
        classes = sorted(set(self.written) | set(self.unchanged))
        parts = [f"{c}: {self.written[c]} written, {self.unchanged[c]} unchanged" for c in classes]
        text = "; ".join(parts)
        if self.invalid:
            text += f"; {len(self.invalid)} invalid skipped"
        return text


def _output_names(listing: Listing) -> dict[str, str]:
    """Raw relative path -> output relative path (``<class>/<stem>.png``, unique)."""
    out: dict[str, str] = {}
    for cls, rels in listing.files.items():
        stems = Counter(os.path.splitext(os.path.basename(r))[0] for r in rels)
        for rel in rels:
            base = os.path.basename(rel)
            stem, ext = os.path.splitext(base)
            name = f"{stem}.png" if stems[stem] == 1 else f"{stem}_{ext.lstrip('.').lower()}.png"
            sub = os.path.dirname(os.path.relpath(rel, cls))
            out[rel] = os.path.normpath(os.path.join(cls, sub, name))
    return out


def _stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_manifest(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_json_atomic(path: str, data) -> None:
    """Write JSON next to its destination, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _settings(raw_dir: str, size: int, mode: str, max_pixels: int) -> dict:
    return {"raw_dir": os.path.abspath(raw_dir), "size": size, "mode": mode, "max_pixels": max_pixels}


def resize_todo(listing: Listing, out_dir: str, size: int, mode: str, max_pixels: int) -> list[str]:
    """Raw files whose output is missing, stale or was made with other settings."""
    manifest = read_manifest(out_dir)
    same = manifest.get("settings") == _settings(listing.root, size, mode, max_pixels)
    done = {**manifest.get("files", {}), **manifest.get("invalid", {})} if same else {}
    todo = []
    for rels in listing.files.values():
        for rel in rels:
            prev = done.get(rel)
            stat = _stat(os.path.join(listing.root, rel))
            if prev is None or prev.get("size") != stat["size"] or prev.get("mtime_ns") != stat["mtime_ns"]:
                todo.append(rel)
            elif "out" in prev and not os.path.isfile(os.path.join(out_dir, prev["out"])):
                todo.append(rel)
    return todo


def is_resized_current(raw_dir: str, out_dir: str, size: int, mode: str, max_pixels: int) -> bool:
    """True when ``out_dir`` holds every raw image, made from its current version and settings."""
    try:
        listing = list_dataset(raw_dir)
    except DataError:
        return False
    manifest = read_manifest(out_dir)
    known = set(manifest.get("files", {})) | set(manifest.get("invalid", {}))
    current = {rel for rels in listing.files.values() for rel in rels}
    return current == known and not resize_todo(listing, out_dir, size, mode, max_pixels)


def _resize_partition(size: int, mode: str, max_pixels: int):
    """Executor-side work: read, decode, resize and write each file atomically."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            rows = []
            for src, dst in zip(batch["src"], batch["dst"]):
                row = {"src": src, "dst": dst, "reason": None, "format": None, "mode": None, "width": None, "height": None}
                try:
                    try:
                        with open(src, "rb") as f:
                            data = f.read()
                    except OSError as exc:
                        raise InvalidImageError(f"cannot read file ({exc.strerror})", origin=src) from None
                    info = image_info(data, origin=src)
                    row.update(format=info["format"], mode=info["mode"], width=info["width"], height=info["height"])
                    image = resize_pil(decode_to_pil(data, max_pixels=max_pixels, origin=src, mode=mode), (size, size))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=".tmp-", suffix=".png")
                    try:
                        with os.fdopen(fd, "wb") as f:
                            image.save(f, format="PNG")
                        os.replace(tmp, dst)
                    except BaseException:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
                        raise
                except InvalidImageError as exc:
                    row["reason"] = exc.reason
                rows.append(row)
            yield pd.DataFrame(rows, columns=list(_RESULT_COLUMNS))

    return run


_RESULT_COLUMNS = {
    "src": "string", "dst": "string", "reason": "string", "format": "string",
    "mode": "string", "width": "int", "height": "int",
}


def resize_dataset(
    spark,
    raw_dir: str,
    out_dir: str,
    *,
    size: int,
    mode: str,
    max_pixels: int,
    handle_invalid: str = "error",
    log=print,
) -> ResizeReport:
    """Write ``out_dir`` from ``raw_dir``: one mode, one size, PNG, same class layout.

    Only new or changed raw files are processed; outputs of removed raw files are removed.
    With ``handle_invalid='error'`` a bad file stops the job naming it (after the manifest has
    recorded every good file written, so nothing done is lost); with ``'skip'`` bad files are
    counted and listed.
    """
    listing = list_dataset(raw_dir)
    if os.path.abspath(out_dir) == os.path.abspath(raw_dir):
        raise DataError(f"dataset.resized_dir equals dataset.raw_dir ({raw_dir}): the raw folder is never written; choose another folder")
    settings = _settings(raw_dir, size, mode, max_pixels)
    manifest = read_manifest(out_dir)
    same = manifest.get("settings") == settings
    files = dict(manifest.get("files", {})) if same else {}
    invalid = dict(manifest.get("invalid", {})) if same else {}
    names = _output_names(listing)
    current = set(names)

    removed = 0
    for rel in [r for r in list(files) if r not in current]:
        out = os.path.join(out_dir, files.pop(rel)["out"])
        if os.path.isfile(out):
            os.unlink(out)
            removed += 1
    for rel in [r for r in list(invalid) if r not in current]:
        invalid.pop(rel)

    todo = resize_todo(listing, out_dir, size, mode, max_pixels) if same else [r for rs in listing.files.values() for r in rs]
    written: Counter = Counter()
    if todo:
        log(f"resize: {len(todo)} of {listing.count} images to write into {out_dir} ({size}x{size}, mode {mode})")
        pdf = pd.DataFrame(
            {"src": [os.path.join(listing.root, r) for r in todo], "dst": [os.path.join(out_dir, names[r]) for r in todo]}
        )
        parallelism = max(1, min(len(todo), spark.sparkContext.defaultParallelism * 4))
        jobs = spark.createDataFrame(pdf).repartition(parallelism)
        schema = ", ".join(f"{k} {v}" for k, v in _RESULT_COLUMNS.items())
        results = jobs.mapInPandas(_resize_partition(size, mode, max_pixels), schema=schema).toPandas()
        root_len = len(os.path.join(listing.root, ""))
        for row in results.itertuples(index=False):
            rel = row.src[root_len:]
            entry = {**_stat(row.src), "format": row.format, "mode": row.mode, "width": _int(row.width), "height": _int(row.height)}
            if not isinstance(row.reason, str):  # None or NaN: written
                files[rel] = {**entry, "out": names[rel]}
                invalid.pop(rel, None)
                written[rel.split(os.sep)[0]] += 1
            else:
                invalid[rel] = {**entry, "reason": row.reason}
                old = files.pop(rel, None)
                if old and os.path.isfile(os.path.join(out_dir, old["out"])):
                    os.unlink(os.path.join(out_dir, old["out"]))
    write_json_atomic(os.path.join(out_dir, MANIFEST), {"settings": settings, "files": files, "invalid": invalid})

    unchanged = Counter({cls: sum(1 for r in rels if r in files) - written[cls] for cls, rels in listing.files.items()})
    reasons = {rel: v["reason"] for rel, v in sorted(invalid.items())}
    entries = {**files, **invalid}
    report = ResizeReport(written, unchanged, removed, reasons, audit(listing, entries), source_cue_warning(listing, entries))
    if reasons and handle_invalid == "error":
        first, why = next(iter(reasons.items()))
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        raise DataError(
            f"invalid image {os.path.join(listing.root, first)}: {why}{more}: fix or remove it, "
            f"or set handleInvalid=skip to leave such files out"
        )
    return report


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def audit(listing: Listing, entries: dict[str, dict]) -> dict[str, dict]:
    """Per class: count, formats, modes, size range (from the resize manifest's header data)."""
    result = {}
    for cls, rels in listing.files.items():
        infos = [entries[r] for r in rels if r in entries]
        widths = [i["width"] for i in infos if i.get("width")]
        heights = [i["height"] for i in infos if i.get("height")]
        result[cls] = {
            "count": len(rels),
            "invalid": sum(1 for i in infos if "reason" in i),
            "formats": dict(Counter(str(i.get("format")) for i in infos)),
            "modes": dict(Counter(str(i.get("mode")) for i in infos)),
            "min_size": [min(widths), min(heights)] if widths else None,
            "max_size": [max(widths), max(heights)] if widths else None,
        }
    return result


def source_cue_warning(listing: Listing, entries: dict[str, dict]) -> str | None:
    """A warning when file format and colour mode alone nearly separate the classes."""
    combos: dict[tuple, Counter] = defaultdict(Counter)
    for cls, rels in listing.files.items():
        for rel in rels:
            info = entries.get(rel)
            if info and "reason" not in info:
                combos[(info.get("format"), info.get("mode"))][cls] += 1
    total = sum(sum(c.values()) for c in combos.values())
    if not total:
        return None
    by_cue = sum(max(c.values()) for c in combos.values()) / total
    per_class = Counter()
    for c in combos.values():
        per_class.update(c)
    majority = max(per_class.values()) / total
    if by_cue >= 0.95 and by_cue - majority >= 0.05:
        return (
            f"warning: file format and colour mode alone predict the class of {by_cue:.0%} of the raw "
            f"images (majority class: {majority:.0%}); a model can learn the source instead of the "
            f"disease. The resized data set (one mode, one size, PNG) removes this cue."
        )
    return None


def audit_for(raw_dir: str, out_dir: str, classes: list[str]) -> tuple[dict, str | None, dict[str, str]]:
    """(audit, source-cue warning, invalid files) of the task's classes, from the resize manifest."""
    listing = list_dataset(raw_dir, classes)
    manifest = read_manifest(out_dir)
    entries = {**manifest.get("files", {}), **manifest.get("invalid", {})}
    invalid = {rel: v["reason"] for rel, v in manifest.get("invalid", {}).items() if rel.split(os.sep)[0] in classes}
    return audit(listing, entries), source_cue_warning(listing, entries), invalid
