"""A driver program for tests/test_featurizer.py: the featurizer with an engine in a fresh local[2]
application, then what its Python workers and its driver hold.

    python tests/engine_job.py IMAGES OUT.json ENGINE MODEL

Featurizes every PNG under ``IMAGES`` (one partition each, so both workers take part) with
``MODEL``, random weights, features and maps; then a probe job on the same (reused) workers
reports, per worker: whether TensorFlow, Keras and OpenVINO are imported, and the settings of
each OpenVINO model it holds. ``OUT.json`` gets the features and maps by file name, the probes,
the engine plan and whether the driver imported TensorFlow. Its own process: the workers of the
test session's Spark application have imported TensorFlow long before.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterator

import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from imagefeaturizer import KerasImageFeaturizer


def probe(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
    """Per worker: TensorFlow, Keras, OpenVINO imported? The settings of its OpenVINO models."""
    from imagefeaturizer import runtime

    ov = [e.engine for e in runtime._EXTRACTORS.values() if e.engine.name == "openvino"]
    state = {
        "pid": os.getpid(),
        "tensorflow": "tensorflow" in sys.modules,
        "keras": "keras" in sys.modules,
        "openvino": "openvino" in sys.modules,
        "models": [{k: str(e.compiled.get_property(k)) for k in
                    ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "ENABLE_CPU_PINNING", "INFERENCE_PRECISION_HINT")}
                   for e in ov],
    }
    for batch in batches:
        yield pd.Series([json.dumps(state)] * len(batch))


def main(images: str, out: str, engine: str, model: str) -> int:
    spark = (SparkSession.builder.master("local[2]").appName("engine-job")
             .config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.sql.files.openCostInBytes", str(128 * 1024 * 1024))  # a partition per file
             .config("spark.sql.execution.arrow.maxRecordsPerBatch", "4")
             .getOrCreate())
    df = spark.read.format("binaryFile").option("pathGlobFilter", "*.png").load(images)
    featurizer = KerasImageFeaturizer(modelName=model, weights="random", batchSize=2, engine=engine, mapsCol="maps")
    plan = featurizer.resolveEngine(spark)
    rows = featurizer.transform(df).select("path", "features", "maps").collect()
    probes = spark.range(0, 8, numPartitions=4).select(F.pandas_udf(probe, "string")("id")).distinct().collect()
    result = {
        "plan": plan.as_dict(),
        "partitions": df.rdd.getNumPartitions(),
        "features": {os.path.basename(r.path): r.features.toArray().tolist() for r in rows},
        "maps": {os.path.basename(r.path): list(r.maps) for r in rows},
        "workers": [json.loads(r[0]) for r in probes],
        "driver_imported_tensorflow": "tensorflow" in sys.modules,
    }
    spark.stop()
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
