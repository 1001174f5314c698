"""The resize job: the raw class folders -> one mode, one square size, PNG, on Spark executors.

``resized_dir`` gets the raw folder's layout; each output is written atomically. The job is
incremental: a manifest (``.resize-manifest.json``) remembers what each output was made from
(the raw file's size and mtime, and the settings) and the output's own size and mtime, so only
new or changed raw files, and outputs that are missing or changed since (truncated, overwritten),
are processed. Experiments load exactly the outputs the manifest lists
(:func:`resized_images`): other files in the class folders are named and left alone; temporary
files of killed runs are removed.
:func:`normalize_image` is the one decode-resize-PNG step: the job writes its bytes, and
``predict`` applies it to new images so that they reach the model as the training images did.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from imagefeaturizer.images import InvalidImageError, decode_to_pil, image_info, resize_pil
from imagefeaturizer.runtime import hold_for_tests

from .atomic import TEMP_PREFIX, atomic_file, remove_orphans, write_json_atomic
from .config import Experiment
from .data import Listing, audit, check_invalid, describe_ignored, invalid_error, list_dataset, source_cue_warning
from .errors import DataError
from .paths import file_uri, local_path
from .session import default_parallelism, spark_session

MANIFEST = ".resize-manifest.json"
AUDIT_FILE = "data-audit.json"
FILES_PER_TASK = 16  # the resize job's smallest share of files per Spark task
_RESULT_COLUMNS = {
    "src": "string", "dst": "string", "reason": "string", "format": "string",
    "mode": "string", "width": "int", "height": "int",
}


def normalize_image(data: bytes, *, size: int, mode: str, max_pixels: int, origin: str | None = None) -> bytes:
    """Image bytes decoded, in ``mode``, ``size`` x ``size``, as PNG: what the resize job writes.

    Raises InvalidImageError (with the reason) for a file that is not a usable image."""
    image = resize_pil(decode_to_pil(data, max_pixels=max_pixels, origin=origin, mode=mode, limit_name="max_image_pixels"), (size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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


# --------------------------------------------------------------------------- the manifest


def read_manifest(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _settings(raw_dir: str, size: int, mode: str, max_pixels: int) -> dict:
    return {"raw_dir": os.path.abspath(raw_dir), "size": size, "mode": mode, "max_pixels": max_pixels}


def _stat(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


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


def resize_todo(listing: Listing, out_dir: str, size: int, mode: str, max_pixels: int) -> list[str]:
    """Raw files whose output is missing, stale, damaged or was made with other settings."""
    return list(_todo(listing, out_dir, size, mode, max_pixels))


def _todo(listing: Listing, out_dir: str, size: int, mode: str, max_pixels: int) -> dict[str, str]:
    """Raw files to process -> why: "raw" (new, changed, other settings), "output" (missing or
    changed since it was written: truncated, overwritten) or "unrecorded" (an older manifest)."""
    manifest = read_manifest(out_dir)
    same = manifest.get("settings") == _settings(listing.root, size, mode, max_pixels)
    done = {**manifest.get("files", {}), **manifest.get("invalid", {})} if same else {}
    todo = {}
    for rels in listing.files.values():
        for rel in rels:
            prev = done.get(rel)
            stat = _stat(os.path.join(listing.root, rel))
            if prev is None or prev.get("size") != stat["size"] or prev.get("mtime_ns") != stat["mtime_ns"]:
                todo[rel] = "raw"
            elif "out" in prev and "out_size" not in prev:
                todo[rel] = "unrecorded"
            elif "out" in prev and not _output_intact(out_dir, prev):
                todo[rel] = "output"
    return todo


def _output_intact(out_dir: str, entry: dict) -> bool:
    """The output is there as it was written: its size and mtime as the manifest recorded them."""
    try:
        st = os.stat(os.path.join(out_dir, entry["out"]))
    except OSError:
        return False
    return entry.get("out_size") == st.st_size and entry.get("out_mtime_ns") == st.st_mtime_ns


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


def audit_for(raw_dir: str, out_dir: str, classes: list[str]) -> tuple[dict, str | None, dict[str, str]]:
    """(audit, source-cue warning, invalid files) of the task's classes, from the resize manifest."""
    listing = list_dataset(raw_dir, classes)
    manifest = read_manifest(out_dir)
    entries = {**manifest.get("files", {}), **manifest.get("invalid", {})}
    invalid = {
        rel: v["reason"] for rel, v in sorted(manifest.get("invalid", {}).items()) if rel.split(os.sep)[0] in classes
    }
    return audit(listing, entries), source_cue_warning(listing, entries), invalid


# --------------------------------------------------------------------------- the job


@dataclass
class _State:
    """The manifest being brought up to date: outputs made (``files``) and known bad files."""

    settings: dict
    same: bool  # the manifest was made with these settings
    files: dict[str, dict]
    invalid: dict[str, dict]
    names: dict[str, str]  # raw relative path -> output relative path
    removed: int = 0
    written: Counter = field(default_factory=Counter)


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
    remove_killed_runs_files(out_dir, log)
    state = _load_state(listing, out_dir, _settings(raw_dir, size, mode, max_pixels))
    _drop_outdated(state, out_dir)
    todo = (_todo(listing, out_dir, size, mode, max_pixels) if state.same
            else dict.fromkeys((r for rs in listing.files.values() for r in rs), "raw"))
    if todo:
        changed = [state.files[r]["out"] for r, why in todo.items() if why == "output"]
        again = f"; {len(changed)} output(s) missing or changed since written: {_listed(changed)}" if changed else ""
        log(f"resize: {len(todo)} of {listing.count} images to write into {out_dir} ({size}x{size}, mode {mode}){again}")
        session = spark() if callable(spark) else spark
        _record(state, listing, out_dir, _run_job(session, listing, out_dir, list(todo), state.names, size, mode,
                                                  max_pixels))
    else:
        log(f"resize: {out_dir} is up to date ({listing.count} images)")
    write_json_atomic(os.path.join(out_dir, MANIFEST),
                      {"settings": state.settings, "files": state.files, "invalid": state.invalid})
    stray = strays(out_dir, listing.files, {e["out"] for e in state.files.values()})
    if stray:
        log(f"resize: {len(stray)} file(s) in {out_dir} were not made by the resize step: left alone, and "
            f"experiments do not load them: {_listed(stray)}")
    report = _report(state, listing, time.perf_counter() - start)
    _write_audit(out_dir, raw_dir, report, listing)
    _log_report(report, listing.root, handle_invalid, log)
    if report.invalid and handle_invalid == "error":
        raise invalid_error(listing.root, report.invalid)
    return report


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def _load_state(listing: Listing, out_dir: str, settings: dict) -> _State:
    manifest = read_manifest(out_dir)
    same = manifest.get("settings") == settings
    return _State(settings, same, dict(manifest.get("files", {})),
                  dict(manifest.get("invalid", {})) if same else {}, _output_names(listing))


def _drop_outdated(state: _State, out_dir: str) -> None:
    """Forget (and delete the outputs of) raw files that are gone; with other settings, every output."""
    keep = set(state.names) if state.same else set()
    targets = set(state.names.values())
    for rel in [r for r in state.files if r not in keep]:
        out = state.files.pop(rel)["out"]
        if out not in targets:  # outputs about to be rewritten stay until replaced
            state.removed += _remove_output(out_dir, out)
    for rel in [r for r in state.invalid if r not in state.names]:
        state.invalid.pop(rel)


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


def _run_job(session, listing: Listing, out_dir: str, todo: list[str], names: dict[str, str],
             size: int, mode: str, max_pixels: int) -> pd.DataFrame:
    """The Spark job over the files to do; one result row per file (see :func:`_resize_partition`)."""
    pairs = [(os.path.join(listing.root, r), os.path.join(out_dir, names[r])) for r in todo]
    # Enough tasks to use every core, none too small: each task costs a Python worker round trip.
    tasks = max(1, min(default_parallelism(session) * 4, -(-len(todo) // FILES_PER_TASK)))
    jobs = session.createDataFrame(pairs, "src string, dst string").repartition(tasks)
    schema = ", ".join(f"{k} {v}" for k, v in _RESULT_COLUMNS.items())
    return jobs.mapInPandas(_resize_partition(size, mode, max_pixels), schema=schema).toPandas()


def _resize_partition(size: int, mode: str, max_pixels: int):
    """Executor-side work: read, describe, normalise and write each file atomically."""

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            hold_for_tests("resize")
            rows = [_resize_one(src, dst, size, mode, max_pixels) for src, dst in zip(batch["src"], batch["dst"])]
            yield pd.DataFrame(rows, columns=list(_RESULT_COLUMNS))

    return run


def _resize_one(src: str, dst: str, size: int, mode: str, max_pixels: int) -> dict:
    """One file: its raw format, mode and size, and the reason when it is not a usable image."""
    row = {"src": src, "dst": dst, "reason": None, "format": None, "mode": None, "width": None, "height": None}
    try:
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidImageError(f"cannot read file ({exc.strerror})", origin=src) from None
        info = image_info(data, origin=src)
        row.update(format=info["format"], mode=info["mode"], width=info["width"], height=info["height"])
        png = normalize_image(data, size=size, mode=mode, max_pixels=max_pixels, origin=src)
        with atomic_file(dst) as f:
            f.write(png)
    except InvalidImageError as exc:
        row["reason"] = exc.reason
    return row


def _record(state: _State, listing: Listing, out_dir: str, results: pd.DataFrame) -> None:
    """The job's results into the manifest; outputs of files that became invalid are removed."""
    root_len = len(os.path.join(listing.root, ""))
    names = state.names
    for row in results.itertuples(index=False):
        rel = row.src[root_len:]
        entry = {**_stat(row.src), "format": row.format, "mode": row.mode, "width": _int(row.width),
                 "height": _int(row.height)}
        if not isinstance(row.reason, str):  # None or NaN: written
            out = _stat(os.path.join(out_dir, names[rel]))
            state.files[rel] = {**entry, "out": names[rel], "out_size": out["size"], "out_mtime_ns": out["mtime_ns"]}
            state.invalid.pop(rel, None)
            state.written[rel.split(os.sep)[0]] += 1
        else:
            state.invalid[rel] = {**entry, "reason": row.reason}
            old = state.files.pop(rel, {})
            for out in {old.get("out", names[rel]), names[rel]}:
                state.removed += _remove_output(out_dir, out)


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _report(state: _State, listing: Listing, seconds: float) -> ResizeReport:
    written = state.written
    unchanged = Counter({cls: sum(1 for r in rels if r in state.files) - written[cls]
                         for cls, rels in listing.files.items()})
    reasons = {rel: v["reason"] for rel, v in sorted(state.invalid.items())}
    entries = {**state.files, **state.invalid}
    return ResizeReport(written, unchanged, state.removed, reasons, audit(listing, entries),
                        source_cue_warning(listing, entries), listing.ignored, seconds)


def _write_audit(out_dir: str, raw_dir: str, report: ResizeReport, listing: Listing) -> None:
    write_json_atomic(
        os.path.join(out_dir, AUDIT_FILE),
        {
            "raw_dir": os.path.abspath(raw_dir),
            "classes": report.audit,
            "warning": report.warning,
            "invalid": {os.path.join(raw_dir, rel): why for rel, why in report.invalid.items()},
            "ignored": {os.path.join(raw_dir, rel): why for rel, why in listing.ignored.items()},
        },
    )


def _log_report(report: ResizeReport, root: str, handle_invalid: str, log) -> None:
    verb = "skipped" if handle_invalid == "skip" else "invalid"
    for rel, why in report.invalid.items():
        log(f"  {verb} image {os.path.join(root, rel)}: {why}")
    log(f"resize: {report.summary()}")
    if report.warning:
        log(report.warning)


# --------------------------------------------------------------------------- what experiments load


def resized_images(out_dir: str, classes: list[str], log=print) -> list[tuple[str, str]]:
    """(path, class) of the resize step's outputs of ``classes``, as its manifest lists them.

    What experiments load: every output, whatever its name, and nothing else. Other files in the
    class folders (not made by the resize step) are left out and named; temporary files that
    killed runs left are removed.
    """
    remove_killed_runs_files(out_dir, log)
    outputs = {e["out"]: rel.split(os.sep, 1)[0] for rel, e in read_manifest(out_dir).get("files", {}).items()}
    wanted = set(classes)
    files = sorted((os.path.join(out_dir, out), cls) for out, cls in outputs.items() if cls in wanted)
    stray = strays(out_dir, classes, set(outputs))
    if stray:
        log(f"left out {len(stray)} file(s) in {out_dir} not made by the resize step (not in its manifest "
            f"{MANIFEST}; not deleted): {_listed(stray)}")
    return files


def forget_outputs(out_dir: str, paths) -> list[str]:
    """Mark the outputs among ``paths`` (local paths or ``file:`` URIs) as not written, so the
    next resize makes them again from their raw files: outputs that do not decode although their
    size and mtime are as written. Returns them (relative paths); other paths are ignored."""
    manifest = read_manifest(out_dir)
    by_out = {os.path.join(out_dir, e["out"]): e for e in manifest.get("files", {}).values() if "out" in e}
    forgotten = []
    for path in paths:
        entry = by_out.get(os.path.normpath(local_path(path)))
        if entry is not None and entry.pop("out_size", None) is not None:
            forgotten.append(entry["out"])
    if forgotten:
        write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return sorted(forgotten)


def damaged_output(message: str, out_dir: str) -> str | None:
    """The output of ``out_dir`` a worker's invalid-image message names (``<file URI>: reason``)."""
    outputs = (os.path.join(out_dir, e["out"]) for e in read_manifest(out_dir).get("files", {}).values() if "out" in e)
    return next((p for p in outputs if f"{file_uri(p)}: " in message), None)


def strays(out_dir: str, classes, made: set[str]) -> list[str]:
    """Files in the class folders of ``out_dir`` (relative paths) that are not among ``made``."""
    found = []
    for cls in classes:
        for dirpath, _, names in os.walk(os.path.join(out_dir, cls)):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), out_dir)
                if rel not in made and not name.startswith(TEMP_PREFIX):
                    found.append(rel)
    return sorted(found)


def remove_killed_runs_files(out_dir: str, log=print) -> None:
    """Remove the temporary files (half-written outputs) of killed runs; a running one's stay."""
    removed = remove_orphans(out_dir, recursive=True) if os.path.isdir(out_dir) else []
    if removed:
        log(f"removed {len(removed)} temporary file(s) left by an interrupted run: {_listed(removed)}")


def _listed(items: list[str], limit: int = 10) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --------------------------------------------------------------------------- the job from config


def ensure_resized(spark, exp: Experiment, log=print) -> None:
    """Run the resize job when ``resized_dir`` is missing or stale."""
    ds = exp["dataset"]
    if is_resized_current(exp.raw_dir, exp.resized_dir, ds["image_size"], ds["mode"], exp["max_image_pixels"]):
        return
    log(f"{exp.resized_dir} is missing or stale: running the resize step first")
    run_resize(exp, spark=spark, log=log)


def run_resize(exp: Experiment, spark=None, log=print) -> ResizeReport:
    """The dataset_resize job; Spark starts only when some file needs processing."""
    ds = exp["dataset"]
    ignored = describe_ignored(list_dataset(exp.raw_dir))  # fail before Spark starts when the folder is wrong
    if ignored:
        log(ignored)
    return resize_dataset(
        spark or (lambda: spark_session(exp.settings)),
        exp.raw_dir,
        exp.resized_dir,
        size=ds["image_size"],
        mode=ds["mode"],
        max_pixels=exp["max_image_pixels"],
        handle_invalid=exp["handleInvalid"],
        log=log,
    )


def task_data_checks(exp: Experiment, log=print) -> tuple[dict, str | None, dict[str, str]]:
    """After resizing: the task's audit, its source-cue warning and its known invalid raw files,
    with ``handleInvalid`` applied (error: stop naming the first; skip: name them all)."""
    audit_, cue_warning, invalid_raw = audit_for(exp.raw_dir, exp.resized_dir, exp.classes)
    check_invalid(exp.raw_dir, invalid_raw, exp["handleInvalid"], log)
    if cue_warning:
        log(cue_warning + " (this run uses the resized data set)")
    return audit_, cue_warning, invalid_raw
