"""A real Spark standalone cluster on 127.0.0.1, for trying cluster mode on one machine.

``./wrapper.sh cluster start [--workers N]`` starts a master and N workers with Spark's own
daemon script, ``sbin/spark-daemon.sh`` of the Spark that pyspark ships (the same version as the
driver's): it writes the pid files, the logs (rotated) and starts and stops each daemon. Everything
lives under ``.cluster/`` (in the current folder). ``run <experiment> --set
spark.master=spark://127.0.0.1:7077`` then runs there. ``cluster stop`` stops the workers (each
worker ends its executors, whose Python workers follow), then the master; ``cluster status``
lists them.

What this module adds to the script: the settings below, checks before anything starts (Java
and ``ps`` found, ports free, one cluster per folder), waiting until the master's JSON status
shows the workers alive, waiting on ``stop`` until the daemons have exited, and a status summary.

The cluster processes run without the caller's ``PYTHONPATH``: executors get the project's code
only the way a real cluster gets it, from the zip the driver ships (:mod:`xray.session`).

Settings (environment variables, so that tests and users can run a second cluster beside one on
the default ports): ``XRAY_CLUSTER_PORT`` (7077), ``XRAY_CLUSTER_WEBUI_PORT`` (8080),
``XRAY_CLUSTER_WORKER_CORES`` (1), ``XRAY_CLUSTER_WORKER_MEMORY`` (2g), ``XRAY_CLUSTER_DIR``
(``.cluster``).
"""

from __future__ import annotations

import glob
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

from . import class_archive
from .atomic import folder_lock, write_json_atomic
from .errors import UserError

HOST = "127.0.0.1"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
IDENT = "xray"  # SPARK_IDENT_STRING: part of spark-daemon.sh's pid and log file names
STATE_FILE = "cluster.json"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


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

    @property
    def log_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    def work_dir(self, name: str) -> str:
        return os.path.join(self.state_dir, "work", name)

    def pid_file(self, name: str) -> str:
        """spark-daemon.sh's pid file of ``master`` or ``worker-N`` (SPARK_PID_DIR is the state folder)."""
        daemon_class, instance = _daemon_id(name)
        return os.path.join(self.state_dir, f"spark-{IDENT}-{daemon_class}-{instance}.pid")

    def log_file(self, name: str) -> str:
        """spark-daemon.sh's log of ``name`` (its name ends with the host name the script saw)."""
        daemon_class, instance = _daemon_id(name)
        pattern = os.path.join(self.log_dir, f"spark-{IDENT}-{daemon_class}-{instance}-*.out")
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
        return found[-1] if found else pattern


def _daemon_id(name: str) -> tuple[str, int]:
    """``master`` -> (Master class, 1); ``worker-N`` -> (Worker class, N): spark-daemon.sh's arguments."""
    if name == "master":
        return MASTER_CLASS, 1
    return WORKER_CLASS, int(name.split("-", 1)[1])


# ---------------------------------------------------------------------------------------------
# Spark's daemon script
# ---------------------------------------------------------------------------------------------
def spark_home() -> str:
    """The Spark that pyspark ships: the same version as the driver's."""
    import pyspark

    home = os.path.dirname(os.path.abspath(pyspark.__file__))
    if not os.path.isfile(os.path.join(home, "sbin", "spark-daemon.sh")):
        raise ClusterError(f"{home} has no sbin/spark-daemon.sh: reinstall pyspark (./wrapper.sh env-setup --force)")
    return home


def _check_tools() -> None:
    """Java as spark-class finds it (JAVA_HOME, else PATH), and ``ps``, which spark-daemon.sh uses."""
    java_home, java = os.environ.get("JAVA_HOME", "").strip(), class_archive.spark_java()
    if not java or not os.access(java, os.X_OK):
        where = f"JAVA_HOME={java_home} has no bin/java" if java_home else "no java on PATH"
        raise ClusterError(
            f"Java not found ({where}): Spark needs Java 17 or 21; install one "
            f"(e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
        )
    if shutil.which("ps") is None:
        raise ClusterError("no ps command: Spark's daemon script needs it; install procps")


def _daemon_env(settings: ClusterSettings, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # Executors inherit the worker's environment: without this they could import the project
    # from the caller's PYTHONPATH and never prove that the shipped code zip works.
    env.pop("PYTHONPATH", None)
    env.pop("SPARK_MASTER", None)  # spark-daemon.sh would rsync Spark from there
    env.pop("SPARK_NO_DAEMONIZE", None)  # it would run in the foreground, without a pid file
    env.update(
        SPARK_HOME=spark_home(),
        SPARK_IDENT_STRING=IDENT,
        SPARK_PID_DIR=settings.state_dir,
        SPARK_LOG_DIR=settings.log_dir,
        SPARK_LOCAL_IP=HOST,
        SPARK_DAEMON_MEMORY=os.environ.get("SPARK_DAEMON_MEMORY", "512m"),
        PYSPARK_PYTHONPATH_SET="1",  # spark-config.sh: no pyspark source folder (pip has none) on it
        **extra,
    )
    daemon_options = class_archive.with_archive(env.get("SPARK_DAEMON_JAVA_OPTS", ""), class_archive.archive_path())
    if daemon_options:  # the daemons start sooner
        env["SPARK_DAEMON_JAVA_OPTS"] = daemon_options
    return env


def _daemon(settings: ClusterSettings, action: str, name: str, args: tuple[str, ...] = (),
            extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``spark-daemon.sh ACTION CLASS N ARGS`` for ``name``, output captured."""
    daemon_class, instance = _daemon_id(name)
    script = os.path.join(spark_home(), "sbin", "spark-daemon.sh")
    return subprocess.Popen(
        ["bash", script, action, daemon_class, str(instance), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_daemon_env(settings, extra_env or {}), cwd=settings.state_dir,
        start_new_session=True,  # the daemons outlive this process and its terminal
    )


def _launch(settings: ClusterSettings, daemons: list[tuple[str, tuple[str, ...], dict[str, str]]]) -> None:
    """Start each ``(name, arguments, environment)`` at once; the script waits about 2 s for each JVM."""
    os.makedirs(settings.log_dir, exist_ok=True)
    started = [(name, _daemon(settings, "start", name, args, env)) for name, args, env in daemons]
    for name, proc in started:
        output = proc.communicate()[0].strip()
        if proc.returncode != 0 or "failed to launch" in output:
            raise ClusterError(
                f"Spark {name} did not start: see {settings.log_file(name)} "
                f"({' | '.join(output.splitlines()[-4:])})"
            )


def running_pid(settings: ClusterSettings, name: str) -> int | None:
    """The pid of ``name``'s JVM when spark-daemon.sh reports it running (pid file and a live java)."""
    try:
        with open(settings.pid_file(name), encoding="utf-8") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    proc = _daemon(settings, "status", name)
    proc.communicate()
    return pid if proc.returncode == 0 else None


def worker_names(settings: ClusterSettings) -> list[str]:
    """Workers with a pid file, in index order."""
    prefix, suffix = f"spark-{IDENT}-{WORKER_CLASS}-", ".pid"
    if not os.path.isdir(settings.state_dir):
        return []
    found = [n[len(prefix) : -len(suffix)] for n in os.listdir(settings.state_dir)
             if n.startswith(prefix) and n.endswith(suffix)]
    return [f"worker-{i}" for i in sorted(int(n) for n in found if n.isdigit())]


def _living(pids: list[int]) -> set[int]:
    """Those of ``pids`` that run (zombies excluded), as ``ps`` sees them."""
    if not pids:
        return set()
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-p", ",".join(map(str, pids))],
                         capture_output=True, text=True, check=False).stdout
    return {int(f[0]) for f in (line.split() for line in out.splitlines()) if len(f) == 2 and f[1][0] not in "ZX"}


def _wait_exit(pids: dict[str, int], log: Callable[[str], None]) -> None:
    """Wait until the stopped JVMs have exited; SIGKILL what is left after :data:`STOP_TIMEOUT_S`."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _living(list(pids.values())):
        time.sleep(0.2)
    left = _living(list(pids.values()))
    for name, pid in pids.items():
        if pid in left:
            os.kill(pid, signal.SIGKILL)
            log(f"{name} (pid {pid}) did not stop within {STOP_TIMEOUT_S:.0f} s: killed")


# ---------------------------------------------------------------------------------------------
# What the script lacks: locking, ports, the master's view
# ---------------------------------------------------------------------------------------------
@contextmanager
def _locked(settings: ClusterSettings) -> Iterator[None]:
    """Serialize start and stop of one cluster folder across processes."""
    with folder_lock(settings.state_dir):
        yield


def _recorded(settings: ClusterSettings) -> ClusterSettings:
    """``settings`` with the ports the cluster of its folder was started with (``cluster.json``)."""
    try:
        with open(os.path.join(settings.state_dir, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        return replace(settings, port=int(state["port"]), webui_port=int(state["webui_port"]))
    except (OSError, ValueError, KeyError, TypeError):
        return settings


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


def _wait(what: str, ready: Callable[[], bool], settings: ClusterSettings, watched: list[str]) -> None:
    """Until ``ready()``; a watched daemon that exits meanwhile, or :data:`START_TIMEOUT_S`, is an error."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        for name in watched:
            if running_pid(settings, name) is None:
                raise ClusterError(f"Spark {name} exited while waiting for {what}: see {settings.log_file(name)}")
        if time.monotonic() > deadline:
            raise ClusterError(
                f"timed out after {START_TIMEOUT_S:.0f} s waiting for {what}: see the logs in {settings.log_dir}"
            )
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# start / stop / status
# ---------------------------------------------------------------------------------------------
def _start_master(settings: ClusterSettings, log: Callable[[str], None]) -> None:
    """Start the master unless this folder's runs, on the same ports (else an error naming it)."""
    running, pid = _recorded(settings), running_pid(settings, "master")
    if pid is not None and running != settings:
        raise ClusterError(
            f"the cluster of {settings.state_dir} already runs at {running.master_url} "
            f"(web UI port {running.webui_port}): stop it first (./wrapper.sh cluster stop), "
            f"or use another XRAY_CLUSTER_DIR"
        )
    if pid is not None:
        log(f"Spark master {settings.master_url} already running (pid {pid})")
        return
    for port, option in ((settings.port, "XRAY_CLUSTER_PORT"), (settings.webui_port, "XRAY_CLUSTER_WEBUI_PORT")):
        if not _port_free(port):
            raise ClusterError(
                f"port {port} on {HOST} is in use (another Spark master or program?): stop it, "
                f"or pick another port with {option}=PORT"
            )
    write_json_atomic(
        os.path.join(settings.state_dir, STATE_FILE),
        {"master_url": settings.master_url, "webui_url": settings.webui_url, "port": settings.port,
         "webui_port": settings.webui_port, "spark_home": spark_home()},
    )
    args = ("--host", HOST, "--port", str(settings.port), "--webui-port", str(settings.webui_port))
    # Fail rather than silently moving to the next port.
    opts = f"-Dspark.port.maxRetries=0 {os.environ.get('SPARK_MASTER_OPTS', '')}".strip()
    _launch(settings, [("master", args, {"SPARK_MASTER_OPTS": opts})])
    _wait("the master", lambda: master_state(settings) is not None, settings, ["master"])
    log(f"started Spark master {settings.master_url} (web UI {settings.webui_url})")


def _start_workers(settings: ClusterSettings, names: list[str]) -> None:
    """Start those of ``names`` that are not running, each with an empty work folder of its own."""
    daemons = []
    for name in names:
        if running_pid(settings, name) is not None:
            continue
        work = settings.work_dir(name)
        # Earlier applications' folders hold shipped files (code zip, weights copies of ~100 MB).
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(os.path.join(work, "local"), exist_ok=True)
        args = (settings.master_url, "--host", HOST, "--cores", str(settings.worker_cores),
                "--memory", settings.worker_memory, "--work-dir", work,
                "--webui-port", "0")  # any free port: never collides with a user's workers
        daemons.append((name, args, {"SPARK_LOCAL_DIRS": os.path.join(work, "local")}))
    _launch(settings, daemons)


def start(workers: int, settings: ClusterSettings | None = None, log: Callable[[str], None] = print) -> str:
    """Start the master and workers 1..``workers`` that are not running yet; the master URL.

    Idempotent: running processes are kept. Waits until the master reports ``workers`` alive.
    """
    settings = settings or ClusterSettings.from_env()
    if workers < 1:
        raise ClusterError(f"--workers {workers}: expected at least 1")
    _check_tools()
    with _locked(settings):
        _start_master(settings, log)
        names = [f"worker-{i}" for i in range(1, workers + 1)]
        _start_workers(settings, names)
        running = [n for n in worker_names(settings) if running_pid(settings, n) is not None]
        want = max(workers, len(running))
        _wait(f"{want} alive worker(s) at {settings.master_url}",
              lambda: len(alive_workers(master_state(settings))) >= want, settings, ["master", *names])
        if len(running) > workers:
            log(f"note: {len(running)} workers are running (asked for {workers}); the extra ones were left running")
        log(
            f"cluster ready: {want} worker(s) x {settings.worker_cores} core(s), {settings.worker_memory} each; "
            f"run with --set spark.master={settings.master_url}"
        )
    return settings.master_url


def _stop_daemons(settings: ClusterSettings, names: list[str], log: Callable[[str], None]) -> int:
    """``spark-daemon.sh stop`` for each of ``names`` at once, then wait for them; the number stopped."""
    pids = {name: pid for name in names if (pid := running_pid(settings, name)) is not None}
    for name in pids:
        _daemon(settings, "stop", name).communicate()
    _wait_exit(pids, log)
    for name in names:
        if name in pids:
            log(f"stopped {name} (pid {pids[name]})")
        try:  # the script leaves the pid file of a daemon that had died
            os.remove(settings.pid_file(name))
        except FileNotFoundError:
            pass
    return len(pids)


def stop(settings: ClusterSettings | None = None, log: Callable[[str], None] = print) -> int:
    """Stop every worker (each ends its executors), then the master. The number stopped."""
    settings = settings or ClusterSettings.from_env()
    if not os.path.isdir(settings.state_dir):
        log(f"no cluster in {settings.state_dir}")
        return 0
    with _locked(settings):
        stopped = _stop_daemons(settings, worker_names(settings), log)
        stopped += _stop_daemons(settings, ["master"], log)
        try:
            os.remove(os.path.join(settings.state_dir, STATE_FILE))
        except FileNotFoundError:
            pass
    if not stopped:
        log("no cluster process was running")
    return stopped


def status(settings: ClusterSettings | None = None, log: Callable[[str], None] = print) -> bool:
    """Print the cluster's processes and what the master reports; True when the master runs."""
    settings = _recorded(settings or ClusterSettings.from_env())
    master = running_pid(settings, "master")
    if master is None:
        log(f"no Spark master running for {settings.state_dir} (start one: ./wrapper.sh cluster start)")
    else:
        log(f"master    pid {master:<8} {settings.master_url}  web UI {settings.webui_url}")
    for name in worker_names(settings):
        pid = running_pid(settings, name)
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
