"""The benchmarks' bookkeeping, in process on made-up measurements: runs alternated between the
sides, each side's best (or min / median / max) over the runs, the ratios taken from those, and
the printed tables showing the figures. The real runs, one per script, are in
tests/test_benchmark_smoke.py (slow)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import engines  # noqa: E402
import explain  # noqa: E402
import featurize  # noqa: E402
import finetune  # noqa: E402
import sweep  # noqa: E402


def _cells(stdout: str, first: str) -> list[list[str]]:
    """The printed table rows whose first cell is ``first``, split at runs of spaces."""
    return [line.split() for line in stdout.splitlines() if line.split()[:1] == [first]]


# --------------------------------------------------------------------------- featurize.py


def _keras_run(rate: float, predict: float) -> dict:
    return {"images": 4, "images_per_s": rate, "predict_images_per_s": predict, "cpu_s": 2.0, "device": "test-device",
            "tensorflow_import_s": 1.5, "model_build_s": 0.5, "peak_rss_mib": 700.0}


def _spark_run(rate: float) -> dict:
    return {"images": 4, "images_per_s": rate, "cpu_s": 8.0, "partitions": 2, "driver_jvm_peak_rss_mib": 400.0,
            "worker_peak_rss_mib": 300.0, "workers_sum_peak_rss_mib": 600.0}


def test_featurize_alternates_the_sides_and_keeps_each_sides_best_run(monkeypatch, capsys):
    calls = []
    keras = iter([_keras_run(2.0, 8.0), _keras_run(5.0, 10.0), _keras_run(3.0, 20.0)])
    spark = iter([_spark_run(4.0), _spark_run(1.0), _spark_run(6.0)])
    monkeypatch.setattr(featurize, "run_keras_baseline", lambda *a: calls.append("keras") or next(keras))
    monkeypatch.setattr(featurize, "spark_run", lambda *a: calls.append("spark") or next(spark))
    args = argparse.Namespace(repeat=3, weights="random", batch_size=2, warm=False, engine="auto")
    decode = {"seconds": 0.5, "images_per_s": 8.0, "input_size": 224}
    row = featurize.measure_backbone(args, "ResNet50", {}, ["a.png"] * 4, decode)

    assert calls == ["keras", "spark"] * 3
    assert row["all_runs_images_per_s"] == {"keras": [2.0, 5.0, 3.0], "spark": [4.0, 1.0, 6.0]}
    assert row["keras"]["images_per_s"] == 5.0 and row["spark"]["images_per_s"] == 6.0  # each side's best
    assert row["ratio"] == pytest.approx(1.2)  # 6 / 5
    assert row["ratio_predict_loop"] == pytest.approx(0.6)  # 6 / the best Keras run's predict loop, 10
    capsys.readouterr()
    featurize.print_tables([row])
    speed, memory = _cells(capsys.readouterr().out, "ResNet50")
    assert speed[:9] == ["ResNet50", "4", "test-device", "5.00", "6.00", "1.20", "10.00", "0.60", "n/a"]
    assert speed[-3:] == ["8.0", "2.0", "2"]  # decode img/s, Keras import + build s, partitions
    assert memory[:2] == ["ResNet50", "700"] and memory[3:] == ["400", "300", "600"]


# --------------------------------------------------------------------------- engines.py


SIDES = ["keras", "openvino", "spark-openvino"]
COLD = {"keras": [3.0, 1.0, 2.0], "openvino": [4.0, 6.0, 5.0], "spark-openvino": [9.0, 7.0, 8.0]}
WARM = {"keras": [10.0, 12.0, 11.0], "openvino": [20.0, 22.0, 21.0], "spark-openvino": [15.0, 16.0, 14.0]}


def _engines_row(monkeypatch, default_side: str) -> tuple[dict, list[str]]:
    calls = []
    runs = {side: iter(zip(COLD[side], WARM[side])) for side in SIDES}

    def run_side(args, side, model_name, paths, source):
        calls.append(side)
        assert source == ("model.xml" if side == "openvino" else None)  # Spark sides find their export themselves
        cold, warm = next(runs[side])
        return {"images": 3, "cold_images_per_s": cold, "warm_images_per_s": warm, "load_average": 0.0}

    monkeypatch.setattr(engines, "exports_for", lambda *a: {"openvino": {"source": "model.xml"}})
    monkeypatch.setattr(engines, "run_side", run_side)
    args = argparse.Namespace(sides=SIDES, rounds=3, default_side=default_side)
    return engines.measure_backbone(args, "ResNet50", ["a.png"] * 3), calls


def test_engines_alternate_the_sides_every_round_and_summarise_the_rounds(monkeypatch, capsys):
    row, calls = _engines_row(monkeypatch, "spark-openvino")
    assert calls == SIDES * 3  # A B C A B C A B C
    assert row["summary"]["keras"] == {"cold": {"min": 1.0, "median": 2.0, "max": 3.0},
                                       "warm": {"min": 10.0, "median": 11.0, "max": 12.0}}
    assert row["summary"]["spark-openvino"]["cold"] == {"min": 7.0, "median": 8.0, "max": 9.0}
    ratios = row["ratios"]
    assert ratios["default_side"] == "spark-openvino"
    assert ratios["vs_keras_cold"] == pytest.approx(4.0) and ratios["vs_keras_warm"] == pytest.approx(15 / 11)
    assert ratios["fastest_single_cold"] == ratios["fastest_single_warm"] == "openvino"
    assert ratios["vs_fastest_single_cold"] == pytest.approx(1.6) and ratios["vs_fastest_single_warm"] == pytest.approx(15 / 21)
    assert (ratios["target_vs_keras"], ratios["target_vs_fastest_single"]) == (1.3, 0.9)
    capsys.readouterr()
    engines.print_tables({"results": [row]})
    rows = _cells(capsys.readouterr().out, "ResNet50")
    assert rows[0] == ["ResNet50", "keras", "3", "1.00", "/", "2.00", "/", "3.00", "10.00", "/", "11.00", "/", "12.00"]
    assert rows[-1][:5] == ["ResNet50", "spark-openvino", "4.00", "1.36", "1.3"]


def test_engines_without_the_default_side_report_no_ratios(monkeypatch, capsys):
    row, _ = _engines_row(monkeypatch, "spark-tensorflow")  # a GPU machine's default, not run here
    assert row["ratios"] == {}
    capsys.readouterr()
    engines.print_tables({"results": [row]})
    out = capsys.readouterr().out
    assert len(_cells(out, "ResNet50")) == 3 and "x keras cold" not in out


# --------------------------------------------------------------------------- explain.py


def test_explain_keeps_each_steps_shortest_run_and_prints_the_json_figures(monkeypatch, tmp_path, capsys):
    runs = {"featurize": [4.0, 2.0], "maps": [3.0, 4.0], "predict": [5.0, 6.0], "explain": [12.0, 10.0]}
    figures = explain.best_of(runs, 8)
    assert figures["seconds"] == {"featurize": 2.0, "maps": 3.0, "predict": 5.0, "explain": 10.0}
    assert figures["images_per_s"] == {"featurize": 4.0, "maps": 8 / 3, "predict": 1.6, "explain": 0.8}
    assert (figures["ratio_explain_to_predict"], figures["ratio_explain_to_featurize"]) == (2.0, 5.0)
    assert figures["ratio_maps_to_featurize"] == 1.5

    report = {"settings": {"images": 8, "master": "local[1]"}, "all_runs_seconds": runs, **figures}
    monkeypatch.setattr(explain, "measure", lambda args: report)
    out = tmp_path / "explain.json"
    assert explain.main(["--model", "m", "--images", "i", "--repeat", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {cells[0]: cells[1:] for cells in (line.split() for line in printed.splitlines()) if len(cells) == 3} == {
        "step": ["seconds", "images/s"], "featurize": ["2.0", "4.00"], "maps": ["3.0", "2.67"],
        "predict": ["5.0", "1.60"], "explain": ["10.0", "0.80"]}
    assert "explain / predict 2.00; explain / featurize 5.00; maps / featurize 1.50" in printed
    assert json.loads(out.read_text()) == report


# --------------------------------------------------------------------------- sweep.py


def test_sweep_report_prints_the_json_figures_and_the_verdicts(capsys):
    experiment = {"experiment": "ResNet50_binary_classification", "n_images": 24, "images_featurized": 24,
                  "featurization_seconds": 20.0, "wall_seconds": 40.0, "lr_iterations": 7}
    memory = {"driver_python_peak_rss_mib": 500.0, "driver_jvm_peak_rss_mib": 1700.0, "driver_peak_rss_mib": 2100.0,
              "python_workers_sum_peak_rss_mib": 900.0, "python_worker_peak_rss_mib": 450.0}
    report = {"experiments": [experiment], "single_passes": [{"model": "ResNet50", "images": 24, "seconds": 25.0}],
              "single_passes_seconds": 25.0, "sweep_seconds": 30.0, "sweep_featurization_seconds": 20.0,
              "sweep_ratio": 1.2, "memory": memory}
    sweep.print_report(report)
    out = capsys.readouterr().out
    assert _cells(out, "ResNet50_binary_classification") == [
        ["ResNet50_binary_classification", "24", "24", "20.0", "40.0", "7"]]
    assert "sum of single passes: 25.0 s; sweep: 30.0 s (of which featurization 20.0 s); ratio 1.200 (ABOVE the 1.15 target)" in out
    assert "together 2100 MiB (OVER 2048 MiB)" in out and "largest one 450 MiB" in out

    sweep.print_report({**report, "single_passes": [], "memory": {}})
    out = capsys.readouterr().out
    assert "sweep: 30.0 s (of which featurization 20.0 s); no single passes (--no-passes)" in out
    assert "memory: n/a" in out


# --------------------------------------------------------------------------- finetune.py


def _epochs(first_s: float, then_s: float, stages: int = 1, per_stage: int = 3) -> list[dict]:
    """Epoch rows as the trainer's recorder writes them: each stage's first epoch ``first_s`` seconds."""
    return [{"epoch": s * per_stage + k + 1, "stage": s + 1, "train_seconds": first_s if k == 0 else then_s}
            for s in range(stages) for k in range(per_stage)]


def test_finetune_figures_leave_out_each_stages_first_epoch_and_time_cold_from_the_spawn():
    run = {"epochs": _epochs(10.0, 2.0, stages=2), "n_fit": 40, "trained_at": 1060.0}
    figures = finetune.run_figures(run, spawned=1000.0)
    assert figures["steady_images_per_s"] == pytest.approx(40 * 4 / 8.0)  # epochs 2, 3, 5, 6: 2 s each
    assert figures["all_epochs_images_per_s"] == pytest.approx(40 * 6 / 28.0)
    assert (figures["cold_seconds"], figures["cold_images_per_s"]) == (60.0, pytest.approx(40 * 6 / 60.0))
    one_epoch = finetune.run_figures({**run, "epochs": _epochs(10.0, 2.0, per_stage=1)}, spawned=1000.0)
    assert one_epoch["steady_images_per_s"] is None and one_epoch["all_epochs_images_per_s"] == 4.0


def test_finetune_alternates_the_sides_and_summarises_rounds_and_memory(monkeypatch, capsys):
    calls = []
    steady = {"project": iter([9.0, 7.0, 8.0, 1.0]), "keras": iter([10.0, 12.0, 11.0, 1.0])}
    peaks = {"project": iter([700.0, 720.0, 710.0, 712.0]), "keras": iter([900.0, 905.0, 910.0, 1500.0])}

    def run_side(args, side, spec, rows):
        calls.append((side, len(rows)))
        rate = next(steady[side])
        return {"steady_images_per_s": rate, "all_epochs_images_per_s": rate / 2, "cold_images_per_s": rate / 4,
                "training_peak_rss_mib": next(peaks[side]), "n_fit": len(rows) - 2, "n_validation": 2,
                "load_average": 0.0}

    monkeypatch.setattr(finetune, "run_side", run_side)
    result = finetune.measure(argparse.Namespace(rounds=3), None, [{}] * 10, [{}] * 20)
    assert calls == [("project", 10), ("keras", 10)] * 3 + [("project", 20), ("keras", 20)]
    assert result["summary"]["project"]["steady"] == {"min": 7.0, "median": 8.0, "max": 9.0}
    assert result["summary"]["keras"]["cold"] == {"min": 2.5, "median": 2.75, "max": 3.0}
    assert result["ratios"] == {"steady": pytest.approx(8 / 11), "all_epochs": pytest.approx(8 / 11),
                                "cold": pytest.approx(8 / 11)}
    assert result["memory"]["project"] == {"images": [10, 20], "peak_rss_mib": [710.0, 712.0],
                                           "growth": pytest.approx(712 / 710)}
    assert result["memory"]["keras"]["peak_rss_mib"] == [905.0, 1500.0]
    capsys.readouterr()
    finetune.print_tables({"result": result})
    out = capsys.readouterr().out
    assert _cells(out, "project")[0] == ["project", "7.00", "/", "8.00", "/", "9.00", "3.50", "/", "4.00", "/", "4.50",
                                         "1.75", "/", "2.00", "/", "2.25"]
    assert "steady 0.73 (target >= 0.9: NOT met), all epochs 0.73, cold 0.73" in out
    assert _cells(out, "keras")[1] == ["keras", "10", "/", "20", "905", "/", "1500", "1.66"]


def test_finetune_validates_every_fifth_image_of_each_class_and_needs_one_a_class():
    images = [(f"{cls}{i}.png", cls) for i in range(10) for cls in ("b", "a")]
    rows = finetune.marked(images)
    assert [r["path"] for r in rows if r["validation"]] == ["b4.png", "a4.png", "b9.png", "a9.png"]
    assert {r["label"] for r in rows if r["path"].startswith("a")} == {0}  # classes indexed in sorted order
    with pytest.raises(finetune.BenchmarkError, match=r"class\(es\) c have fewer than 5 of the 24 images"):
        finetune.marked(images + [(f"c{i}.png", "c") for i in range(4)])
