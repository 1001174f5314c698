"""A real Spark standalone cluster on 127.0.0.1, for trying cluster mode on one machine.

``./wrapper.sh cluster start [--workers N]`` starts a master and N workers from the Spark that
pyspark ships (``pyspark/bin/spark-class``), each a background JVM in its own process group, with
its pid file, log and work folder under ``.cluster/`` (in the current folder). ``run <experiment>
--set spark.master=spark://127.0.0.1:7077`` then runs there. ``cluster stop`` ends every process
of the cluster (executors and their Python workers included); ``cluster status`` lists them.

The cluster processes run without the caller's ``PYTHONPATH``: executors get the project's code
only the way a real cluster gets it, from the zip the driver ships (:mod:`xray.session`).

Settings (environment variables, so that tests and users can run a second cluster beside one on
the default ports): ``XRAY_CLUSTER_PORT`` (7077), ``XRAY_CLUSTER_WEBUI_PORT`` (8080),
``XRAY_CLUSTER_WORKER_CORES`` (1), ``XRAY_CLUSTER_WORKER_MEMORY`` (2g), ``XRAY_CLUSTER_DIR``
(``.cluster``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from .atomic import write_json_atomic
from .errors import UserError

HOST = "127.0.0.1"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
STATE_FILE = "cluster.json"
START_TIMEOUT_S = 120.0


class ClusterError(UserError):
    pass


def _env_int(name: str, default: int, minimum: int, maximum: int = 1 << 16) -> int:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if not minimum <= value <= maximum:
        raise ClusterError(f"{name}={raw!r}: expected a whole number from {minimum} to {maximum}")
    return value


@dataclass(frozen=True)
class ClusterSettings:
    """Where the cluster lives and how it is sized."""

    state_dir: str = ".cluster"
    port: int = 7077
    webui_port: int = 8080
    worker_cores: int = 1
    worker_memory: str = "2g"

    def __post_init__(self) -> None:
        # Absolute: the path is matched against the command lines of running workers.
        object.__setattr__(self, "state_dir", os.path.abspath(self.state_dir))

    @classmethod
    def from_env(cls) -> "ClusterSettings":
        memory = os.environ.get("XRAY_CLUSTER_WORKER_MEMORY", "").strip() or cls.worker_memory
        if not memory[:-1].isdigit() or memory[-1].lower() not in "mg":
            raise ClusterError(f"XRAY_CLUSTER_WORKER_MEMORY={memory!r}: expected a size such as 2g or 1536m")
        return cls(
            state_dir=os.environ.get("XRAY_CLUSTER_DIR", "").strip() or cls.state_dir,
            port=_env_int("XRAY_CLUSTER_PORT", cls.port, 1, 65535),
            webui_port=_env_int("XRAY_CLUSTER_WEBUI_PORT", cls.webui_port, 1, 65535),
            worker_cores=_env_int("XRAY_CLUSTER_WORKER_CORES", cls.worker_cores, 1),
            worker_memory=memory,
        )

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    @property
    def webui_url(self) -> str:
        return f"http://{HOST}:{self.webui_port}"

    def pid_file(self, name: str) -> str:
        return os.path.join(self.state_dir, f"{name}.pid")

    def log_file(self, name: str) -> str:
        return os.path.join(self.state_dir, "logs", f"{name}.log")

    def work_dir(self, name: str) -> str:
        return os.path.join(self.state_dir, "work", name)


def spark_home() -> str:
    """The Spark that pyspark ships: the same version as the driver's."""
    import pyspark

    home = os.path.dirname(os.path.abspath(pyspark.__file__))
    if not os.path.isfile(os.path.join(home, "bin", "spark-class")):
        raise ClusterError(f"{home} has no bin/spark-class: reinstall pyspark (./wrapper.sh env-setup --force)")
    return home


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process (Linux /proc, else ``ps``)."""
    table: dict[int, tuple[int, str]] = {}
    if os.path.isdir("/proc/self"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(entry)] = (int(fields[1]), fields[0])
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,stat="], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = (int(parts[1]), parts[2][0])
    return table


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        pass
    out = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _alive(pid: int) -> bool:
    """Running (not a zombie). Reaps the process when it is a child of this one."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = _proc_table().get(pid, (0, "?"))[1]
    return state not in ("Z", "X")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (executors, Python daemons and workers), deepest last."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in _proc_table().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to ``pid``'s process group and to each of its descendants; the pids signalled."""
    targets = [pid, *_descendants(pid)]
    try:
        os.killpg(pid, sig)  # started with start_new_session: the group id is the pid
    except (ProcessLookupError, PermissionError):
        pass
    for target in targets:
        try:
            os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return targets


def _terminate(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process tree, then SIGKILL whatever is left after ``timeout`` seconds."""
    targets = _signal_tree(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in targets):
        time.sleep(0.2)
    for p in targets:
        if _alive(p):
            _signal_tree(p, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in targets):
        time.sleep(0.1)


def _read_pid(settings: ClusterSettings, name: str) -> int | None:
    try:
        with open(settings.pid_file(name), encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _running_pid(settings: ClusterSettings, name: str) -> int | None:
    """The pid in ``name``'s pid file when that process is alive and is this cluster's JVM."""
    pid = _read_pid(settings, name)
    if pid is None or not _alive(pid):
        return None
    cmd = _cmdline(pid)
    if name == "master":
        ours = MASTER_CLASS in cmd and f"--host {HOST}" in cmd
    else:
        ours = WORKER_CLASS in cmd and settings.work_dir(name) in cmd
    return pid if ours else None


def _running_settings(settings: ClusterSettings) -> tuple[ClusterSettings, int | None]:
    """``settings`` with the ports of the master running from its folder (if any), and its pid."""
    pid = _running_pid(settings, "master")
    if pid is None:
        return settings, None
    args = _cmdline(pid).split()
    ports = {}
    for option in ("--port", "--webui-port"):
        if option in args[:-1] and args[args.index(option) + 1].isdigit():
            ports[option] = int(args[args.index(option) + 1])
    return replace(
        settings, port=ports.get("--port", settings.port), webui_port=ports.get("--webui-port", settings.webui_port)
    ), pid


def _write_pid(settings: ClusterSettings, name: str, pid: int) -> None:
    tmp = settings.pid_file(name) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, settings.pid_file(name))


def _worker_names(settings: ClusterSettings) -> list[str]:
    """Workers with a pid file, in index order."""
    if not os.path.isdir(settings.state_dir):
        return []
    names = [n[: -len(".pid")] for n in os.listdir(settings.state_dir) if n.startswith("worker-") and n.endswith(".pid")]
    return sorted(names, key=lambda n: int(n.split("-", 1)[1]) if n.split("-", 1)[1].isdigit() else 0)


@contextmanager
def _locked(settings: ClusterSettings) -> Iterator[None]:
    """Serialize start and stop of one cluster folder across processes."""
    os.makedirs(settings.state_dir, exist_ok=True)
    with open(os.path.join(settings.state_dir, ".lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _spawn(settings: ClusterSettings, name: str, args: list[str], extra_env: dict[str, str]) -> int:
    home = spark_home()
    env = dict(os.environ)
    # Executors inherit the worker's environment: without this they could import the project
    # from the caller's PYTHONPATH and never prove that the shipped code zip works.
    env.pop("PYTHONPATH", None)
    env.update(
        SPARK_HOME=home,
        SPARK_LOCAL_IP=HOST,
        SPARK_LOG_DIR=os.path.join(settings.state_dir, "logs"),
        SPARK_DAEMON_MEMORY=os.environ.get("SPARK_DAEMON_MEMORY", "512m"),
        **extra_env,
    )
    os.makedirs(os.path.dirname(settings.log_file(name)), exist_ok=True)
    with open(settings.log_file(name), "ab") as log:
        proc = subprocess.Popen(
            [os.path.join(home, "bin", "spark-class"), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=settings.state_dir,
            start_new_session=True,  # its own process group: stop ends it with its children
        )
    _write_pid(settings, name, proc.pid)
    return proc.pid


def _log_tail(settings: ClusterSettings, name: str, lines: int = 5) -> str:
    try:
        with open(settings.log_file(name), encoding="utf-8", errors="replace") as f:
            tail = [line.strip() for line in f.readlines()[-lines:] if line.strip()]
    except OSError:
        return ""
    return " | ".join(tail)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM does: TIME_WAIT is fine
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def master_state(settings: ClusterSettings, timeout: float = 2.0) -> dict | None:
    """The master's own JSON (``/json``: workers and applications), or None when it does not answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(f"{settings.webui_url}/json/", timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def alive_workers(state: dict | None) -> list[dict]:
    return [w for w in (state or {}).get("workers", []) if w.get("state") == "ALIVE"]


def _wait(
    what: str, ready: Callable[[], bool], settings: ClusterSettings, watched: list[str], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name in watched:
            if _running_pid(settings, name) is None:
                raise ClusterError(
                    f"Spark {name} exited while waiting for {what}: see {settings.log_file(name)} "
                    f"({_log_tail(settings, name)})"
                )
        if time.monotonic() > deadline:
            raise ClusterError(
                f"timed out after {timeout:.0f} s waiting for {what}: see the logs in "
                f"{os.path.join(settings.state_dir, 'logs')}"
            )
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# start / stop / status
# ---------------------------------------------------------------------------------------------
def start(workers: int, settings: ClusterSettings | None = None, log: Callable[[str], None] = print) -> str:
    """Start the master and workers 1..``workers`` that are not running yet; the master URL.

    Idempotent: running processes are kept. Waits until the master reports ``workers`` alive.
    """
    settings = settings or ClusterSettings.from_env()
    if workers < 1:
        raise ClusterError(f"--workers {workers}: expected at least 1")
    home = spark_home()
    with _locked(settings):
        state_path = os.path.join(settings.state_dir, STATE_FILE)
        running_settings, master = _running_settings(settings)
        if master is not None and running_settings != settings:
            raise ClusterError(
                f"the cluster of {settings.state_dir} already runs at {running_settings.master_url} "
                f"(web UI port {running_settings.webui_port}): stop it first (./wrapper.sh cluster stop), "
                f"or use another XRAY_CLUSTER_DIR"
            )
        if master is None:
            for port, option in ((settings.port, "XRAY_CLUSTER_PORT"), (settings.webui_port, "XRAY_CLUSTER_WEBUI_PORT")):
                if not _port_free(port):
                    raise ClusterError(
                        f"port {port} on {HOST} is in use (another Spark master or program?): stop it, "
                        f"or pick another port with {option}=PORT"
                    )
            _spawn(
                settings,
                "master",
                [MASTER_CLASS, "--host", HOST, "--port", str(settings.port), "--webui-port", str(settings.webui_port)],
                # Fail rather than silently moving to the next port.
                {"SPARK_MASTER_OPTS": f"-Dspark.port.maxRetries=0 {os.environ.get('SPARK_MASTER_OPTS', '')}".strip()},
            )
            write_json_atomic(
                state_path,
                {"master_url": settings.master_url, "webui_url": settings.webui_url, "spark_home": home},
            )
            _wait("the master", lambda: master_state(settings) is not None, settings, ["master"], START_TIMEOUT_S)
            log(f"started Spark master {settings.master_url} (web UI {settings.webui_url})")
        else:
            log(f"Spark master {settings.master_url} already running (pid {master})")

        names = [f"worker-{i}" for i in range(1, workers + 1)]
        for name in names:
            if _running_pid(settings, name) is not None:
                continue
            work = settings.work_dir(name)
            # A fresh worker starts with an empty work folder: earlier applications' folders hold
            # shipped files (code zip, weights copies of ~100 MB) and would pile up.
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(os.path.join(work, "local"), exist_ok=True)
            _spawn(
                settings,
                name,
                [
                    WORKER_CLASS, settings.master_url,
                    "--host", HOST,
                    "--cores", str(settings.worker_cores),
                    "--memory", settings.worker_memory,
                    "--work-dir", work,
                    "--webui-port", "0",  # any free port: never collides with a user's workers
                ],
                {"SPARK_LOCAL_DIRS": os.path.join(work, "local")},
            )
        running = [n for n in _worker_names(settings) if _running_pid(settings, n) is not None]
        want = max(workers, len(running))
        _wait(
            f"{want} alive worker(s) at {settings.master_url}",
            lambda: len(alive_workers(master_state(settings))) >= want,
            settings,
            ["master", *names],
            START_TIMEOUT_S,
        )
        if len(running) > workers:
            log(f"note: {len(running)} workers are running (asked for {workers}); the extra ones were left running")
        log(
            f"cluster ready: {want} worker(s) x {settings.worker_cores} core(s), {settings.worker_memory} each; "
            f"run with --set spark.master={settings.master_url}"
        )
    return settings.master_url


def cluster_pids(settings: ClusterSettings | None = None) -> list[int]:
    """Every running process of the cluster: master, workers, their executors and Python workers."""
    settings = settings or ClusterSettings.from_env()
    pids: list[int] = []
    for name in ["master", *_worker_names(settings)]:
        pid = _running_pid(settings, name)
        if pid is not None:
            pids += [pid, *_descendants(pid)]
    return pids


def kill_worker(name: str, settings: ClusterSettings | None = None) -> list[int]:
    """SIGKILL one worker with its executors and Python workers, as if its machine died."""
    settings = settings or ClusterSettings.from_env()
    pid = _running_pid(settings, name)
    if pid is None:
        raise ClusterError(f"{name} is not running in {settings.state_dir}")
    return _signal_tree(pid, signal.SIGKILL)


def stop(settings: ClusterSettings | None = None, log: Callable[[str], None] = print) -> int:
    """Stop every worker, then the master; removes their pid files. The number stopped."""
    settings = settings or ClusterSettings.from_env()
    if not os.path.isdir(settings.state_dir):
        log(f"no cluster in {settings.state_dir}")
        return 0
    stopped = 0
    with _locked(settings):
        for name in [*_worker_names(settings), "master"]:
            pid = _running_pid(settings, name)
            if pid is not None:
                _terminate(pid)
                stopped += 1
                log(f"stopped {name} (pid {pid})")
            try:
                os.remove(settings.pid_file(name))
            except FileNotFoundError:
                pass
        try:
            os.remove(os.path.join(settings.state_dir, STATE_FILE))
        except FileNotFoundError:
            pass
    if not stopped:
        log("no cluster process was running")
    return stopped


def status(settings: ClusterSettings | None = None, log: Callable[[str], None] = print) -> bool:
    """Print the cluster's processes and what the master reports; True when the master runs."""
    settings, master = _running_settings(settings or ClusterSettings.from_env())
    if master is None:
        log(f"no Spark master running for {settings.state_dir} (start one: ./wrapper.sh cluster start)")
    else:
        log(f"master    pid {master:<8} {settings.master_url}  web UI {settings.webui_url}")
    for name in _worker_names(settings):
        pid = _running_pid(settings, name)
        log(f"{name:<9} {'pid ' + str(pid) if pid else 'not running':<12} log {settings.log_file(name)}")
    state = master_state(settings) if master is not None else None
    if state is not None:
        alive = alive_workers(state)
        log(
            f"master reports {len(alive)} alive worker(s), {sum(int(w.get('cores', 0)) for w in alive)} core(s), "
            f"{len(state.get('activeapps', []))} running application(s)"
        )
    return master is not None


def run_cluster(action: str, workers: int = 2) -> int:
    """``cluster start|stop|status``: the exit code (status: 0 running, 1 not running)."""
    if action == "start":
        start(workers)
        return 0
    if action == "stop":
        stop()
        return 0
    if action == "status":
        return 0 if status() else 1
    raise ClusterError(f"unknown cluster action {action!r}: expected start, stop or status")
