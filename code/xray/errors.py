"""Errors users can act on: each prints as one line, without a traceback, and exits non-zero."""

from __future__ import annotations

import re

from imagefeaturizer.backbones import WeightsError


LOG_FOLDER = "logs"
"""Inside results_dir: the command line's log files and a sweep's tracebacks of failed experiments."""


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
# Any error line of a Python traceback ("module.SomeError: message").
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$", re.M)


def _text(exc: BaseException) -> str:
    """All an exception says: its str() and, for errors Spark hands over, the Java side's text."""
    text = str(exc)
    desc = getattr(exc, "desc", None) or getattr(exc, "getMessage", lambda: None)()
    return f"{text}\n{desc}" if desc else text


def worker_error_message(exc: BaseException) -> str | None:
    """The one-line message of a known error raised inside a Spark Python worker, if any."""
    matches = _WORKER_ERROR.findall(_text(exc))
    if not matches:
        return None
    kind, message = matches[-1]
    return f"{message.strip()}" if kind != "InvalidImageError" else f"invalid image: {message.strip()}"


def user_message(exc: BaseException) -> str | None:
    """The message of an error the user can fix (ours, the weights', or one of them raised inside
    a Spark worker); None for anything else."""
    if isinstance(exc, (UserError, WeightsError)):
        return str(exc)
    return worker_error_message(exc)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The reason of any failure, as one line: a user-fixable error's message; for an error from
    inside Spark, the last Python error line of the worker's traceback (else the Java error);
    otherwise the type and the first line."""
    message = user_message(exc)
    if message:
        return message
    text = _text(exc)
    _, traceback_seen, worker = text.rpartition("Traceback (most recent call last)")
    found = _ERROR_LINE.findall(worker if traceback_seen else text)
    if found:
        kind, first = found[-1] if traceback_seen else found[0]
        line = f"{kind.rsplit('.', 1)[-1]}: {first.strip()}"
    else:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
