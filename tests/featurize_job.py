"""A driver program for tests/test_cluster.py: KerasImageFeaturizer over a folder of PNG images.

    python tests/featurize_job.py MASTER IMAGES OUT.json WEIGHTS [WEIGHTS ...]

Each ``WEIGHTS`` (``random`` or a weights file, maybe relative to the current folder, as a user
may give it) featurizes every image with VGG16 in one SparkContext on ``MASTER``; ``OUT.json``
gets the application id and, per weights, file name -> feature vector. Its own process: a test
process holds one SparkContext (local mode) already.
"""

from __future__ import annotations

import os
import sys

from imagefeaturizer import KerasImageFeaturizer
from xray.atomic import write_json_atomic
from xray.session import spark_session


def main(master: str, images: str, out: str, *weights: str) -> int:
    spark = spark_session({"spark": {"master": master, "app_name": "featurize-job", "driver_memory": "1g",
                                     "conf": {"spark.ui.enabled": "false"}}})
    df = spark.read.format("binaryFile").option("pathGlobFilter", "*.png").load(images)
    features = {}
    for w in weights:
        featurizer = KerasImageFeaturizer(inputCol="content", outputCol="features", modelName="VGG16",
                                          weights=w, batchSize=4)
        rows = featurizer.transform(df).select("path", "features").collect()
        features[w] = {os.path.basename(r.path): r.features.toArray().tolist() for r in rows}
    write_json_atomic(out, {"app_id": spark.sparkContext.applicationId, "features": features})
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
