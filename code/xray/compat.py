"""Client against cluster versions: a mismatch is one clear line, not a stack trace from a worker.

- Spark Connect: the server's Spark (``spark.version``) against this client's pyspark. Another
  major version is an error; another minor or patch version a warning (results are tested with
  equal versions).
- A classic cluster: one tiny Python task reports the executors' Python and pyspark. The task
  failing (e.g. Spark's own "different minor versions" check, or a Spark whose classes do not
  match the driver's) is an error naming the driver's versions; another pyspark a warning.
Local mode runs this very installation: nothing to check.
"""

from __future__ import annotations

import platform
import sys
from typing import Callable, Iterator

import pandas as pd
import pyspark

from .errors import UserError


class VersionMismatchError(UserError):
    pass


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def mismatch(client: str, cluster: str, what: str) -> tuple[str, str] | None:
    """("error" | "warning", message) when the ``cluster``'s version differs from the ``client``'s."""
    if client == cluster:
        return None
    message = (f"{what} runs {cluster}, this client pyspark {client}: use the same Spark version on both "
               f"(pip install pyspark=={cluster}, or a {client} cluster)")
    same_major = client.split(".")[0] == cluster.split(".")[0]
    return ("warning", message + "; results are tested with equal versions only") if same_major else ("error", message)


def _report(problem: tuple[str, str] | None, warn: Callable[[str], None]) -> None:
    if problem is None:
        return
    kind, message = problem
    if kind == "error":
        raise VersionMismatchError(message)
    warn(message)


def check_connect_versions(spark, warn: Callable[[str], None] = _warn) -> None:
    """The Spark Connect server's Spark against this client's pyspark."""
    _report(mismatch(pyspark.__version__, spark.version, "the Spark Connect server"), warn)


def _probe(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    import platform as _platform

    import pyspark as _pyspark

    for _ in batches:
        yield pd.DataFrame({"python": [_platform.python_version()], "pyspark": [_pyspark.__version__]})


def executor_versions(spark) -> set[tuple[str, str]]:
    """(Python, pyspark) versions of the executors' Python workers, from one tiny task."""
    rows = spark.range(1, numPartitions=1).mapInPandas(_probe, "python string, pyspark string").collect()
    return {(r.python, r.pyspark) for r in rows}


def check_cluster_versions(spark, warn: Callable[[str], None] = _warn) -> None:
    """A classic cluster's executors against this driver: Python and pyspark."""
    driver = f"Python {platform.python_version()} and pyspark {pyspark.__version__}"
    try:
        found = executor_versions(spark)
    except Exception as exc:  # noqa: BLE001 - any failure of the first Python task is the message
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise VersionMismatchError(
            f"a Python task on the cluster failed ({first[:300]}): its executors must run the driver's "
            f"{driver} (spark.pyspark.python names the executors' Python)"
        ) from None
    for python, executor_pyspark in sorted(found):
        if python.split(".")[:2] != platform.python_version().split(".")[:2]:
            raise VersionMismatchError(
                f"the executors run Python {python}, this driver {platform.python_version()}: pyspark needs "
                f"the same minor version on both (set spark.pyspark.python)"
            )
        _report(mismatch(pyspark.__version__, executor_pyspark, "the cluster's executors (pyspark)"), warn)
