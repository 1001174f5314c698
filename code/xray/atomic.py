"""Atomic file output: write next to the destination, then rename; readers never see half a file."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator


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


def write_json_atomic(path: str, data) -> None:
    """JSON (indented, one trailing newline), written beside ``path`` and renamed over it."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
