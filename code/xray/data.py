"""The data set as class folders: listing and checks, loading into Spark, audit and the source cue.

Layout everywhere: one folder per class label, images inside (``raw_dir/Covid-19/x.png``). The
raw folder is only ever read; the resize job (:mod:`xray.resize`) writes the normalised copy in
the same layout, and experiments load that copy.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd
from pyspark.sql import DataFrame, SparkSession

from imagefeaturizer.images import IMAGE_EXTENSIONS, is_image_file

from .errors import DataError
from .paths import file_uri, local_path
from .session import default_parallelism

LABEL = "label"  # the column of an image's class (its class folder's name)
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
    _check_folder(root)
    files: dict[str, list[str]] = {}
    ignored: dict[str, str] = {}
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if entry.startswith("."):
            ignored[entry + ("/" if os.path.isdir(full) else "")] = "hidden"
        elif not os.path.isdir(full):
            ignored[entry] = "not in a class folder"
        else:
            files[entry] = _class_images(root, entry, ignored)
    files = _task_classes(root, files, classes) if classes else _non_empty(files, ignored)
    if len(files) < 2:
        raise DataError(
            f"data folder {root} has {len(files)} class folder(s) with images: expected at least two, "
            f"one per class (e.g. {os.path.join(root, 'Covid-19')}/, {os.path.join(root, 'No_findings')}/)"
        )
    return Listing(root, files, dict(sorted(ignored.items())))


def _check_folder(root: str) -> None:
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "not found"
        raise DataError(
            f"data folder {root} {what}: set dataset.raw_dir to a folder with one sub-folder per "
            f"class (--set dataset.raw_dir=PATH), or run ./wrapper.sh run dataset_download"
        )


def _class_images(root: str, cls: str, ignored: dict[str, str]) -> list[str]:
    """Image files under one class folder (sub-folders included); what is left out goes to ``ignored``."""
    images = []
    for dirpath, dirnames, names in os.walk(os.path.join(root, cls)):
        for d in sorted(d for d in dirnames if d.startswith(".")):
            ignored[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "hidden"
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if is_image_file(name):
                images.append(rel)
            else:
                ignored[rel] = _ignore_reason(name)
    return images


def _task_classes(root: str, files: dict[str, list[str]], classes: list[str]) -> dict[str, list[str]]:
    """The task's classes only; each must be there and hold an image."""
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
    return {c: files[c] for c in classes}


def _non_empty(files: dict[str, list[str]], ignored: dict[str, str]) -> dict[str, list[str]]:
    """Without a task: class folders holding no image are left out (and listed in ``ignored``)."""
    for cls in [c for c, rels in files.items() if not rels]:
        ignored[f"{cls}/"] = "class folder without image files"
    return {c: rels for c, rels in files.items() if rels}


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


FILES_PER_TASK = 32  # images a loading task reads (about what binaryFile's 128 MB splits hold)
_IMAGE_COLUMNS = "path string, label string, content binary"


def load_images(spark: SparkSession, files: list[tuple[str, str | None]]) -> DataFrame:
    """(path, label, content) of exactly these image files: (local path, label) pairs; read by executors.

    ``path`` is a ``file:`` URI, as Spark's ``binaryFile`` source gives, but no file is left out:
    that source skips names starting with '_' or '.' (Hadoop's hidden files) and reads glob
    characters in paths as patterns. A file that cannot be read gets a null ``content``, which
    the featurizer reports as an invalid image naming it. Executors must see the same paths (local
    mode, or storage every node mounts at the same place).
    """
    rows = [(file_uri(path), label) for path, label in files]
    tasks = load_tasks(len(rows), default_parallelism(spark))
    listed = spark.createDataFrame(rows, "path string, label string").repartition(tasks)  # no RDD: Spark Connect too
    return listed.mapInPandas(_read_files, schema=_IMAGE_COLUMNS)


def load_tasks(files: int, cores: int) -> int:
    """Tasks for ``files`` images: about FILES_PER_TASK each, at least one a core, and a multiple of
    ``cores`` so that no core idles through a last lone task (96 images on 2 cores: 4, not 3)."""
    wanted = max(cores, -(-files // FILES_PER_TASK))
    return max(1, min(files, -(-wanted // cores) * cores))


def _read_files(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Executor side of :func:`load_images`: each row's file bytes (None when unreadable)."""
    for batch in batches:
        batch["content"] = [_read_bytes(local_path(uri)) for uri in batch["path"]]
        yield batch


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


# --------------------------------------------------------------------------- bad files, audit, source cue


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
