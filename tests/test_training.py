"""xray.training without Spark: the split with its validation part, its one-line errors, class
weights. The whole run (Spark barrier task, evaluation, saved model, predict) is checked in the
shared sweep of tests/test_sweep_predict.py."""

from __future__ import annotations

import os

import pytest

from conftest import ROOT
from xray import training
from xray.atomic import owner_tag
from xray.config import load_config
from xray.errors import DataError
from xray.split import split_rows
from xray.training import class_weights, split_table


@pytest.fixture(scope="module")
def config():
    return load_config(os.path.join(ROOT, "config.yaml"))


def _keys(per_class: dict[str, int]):
    return [(f"{cls}/img{i}.png", cls) for cls, n in per_class.items() for i in range(n)]


def test_validation_is_carved_from_the_training_split_per_class(config):
    exp = config.experiment("SmallCNN_binary_scratch", ["test_fraction=0.2", "training.validation_fraction=0.25"])
    keys = _keys({"Covid-19": 10, "No_findings": 20})
    split = split_table(keys, exp)
    test = {path for path, is_test, _ in split_rows(keys, exp["seed"], 0.2, 0, exp.group_pattern) if is_test}
    assert {path for path, is_test, _ in split.marks() if is_test} == test  # the probe's test split, untouched
    validation = [path for path, is_test, is_val in split.marks() if is_val]
    assert not set(validation) & test
    assert sorted(p.split("/")[0] for p in validation) == ["Covid-19"] * 2 + ["No_findings"] * 4  # 25% of 8 and 16
    assert split.sizes()["n_fit"] == 30 - len(test) - len(validation)


def test_validation_keeps_each_group_whole(config):
    """A patient's images (split.group_pattern) are all fitted on or all validate, never both."""
    exp = config.experiment("SmallCNN_binary_scratch", ["test_fraction=0.2", "training.validation_fraction=0.3"])
    keys = [(f"{cls}/{patient:08d}_{i:03d}.png", cls) for cls, first in (("Covid-19", 0), ("No_findings", 100))
            for patient in range(first, first + 8) for i in range(3)]
    split = split_table(keys, exp)
    side = {}
    for path, is_test, is_val in split.marks():
        side.setdefault(path.split("/")[1][:8], set()).add("test" if is_test else "validation" if is_val else "fit")
    assert all(len(sides) == 1 for sides in side.values()), side
    assert {s for sides in side.values() for s in sides} == {"test", "validation", "fit"}
    assert split.info["groups"] == 16 and split.info["group_pattern"] == exp.group_pattern


@pytest.mark.parametrize(
    "counts,message",
    [
        ({"Covid-19": 1, "No_findings": 6}, "class Covid-19 has no training image: the test split"),
        ({"Covid-19": 2, "No_findings": 6}, "too few images of Covid-19 for the validation split: 1 training image"),
    ],
)
def test_too_few_images_are_one_line_errors(config, counts, message):
    exp = config.experiment("SmallCNN_binary_scratch", ["test_fraction=0.2"])
    with pytest.raises(DataError, match=message) as info:
        split_table(_keys(counts), exp)
    assert "\n" not in str(info.value)


def test_class_weights_make_every_class_weigh_the_same():
    weights = class_weights({"a": 30, "b": 10}, ["a", "b"])
    assert weights == {0: pytest.approx(40 / 60), 1: pytest.approx(40 / 20)}
    assert 30 * weights[0] == pytest.approx(10 * weights[1])


def test_the_trained_models_folder_names_its_process_and_a_killed_runs_is_removed(config, tmp_path, monkeypatch):
    """The .keras file waits (for MLflow) beside results/<experiment>, in a folder named for its
    process as a staging folder is: a failed run removes its own, the next run a killed run's."""
    exp = config.experiment("SmallCNN_binary_scratch", [f"results_dir={tmp_path / 'results'}"])
    workdirs = []

    def train_and_write(exp, p, out_dir, workdir, phases, log):
        workdirs.append(workdir)
        raise DataError("stopped before Spark")

    monkeypatch.setattr(training, "check_before_training", lambda exp, log: None)
    monkeypatch.setattr(training, "_train_and_write", train_and_write)
    with pytest.raises(DataError):
        training.run_training(exp, log=lambda line: None)
    name = os.path.basename(workdirs[0])
    assert os.path.dirname(workdirs[0]) == str(tmp_path / "results")
    assert name.startswith(f".tmp-{owner_tag()}-SmallCNN_binary_scratch-model-")
    assert not (tmp_path / "results").exists()  # the failed run removed its folders and the one it made

    host, boot, pid, start = owner_tag().split(".")
    killed = tmp_path / "results" / name.replace(owner_tag(), f"{host}.{boot}.{pid}.{int(start) + 1}")
    killed.mkdir(parents=True)  # this name from a previous process (killed before it could clean up)
    (killed / "model.keras").write_bytes(b"a killed run's model")
    with pytest.raises(DataError):
        training.run_training(exp, log=lambda line: None)
    assert os.listdir(tmp_path / "results") == []  # the killed run's folder went, and this run's own
