"""Shared fixtures: one local Spark session, tiny generated images and data sets."""

from __future__ import annotations

import io
import os
import sys
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = os.path.join(ROOT, "code")

# Spark's Python workers must import the project and use this interpreter.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (CODE, os.environ.get("PYTHONPATH", "")) if p)
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# On a GPU machine the two xdist workers, their Spark workers and subprocesses share the GPUs:
# each TensorFlow process takes GPU memory as it needs it, not all of it at start.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
os.environ.pop("XRAY_CONFIG", None)  # tests name their config files themselves
# Exported models (engine auto/openvino) go where runs put them, cache/models of the repository
# (git-ignored), for the library's default too: each backbone is exported once, not once per test.
MODEL_CACHE = os.environ.setdefault("IMAGEFEATURIZER_MODEL_CACHE", os.path.join(ROOT, "cache", "models"))
# The tests' JVMs (the launcher, drivers in this process and in subprocesses, a test cluster's
# daemons) are short-lived: C2's compiler threads take CPU from Spark's 2 cores for code that
# is gone before it pays off. C1 only: a script of five small local jobs took 13.7-14.7 s instead
# of 15.5-17.5 s (quiet 2-core machine, alternated), more so when other work holds the cores.
for _var in ("SPARK_LAUNCHER_OPTS", "SPARK_SUBMIT_OPTS", "SPARK_DAEMON_JAVA_OPTS"):
    os.environ.setdefault(_var, "-XX:TieredStopAtLevel=1")
if CODE not in sys.path:
    sys.path.insert(0, CODE)

from xray import class_archive  # noqa: E402 - after the path to the code

# The class archive of Spark's jars (xray.class_archive; ./wrapper.sh env-setup builds it) cut the
# CPU of nine run and interrupt tests by 17%. The JVMs started after it exists use it; a suite that
# finds none builds it in the background (see pytest_configure).
CLASS_ARCHIVE = class_archive.archive_path()


def use_class_archive() -> None:
    """Add the archive's options to the JVMs started from now on, once it exists."""
    for var in ("SPARK_SUBMIT_OPTS", "SPARK_DAEMON_JAVA_OPTS"):
        os.environ[var] = class_archive.with_archive(os.environ[var], CLASS_ARCHIVE)


use_class_archive()


def pytest_configure(config):
    """The run's first process (not an xdist worker) starts the archive's build when there is
    none, in a process of its own that outlives the run if it must: no test waits for it."""
    if hasattr(config, "workerinput") or CLASS_ARCHIVE is None or os.path.isfile(CLASS_ARCHIVE):
        return
    import subprocess

    subprocess.Popen([sys.executable, "-m", "xray.class_archive"], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_runtest_setup(item):
    use_class_archive()


# The suite runs on two pytest-xdist workers (pyproject's addopts: ``-n 2``; ``-n 0`` runs it in
# this process): one at a time, its processes left 2 cores about half idle. A worker takes a test
# module whole, so its module fixtures are built once; these modules go with another one, whose
# session fixture they also read, so that it is built once too.
SHARED_UNITS = {"test_connect": "test_tracking"}  # both read tiny_tracked_run


def work_unit(nodeid: str) -> str:
    """The work unit of a test: its module's name, or the module it shares a fixture with."""
    module = os.path.splitext(os.path.basename(nodeid.split("::", 1)[0]))[0]
    return SHARED_UNITS.get(module, module)


@pytest.hookimpl(tryfirst=True)  # before xdist's own choice of scheduler
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnits(config, log)


def pytest_collection_modifyitems(config, items):
    """On an xdist worker, the order in which the work units are handed out: the units with the
    most slow tests first and the fast modules last, so that both workers finish together (with
    ``--no-loadscope-reorder``, xdist keeps this order). A run without workers keeps pytest's."""
    if not hasattr(config, "workerinput"):
        return
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(work_unit(item.nodeid), []).append(item)
    slow = {unit: sum(1 for item in members if item.get_closest_marker("slow")) for unit, members in units.items()}
    items[:] = [item for unit in sorted(units, key=lambda u: -slow[u]) for item in units[unit]]


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("xray-featurizer-tests")
        .config("spark.task.maxFailures", "1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "16")
        .config("spark.executorEnv.PYTHONPATH", os.environ["PYTHONPATH"])
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


class FakeSession:
    """What the library ships through, of a classic SparkSession: ``conf.get`` and ``addArtifacts``."""

    def __init__(self, master: str = "spark://10.0.0.1:7077", conf: dict | None = None, app_id: str = "app-1"):
        self.settings = {"spark.master": master, "spark.app.id": app_id, **(conf or {})}
        self.conf = types.SimpleNamespace(get=lambda key, default=None: self.settings.get(key, default))
        self.artifacts: list[tuple[str, str]] = []  # (path, "file" | "pyfile")

    def addArtifacts(self, *paths: str, pyfile: bool = False, file: bool = False) -> None:  # noqa: N802 - Spark's name
        self.artifacts += [(p, "pyfile" if pyfile else "file") for p in paths]


def xray_like(kind: int, seed: int, size=(64, 48), mode="L"):
    """A small synthetic image whose class is visible: kind 0 a bright disc, 1 stripes, 2 a ramp."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == 0:
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        base = 220.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < (0.25 * min(w, h)) ** 2)
    elif kind == 1:
        period = rng.integers(4, 8)
        base = 200.0 * ((xx // period) % 2)
    else:
        base = 255.0 * yy / max(1, h - 1)
    pixels = np.clip(base + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "L")
    return image.convert(mode) if mode != "L" else image


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_dataset(root, classes=("Covid-19", "No_findings", "Pneumonia"), per_class=6, seed=0) -> str:
    """A folder-per-class data set of small generated images, in mixed modes and formats."""
    root = str(root)
    for k, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            image = xray_like(k % 3, seed * 1000 + k * 100 + i, size=(64 + 8 * i, 56 + 4 * k))
            if k == 0 and i % 2:
                image.convert("RGB").save(os.path.join(folder, f"img{i}.jpg"), quality=95)
            else:
                image.save(os.path.join(folder, f"img{i}.png"))
    return root


def tiny_overrides(out, raw, *extra: str) -> list[str]:
    """``--set`` assignments of a small, quick experiment on generated images, written under ``out``."""
    return [
        "weights=random",
        f"dataset.raw_dir={raw}",
        f"dataset.resized_dir={os.path.join(str(out), 'resized')}",
        "dataset.image_size=64",
        f"results_dir={os.path.join(str(out), 'results')}",
        f"cache_dir={os.path.join(str(out), 'cache')}",
        "test_fraction=0.34",
        "batch_size=8",
        *extra,
    ]


def tracked_overrides(out, *extra: str) -> list[str]:
    """:func:`tiny_overrides` on ``out/raw`` with ``classifier.maxIter=5`` and MLflow on (its store under ``out``)."""
    return tiny_overrides(out, os.path.join(str(out), "raw"), "classifier.maxIter=5", "tracking.mlflow=true",
                          f"tracking.uri={os.path.join(str(out), 'store', 'mlruns.db')}", *extra)


@pytest.fixture(scope="session")
def tiny_tracked_run(spark, tmp_path_factory):
    """The ResNet50 binary experiment of :func:`tracked_overrides` on 6 generated images, run once
    in this process' session: the reference of tests/test_tracking.py's fresh process and of
    tests/test_connect.py's Connect run (a run and a pass of its model cost seconds each). Its
    ``out`` folder, ``raw`` images, ``exp``, ``metrics``, ``logs`` and ``predictions`` (its saved
    model on its resized images: path -> (predicted label, probabilities)). Read it, never change it."""
    from xray.config import load_config
    from xray.run import run_experiment

    out = tmp_path_factory.mktemp("tiny_tracked_run")
    raw = make_dataset(out / "raw", classes=("Covid-19", "No_findings"), per_class=3)
    exp = load_config(os.path.join(ROOT, "config.yaml")).experiment("ResNet50_binary_classification",
                                                                     tracked_overrides(out))
    logs: list[str] = []
    metrics = run_experiment(exp, log=logs.append)
    predictions = saved_model_predictions(spark, os.path.join(exp.results_dir, "model"), str(out / "resized"))
    return types.SimpleNamespace(out=out, raw=raw, exp=exp, metrics=metrics, logs=logs, predictions=predictions)


def png_files(spark, folder: str):
    """The PNG files under ``folder`` (any depth) as Spark's binaryFile rows."""
    return (spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", "*.png")
            .load(folder))


def saved_model_predictions(spark, model_dir: str, images_dir: str) -> dict:
    """Path -> (predicted label, probabilities) of the PipelineModel saved in ``model_dir`` on the
    PNG files under ``images_dir``."""
    from pyspark.ml import PipelineModel

    rows = (PipelineModel.load(model_dir).transform(png_files(spark, images_dir))
            .select("path", "predicted_label", "probability").collect())
    return {r.path: (r.predicted_label, r.probability.toArray()) for r in rows}


def cached_features(out) -> dict[str, np.ndarray]:
    """sha256 of each image -> its feature vector, from the feature cache under ``out``."""
    import glob

    import pyarrow.parquet as pq

    found = {}
    for part in glob.glob(os.path.join(str(out), "cache", "*", "part-*")):
        table = pq.read_table(part).to_pydict()
        for sha, vector in zip(table["sha256"], table["features"]):
            found[sha] = np.asarray(vector["values"], dtype=np.float64)
    return found


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "raw")


def feature_rows(spark, classes, per_class: int, noise: float, seed: int):
    """Labelled feature vectors (``path``, ``label``, ``features``): one cluster a class in 4
    dimensions, class k shifted by 3 along dimension k, ``noise`` the spread of each."""
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql.types import StringType, StructField, StructType

    rng = np.random.default_rng(seed)
    rows = []
    for k, cls in enumerate(classes):
        for i in range(per_class):
            v = rng.normal(0, noise, 4)
            v[k] += 3.0
            rows.append((f"file:/d/{cls}/{i}.png", cls, Vectors.dense(v)))
    schema = StructType([StructField("path", StringType()), StructField("label", StringType()),
                         StructField("features", VectorUDT())])
    return spark.createDataFrame(rows, schema)


def keras_classifier_pipeline(keras_file: str, classes, image_size: int):
    """A PipelineModel (StringIndexerModel, KerasImageClassifier, IndexToString) around a .keras file."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import IndexToString, StringIndexerModel

    from imagefeaturizer.classifier import KerasImageClassifier

    indexer = StringIndexerModel.from_labels(list(classes), inputCol="label", outputCol="label_index")
    classifier = KerasImageClassifier(modelFile=keras_file, imageSize=image_size, batchSize=4)
    converter = IndexToString(inputCol="prediction", outputCol="predicted_label", labels=list(classes))
    return PipelineModel([indexer, classifier, converter])


@pytest.fixture(scope="session")
def random_extractor():
    """Backbone name -> its FeatureExtractor (TensorFlow engine, seeded random weights, avg pooling,
    traced on first use), built once per session for the driver-side references of several test
    files: each build and trace costs seconds of CPU. Read it, never change it."""
    from imagefeaturizer.runtime import FeatureExtractor

    built = {}

    def get(name: str):
        if name not in built:
            built[name] = FeatureExtractor(name, None, "avg", "tensorflow")
        return built[name]

    return get
