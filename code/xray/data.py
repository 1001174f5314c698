"""The data set: class folders, checks and audit, the resize job, loading and the split.

Layout everywhere: one folder per class label, images inside (``raw_dir/Covid-19/x.png``).
The raw folder is only ever read. The resize job writes ``resized_dir`` in the same layout, every
image in one mode and one size, on Spark executors, each file atomically, and is incremental:
a manifest remembers what each output was made from.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from imagefeaturizer.images import (
    IMAGE_EXTENSIONS,
    InvalidImageError,
    decode_to_pil,
    image_info,
    is_image_file,
    resize_pil,
)

from .atomic import atomic_file
from .errors import DataError

LABEL = "label"  # the column of an image's class (its class folder's name)
MANIFEST = ".resize-manifest.json"
AUDIT_FILE = "data-audit.json"
FILES_PER_TASK = 16  # the resize job's smallest share of files per Spark task
_EXTENSIONS = ", ".join(sorted(IMAGE_EXTENSIONS))


@dataclass
class Listing:
    """Image files per class folder (paths relative to the root), and what was ignored.

    ``ignored`` maps each left-out entry (relative path; folders end with ``/``) to the reason.
    """

    root: str
    files: dict[str, list[str]]
    ignored: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.files.values())

    def ignored_in(self, cls: str) -> list[str]:
        """Ignored entries inside one class folder."""
        return [rel for rel in self.ignored if rel.split(os.sep, 1)[0] == cls and rel != f"{cls}/"]


def _ignore_reason(name: str) -> str:
    return "hidden" if name.startswith(".") else "not an image file extension"


def list_dataset(root: str, classes: list[str] | None = None) -> Listing:
    """Class folders of ``root`` and their image files; checks what a task needs.

    Raises DataError when the folder is missing, lacks a class the task needs, a needed class
    holds no image, or fewer than two class folders hold images. Hidden files and folders,
    non-image extensions, files beside the class folders and (without a task) empty class
    folders are left out and listed in ``Listing.ignored`` with the reason.
    """
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "not found"
        raise DataError(
            f"data folder {root} {what}: set dataset.raw_dir to a folder with one sub-folder per "
            f"class (--set dataset.raw_dir=PATH), or run ./wrapper.sh run dataset_download"
        )
    files: dict[str, list[str]] = {}
    ignored: dict[str, str] = {}
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if entry.startswith("."):
            ignored[entry + ("/" if os.path.isdir(full) else "")] = "hidden"
            continue
        if not os.path.isdir(full):
            ignored[entry] = "not in a class folder"
            continue
        images = []
        for dirpath, dirnames, names in os.walk(full):
            for d in sorted(d for d in dirnames if d.startswith(".")):
                ignored[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "hidden"
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(names):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if is_image_file(name):
                    images.append(rel)
                else:
                    ignored[rel] = _ignore_reason(name)
        files[entry] = images
    if classes:
        missing = [c for c in classes if c not in files]
        if missing:
            raise DataError(
                f"data folder {root} lacks class folder(s) {', '.join(missing)} needed by the task "
                f"(found: {', '.join(files) or 'none'})"
            )
        empty = [c for c in classes if not files[c]]
        if empty:
            raise DataError(
                f"class folder(s) {', '.join(empty)} in {root} hold no image files ({_EXTENSIONS}): "
                f"add images or choose another task"
            )
        files = {c: files[c] for c in classes}
    else:
        for cls in [c for c, rels in files.items() if not rels]:
            ignored[f"{cls}/"] = "class folder without image files"
            del files[cls]
    if len(files) < 2:
        raise DataError(
            f"data folder {root} has {len(files)} class folder(s) with images: expected at least two, "
            f"one per class (e.g. {os.path.join(root, 'Covid-19')}/, {os.path.join(root, 'No_findings')}/)"
        )
    return Listing(root, files, dict(sorted(ignored.items())))


def describe_ignored(listing: Listing, limit: int = 10) -> str | None:
    """One line naming what the listing left out and why (None when nothing was)."""
    if not listing.ignored:
        return None
    items = list(listing.ignored.items())
    shown = ", ".join(f"{rel} ({why})" for rel, why in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"ignored {len(items)} entries in {listing.root}: {shown}{more}"


def list_images(path: str) -> list[str]:
    """Image files to load from ``path``: the file itself, or every image under a folder.

    A folder may hold images directly or in sub-folders (class folders or not); hidden files
    and other extensions are left out. Returns absolute paths, sorted. Raises DataError when
    ``path`` does not exist, is a file without an image extension, or holds no image.
    """
    if os.path.isfile(path):
        if not is_image_file(path):
            raise DataError(f"{path} is not an image file: expected one of {_EXTENSIONS}")
        return [os.path.abspath(path)]
    if not os.path.isdir(path):
        raise DataError(f"{path} not found: give an image file or a folder of images")
    found = []
    for dirpath, dirnames, names in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.abspath(os.path.join(dirpath, n)) for n in sorted(names) if is_image_file(n))
    if not found:
        raise DataError(f"no image files ({_EXTENSIONS}) in {path} or its sub-folders")
    return found


# --------------------------------------------------------------------------- resize job


@dataclass
class ResizeReport:
    """What one resize run did, per class, and the audit of the whole raw folder."""

    written: Counter  # class -> outputs written by this run
    unchanged: Counter  # class -> outputs already current (not processed again)
    removed: int  # outputs deleted because their raw file is gone or became invalid
    invalid: dict[str, str]  # relative raw path -> reason (all known invalid files)
    audit: dict[str, dict]
    warning: str | None
    ignored: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        bad = Counter(rel.split(os.sep, 1)[0] for rel in self.invalid)
        classes = sorted(set(self.written) | set(self.unchanged) | set(bad))
        text = "; ".join(
            f"{c}: {self.written[c]} written, {self.unchanged[c]} unchanged, {bad[c]} invalid" for c in classes
        )
        if self.removed:
            text += f"; {self.removed} outdated output(s) removed"
        return f"{text} ({self.seconds:.1f} s)"


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
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


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
                    with atomic_file(dst) as f:
                        image.save(f, format="PNG")
                except InvalidImageError as exc:
                    row["reason"] = exc.reason
                rows.append(row)
            yield pd.DataFrame(rows, columns=list(_RESULT_COLUMNS))

    return run


_RESULT_COLUMNS = {
    "src": "string", "dst": "string", "reason": "string", "format": "string",
    "mode": "string", "width": "int", "height": "int",
}


def _remove_output(out_dir: str, rel_out: str) -> bool:
    """Delete one output and the folders it leaves empty (never ``out_dir`` itself)."""
    path = os.path.join(out_dir, rel_out)
    if not os.path.isfile(path):
        return False
    os.unlink(path)
    folder = os.path.dirname(path)
    while os.path.abspath(folder) != os.path.abspath(out_dir):
        try:
            os.rmdir(folder)
        except OSError:
            break
        folder = os.path.dirname(folder)
    return True


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def invalid_error(root: str, reasons: dict[str, str]) -> DataError:
    """The one-line error of ``handleInvalid=error``: the first bad file, its reason, the count."""
    first, why = next(iter(reasons.items()))
    more = f" (and {len(reasons) - 1} more invalid file(s))" if len(reasons) > 1 else ""
    return DataError(
        f"invalid image {os.path.join(root, first)}: {why}{more}: fix or remove it, "
        f"or set handleInvalid=skip to leave such files out"
    )


def check_invalid(root: str, reasons: dict[str, str], handle_invalid: str, log=print, limit: int = 10) -> None:
    """Apply ``handleInvalid`` to known invalid raw files: 'error' raises, 'skip' logs one line."""
    if not reasons:
        return
    if handle_invalid == "error":
        raise invalid_error(root, reasons)
    items = list(reasons.items())
    shown = "; ".join(f"{os.path.join(root, rel)}: {why}" for rel, why in items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    log(f"left out {len(items)} invalid image(s) (handleInvalid=skip): {shown}{more}")


def resize_dataset(
    spark: Any | Callable[[], Any],
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

    ``spark`` is a SparkSession, or a function returning one that is called only when some
    file needs processing. Only new or changed raw files are processed; outputs of removed raw
    files are removed; ``raw_dir`` is only read. Each bad file is logged with its reason; the
    manifest and ``data-audit.json`` (per class: counts, formats, modes, sizes, invalid and
    ignored files) are written before ``handle_invalid='error'`` stops the job naming the first
    bad file, so nothing done is lost. With ``'skip'`` bad files are counted and listed.
    """
    start = time.perf_counter()
    listing = list_dataset(raw_dir)
    if _inside(out_dir, raw_dir):
        raise DataError(
            f"dataset.resized_dir ({out_dir}) is inside dataset.raw_dir ({raw_dir}): the raw folder is "
            f"never written; choose a folder outside it"
        )
    settings = _settings(raw_dir, size, mode, max_pixels)
    manifest = read_manifest(out_dir)
    same = manifest.get("settings") == settings
    files: dict[str, dict] = dict(manifest.get("files", {}))
    invalid: dict[str, dict] = dict(manifest.get("invalid", {})) if same else {}
    names = _output_names(listing)

    removed = 0
    keep = set(names) if same else set()  # other settings: every old output is outdated
    targets = set(names.values())
    for rel in [r for r in files if r not in keep]:
        out = files.pop(rel)["out"]
        if out not in targets:  # outputs about to be rewritten stay until replaced
            removed += _remove_output(out_dir, out)
    for rel in [r for r in invalid if r not in names]:
        invalid.pop(rel)

    todo = resize_todo(listing, out_dir, size, mode, max_pixels) if same else [r for rs in listing.files.values() for r in rs]
    written: Counter = Counter()
    if todo:
        log(f"resize: {len(todo)} of {listing.count} images to write into {out_dir} ({size}x{size}, mode {mode})")
        session = spark() if callable(spark) else spark
        pairs = [(os.path.join(listing.root, r), os.path.join(out_dir, names[r])) for r in todo]
        # Enough tasks to use every core, none too small: each task costs a Python worker round trip.
        tasks = max(1, min(session.sparkContext.defaultParallelism * 4, -(-len(todo) // FILES_PER_TASK)))
        jobs = session.createDataFrame(session.sparkContext.parallelize(pairs, tasks), "src string, dst string")
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
                old = files.pop(rel, {})
                for out in {old.get("out", names[rel]), names[rel]}:
                    removed += _remove_output(out_dir, out)
    else:
        log(f"resize: {out_dir} is up to date ({listing.count} images)")
    write_json_atomic(os.path.join(out_dir, MANIFEST), {"settings": settings, "files": files, "invalid": invalid})

    unchanged = Counter({cls: sum(1 for r in rels if r in files) - written[cls] for cls, rels in listing.files.items()})
    reasons = {rel: v["reason"] for rel, v in sorted(invalid.items())}
    entries = {**files, **invalid}
    report = ResizeReport(
        written, unchanged, removed, reasons, audit(listing, entries), source_cue_warning(listing, entries),
        listing.ignored, time.perf_counter() - start,
    )
    write_json_atomic(
        os.path.join(out_dir, AUDIT_FILE),
        {
            "raw_dir": os.path.abspath(raw_dir),
            "classes": report.audit,
            "warning": report.warning,
            "invalid": {os.path.join(raw_dir, rel): why for rel, why in reasons.items()},
            "ignored": {os.path.join(raw_dir, rel): why for rel, why in listing.ignored.items()},
        },
    )
    verb = "skipped" if handle_invalid == "skip" else "invalid"
    for rel, why in reasons.items():
        log(f"  {verb} image {os.path.join(listing.root, rel)}: {why}")
    log(f"resize: {report.summary()}")
    if report.warning:
        log(report.warning)
    if reasons and handle_invalid == "error":
        raise invalid_error(listing.root, reasons)
    return report


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def audit(listing: Listing, entries: dict[str, dict]) -> dict[str, dict]:
    """Per class: count, formats, modes, size range (from the resize manifest), invalid and ignored files."""
    result = {}
    for cls, rels in listing.files.items():
        infos = [entries[r] for r in rels if r in entries]
        good = [i for i in infos if "reason" not in i]
        widths = [i["width"] for i in good if i.get("width")]
        heights = [i["height"] for i in good if i.get("height")]
        result[cls] = {
            "count": len(rels),
            "invalid": len(infos) - len(good),
            "formats": dict(Counter(str(i.get("format")) for i in good)),
            "modes": dict(Counter(str(i.get("mode")) for i in good)),
            "min_size": [min(widths), min(heights)] if widths else None,
            "max_size": [max(widths), max(heights)] if widths else None,
            "ignored": listing.ignored_in(cls),
        }
    return result


def source_cue_warning(listing: Listing, entries: dict[str, dict], threshold: float = 0.9) -> str | None:
    """A warning when file format and colour mode alone single out a class.

    For each class, the (format, mode) pairs in which it is the most common class are its cue;
    the class is singled out when at least ``threshold`` of its files carry its cue and at least
    ``threshold`` of the other files do not (as in the shared data set, where Covid-19 files are
    JPEG or RGB(A) and the other classes grayscale PNG).
    """
    combos: dict[tuple, Counter] = defaultdict(Counter)
    for cls, rels in listing.files.items():
        for rel in rels:
            info = entries.get(rel)
            if info and "reason" not in info:
                combos[(info.get("format"), info.get("mode"))][cls] += 1
    sizes: Counter = Counter()
    for counts in combos.values():
        sizes.update(counts)
    total = sum(sizes.values())
    if len(sizes) < 2:
        return None
    found = []
    for cls, n in sizes.items():
        cue = sorted(k for k, counts in combos.items() if counts.most_common(1)[0][0] == cls)
        inside = sum(combos[k][cls] for k in cue)
        others_inside = sum(sum(combos[k].values()) for k in cue) - inside
        others = total - n
        if inside >= threshold * n - 1e-9 and others_inside <= (1 - threshold) * others + 1e-9:
            pairs = ", ".join(f"{f}/{m}" for f, m in cue)
            found.append(f"{cls} ({inside} of its {n} files are {pairs}; {others_inside} of {others} other files are)")
    if not found:
        return None
    return (
        f"warning: file format and colour mode alone single out {'; '.join(found)}: a model can learn the "
        f"source instead of the disease. The resized data set (one mode, one size, PNG) removes this cue."
    )


def audit_for(raw_dir: str, out_dir: str, classes: list[str]) -> tuple[dict, str | None, dict[str, str]]:
    """(audit, source-cue warning, invalid files) of the task's classes, from the resize manifest."""
    listing = list_dataset(raw_dir, classes)
    manifest = read_manifest(out_dir)
    entries = {**manifest.get("files", {}), **manifest.get("invalid", {})}
    invalid = {
        rel: v["reason"] for rel, v in sorted(manifest.get("invalid", {}).items()) if rel.split(os.sep)[0] in classes
    }
    return audit(listing, entries), source_cue_warning(listing, entries), invalid
