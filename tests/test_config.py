"""config.yaml: every entry loads and builds; wrong keys, values and YAML are one-line errors."""

from __future__ import annotations

import os

import pytest

from conftest import ROOT
from imagefeaturizer import backbones
from imagefeaturizer.featurizer import KerasImageFeaturizer
from xray.config import Config, load_config
from xray.errors import ConfigError
from xray.experiment import make_classifier

CONFIG = os.path.join(ROOT, "config.yaml")
EXPECTED = {f"{m}_{t}_classification" for m in backbones.BACKBONES for t in ("binary", "multiclass")}
TRAINED = ({f"{m}_{t}_finetune" for m in backbones.BACKBONES for t in ("binary", "multiclass")}
           | {f"SmallCNN_{t}_scratch" for t in ("binary", "multiclass")})


@pytest.fixture(scope="module")
def config():
    return load_config(CONFIG)


def test_one_entry_per_model_and_task(config):
    assert set(config.names) == EXPECTED | TRAINED | {"dataset_resize", "dataset_download"}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_every_trained_entry_plans_its_network(config, name):
    from xray.training import is_trained, plan

    exp = config.experiment(name)
    model, task, method = name.split("_")
    assert (exp.model, exp.task, exp["train"]) == (model, task, method) and is_trained(exp)
    p = plan(exp)
    assert p.kind == method and (p.units == 0 if method == "scratch" else 0 < exp["finetune"]["unfreeze"] <= p.units)
    assert p.image_size == (128 if model == "SmallCNN" else backbones.get_backbone(model).input_size)


@pytest.mark.parametrize(
    "entry,sets,message",
    [
        ("VGG16_binary_finetune", ["train=transfer"], "expected one of probe, finetune, scratch"),
        ("VGG16_binary_classification", ["model=SmallCNN"], "is trained from scratch: set train: scratch"),
        ("SmallCNN_binary_scratch", ["train=finetune"], "model 'SmallCNN' is trained from scratch"),
        ("VGG16_binary_finetune", ["finetune.unfreeze=6"], "finetune.unfreeze=6 is larger than VGG16, which has 5"),
        ("Xception_binary_finetune", ["training.image_size=64"], "training.image_size=64 is too small for Xception"),
    ],
)
def test_bad_training_settings_are_one_line(config, entry, sets, message):
    from xray.training import plan

    with pytest.raises(ConfigError, match=message) as info:
        plan(config.experiment(entry, sets))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_experiment_loads_and_builds(spark, config, name):
    exp = config.experiment(name)
    model, task = name.split("_")[0], name.split("_")[1]
    assert (exp.model, exp.task, exp.job) == (model, task, "experiment")
    expected_classes = ["Covid-19", "No_findings"] + (["Pneumonia"] if task == "multiclass" else [])
    assert exp.classes == expected_classes
    featurizer = KerasImageFeaturizer(
        modelName=exp.model, weights=exp.weights, pooling=exp["pooling"], batchSize=exp["batch_size"],
        handleInvalid=exp["handleInvalid"], maxImagePixels=exp["max_image_pixels"],
    )
    assert featurizer.backbone.name == model
    lr = make_classifier(exp.settings, len(exp.classes))
    assert lr.getFamily() == ("binomial" if task == "binary" else "multinomial")
    assert lr.getRegParam() == exp["classifier"]["regParam"]
    for key in ("weights", "dataset", "results_dir"):
        assert key in exp.settings
    assert {"raw_dir", "resized_dir"} <= set(exp["dataset"])


def test_resize_entry(config):
    exp = config.experiment("dataset_resize")
    assert exp.job == "resize" and exp.classes == []


def test_set_overrides_any_key(config):
    exp = config.experiment(
        "VGG16_binary_classification",
        [
            "weights=random",
            "dataset.raw_dir=/data/x",
            "classifier.regParam=0.5",
            "seed=7",
            "spark.master=spark://127.0.0.1:7077",
            "spark.conf.spark.executor.memory=3g",
            "handleInvalid=skip",
        ],
    )
    assert exp["weights"] == "random" and exp.weights == "random"
    assert exp.raw_dir == "/data/x"
    assert exp["classifier"]["regParam"] == 0.5 and exp["seed"] == 7
    assert exp["spark"]["master"] == "spark://127.0.0.1:7077"
    assert exp["spark"]["conf"]["spark.executor.memory"] == "3g"
    assert exp["spark"]["conf"]["spark.sql.shuffle.partitions"] == 8  # defaults kept beside it
    assert exp["handleInvalid"] == "skip"


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("colour=red", "unknown key 'colour'"),
        ("dataset.rawdir=/x", "unknown key 'dataset.rawdir'"),
        ("seed=abc", "seed: expected int"),
        ("test_fraction=2", "must be <= 0.9"),
        ("pooling=flatten", "expected one of avg, max"),
        ("model=AlexNet", "expected one of InceptionV3, ResNet50, VGG16, VGG19, Xception"),
        ("handleInvalid=ignore", "expected one of error, skip"),
        ("noequals", "expected key=value"),
        ("dataset=/x", "is a section"),
        ("explain.border_warning=1.5", "must be <= 1.0"),
        ("explain.sample_per_class=-1", "must be >= 0"),
        ("split.group_pattern=(", "not a valid regular expression .*set it empty for one group per image"),
        ("split.group_pattern=_\\d+", "has no capturing group: put the part of the file name that names the group"),
        ("split.near_duplicate_threshold=0.5", "must be >= 0.9"),
        ("split=x", "is a section"),
        ("spark.conf=1", "'spark.conf' is a section of Spark settings; set one of them, e.g. --set spark.conf.spark"),
    ],
)
def test_bad_set_values(config, assignment, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.experiment("ResNet50_binary_classification", [assignment])
    assert "\n" not in str(info.value)


def test_split_settings_default_and_override(config):
    exp = config.experiment("ResNet50_binary_classification")
    assert exp.group_pattern == r"^(\d{8})_\d{3}" and exp.near_duplicate_threshold == 0.995  # shipped for NIH names
    assert config.experiment("ResNet50_binary_classification", ["split.group_pattern="]).group_pattern == ""
    # a regex that YAML would read as a mapping is taken as written
    assert config.experiment("ResNet50_binary_classification",
                             ["split.group_pattern=^([^:]+): x"]).group_pattern == "^([^:]+): x"
    bare = {k: v for k, v in config.defaults.items() if k != "split"}  # a config without the section
    exp = Config(config.path, bare, config.tasks, config.entries).experiment("ResNet50_binary_classification")
    assert exp.group_pattern == "" and exp.near_duplicate_threshold == 0.995


def test_unknown_experiment_lists_the_names(config):
    with pytest.raises(ConfigError, match="VGG16_binary_classification") as info:
        config.experiment("VGG17_binary_classification")
    assert "unknown experiment" in str(info.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("defaults: {weights: random}\ntasks: {b: [a, c]}\nexperiments:\n  x: {model: VGG16, task: b, lr: 3}\n")
    with pytest.raises(ConfigError, match=r"\[x\]: unknown key 'lr'"):
        load_config(str(path))


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("defaults:\n  weights: random\nexperiments:\n  x: {model: VGG16\n  y: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line \d+: invalid YAML"):
        load_config(str(path))


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("defaults: !!python/object/apply:os.system ['echo pwned']\nexperiments: {}\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found: give an existing file with --config PATH"):
        load_config(str(tmp_path / "nope.yaml"))


def test_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("defaults: {weights: random}  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"c\.yaml is not UTF-8 text \(byte 0xe9 at offset \d+\): save it as UTF-8") as info:
        load_config(str(path))
    assert "\n" not in str(info.value)


def test_relative_paths_resolve_against_the_config_folder(config):
    exp = config.experiment("ResNet50_binary_classification", ["weights=weights/r.h5"])
    assert exp.weights == os.path.join(ROOT, "weights", "r.h5")
    assert exp.resized_dir == os.path.join(ROOT, "dataset_resized")
