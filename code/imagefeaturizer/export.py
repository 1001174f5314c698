"""Exported models: the Keras backbone converted once for an exported engine, cached on disk.

Keras stays the source of truth: the backbone is built and its weights loaded exactly as for the
TensorFlow engine (:func:`imagefeaturizer.backbones.build_model`, no pooling), then wrapped in one
traced function, uint8 ``images`` in, outputs ``avg``, ``max`` (the global poolings) and ``maps``
(the last feature maps), Keras' own ``preprocess_input`` inside the graph (a worker that runs the
export needs neither TensorFlow nor Keras), and converted by the engine
(:meth:`imagefeaturizer.engines.Engine.write_export`). One export serves both poolings and the
maps, so the pooling is not part of its key.

The cache (:func:`exported_model`): one folder per export, ``<cache>/<backbone>-<engine>-<key>``,
holding the engine's files and ``export.json`` (the key's parts, each file's sha256, the export's
seconds). The key covers what changes the exported graph: backbone, weights (the file's sha256, or
the random seed and Keras' version), engine and its version, Keras' and TensorFlow's versions and
:data:`EXPORT_FORMAT` (bump it when the exported graph changes). A folder is written under a
temporary name beside its place and renamed into place complete, so readers never see half an
export. Exporters of the same key on one machine take turns (a lock file beside the folder): the
second waits, saying so, and uses the first's export instead of making its own; where the lock
is not available (no ``fcntl``), concurrent exporters are still safe (the first rename wins, the
others use it). Files whose
sha256 differs from ``export.json`` are a damaged export: exported again. Each export runs in a
child process (``python -m imagefeaturizer.export``): it imports TensorFlow and grows by a few GiB,
which the driver does not keep.

:func:`plan_engine` decides, on the driver, which engine runs and with which export: ``auto`` is
OpenVINO on CPUs and TensorFlow where TensorFlow sees a GPU; an exported engine that is not
installed or fails to export falls back to TensorFlow under ``auto`` (saying why and the fix),
and is an :class:`EngineError` naming the fix when asked for by name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

from . import backbones
from .engines import AUTO, EngineError, TensorFlowEngine, choose_auto, engine_class
from .shipping import session_key, ship_file

EXPORT_FORMAT = 1
"""Version of the exported graph (inputs, outputs, preprocessing): part of every export's key."""
MODEL_CACHE_ENV = "IMAGEFEATURIZER_MODEL_CACHE"
MANIFEST = "export.json"
_LOG = logging.getLogger("imagefeaturizer")

try:
    import fcntl
except ImportError:  # not POSIX: no lock, concurrent exports stay safe through the rename
    fcntl = None


class ExportError(EngineError):
    """Exporting a backbone for an engine failed."""


def cache_dir(setting: str = "") -> str:
    """The model cache folder: ``setting`` (the featurizer's ``modelCacheDir``) when not empty, else
    ``$IMAGEFEATURIZER_MODEL_CACHE``, else ``$XDG_CACHE_HOME/imagefeaturizer/models`` (``~/.cache``)."""
    chosen = setting or os.environ.get(MODEL_CACHE_ENV)
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imagefeaturizer", "models")


# ---------------------------------------------------------------------------------------------
# The key and the cache
# ---------------------------------------------------------------------------------------------
def export_key(model_name: str, weights_sha256: str | None, engine: str) -> dict[str, str | int]:
    """What an export depends on (``weights_sha256`` None: seeded random weights)."""
    keras = backbones.keras_version()
    weights = f"sha256:{weights_sha256}" if weights_sha256 else f"random:{backbones.RANDOM_WEIGHTS_SEED}:keras-{keras}"
    return {"backbone": backbones.get_backbone(model_name).name, "weights": weights, "engine": engine,
            "engine_version": engine_class(engine).version(), "keras": keras,
            "tensorflow": TensorFlowEngine.version(), "format": EXPORT_FORMAT}


def folder_name(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"{key['backbone']}-{key['engine']}-{digest}"


@dataclass(frozen=True)
class ExportedModel:
    """An export in the cache: its files (the first is what the engine opens) and their sha256."""

    engine: str
    folder: str
    files: tuple[str, ...]
    sha256: tuple[str, ...]
    export_seconds: float
    exported_now: bool = False  # False: found in the cache

    def stat(self) -> tuple:
        """Size and modification time of each file: changes when a file is replaced or damaged."""
        return tuple((s.st_size, s.st_mtime_ns) for s in map(os.stat, self.files))


def exported_model(model_name: str, weights_path: str | None, weights_sha256: str | None, engine: str,
                   cache_dir: str, log: Callable[[str], None] | None = None) -> ExportedModel:
    """The export of (backbone, weights, engine) from ``cache_dir``, exported first when it is
    missing or damaged. ``weights_sha256`` is the file's (None with random weights)."""
    log = log or _LOG.warning
    key = export_key(model_name, weights_sha256, engine)
    name = folder_name(key)
    final = os.path.join(cache_dir, name)
    found = read_export(final, key, log)
    if found is not None:
        return found
    os.makedirs(cache_dir, exist_ok=True)
    with _exporting(final, log):
        found = read_export(final, key, lambda _: None)  # made by an exporter this one waited for (damage: said)
        return found if found is not None else _export(model_name, weights_path, engine, final, key, log)


@contextlib.contextmanager
def _exporting(final: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of the export ``final`` (``.<name>.lock`` beside it), waiting for another
    exporter that holds it; the holder removes the file when done."""
    if fcntl is None:
        yield
        return
    path = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.lock")
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is exporting {final}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)  # whoever locks after this (this file or a new one) first finds the export in place
            fcntl.flock(lock, fcntl.LOCK_UN)


def _export(model_name: str, weights_path: str | None, engine: str, final: str, key: dict,
            log: Callable[[str], None]) -> ExportedModel:
    """Export into a temporary folder beside ``final`` and rename it into place."""
    cache_dir, name = os.path.dirname(final), os.path.basename(final)
    log(f"exporting {model_name} for the {engine} engine into {final} (once: later runs reuse it)")
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        seconds = run_exporter(model_name, weights_path, engine, tmp, name)
        _write_manifest(tmp, key, engine, name, seconds)
        _move_into_place(tmp, final, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    placed = read_export(final, key, log)  # ours, or a concurrent exporter's that won the rename
    if placed is None:
        raise ExportError(f"the export of {model_name} for {engine} in {final} is unreadable right after writing it")
    return dataclasses.replace(placed, exported_now=True)


def read_export(folder: str, key: dict, log: Callable[[str], None] = _LOG.warning) -> ExportedModel | None:
    """The complete, undamaged export in ``folder``, else None (a damaged one is reported)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log(f"exported model {folder} is damaged ({MANIFEST} unreadable: {exc}): exporting it again")
        return None
    files = tuple(os.path.join(folder, name) for name in manifest.get("files", {}))
    problem = None if manifest.get("key") == key and files else "its key differs"
    for path, expected in zip(files, manifest.get("files", {}).values()):
        if problem is None and not os.path.isfile(path):
            problem = f"{os.path.basename(path)} is missing"
        elif problem is None and backbones.file_sha256(path) != expected:
            problem = f"{os.path.basename(path)} does not match its sha256"
    if problem:
        log(f"exported model {folder} is damaged ({problem}): exporting it again")
        return None
    return ExportedModel(key["engine"], folder, files, tuple(manifest["files"].values()),
                         float(manifest.get("export_seconds", 0.0)))


def _write_manifest(folder: str, key: dict, engine: str, stem: str, seconds: float) -> None:
    names = engine_class(engine).export_files(stem)
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ExportError(f"exporting {key['backbone']} for {engine} wrote no {', '.join(missing)}")
    manifest = {"key": key, "files": {n: backbones.file_sha256(os.path.join(folder, n)) for n in names},
                "export_seconds": round(seconds, 2)}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def _move_into_place(tmp: str, final: str, key: dict) -> None:
    """Rename ``tmp`` to ``final``; a damaged ``final`` is set aside first, a good one (a concurrent
    exporter's) is kept and ``tmp`` dropped."""
    if os.path.exists(final) and read_export(final, key, lambda _: None) is None:
        aside = f"{final}.damaged-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, aside)
        except OSError:
            pass  # another exporter set it aside already
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        pass  # another exporter's complete folder is in place: it is used


# ---------------------------------------------------------------------------------------------
# Exporting, in a child process
# ---------------------------------------------------------------------------------------------
def run_exporter(model_name: str, weights_path: str | None, engine: str, folder: str, stem: str) -> float:
    """Export in a child process into ``folder`` (files named by ``stem``); its seconds."""
    code_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, "-m", "imagefeaturizer.export", "--backbone", model_name, "--engine", engine,
           "--folder", folder, "--stem", stem, "--weights", weights_path or backbones.RANDOM]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
                  else lines[-1] if lines else f"exit code {proc.returncode}")
        raise ExportError(f"exporting {model_name} for the {engine} engine failed: {reason[:300]}")
    return time.perf_counter() - start


def serving_function(model, backbone: backbones.Backbone):
    """The graph that is exported: uint8 ``images`` (n, H, W, 3) -> ``avg``, ``max``, ``maps``."""
    import tensorflow as tf

    size = backbone.input_size
    spec = tf.TensorSpec((None, size, size, 3), tf.uint8, name="images")

    def serve(images):
        maps = model(backbone.preprocess_input(tf.cast(images, tf.float32)), training=False)
        return {"avg": tf.reduce_mean(maps, axis=[1, 2]), "max": tf.reduce_max(maps, axis=[1, 2]), "maps": maps}

    return tf.function(serve, input_signature=[spec], autograph=False)


def _export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a Keras backbone for an engine (internal).")
    for flag in ("--backbone", "--engine", "--folder", "--stem", "--weights"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    backbone = backbones.get_backbone(args.backbone)
    weights = None if args.weights == backbones.RANDOM else args.weights
    model = backbones.build_model(backbone, weights, pooling=None)
    function = serving_function(model, backbone).get_concrete_function()
    engine_class(args.engine).write_export(function, args.folder, args.stem)
    return 0


# ---------------------------------------------------------------------------------------------
# Which engine runs: the driver's plan
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnginePlan:
    """What runs a featurizer's backbone: ``engine`` (and its ``model`` when exported), why, and
    when the wanted engine could not be used, ``fallback`` (the reason, with its fix)."""

    requested: str
    engine: str
    why: str
    model: ExportedModel | None = None
    fallback: str | None = None

    def describe(self) -> str:
        text = f"engine: {self.engine} ({self.why})"
        if self.model is not None:
            how = f"exported in {self.model.export_seconds:.0f} s" if self.model.exported_now else "from the cache"
            text += f", model {self.model.folder} ({how})"
        return text + (f"; {self.fallback}" if self.fallback else "")

    def shipped_files(self, spark) -> tuple[tuple[str, str], ...]:
        """(path, sha256) of the exported model's files, shipped to the workers where they may not
        read them (:func:`imagefeaturizer.shipping.ship_file`, under their own names: the graph
        finds its weights beside it); () for TensorFlow."""
        if self.model is None:
            return ()
        return tuple((path, ship_file(spark, path, sha256=sha, name=os.path.basename(path)))
                     for path, sha in zip(self.model.files, self.model.sha256))

    def as_dict(self) -> dict:
        """For reports (metrics.json)."""
        return {"requested": self.requested, "engine": self.engine, "why": self.why,
                "version": engine_class(self.engine).version(), "fallback": self.fallback,
                "exported_model": self.model.folder if self.model else None}


def plan_engine(requested: str, model_name: str, weights_path: str | None, weights_sha256: str | None,
                cache_dir: str, log: Callable[[str], None] | None = None) -> EnginePlan:
    """Resolve ``requested`` (``auto`` or an engine's name) for this backbone and weights, exporting
    the model when the engine needs it and the cache lacks it."""
    wanted, why = choose_auto() if requested == AUTO else (engine_class(requested).name, "requested")
    cls = engine_class(wanted)
    if not cls.exported:
        return EnginePlan(requested, wanted, why)
    try:
        if not cls.installed():
            raise EngineError(f"the {wanted} engine needs the {cls.module} package, which is not installed: "
                              f"pip install {cls.module} (requirements.txt pins the tested version)")
        model = exported_model(model_name, weights_path, weights_sha256, wanted, cache_dir, log)
    except EngineError as exc:
        if requested != AUTO:
            raise EngineError(f"{exc}; or set engine=tensorflow") from None
        fallback = f"falling back to TensorFlow: {exc}"
        (log or _LOG.warning)(f"WARNING: {fallback}")
        return EnginePlan(requested, TensorFlowEngine.name, why, fallback=fallback)
    return EnginePlan(requested, wanted, why, model)


# Per Spark Connect session or classic application: the plans made, reused while their files stay the same.
_PLANS: dict[tuple, dict[tuple, tuple[EnginePlan, tuple]]] = {}


def plan_for_context(spark, requested: str, model_name: str, weights_path: str | None, weights_sha256: str | None,
                     cache_dir: str, log: Callable[[str], None] | None = None) -> EnginePlan:
    """:func:`plan_engine`, made once per session (again when an exported file changed)."""
    plans = _PLANS.setdefault(session_key(spark), {})
    key = (requested, model_name, weights_path, weights_sha256, os.path.abspath(cache_dir))
    if key in plans:
        plan, stat = plans[key]
        try:
            if plan.model is None or plan.model.stat() == stat:
                return plan
        except OSError:
            pass  # a file is gone: plan again
    plan = plan_engine(requested, model_name, weights_path, weights_sha256, cache_dir, log)
    plans[key] = (plan, plan.model.stat() if plan.model else ())
    return plan


if __name__ == "__main__":
    sys.exit(_export_main())
