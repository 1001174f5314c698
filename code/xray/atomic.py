"""Atomic output, the one writer of every file and folder the app produces: write next to the
destination, then rename. Readers see the old version or the new one, never half of one; a
failure leaves the old version and no temporary file or folder behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import IO, Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` (with the usual
    permissions, not mkstemp's 0600), on any error it is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_json_atomic(path: str, data: Any) -> None:
    """JSON (indented, keys in order, anything else as ``str``) written atomically."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


class StagedFolder:
    """A whole folder written under a temporary name beside ``dest`` (``path``, made on first
    use) and put in place of ``dest`` by :meth:`commit`, or removed by :meth:`discard`. Readers
    of ``dest`` see the old folder or the new one, never a mix of both; a process killed before
    the commit leaves ``dest`` as it was (and the ``.tmp-`` folder, for a later clean-up)."""

    def __init__(self, dest: str) -> None:
        self.dest = os.path.abspath(dest)
        self._tmp, self._old = _beside(self.dest)
        self._made_parent = False

    @property
    def path(self) -> str:
        if not os.path.isdir(self._tmp):
            parent = os.path.dirname(self.dest)
            self._made_parent = self._made_parent or not os.path.isdir(parent)
            os.makedirs(self._tmp)
        return self._tmp

    def commit(self) -> None:
        _swap_in(self.path, self.dest, self._old)
        shutil.rmtree(self._old, ignore_errors=True)

    def discard(self) -> None:
        """Remove what was staged (and the parent folder when this made it and it is empty)."""
        shutil.rmtree(self._tmp, ignore_errors=True)
        if self._made_parent:
            try:
                os.rmdir(os.path.dirname(self.dest))
            except OSError:
                pass


def _beside(dest: str) -> tuple[str, str]:
    """(temporary name, name for the old version) beside ``dest``, unique to this call."""
    parent, base, token = os.path.dirname(os.path.abspath(dest)), os.path.basename(dest), uuid.uuid4().hex
    return os.path.join(parent, f".tmp-{base}-{token}"), os.path.join(parent, f".old-{base}-{token}")


@contextmanager
def atomic_folder(dest: str) -> Iterator[str]:
    """A path beside ``dest`` (not created) for the caller to write a whole folder into; on
    success it takes the place of ``dest``. An existing ``dest`` is moved aside first and put
    back when the swap fails, so a failure at any step leaves the old folder in place."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp, old = _beside(dest)
    try:
        yield tmp
        _swap_in(tmp, dest, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _swap_in(tmp: str, dest: str, old: str) -> None:
    """Rename ``tmp`` to ``dest``; a folder already at ``dest`` goes to ``old`` (restored on failure)."""
    if not os.path.exists(dest):
        os.replace(tmp, dest)
        return
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
