"""The feature cache's parts on disk: which ones Spark may read, the damaged ones set aside, and
what killed runs left behind.

A part (``<cache_dir>/<key>/part-<uuid>/``) is whole when its ``_SUCCESS`` marker is there and
every file Spark would read in it (names not starting with ``_`` or ``.``) is Parquet with the
cache's columns that matches its checksum file (``.<name>.crc``, which Hadoop's reader checks)
or, without one, decodes to its end. These checks run on the driver before Spark reads the
cache, so a damaged part never fails a Spark job: it is moved (never deleted) to
``<cache_dir>/quarantine/<key>/`` and named in one line, and its images are featurized again.
"""

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import remove_orphans
from .errors import DataError

QUARANTINE = "quarantine"
COLUMNS = ("sha256", "features")
_CRC_MAGIC = b"crc\0"


def list_parts(folder: str) -> list[str]:
    """Every part folder of one cache folder, sorted (whole or not)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, p) for p in os.listdir(folder)
                  if p.startswith("part-") and os.path.isdir(os.path.join(folder, p)))


def usable_parts(folder: str, log=print) -> list[str]:
    """The whole parts of ``folder``, sorted; each damaged one is set aside and named."""
    good = []
    for part in list_parts(folder):
        reason = check_part(part)
        if reason is None:
            good.append(part)
        else:
            set_aside(part, reason, log)
    return good


def check_part(part: str) -> str | None:
    """Why Spark could not read ``part`` as a whole cache part; None when it can."""
    if not os.path.isfile(os.path.join(part, "_SUCCESS")):
        return "no _SUCCESS marker: its writer did not finish"
    names = sorted(n for n in os.listdir(part) if not n.startswith(("_", ".")))
    if not names:
        return "no Parquet file"
    for name in names:
        reason = _check_parquet(os.path.join(part, name))
        if reason:
            return f"{name}: {reason}"
    return None


def _check_parquet(path: str) -> str | None:
    """Why one data file is unreadable; None when it is whole."""
    matches = _matches_checksum(path)
    if matches is False:
        return "does not match its checksum file (truncated or overwritten)"
    try:
        parquet = pq.ParquetFile(path)
        try:
            missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
            if missing:
                return f"not a feature-cache file (no column {', '.join(missing)})"
            if matches is None:  # no checksum to trust: decode every page
                for _ in parquet.iter_batches():
                    pass
        finally:
            parquet.close()
    except (OSError, ValueError, pa.ArrowException) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        return f"not readable Parquet: {first[:160]}"
    return None


def _matches_checksum(path: str) -> bool | None:
    """Whether ``path`` matches Hadoop's checksum file beside it (CRC32 of each chunk); None when
    there is no usable one (Hadoop's reader ignores a checksum file without its header too)."""
    folder, name = os.path.split(path)
    try:
        with open(os.path.join(folder, f".{name}.crc"), "rb") as f:
            header, expected = f.read(8), f.read()
    except OSError:
        return None
    chunk = int.from_bytes(header[4:8], "big") if len(header) == 8 and header[:4] == _CRC_MAGIC else 0
    if chunk <= 0:
        return None
    sums = bytearray()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk * 2048):
                view = memoryview(block)
                for i in range(0, len(block), chunk):
                    sums += zlib.crc32(view[i:i + chunk]).to_bytes(4, "big")
    except OSError:
        return None  # the Parquet check names the reason
    return bytes(sums) == expected


def set_aside(part: str, reason: str, log=print) -> None:
    """Move a damaged part to ``<cache_dir>/quarantine/<key>/`` (never delete it) and say so."""
    folder = os.path.dirname(part)
    dest = os.path.join(os.path.dirname(folder), QUARANTINE, os.path.basename(folder), os.path.basename(part))
    if os.path.exists(dest):
        dest += f"-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(part, dest)
    except FileNotFoundError:
        return  # another run set it aside first
    except OSError as exc:
        raise DataError(f"feature cache part {part} is damaged ({reason}) and cannot be moved aside "
                        f"({exc.strerror}): move or delete it, then run again") from None
    log(f"feature cache: part {part} is damaged ({reason}): moved to {dest}; its images are featurized again")


# --------------------------------------------------------------------------- what killed or failed runs left


def remove_killed_runs_parts(cache_dir: str, log=print) -> None:
    """Remove the temporary parts of killed runs (a running run's stay) and empty cache folders."""
    if not os.path.isdir(cache_dir):
        return
    removed = []
    for entry in sorted(os.listdir(cache_dir)):
        folder = os.path.join(cache_dir, entry)
        if entry == QUARANTINE or not os.path.isdir(folder) or os.path.islink(folder):
            continue
        removed += remove_orphans(folder)
        try:
            os.rmdir(folder)  # only when empty: a failed or killed run's, or one emptied just now
        except OSError:
            pass
    if removed:
        more = f" and {len(removed) - 5} more" if len(removed) > 5 else ""
        log(f"feature cache: removed {len(removed)} temporary part(s) left by an interrupted run: "
            f"{', '.join(removed[:5])}{more}")


@contextmanager
def removed_if_left_empty(folder: str) -> Iterator[None]:
    """On failure, remove ``folder`` and the parents this block created, if they are still empty."""
    created = []
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        created.append(path)
        path = os.path.dirname(path)
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            try:
                os.rmdir(path)
            except OSError:
                break
        raise
