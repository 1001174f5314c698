"""What the driver sends to Spark's Python workers: weights files and, when needed, this package.

Both go through ``SparkSession.addArtifacts`` (Spark Connect's artifact API; in classic mode
pyspark forwards it to ``SparkContext.addFile`` / ``addPyFile``), once per Spark Connect session
or classic application, so the library needs no SparkContext and no JVM:

- :func:`weights_sha256`: the sha256 of a weights file on the driver, and the file shipped under
  :func:`imagefeaturizer.runtime.shipped_name` where workers may not read the driver's path: on
  Spark Connect always (the server may be another machine), in classic mode off local mode, unless
  the Spark setting ``spark.imagefeaturizer.shipWeights`` is ``false`` (shared storage).
- :func:`ship_file`: the same for any file workers need, e.g. an exported model's files.
- :func:`ensure_package`: a zip of this package, as a Python dependency, where the workers may
  not import it: on Spark Connect always, in classic mode when this package is neither installed
  (site-packages) nor on the workers' ``PYTHONPATH`` (local mode), e.g. loaded from an MLflow
  model's ``code/`` folder in a fresh process. An application that ships its own code tells
  :func:`mark_package_shipped`.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import site
import tempfile
import threading
import zipfile

from . import backbones
from .runtime import SHIP_WEIGHTS_CONF, shipped_name

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.basename(PACKAGE_DIR)

_LOCK = threading.Lock()
_FILES: dict[tuple, dict[tuple, str]] = {}  # session key -> {(path, size, mtime): sha256} hashed (and shipped)
_PACKAGE_SHIPPED: set[tuple] = set()  # session keys whose workers import this package
_folder: str | None = None  # this process's files to ship (Spark serves them while it runs)


def is_connect(spark) -> bool:
    """True for a Spark Connect session (a thin client: no SparkContext, no JVM here)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def session_key(spark) -> tuple:
    """What shipped artifacts belong to: a Spark Connect session, or a classic application."""
    if is_connect(spark):
        return ("connect", spark.session_id)
    return ("classic", spark.conf.get("spark.app.id"))


def weights_sha256(spark, path: str) -> str:
    """The sha256 of the weights file ``path`` on the driver, hashed and shipped once per session."""
    return ship_file(spark, path)


def ship_file(spark, path: str, sha256: str | None = None, name: str | None = None) -> str:
    """The sha256 of ``path`` (hashed unless given), and the file shipped once per session where
    workers may not read the driver's path, under ``name`` (default :func:`shipped_name`: sha256
    prefix and file name). Files that must sit side by side (an exported model's graph and
    weights) keep their own unique names. A file written again under the same path (a trained
    model saved anew) is hashed and shipped again. Workers find it with
    :func:`imagefeaturizer.runtime.local_file`."""
    stat = os.stat(path)
    version = (path, stat.st_size, stat.st_mtime_ns)
    with _LOCK:
        known = _FILES.setdefault(session_key(spark), {})
        if version not in known:
            sha = sha256 or backbones.file_sha256(path)
            if _ships_files(spark):
                spark.addArtifacts(_named_link(path, name or shipped_name(path, sha)), file=True)
            known[version] = sha
        return known[version]


def _ships_files(spark) -> bool:
    if spark.conf.get(SHIP_WEIGHTS_CONF, "true").strip().lower() == "false":
        return False
    return is_connect(spark) or not spark.conf.get("spark.master", "local").startswith("local")


def ensure_package(spark) -> bool:
    """Ship this package to the workers once per session where they may not import it; True when
    it shipped now."""
    key = session_key(spark)
    with _LOCK:
        if key in _PACKAGE_SHIPPED:
            return False
        _PACKAGE_SHIPPED.add(key)
        if not is_connect(spark) and _workers_import_package(spark):
            return False
        spark.addArtifacts(package_zip(), pyfile=True)
        return True


def mark_package_shipped(spark) -> None:
    """The application shipped this package itself (e.g. inside a zip of all its code)."""
    with _LOCK:
        _PACKAGE_SHIPPED.add(session_key(spark))


def _workers_import_package(spark) -> bool:
    """Classic mode: installed in site-packages, or local mode with this package's folder on the
    workers' ``PYTHONPATH`` (inherited, or ``spark.executorEnv.PYTHONPATH``)."""
    root = os.path.realpath(os.path.dirname(PACKAGE_DIR))
    installed = [*site.getsitepackages(), site.getusersitepackages()]
    if any(_same_dir(root, d) for d in installed):
        return True
    if not spark.conf.get("spark.master", "local").startswith("local"):
        return False
    paths = [*os.environ.get("PYTHONPATH", "").split(os.pathsep),
             *spark.conf.get("spark.executorEnv.PYTHONPATH", "").split(os.pathsep)]
    return any(p and _same_dir(root, p) for p in paths)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def package_zip() -> str:
    """This package's Python files as one zip, named by their content (built once per process)."""
    files = []
    for dirpath, dirnames, names in os.walk(PACKAGE_DIR):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        files += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(".py")]
    digest = hashlib.sha256()
    for full in files:
        digest.update(os.path.relpath(full, PACKAGE_DIR).encode())
        with open(full, "rb") as f:
            digest.update(f.read())
    path = os.path.join(_ship_folder(), f"{PACKAGE}-{digest.hexdigest()[:16]}.zip")
    if not os.path.exists(path):
        with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as zf:
            for full in files:
                zf.write(full, os.path.join(PACKAGE, os.path.relpath(full, PACKAGE_DIR)))
        os.replace(path + ".tmp", path)
    return path


def _named_link(path: str, name: str) -> str:
    """``path`` under the file name ``name`` (a hard link, else a copy), for shipping. Not a
    symbolic link: Spark's ``addFile`` resolves one and ships the file under its target's name."""
    link = os.path.join(_ship_folder(), name)
    if not os.path.lexists(link):
        try:
            os.link(os.path.abspath(path), link)
        except OSError:  # another file system, or no hard links there
            shutil.copyfile(path, link)
    return link


def _ship_folder() -> str:
    global _folder
    if _folder is None:
        _folder = tempfile.mkdtemp(prefix=f"{PACKAGE}-ship-")
        atexit.register(shutil.rmtree, _folder, True)
    return _folder

