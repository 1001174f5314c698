"""Experiment configuration: read config.yaml, merge defaults with a named entry, apply --set.

Every key is checked against :data:`SCHEMA`; a wrong name, type or value is a :class:`ConfigError`
with one line that names the key and what is allowed.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from imagefeaturizer.backbones import BACKBONES, POOLINGS
from imagefeaturizer.engines import ENGINE_CHOICES
from imagefeaturizer.networks import SCRATCH_MODELS

from .errors import ConfigError

HANDLE_INVALID = ("error", "skip")
NEAR_DUPLICATE_THRESHOLD = 0.995  # split.near_duplicate_threshold when not set
JOBS = ("experiment", "resize", "download")
TRAIN = ("probe", "finetune", "scratch")  # frozen backbone + LogisticRegression | fine-tune a backbone | SmallCNN


class OpenMap(dict):
    """Schema marker: a map whose keys are free (Spark settings)."""


def _choice(*allowed):
    def check(key, value):
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed: expected one of {', '.join(map(str, allowed))}")
        return value

    check.__doc__ = " | ".join(map(str, allowed))
    return check


def _typed(kind, *, minimum=None, maximum=None, exclusive_max=False):
    def check(key, value):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {value!r}")
        if maximum is not None and (value >= maximum if exclusive_max else value > maximum):
            raise ConfigError(f"{key}: must be {'<' if exclusive_max else '<='} {maximum}, got {value!r}")
        return value

    return check


def _list_of(rule):
    def check(key, value):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{key}: expected a non-empty list of values, e.g. [0.01, 0.1, 1.0], got {value!r}")
        return [rule(f"{key}[{i}]", v) for i, v in enumerate(value)]

    return check


def _text(key, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


_CLASSIFIER = {  # Spark ML LogisticRegression
    "regParam": _typed(float, minimum=0.0),
    "elasticNetParam": _typed(float, minimum=0.0, maximum=1.0),
    "maxIter": _typed(int, minimum=1),
    "tol": _typed(float, minimum=0.0),
    "standardization": _typed(bool),
}


def _group_pattern(key, value):
    """A regular expression with at least one capturing group, or empty (one group per image)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a regular expression (string), got {value!r}")
    try:
        compiled = re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{key}: {value!r} is not a valid regular expression ({exc}): fix it, "
                          f"or set it empty for one group per image") from None
    if compiled.groups < 1:
        raise ConfigError(f"{key}: {value!r} has no capturing group: put the part of the file name that "
                          f"names the group in parentheses, e.g. '^(\\d{{8}})_\\d{{3}}'")
    return value


SCHEMA: dict[str, Any] = {
    "job": _choice(*JOBS),
    "model": _choice(*BACKBONES, *SCRATCH_MODELS),
    "task": _text,  # checked against `tasks` once merged
    "weights": _text,
    "pooling": _choice(*POOLINGS),
    "batch_size": _typed(int, minimum=1),
    "handleInvalid": _choice(*HANDLE_INVALID),
    "max_image_pixels": _typed(int, minimum=1),
    "seed": _typed(int),
    "test_fraction": _typed(float, minimum=0.01, maximum=0.9),
    "cv_folds": _typed(int, minimum=0, maximum=20),
    "split": {
        "group_pattern": _group_pattern,  # regex on the file name; its first group names the group
        "near_duplicate_threshold": _typed(float, minimum=0.9, maximum=1.0),  # cosine similarity
    },
    "results_dir": _text,
    "cache_dir": _text,
    "engine": _choice(*ENGINE_CHOICES),
    "model_cache_dir": _text,
    "dataset": {
        "raw_dir": _text,
        "resized_dir": _text,
        "image_size": _typed(int, minimum=32, maximum=4096),
        "mode": _choice("L", "RGB"),
        "download_url": _text,
        "download_subdir": _text,
        "download_sha256": _text,  # optional: the archive's expected SHA-256 (hex)
    },
    "classifier": {
        **_CLASSIFIER,
        "grid": {k: _list_of(rule) for k, rule in _CLASSIFIER.items()},  # candidates: the tuned head
    },
    "train": _choice(*TRAIN),
    "training": {  # train: finetune | scratch
        "epochs": _typed(int, minimum=1),
        "batch_size": _typed(int, minimum=1),
        "learning_rate": _typed(float, minimum=1e-12),
        "finetune_learning_rate": _typed(float, minimum=1e-12),
        "patience": _typed(int, minimum=1),
        "validation_fraction": _typed(float, minimum=0.01, maximum=0.9),
        "augment": _typed(bool),
        "class_weights": _typed(bool),
        "dropout": _typed(float, minimum=0.0, maximum=1.0, exclusive_max=True),
        "image_size": _typed(int, minimum=0, maximum=4096),
    },
    "finetune": {"unfreeze": _typed(int, minimum=0)},
    "explain": {  # every run's class activation maps (xray.explain)
        "sample_per_class": _typed(int, minimum=0),
        "gallery_per_class": _typed(int, minimum=0),
        "gallery_misclassified": _typed(int, minimum=0),
        "border_warning": _typed(float, minimum=0.0, maximum=1.0),
    },
    "spark": {
        "master": _text,
        "remote": _text,  # optional: a Spark Connect server, sc://host:15002, or local (starts one)
        "app_name": _text,
        "driver_memory": _text,
        "conf": OpenMap(),
    },
    "tracking": {  # MLflow (xray/tracking.py)
        "mlflow": _typed(bool),
        "uri": _text,
        "experiment": _text,
    },
}


@dataclass
class Experiment:
    """One named entry, merged with the defaults and validated."""

    name: str
    settings: dict[str, Any]
    classes: list[str]  # the task's class folder names (empty for jobs without a task)
    base_dir: str  # folder of the config file: relative paths resolve against it

    def __getitem__(self, key: str) -> Any:
        return self.settings[key]

    @property
    def job(self) -> str:
        return self.settings["job"]

    @property
    def model(self) -> str | None:
        return self.settings.get("model")

    @property
    def task(self) -> str | None:
        return self.settings.get("task")

    def path(self, value: str) -> str:
        """A configured path, made absolute against the config file's folder."""
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    @property
    def raw_dir(self) -> str:
        return self.path(self.settings["dataset"]["raw_dir"])

    @property
    def resized_dir(self) -> str:
        return self.path(self.settings["dataset"]["resized_dir"])

    @property
    def results_dir(self) -> str:
        return os.path.join(self.path(self.settings["results_dir"]), self.name)

    @property
    def cache_dir(self) -> str:
        return self.path(self.settings["cache_dir"])

    @property
    def group_pattern(self) -> str:
        """``split.group_pattern``; empty: one group per image."""
        return self.settings.get("split", {}).get("group_pattern") or ""

    @property
    def near_duplicate_threshold(self) -> float:
        return self.settings.get("split", {}).get("near_duplicate_threshold", NEAR_DUPLICATE_THRESHOLD)

    @property
    def model_cache_dir(self) -> str:
        return self.path(self.settings.get("model_cache_dir", "cache/models"))

    @property
    def weights(self) -> str:
        """`weights` with a file path made absolute; 'imagenet' and 'random' unchanged."""
        w = self.settings["weights"]
        return w if w in ("imagenet", "random") else self.path(w)


def _validate(tree: dict, schema: dict, where: str, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'entry'} must be a mapping, got {tree!r}")
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if key not in schema:
            allowed = ", ".join(f"{prefix}{k}" for k in schema)
            raise ConfigError(f"{where}: unknown key {name!r} (allowed: {allowed})")
        rule = schema[key]
        if isinstance(rule, OpenMap):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a mapping of settings, got {value!r}")
            out[key] = {str(k): v for k, v in value.items()}
        elif isinstance(rule, dict):
            out[key] = _validate(value, rule, where, f"{name}.")
        else:
            out[key] = rule(f"{where}: {name}", value)
    return out


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """'dataset.raw_dir=/x' -> (['dataset', 'raw_dir'], '/x'); the value is read as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set weights=random")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = raw
    path: list[str] = []
    schema: Any = SCHEMA
    parts = key.strip().split(".")
    for i, part in enumerate(parts):
        if isinstance(schema, OpenMap):
            path.append(".".join(parts[i:]))  # Spark keys contain dots
            return path, value
        if not isinstance(schema, dict) or part not in schema:
            known = ", ".join(_flat_keys(SCHEMA))
            raise ConfigError(f"--set {assignment!r}: unknown key {key!r} (allowed: {known})")
        path.append(part)
        schema = schema[part]
    if isinstance(schema, OpenMap):
        raise ConfigError(f"--set {assignment!r}: {key!r} is a section of Spark settings; set one of them, "
                          f"e.g. --set {key}.spark.executor.memory=4g")
    if isinstance(schema, dict):
        raise ConfigError(f"--set {assignment!r}: {key!r} is a section; set one of its keys, e.g. {key}.{next(iter(schema))}=...")
    if schema is _group_pattern and not isinstance(value, str):  # YAML read a regex such as '^(\w+): x'
        value = raw
    return path, value


def _flat_keys(schema: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in schema.items():
        if isinstance(v, OpenMap):
            keys.append(f"{prefix}{k}.<spark setting>")
        elif isinstance(v, dict):
            keys.extend(_flat_keys(v, f"{prefix}{k}."))
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _nested(path: list[str], value: Any) -> dict:
    tree: Any = value
    for part in reversed(path):
        tree = {part: tree}
    return tree


@dataclass
class Config:
    path: str
    defaults: dict[str, Any]
    tasks: dict[str, list[str]]
    entries: dict[str, dict[str, Any]]

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def experiment(self, name: str, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
        if name not in self.entries:
            raise ConfigError(
                f"unknown experiment {name!r} in {self.path}: expected one of {', '.join(self.entries)}"
            )
        settings = _merge(self.defaults, self.entries[name])
        for assignment in overrides:
            path, value = parse_set(assignment)
            settings = _merge(settings, _nested(path, value))
        settings = _validate(settings, SCHEMA, f"{os.path.basename(self.path)} [{name}]")
        settings.setdefault("job", "experiment")
        classes: list[str] = []
        if settings["job"] == "experiment":
            for required in ("model", "task"):
                if required not in settings:
                    raise ConfigError(f"{self.path} [{name}]: missing key {required!r}")
            if settings["task"] not in self.tasks:
                raise ConfigError(
                    f"{self.path} [{name}]: unknown task {settings['task']!r}: expected one of {', '.join(self.tasks)}"
                )
            classes = list(self.tasks[settings["task"]])
            _check_model(f"{self.path} [{name}]", settings)
        return Experiment(name, settings, classes, os.path.dirname(os.path.abspath(self.path)))


def _check_model(where: str, settings: dict) -> None:
    """A backbone for ``train: probe|finetune``, a network of its own for ``train: scratch``."""
    train, model = settings.get("train", "probe"), settings["model"]
    if train == "scratch" and model not in SCRATCH_MODELS:
        raise ConfigError(f"{where}: train: scratch needs model: {' | '.join(SCRATCH_MODELS)}, got {model!r}")
    if train != "scratch" and model not in BACKBONES:
        raise ConfigError(f"{where}: model {model!r} is trained from scratch: set train: scratch, or choose a "
                          f"backbone ({', '.join(BACKBONES)})")


def load_config(path: str = "config.yaml") -> Config:
    """Read and check config.yaml (safe YAML loader; errors name the file and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found: give an existing file with --config PATH "
                          f"(before or after the command: ./wrapper.sh --config PATH run <experiment>)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
                          f"save it as UTF-8") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise ConfigError(f"config file {path!r} cannot be read ({exc.strerror}): give a readable file with --config PATH") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected sections defaults, tasks, experiments")
    unknown = set(raw) - {"defaults", "tasks", "experiments"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))} (allowed: defaults, tasks, experiments)")
    defaults = _validate(raw.get("defaults") or {}, SCHEMA, f"{path} [defaults]")
    tasks = raw.get("tasks") or {}
    if not isinstance(tasks, dict) or not all(
        isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v) for v in tasks.values()
    ):
        raise ConfigError(f"{path} [tasks]: each task must list at least two class folder names")
    entries = raw.get("experiments") or {}
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: 'experiments' must name at least one entry")
    for name, entry in entries.items():
        if entry is None:
            entries[name] = {}
        elif not isinstance(entry, dict):
            raise ConfigError(f"{path} [{name}]: an entry must be a mapping of settings, got {entry!r}")
        _validate(entries[name], SCHEMA, f"{path} [{name}]")
    return Config(path, defaults, {k: list(v) for k, v in tasks.items()}, entries)
