"""Paths as Spark sees them.

Spark's file readers (``spark.read.parquet``, ``PipelineModel.load``, ``binaryFile``) read a path
as a Hadoop glob: ``[1]``, ``{a,b}``, ``*``, ``?`` and ``\\`` in a folder name make them miss the
folder ("Path does not exist"). :func:`spark_literal` makes such a path mean itself; writers take
paths as they are. Rows name an image file by a ``file:`` URI, as Spark's ``binaryFile`` source
does: :func:`file_uri` and :func:`local_path` go there and back.
"""

from __future__ import annotations

import os

GLOB_CHARS = "\\[]{}*?"


def spark_literal(path: str) -> str:
    """``path`` for a Spark reader: every glob character escaped, so it names only itself."""
    return "".join("\\" + c if c in GLOB_CHARS else c for c in path)


def file_uri(path: str) -> str:
    """A local path as Spark's ``binaryFile`` source names it: ``file:`` and the absolute path, as is."""
    return "file:" + os.path.abspath(path)


def local_path(uri: str) -> str:
    """The local path of a ``file:`` URI (from :func:`file_uri` or ``binaryFile``); other strings as they are."""
    return os.path.normpath(uri[len("file:"):] if uri.startswith("file:") else uri)
