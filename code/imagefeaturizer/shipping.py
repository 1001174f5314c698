"""Files the driver hands to the Spark executors: the weights file and exported models.

- :func:`ship_file` (driver): the file's sha256, computed once per SparkContext and content, and
  off local mode the file shipped to every executor (``SparkContext.addFile``; each executor
  fetches it once).
- :func:`local_file` (worker): the file as this machine sees it, the driver's path when it is
  readable here, else the shipped copy; checked against the driver's sha256.
"""

from __future__ import annotations

import os
import socket
import weakref

from . import backbones

SHIP_WEIGHTS_CONF = "spark.imagefeaturizer.shipWeights"
"""Spark setting: ``false`` when a weights path is on storage every node reads (nothing shipped)."""

# Per SparkContext (dropped with it): (path, size, mtime) -> sha256, for files hashed (and shipped).
_SHIPPED: "weakref.WeakKeyDictionary[object, dict[tuple, str]]" = weakref.WeakKeyDictionary()


def ship_file(sc, path: str, ship: bool = True, sha256: str | None = None) -> str:
    """sha256 of ``path``, hashed once per SparkContext while the file stays the same (``sha256``:
    already known); off local mode, with ``ship``, the file is added to the context's files once."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    known = _SHIPPED.setdefault(sc, {})
    if key not in known:
        shipped_before = any(k[0] == path for k in known)
        known[key] = sha256 or backbones.file_sha256(path)
        if ship and not shipped_before and not sc.master.startswith("local"):
            sc.addFile(path)
    return known[key]


def ships_weights(sc) -> bool:
    """False when the Spark setting :data:`SHIP_WEIGHTS_CONF` is ``false``."""
    return sc.getConf().get(SHIP_WEIGHTS_CONF, "true").strip().lower() != "false"


def local_file(path: str, sha256: str | None, what: str, error: type[Exception] = backbones.WeightsError) -> str:
    """``path`` as this process sees it, checked against the driver's ``sha256``.

    The driver's path when it is readable here (same machine, or storage every node mounts at the
    same path), else the copy the driver shipped through SparkFiles. A missing file or one whose
    sha256 differs from the driver's raises ``error`` naming ``what`` and the fix.
    """
    host = socket.gethostname()
    local = path if os.path.isfile(path) else _shipped_copy(path)
    if not os.path.isfile(local):
        raise error(
            f"{what} {path} is not readable on {host} and no copy was shipped: put it "
            f"on storage every node reads at the same path, or let the driver ship it "
            f"({SHIP_WEIGHTS_CONF} unset or true)"
        )
    if sha256:
        actual = backbones.file_sha256(local)
        if actual != sha256:
            raise error(
                f"{what} {local} on {host} does not match the driver's copy (sha256 {actual[:16]}..., "
                f"driver {sha256[:16]}...): make every node read the same file, or let the driver "
                f"ship it"
            )
    return local


def _shipped_copy(path: str) -> str:
    """Where SparkFiles put the driver's copy of ``path`` here ("" outside Spark)."""
    from pyspark import SparkFiles

    try:
        return SparkFiles.get(os.path.basename(path))
    except Exception:  # noqa: BLE001 - no SparkFiles root: not in a Spark process
        return ""
