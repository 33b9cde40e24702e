"""benchmarks/bench_trainers.py times equal work: the downstream classifier's engine, built from the bundle config, and
the hand-written loop start from the same weights, compute the same loss on the same first batch and end the same
steps on the same batches with the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.utils import set_determinism

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_classification_engine_and_plain_loop_do_the_same_work(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their `common` module as a top-level one
    import bench_trainers

    args = bench_trainers.arguments(["--image-size", "32", "--batch-size", "4", "--steps", "1", "--device", "cpu"])
    pair = bench_trainers.build("classification", args, tmp_path)
    assert type(pair.trainer).__name__ == "SupervisedTrainer"  # what common.yaml builds
    assert pair.info["same_initial_weights"]
    assert pair.info["handlers"] == ["LrScheduleHandler", "StatsHandler"]
    assert "ValidationHandler" in pair.info["handlers_left_out"]

    first: dict[str, list[float]] = {"engine": [], "reference": []}
    set_determinism(0)
    images_engine, _ = pair.engine_round(first["engine"])
    set_determinism(0)
    images_reference, _ = pair.reference_round(first["reference"])
    assert images_engine == images_reference == 4
    assert first["engine"][0] == pytest.approx(first["reference"][0], rel=1e-5)
    assert bench_trainers.weight_difference(*pair.networks) < 1e-4
    # a second engine round continues the same run: one more iteration
    assert pair.engine_round()[0] == 4 and pair.trainer.state.iteration == 2
