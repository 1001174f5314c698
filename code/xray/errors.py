"""Errors users can act on: each prints as one line, without a traceback, and exits non-zero."""

from __future__ import annotations

import re


class UserError(Exception):
    """Something the user can fix (config, data, paths, weights); str() is the whole message."""

    exit_code = 2


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


# Our own error types, as they appear in the last lines of a Python worker's traceback.
_WORKER_ERROR = re.compile(
    r"^(?:[\w.]+\.)?(InvalidImageError|WeightsError|WeightsUnavailableError|EngineError|ExportError|DataError): (.+)$", re.M
)


def worker_error_message(exc: BaseException) -> str | None:
    """The one-line message of a known error raised inside a Spark Python worker, if any."""
    text = str(exc)
    desc = getattr(exc, "desc", None) or getattr(exc, "getMessage", lambda: None)()
    if desc:
        text = f"{text}\n{desc}"
    matches = _WORKER_ERROR.findall(text)
    if not matches:
        return None
    kind, message = matches[-1]
    return f"{message.strip()}" if kind != "InvalidImageError" else f"invalid image: {message.strip()}"
