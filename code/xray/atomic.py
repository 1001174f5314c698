"""Atomic output, the one writer of every file and folder the app produces: write next to the
destination, then rename. Readers see the old version or the new one, never half of one; a
failure leaves the old version and no temporary file or folder behind.

A process killed mid-write cannot clean up: its temporary stays. Each temporary's name carries
its owner (``.tmp-<host>.<boot>.<pid>.<start time>-...``), so :func:`remove_orphans` removes
exactly those whose process is gone and never one a running process (another run) still writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from typing import IO, Any, Iterator

TEMP_PREFIX = ".tmp-"
_OWNED = re.compile(r"^\.tmp-([0-9a-f]{8})\.([0-9a-f]{8})\.(\d+)\.(\d+)-")
_owner_tags: dict[int, str] = {}  # pid -> tag (a forked Spark worker gets its own)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _host_and_boot() -> tuple[str, str]:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return _digest(socket.gethostname()), _digest(boot)


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot; Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_tag() -> str:
    """This process, as temporaries name their owner: host, boot, pid and start time."""
    pid = os.getpid()
    if pid not in _owner_tags:
        host, boot = _host_and_boot()
        _owner_tags[pid] = f"{host}.{boot}.{pid}.{_start_time(pid) or 0}"
    return _owner_tags[pid]


def _owner_gone(name: str) -> bool:
    """True when ``name`` is a temporary whose owner process has ended (on this host, in this boot
    or an earlier one). Temporaries of other hosts, and names without an owner, are never judged."""
    match = _OWNED.match(name)
    if not match:
        return False
    host, boot, pid, start = match.groups()
    this_host, this_boot = _host_and_boot()
    if host != this_host:
        return False
    if boot != this_boot:
        return True
    now = _start_time(int(pid))
    if now is not None:
        return now != start
    try:
        os.kill(int(pid), 0)  # no /proc: whether a process with that pid runs at all
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def remove_orphans(folder: str, recursive: bool = False) -> list[str]:
    """Remove the temporaries in ``folder`` (and its sub-folders with ``recursive``) that killed
    processes left; returns their paths. A temporary of a running process is never touched."""
    removed = []
    for dirpath, dirnames, names in os.walk(folder):
        for name in sorted(dirnames + names):
            if _owner_gone(name):
                path = os.path.join(dirpath, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    _unlink(path)
                if not os.path.lexists(path):
                    removed.append(path)
        dirnames[:] = sorted(d for d in dirnames if recursive and not d.startswith(TEMP_PREFIX))
    return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # another run removed it first
        pass


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
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{owner_tag()}-", suffix=os.path.splitext(path)[1])
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
        if os.path.isdir(os.path.dirname(self.dest)):
            remove_orphans(os.path.dirname(self.dest))  # staging folders of killed runs beside it
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
    """(temporary name, name for the old version) beside ``dest``, unique to this call; both name
    their owner (:func:`owner_tag`), so :func:`remove_orphans` can tell a killed run's leftovers."""
    parent = os.path.dirname(os.path.abspath(dest))
    token = f"{owner_tag()}-{os.path.basename(dest)}-{uuid.uuid4().hex}"
    return os.path.join(parent, f"{TEMP_PREFIX}{token}"), os.path.join(parent, f".old-{token}")


def owned_path(dest: str) -> str:
    """A path beside ``dest`` (not created) for a temporary that another program writes (e.g. a
    JVM), named for this process as the others are: once it is gone, :func:`remove_orphans` of
    the folder removes what was left there."""
    return _beside(dest)[0]


@contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """Hold ``folder``'s lock file (``.lock``; the folder is made) while other processes holding
    it wait. Without ``fcntl`` (not POSIX) there is no lock."""
    os.makedirs(folder, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(folder, ".lock"), "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def owned_folder(beside: str, what: str) -> str:
    """A new folder beside ``beside`` for temporary files, named for its owner as a staging folder
    is (``.tmp-<owner>-<name>-<what>-...``): once its process is gone, :func:`remove_orphans` of
    that folder (e.g. the next :class:`StagedFolder` there) removes it."""
    tmp, _ = _beside(f"{os.path.abspath(beside)}-{what}")
    os.makedirs(tmp)
    return tmp


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
