"""Saving and loading ``KerasImageFeaturizer`` so that a saved model folder carries its weights.

The stage folder pyspark's ``DefaultParamsWriter`` writes (``metadata/``) gets a ``weights``
record beside the Params, and for a weights file the file itself:

- a weights file: copied into the stage folder as ``weights/<file name>``, recorded with its
  sha256 and the path it came from. Loading uses the copy wherever the folder now is (another
  path, another machine), after checking its sha256; a missing or altered copy is a
  :class:`~imagefeaturizer.backbones.WeightsError` naming the file and the expected sha256.
- ``imagenet``: Keras' file name and checksum, and the sha256 of the cached file; at
  featurization the file found in the Keras cache must have that sha256.
- ``random``: the seed (the weights are rebuilt from it).

The copy is made by the driver with plain file operations, so it needs the model folder on a
file system the driver writes (a local disk, NFS, a FUSE mount; with Spark Connect, a server on
this machine). Elsewhere (``hdfs://``, ``s3a://``, a remote Connect server) the record is written
but not the copy: a warning says so, and loading falls back to the original path when it still
holds the same file.
"""

from __future__ import annotations

import os
import shutil
import warnings
from urllib.parse import urlparse

from pyspark.ml.util import DefaultParamsReader, DefaultParamsWriter

from . import backbones

WEIGHTS_DIR = "weights"
RECORD_KEY = "weights"  # in the stage's metadata, beside paramMap


class FeaturizerWriter(DefaultParamsWriter):
    """The featurizer's Params (as ``DefaultParamsWriter``), its weights record and file."""

    def saveImpl(self, path: str) -> None:
        record, source = weights_record(self.instance)
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sparkSession,
                                         extraMetadata={RECORD_KEY: record})
        if source is not None:
            _copy_weights(source, path, record)


class FeaturizerReader(DefaultParamsReader):
    """The featurizer with its Params, reading its weights from the saved folder."""

    def load(self, path: str):
        metadata = DefaultParamsReader.loadMetadata(path, self.sparkSession)
        instance = self.cls()
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        record = metadata.get(RECORD_KEY)  # absent in folders saved before weights were recorded
        if record and record.get("kind") == "file":
            instance.set(instance.weights, _saved_weights_file(path, record))
        if record and record.get("sha256"):
            instance._saved_weights = (instance.getWeights(), record["sha256"])
        return instance


def weights_record(featurizer) -> tuple[dict, str | None]:
    """(what the metadata records about the weights, the file to copy or None)."""
    weights = featurizer.getWeights()
    backbone = featurizer.backbone
    if weights == backbones.RANDOM:
        return {"kind": "random", "seed": backbones.RANDOM_WEIGHTS_SEED}, None
    if weights == backbones.IMAGENET:
        try:
            sha = backbones.file_sha256(backbones.resolve_weights(backbone, weights))
        except backbones.WeightsUnavailableError:
            sha = None  # not in the Keras cache and offline: Keras' checksum still names it
        return {"kind": "imagenet", "file": backbone.imagenet_file, "md5": backbone.imagenet_md5,
                "sha256": sha}, None
    source = backbones.resolve_weights(backbone, weights)
    return {"kind": "file", "file": f"{WEIGHTS_DIR}/{os.path.basename(source)}",
            "sha256": backbones.file_sha256(source), "source": source}, source


def check_saved_hash(featurizer, path: str, sha256: str) -> None:
    """A loaded featurizer's weights must still be the file it was saved with."""
    saved = getattr(featurizer, "_saved_weights", None)
    if saved and saved[0] == featurizer.getWeights() and saved[1] != sha256:
        raise backbones.WeightsError(
            f"weights file {path} is not the one the model was saved with (sha256 {sha256}, expected "
            f"{saved[1]}): restore that file (for imagenet: delete it from the Keras cache to fetch it again)"
        )


def local_folder(path: str) -> str | None:
    """``path`` as a folder of this machine (a plain path or ``file:`` URI), else None."""
    parsed = urlparse(path)
    if parsed.scheme in ("", "file"):
        return os.path.abspath(parsed.path if parsed.scheme else path)
    if len(parsed.scheme) == 1:  # a Windows drive letter
        return os.path.abspath(path)
    return None


def _copy_weights(source: str, path: str, record: dict) -> None:
    """Copy the weights file into the saved folder (write beside, then rename)."""
    folder = local_folder(path)
    if folder is None or not os.path.isdir(os.path.join(folder, "metadata")):
        warnings.warn(
            f"the featurizer was saved to {path}, which is not on this machine's file system: its weights "
            f"file was not copied into it; copy {source} to {path}/{record['file']} (sha256 {record['sha256']})",
            stacklevel=3,
        )
        return
    dest = os.path.join(folder, *record["file"].split("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


def _saved_weights_file(path: str, record: dict) -> str:
    """The weights file of a saved featurizer, checked against its recorded sha256."""
    folder = local_folder(path)
    expected = record["sha256"]
    copy = os.path.join(folder, *record["file"].split("/")) if folder else f"{path}/{record['file']}"
    if os.path.isfile(copy):
        actual = backbones.file_sha256(copy)
        if actual != expected:
            raise backbones.WeightsError(
                f"weights file {copy} was altered: sha256 {actual}, expected {expected}: restore it from "
                f"the original model folder"
            )
        return copy
    source = record.get("source")
    if source and os.path.isfile(source) and backbones.file_sha256(source) == expected:
        return source  # saved where the driver could not copy it (see the module docstring)
    raise backbones.WeightsError(
        f"weights file {copy} is missing (expected sha256 {expected}): copy the model folder whole, "
        f"or put that file (saved from {source}) there"
    )
