"""The dataset_download job: fetch the public data set archive and unpack it into ``raw_dir``.

The archive (zip or tar, optionally compressed; its URL is ``dataset.download_url``) is streamed
into a temporary folder beside ``raw_dir`` with progress lines, checked (complete, a readable
archive, the optional ``dataset.download_sha256``), unpacked there, and the folder that holds one
sub-folder per class (``dataset.download_subdir``, found at any depth) is renamed to ``raw_dir``.
The rename is the only step that touches ``raw_dir``: a failed or interrupted download never
leaves a half-filled data folder behind.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable

from .config import Experiment
from .data import Listing, list_dataset
from .errors import DataError

CHUNK = 1 << 16
_DISK_ERRORS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT}
ALTERNATIVE = "or point dataset.raw_dir at a copy of the data set (--set dataset.raw_dir=PATH, one folder per class)"


def run_download(exp: Experiment, log: Callable[[str], None] = print) -> Listing:
    """The job as configured: ``dataset.download_url`` -> ``dataset.raw_dir``."""
    ds = exp["dataset"]
    return download_dataset(
        ds["download_url"], exp.raw_dir, ds["download_subdir"], sha256=ds.get("download_sha256"), log=log
    )


def download_dataset(
    url: str,
    raw_dir: str,
    subdir: str,
    *,
    sha256: str | None = None,
    timeout: float = 30.0,
    progress_every: float = 2.0,
    log: Callable[[str], None] = print,
) -> Listing:
    """Fetch ``url``, check it and move its ``subdir`` (one folder per class) to ``raw_dir``.

    Does nothing when ``raw_dir`` already holds a data set. Raises DataError (one line, naming
    the alternative of a local copy) when the download, the check or the archive fails; in that
    case ``raw_dir`` is not created.
    """
    raw_dir = os.path.abspath(raw_dir)
    existing = _existing_data_set(raw_dir, log)
    if existing is not None:
        return existing
    parent = os.path.dirname(raw_dir)
    created = _missing_ancestors(parent)
    work = _work_folder(parent, raw_dir)
    try:
        archive = os.path.join(work, "archive")
        digest = fetch(url, archive, timeout=timeout, progress_every=progress_every, log=log)
        if sha256 and digest != sha256.strip().lower():
            raise DataError(
                f"the archive from {url} has SHA-256 {digest}, expected {sha256}: the file changed or is "
                f"damaged; fix dataset.download_sha256, {ALTERNATIVE}"
            )
        _move_into_place(_unpacked_data_set(archive, work, subdir, url), raw_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in reversed(created):
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
    shutil.rmtree(work, ignore_errors=True)
    listing = list_dataset(raw_dir)
    counts = ", ".join(f"{cls}: {len(rels)}" for cls, rels in listing.files.items())
    log(f"download: {listing.count} images in {raw_dir} ({counts})")
    return listing


def _existing_data_set(raw_dir: str, log: Callable[[str], None]) -> Listing | None:
    """The listing of a data set already in ``raw_dir`` (None: empty or missing; a folder of
    something else is an error: it is never replaced)."""
    if not os.path.exists(raw_dir) or (os.path.isdir(raw_dir) and not os.listdir(raw_dir)):
        return None
    try:
        listing = list_dataset(raw_dir)
    except DataError:
        raise DataError(
            f"{raw_dir} exists and is not a data set: remove it or set dataset.raw_dir to a new "
            f"folder before downloading"
        ) from None
    log(f"download: {raw_dir} already holds {listing.count} images in {len(listing.files)} classes: nothing to do")
    return listing


def _work_folder(parent: str, raw_dir: str) -> str:
    """A temporary folder beside ``raw_dir`` (same file system: the final step is a rename)."""
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(raw_dir)}.download-")
    except OSError as exc:
        raise DataError(f"cannot create a download folder in {parent}: {exc.strerror or exc}: choose another dataset.raw_dir") from None


def _unpacked_data_set(archive: str, work: str, subdir: str, url: str) -> str:
    """Unpack ``archive`` inside ``work``; the folder ``subdir`` in it, checked to hold class folders."""
    unpacked = os.path.join(work, "unpacked")
    unpack(archive, unpacked, url)
    os.unlink(archive)
    source = find_folder(unpacked, subdir, url)
    try:
        list_dataset(source)
    except DataError:
        raise DataError(
            f"folder {subdir!r} of the archive from {url} does not hold one folder per class with "
            f"images: check dataset.download_subdir, {ALTERNATIVE}"
        ) from None
    return source


def _move_into_place(source: str, raw_dir: str) -> None:
    if os.path.isdir(raw_dir):
        os.rmdir(raw_dir)  # empty (checked before downloading): the rename replaces it
    try:
        os.rename(source, raw_dir)
    except OSError as exc:
        raise DataError(f"cannot move the downloaded data set to {raw_dir}: {exc.strerror or exc}") from None


def _missing_ancestors(folder: str) -> list[str]:
    """``folder`` and its parents that do not exist yet, outermost first."""
    missing: list[str] = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return list(reversed(missing))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def fetch(
    url: str,
    dest: str,
    *,
    timeout: float = 30.0,
    progress_every: float = 2.0,
    log: Callable[[str], None] = print,
) -> str:
    """Stream ``url`` into ``dest`` with progress lines; returns the SHA-256 (hex) of the bytes.

    Raises DataError when the server cannot be reached, answers with an HTTP error, or the
    transfer stops before the announced length.
    """
    log(f"download: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": "xray-featurizer"})
    digest = hashlib.sha256()
    done, total = 0, None
    start = last = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last >= progress_every:
                    last = now
                    rate = done / max(now - start, 1e-9)
                    of = f" of {_mb(total)} ({done / total:.0%})" if total else ""
                    log(f"download: {_mb(done)}{of}, {_mb(int(rate))}/s")
    except urllib.error.HTTPError as exc:
        raise DataError(f"cannot download the data set from {url}: HTTP {exc.code} {exc.reason}: check dataset.download_url, {ALTERNATIVE}") from None
    except http.client.IncompleteRead as exc:
        raise DataError(
            f"download of {url} stopped after {_mb(done + len(exc.partial))}: retry, {ALTERNATIVE}"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            raise DataError(f"cannot write the download into {os.path.dirname(dest)}: {exc.strerror}") from None
        reason = getattr(exc, "reason", None) or exc
        text = " ".join(str(reason).split()) or type(exc).__name__
        raise DataError(f"cannot download the data set from {url} ({text}): offline? Retry when online, {ALTERNATIVE}") from None
    if total is not None and done != total:
        raise DataError(f"download of {url} incomplete: {done} of {total} bytes: retry, {ALTERNATIVE}")
    seconds = time.monotonic() - start
    log(f"download: {_mb(done)} in {seconds:.1f} s ({_mb(int(done / max(seconds, 1e-9)))}/s)")
    return digest.hexdigest()


def unpack(archive: str, dest: str, url: str) -> None:
    """Extract a zip or tar archive into ``dest``; a damaged one, or unsafe member paths, fail."""
    damaged = f"the archive from {url} is damaged or incomplete"
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = zf.testzip()  # reads every member: CRC errors and truncation show here
                if bad is not None:
                    raise DataError(f"{damaged} (bad checksum of {bad}): retry, {ALTERNATIVE}")
                for name in zf.namelist():
                    _check_member(name, url)
                zf.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter="data")
                else:  # Python without extraction filters: refuse unsafe names and links ourselves
                    members = tf.getmembers()
                    for member in members:
                        _check_member(member.name, url)
                        if not (member.isfile() or member.isdir()):
                            raise DataError(f"the archive from {url} holds a link or device ({member.name}): refused")
                    tf.extractall(dest, members=members)
        else:
            raise DataError(f"the file from {url} is not a zip or tar archive (or it is incomplete): {ALTERNATIVE}")
    except DataError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            raise DataError(f"cannot unpack the archive into {dest}: {exc.strerror}") from None
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{damaged} ({text}): retry, {ALTERNATIVE}") from None


def _check_member(name: str, url: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"the archive from {url} holds an unsafe path ({name}): refused")


def find_folder(root: str, name: str, url: str) -> str:
    """The shallowest folder called ``name`` under ``root`` (``name`` may hold slashes)."""
    want = os.path.normpath(name.strip("/"))
    found: list[tuple[int, str]] = []
    for dirpath, dirnames, _ in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel == want or rel.endswith(os.sep + want):
            found.append((rel.count(os.sep), dirpath))
    if not found:
        top = ", ".join(sorted(os.listdir(root))) or "nothing"
        raise DataError(
            f"the archive from {url} has no folder {name!r} (top level: {top}): set dataset.download_subdir "
            f"to the folder that holds the class folders"
        )
    return min(found)[1]
