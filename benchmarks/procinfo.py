"""Processes as Linux's ``/proc`` shows them: the process tree, names, memory and CPU time.

The one copy of this walking, for the benchmarks' memory samplers and for the tests that kill a
cluster worker with its executors. Off Linux the tree comes from ``ps``; memory and CPU read as
None there.
"""

from __future__ import annotations

import os
import subprocess

HAVE_PROC = os.path.isdir("/proc/self")


def children() -> dict[int, list[int]]:
    """Parent pid -> child pids, of every process."""
    tree: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        tree.setdefault(parent, []).append(pid)
    return tree


def _parents() -> dict[int, int]:
    if not HAVE_PROC:
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=False).stdout
        return {int(f[0]): int(f[1]) for f in (line.split() for line in out.splitlines())
                if len(f) == 2 and f[0].isdigit() and f[1].isdigit()}
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                parents[int(entry)] = int(fields[1])
    return parents


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    tree = children() if tree is None else tree
    found, level = [], list(tree.get(pid, []))
    while level:
        found += level
        level = [child for p in level for child in tree.get(p, [])]
    return found


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name: state, parent pid, ... (empty when gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def comm(pid: int) -> str:
    """The process' name (``java``, ``python3.11``...), or "" when it is gone."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def status_kib(pid: int, field: str) -> int | None:
    """A memory field of ``/proc/PID/status`` in KiB (``VmRSS``, ``VmHWM``: the peak)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process."""
    fields = _stat_fields(pid)
    try:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (ValueError, IndexError):
        return None


def machine_cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def alive(pid: int) -> bool:
    """Running: neither gone nor a zombie."""
    if not HAVE_PROC:
        out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, check=False)
        return out.stdout.strip()[:1] not in ("", "Z", "X")
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")
