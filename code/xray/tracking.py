"""MLflow tracking, optional (``tracking.mlflow: true``; off by default, nothing imported then).

Each experiment becomes an MLflow run: its flattened config as params; the metrics of
``metrics.json`` (accuracy and its 95% interval, balanced accuracy, AUC, per-class precision,
recall and F1, images/s, wall and phase seconds, cross-validation means); tags (model, task,
weights, ``transfer_learning``, method); ``metrics.json``, ``config.json`` and the charts as
artifacts; and the fitted ``PipelineModel`` with MLflow's Spark flavour, with the
``imagefeaturizer`` package as its code, so ``mlflow.spark.load_model(uri)`` works in a fresh
process (the featurizer ships its package to the Python workers itself). A sweep is a parent
run with one child run per experiment and the summary files.

``tracking.uri``: any MLflow tracking URI, or a path (relative to ``config.yaml``'s folder) of
a SQLite store, by default ``mlruns.db`` with the artifacts in ``mlartifacts/`` beside it: no
server needed; ``wrapper.sh mlflow-ui`` opens the UI on it. The store is checked before any
Spark work: unreachable, the run stops with one line. A failure while logging a finished
experiment is a warning: its files in ``results/<experiment>/`` are complete either way.

On Spark Connect (no JVM on the client) MLflow's Spark flavour cannot save through Spark's
Hadoop file system: the model folder the run saved is logged in the flavour's layout instead
(``model/MLmodel``, ``model/sparkml/``, ``model/code/``); ``mlflow.spark.load_model`` loads it in
a classic session.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from imagefeaturizer.shipping import PACKAGE_DIR

from .config import Experiment
from .errors import UserError
from .evaluation import auc

DEFAULT_STORE = "mlruns.db"
ARTIFACTS_DIR = "mlartifacts"
DEFAULT_EXPERIMENT = "xray-featurizer"
MODEL_ARTIFACT = "model"
# What the saved model imports (imagefeaturizer's dependencies), pinned to this environment.
MODEL_DISTRIBUTIONS = ("pyspark", "tensorflow-cpu", "tensorflow", "keras", "h5py", "numpy", "pandas", "pyarrow",
                       "pillow")
_QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_NAME_CHARS = re.compile(r"[^\w\-. :/]")

_sweep_parent: str | None = None  # the run id of the sweep running in this process
_lock = threading.Lock()


class TrackingError(UserError):
    pass


def enabled(settings: dict) -> bool:
    return bool(settings.get("tracking", {}).get("mlflow", False))


def store_uri(settings: dict, base_dir: str) -> str:
    """``tracking.uri`` as MLflow takes it: a URI as given, a path as a SQLite store."""
    uri = settings.get("tracking", {}).get("uri", DEFAULT_STORE)
    if re.match(r"^[a-z][a-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return uri
    return "sqlite:///" + os.path.normpath(os.path.join(base_dir, os.path.expanduser(uri)))


def artifact_root(uri: str) -> str | None:
    """Where a new MLflow experiment of a SQLite store keeps its artifacts: beside the store."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server or other store decides
    return os.path.join(os.path.dirname(uri[len("sqlite:///"):]), ARTIFACTS_DIR)


def _experiment_name(settings: dict) -> str:
    return settings.get("tracking", {}).get("experiment", DEFAULT_EXPERIMENT)


@contextmanager
def _quick_http() -> Iterator[None]:
    """An unreachable tracking server fails in seconds, not after MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in _QUICK_HTTP}
    os.environ.update({k: v for k, v in _QUICK_HTTP.items() if saved[k] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def open_store(settings: dict, base_dir: str) -> tuple[str, str]:
    """(tracking URI, MLflow experiment id), the experiment created when new; a one-line
    :class:`TrackingError` when the store cannot be reached."""
    from mlflow.tracking import MlflowClient

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri, name = store_uri(settings, base_dir), _experiment_name(settings)
    root = artifact_root(uri)
    try:
        if root is not None:
            os.makedirs(root, exist_ok=True)
        with _quick_http():
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else client.create_experiment(name, artifact_location=root)
    except Exception as exc:  # noqa: BLE001 - whatever MLflow or the store raise, one line
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise TrackingError(
            f"MLflow tracking store {uri} cannot be used ({first[:200]}): fix tracking.uri, or set "
            f"tracking.mlflow=false"
        ) from None
    return uri, experiment_id


def check_store(exp: Experiment) -> None:
    """Before any Spark work: with tracking on, the store must be reachable."""
    if enabled(exp.settings):
        open_store(exp.settings, exp.base_dir)


# --------------------------------------------------------------------------- what a run logs


def flat_params(settings: dict, prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: nested keys joined with dots (``classifier.regParam``)."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _name(text: str) -> str:
    return _NAME_CHARS.sub("_", text)


def run_metrics(result: dict) -> dict[str, float]:
    """The numbers of a run's metrics.json, as MLflow metrics."""
    low, high = result["accuracy_ci95"]
    out: dict[str, Any] = {"accuracy": result["accuracy"], "accuracy_ci95_low": low, "accuracy_ci95_high": high,
                           "balanced_accuracy": result["balanced_accuracy"], "auc": auc(result)}
    for cls, values in result["per_class"].items():
        out.update({f"{m}.{_name(cls)}": values[m] for m in ("precision", "recall", "f1")})
    for key in ("images_per_second", "featurization_seconds", "wall_seconds", "n_train", "n_test", "n_images"):
        out[key] = result.get(key)
    out.update({f"phase_seconds.{k}": v for k, v in result.get("phase_seconds", {}).items()})
    cv = result.get("cross_validation") or {}
    for key in ("accuracy", "balanced_accuracy", "auc"):
        if cv.get(key):
            out[f"cv.{key}.mean"], out[f"cv.{key}.std"] = cv[key]["mean"], cv[key]["std"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_tags(exp: Experiment, result: dict) -> dict[str, str]:
    return {
        "experiment": exp.name,
        "model": str(result["model"]),
        "task": str(result["task"]),
        "weights": str(result["weights"]),
        "weights_id": str(result.get("weights_id")),
        "transfer_learning": str(result["transfer_learning"]).lower(),
        "method": str(result.get("method", "linear probe: frozen backbone features, LogisticRegression")),
    }


def model_requirements() -> list[str]:
    """The pip requirements of a logged model: imagefeaturizer's dependencies at this environment's
    versions (MLflow's inference misses TensorFlow, Keras and Pillow, and takes minutes)."""
    found = []
    for dist in MODEL_DISTRIBUTIONS:
        try:
            found.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def log_experiment(exp: Experiment, result: dict, model, log: Callable[[str], object] = print) -> str | None:
    """Log a finished experiment as an MLflow run (a child of the running sweep, if any); its run
    id, or None when tracking is off or logging failed (a warning line says why)."""
    if not enabled(exp.settings):
        return None
    try:
        return _log_run(exp, result, model, log)
    except Exception as exc:  # noqa: BLE001 - the run's files are written: tracking must not lose them
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        log(f"warning: MLflow logging of {exp.name} failed ({type(exc).__name__}: {first[:200]}); its files in "
            f"{exp.results_dir} are complete")
        return None


def _log_run(exp: Experiment, result: dict, model, log) -> str:
    import mlflow

    uri, experiment_id = open_store(exp.settings, exp.base_dir)
    with _lock:
        mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=exp.name, parent_run_id=_sweep_parent,
                          tags=run_tags(exp, result)) as run:
        mlflow.log_params(flat_params(exp.settings))
        mlflow.log_metrics(run_metrics(result))
        for name in ["metrics.json", *result.get("reports", {}).values()]:
            path = os.path.join(exp.results_dir, name)
            if os.path.isfile(path):
                mlflow.log_artifact(path)
        if model is not None:
            _log_model(model, os.path.join(exp.results_dir, "model"))
    log(f"MLflow: run {run.info.run_id} in {uri} (experiment {_experiment_name(exp.settings)!r}); "
        f"model: runs:/{run.info.run_id}/{MODEL_ARTIFACT}")
    return run.info.run_id


def _log_model(model, saved_dir: str) -> None:
    """The fitted PipelineModel with MLflow's Spark flavour and the featurizer's package as code."""
    import mlflow
    from pyspark.sql.utils import is_remote

    if is_remote():  # a Spark Connect client: no JVM here
        _log_saved_model(model, saved_dir)
        return
    mlflow.spark.log_model(model, MODEL_ARTIFACT, code_paths=[PACKAGE_DIR], pip_requirements=model_requirements())


def _log_saved_model(model, saved_dir: str) -> None:
    """Spark Connect: the folder the run saved, in the Spark flavour's layout, as artifacts."""
    import mlflow
    from mlflow.models import Model
    from mlflow.spark import _save_model_metadata  # the flavour's own MLmodel and environment files

    folder = tempfile.mkdtemp(prefix="xray-mlflow-")
    try:
        shutil.copytree(saved_dir, os.path.join(folder, "sparkml"))
        _save_model_metadata(folder, model, Model(artifact_path=MODEL_ARTIFACT), None, [PACKAGE_DIR],
                             pip_requirements=model_requirements())
        mlflow.log_artifacts(folder, MODEL_ARTIFACT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- sweeps and the UI


@contextmanager
def sweep_run(settings: dict, base_dir: str, pattern: str, names: list[str]) -> Iterator[Callable[[str, bool], None]]:
    """With tracking on, a parent run for a sweep: the experiments' runs become its children.
    Yields ``finish(summary_folder, ok)``, which logs the summary files and closes the run."""
    global _sweep_parent
    if not enabled(settings):
        yield lambda folder, ok: None
        return
    from mlflow.tracking import MlflowClient

    uri, experiment_id = open_store(settings, base_dir)
    client = MlflowClient(uri)
    parent = client.create_run(experiment_id, run_name=f"sweep {pattern}",
                               tags={"sweep": pattern, "experiments": ", ".join(names)}).info.run_id
    status = {"value": "FAILED"}

    def finish(folder: str, ok: bool) -> None:
        for name in ("summary.md", "summary.csv", "summary.png"):
            if os.path.isfile(os.path.join(folder, name)):
                client.log_artifact(parent, os.path.join(folder, name))
        status["value"] = "FINISHED" if ok else "FAILED"

    _sweep_parent = parent
    try:
        yield finish
    finally:
        _sweep_parent = None
        client.set_terminated(parent, status["value"])


def ui_command(settings: dict, base_dir: str, port: int) -> list[str]:
    """``mlflow ui`` on the configured store, bound to 127.0.0.1."""
    uri = store_uri(settings, base_dir)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # one user on this machine: one server process
    root = artifact_root(uri)
    return command + (["--default-artifact-root", root] if root else [])


def run_ui(settings: dict, base_dir: str, port: int = 5000, log: Callable[[str], object] = print) -> int:
    """Open the MLflow UI on the store of these settings (config.yaml's defaults); runs until
    interrupted."""
    command = ui_command(settings, base_dir, port)
    log(f"MLflow UI on {command[command.index('--backend-store-uri') + 1]}: http://127.0.0.1:{port} (Ctrl-C stops it)")
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
