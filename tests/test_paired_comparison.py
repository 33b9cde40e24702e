"""Per-case scores of the evaluation reports and the paired comparison that benchmarks/bench_downstream.py makes
from them (synthetic predictions: these check bookkeeping and signs, not model quality)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from muscle_ext.handlers import RegressionReport, SegmentationReport
from muscle_ext.metrics import roc_auc, write_case_scores

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_downstream(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their `common` module as a top-level one
    import bench_downstream

    yield bench_downstream
    sys.modules.pop("bench_downstream", None)


def _arm(folder: Path, columns: dict[str, np.ndarray]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "per_case.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", *columns])
        writer.writerows([i, *row] for i, row in enumerate(zip(*columns.values(), strict=True)))
    n = len(next(iter(columns.values())))
    return {"per_case": str(folder / "per_case.csv"), "metrics": {"n": n}}


def _run_report(report, items: list[dict]) -> None:
    engine = Engine(lambda e, batch: batch)  # the "evaluator" emits decollated, post-processed items
    report.attach(engine)
    engine.run([items], max_epochs=1)


def test_paired_auc_difference_has_the_arm_minus_scratch_sign(tmp_path, bench_downstream):
    rng = np.random.default_rng(0)
    label = np.repeat([0, 1], 30)
    good = label + rng.normal(0, 0.5, 60)  # separates the classes
    noise = rng.normal(0, 1, 60)
    arm = _arm(tmp_path / "arm", {"label": label, "score": good})
    scratch = _arm(tmp_path / "scratch", {"label": label, "score": noise})
    diff = bench_downstream.paired_vs_scratch(arm, scratch, resamples=200, seed=0)["roc_auc"]
    assert diff["value"] == pytest.approx(roc_auc(label, good) - roc_auc(label, noise))
    assert 0 < diff["ci_low"] <= diff["value"] <= diff["ci_high"]
    reverse = bench_downstream.paired_vs_scratch(scratch, arm, resamples=200, seed=0)["roc_auc"]
    assert reverse["value"] == pytest.approx(-diff["value"]) and reverse["ci_high"] < 0


def test_paired_mae_and_dice_differences(tmp_path, bench_downstream):
    label = np.array([100.0, 120.0, 140.0, 160.0])
    arm = _arm(tmp_path / "arm", {"label": label, "pred": label + [1, -1, 2, -2]})  # MAE 1.5
    scratch = _arm(tmp_path / "scratch", {"label": label, "pred": label + [10, -10, 0, 4]})  # MAE 6
    assert bench_downstream.paired_vs_scratch(arm, scratch, 100, 0)["mae"]["value"] == pytest.approx(-4.5)

    arm = _arm(tmp_path / "seg_arm", {"dice": np.array([0.9, np.nan, 0.8]), "iou": np.array([0.8, np.nan, 0.7])})
    scratch = _arm(tmp_path / "seg_scratch", {"dice": np.array([0.7, np.nan, 0.6]),
                                              "iou": np.array([0.5, np.nan, 0.4])})
    assert bench_downstream.paired_vs_scratch(arm, scratch, 100, 0)["dice"]["value"] == pytest.approx(0.2)


def test_paired_comparison_refuses_different_cases(tmp_path, bench_downstream):
    scratch = _arm(tmp_path / "scratch", {"label": np.array([0, 1, 0, 1]), "score": np.array([0.1, 0.2, 0.3, 0.4])})
    other_labels = _arm(tmp_path / "a", {"label": np.array([1, 0, 0, 1]), "score": np.array([0.1, 0.2, 0.3, 0.4])})
    fewer = _arm(tmp_path / "b", {"label": np.array([0, 1, 0]), "score": np.array([0.1, 0.2, 0.3])})
    for arm in (other_labels, fewer):
        with pytest.raises(ValueError, match="scored different cases"):
            bench_downstream.paired_vs_scratch(arm, scratch, 100, 0)
    seg = _arm(tmp_path / "c", {"dice": np.array([0.5, np.nan]), "iou": np.array([0.4, np.nan])})
    seg_other = _arm(tmp_path / "d", {"dice": np.array([np.nan, 0.5]), "iou": np.array([np.nan, 0.4])})
    with pytest.raises(ValueError, match="scored different cases"):
        bench_downstream.paired_vs_scratch(seg, seg_other, 100, 0)
    detection = {"per_case": str(tmp_path / "missing.csv"), "metrics": {"n": 4}}
    assert bench_downstream.paired_vs_scratch(detection, detection, 100, 0) is None


def test_segmentation_and_regression_reports_write_the_scores_they_average(tmp_path):
    truth = torch.zeros(1, 8, 8)
    truth[0, 2:6, 2:6] = 1
    shifted = torch.roll(truth, 1, dims=2)  # Dice 0.75 against truth
    empty = torch.zeros(1, 8, 8)  # no lung in the ground truth: NaN, left out of the mean
    report = SegmentationReport(tmp_path / "seg", num_overlays=0, n_resamples=20)
    _run_report(report, [{"pred": truth, "label": truth}, {"pred": shifted, "label": truth},
                         {"pred": truth, "label": empty}])
    rows = list(csv.DictReader((tmp_path / "seg" / "per_case.csv").open()))
    dice = np.array([float(r["dice"]) for r in rows])
    assert list(rows[0]) == ["index", "dice", "iou"] and dice[:2] == pytest.approx([1.0, 0.75])
    assert np.isnan(dice[2]) and np.nanmean(dice) == pytest.approx(report.report["dice"]["value"])
    assert np.nanmean([float(r["iou"]) for r in rows]) == pytest.approx(report.report["miou"]["value"])

    report = RegressionReport(tmp_path / "reg", n_resamples=20)
    _run_report(report, [{"pred": torch.tensor([130.0]), "label": torch.tensor([120.0])},
                         {"pred": torch.tensor([90.0]), "label": torch.tensor([96.0])}])
    rows = list(csv.DictReader((tmp_path / "reg" / "per_case.csv").open()))
    assert rows == [{"index": "0", "label": "120.0", "pred": "130.0"}, {"index": "1", "label": "96.0", "pred": "90.0"}]
    assert report.report["mae"]["value"] == pytest.approx(8.0)


def test_pretrain_pairing_reads_scores_stored_in_the_result_or_in_its_csv(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_pretrain

    labels = np.array([0, 1, 0, 1, 1, 0])
    mdmoco = {"label": labels, "knn": np.array([0.1, 0.9, 0.2, 0.8, 0.7, 0.3]),
              "linear_probe": np.array([0.6, 0.4, 0.2, 0.8, 0.7, 0.3])}
    random_init = {"label": labels, "knn": np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3]),
                   "linear_probe": np.array([0.6, 0.4, 0.2, 0.8, 0.7, 0.3])}
    stored = {"case_scores": {k: v.tolist() for k, v in mdmoco.items()}}
    older = {"scores_csv": str(write_case_scores(tmp_path / "query_scores.csv", random_init))}
    paired = bench_pretrain.paired_difference(stored, older, seed=0)
    assert paired["knn_auc"]["value"] == pytest.approx(roc_auc(labels, mdmoco["knn"]) - roc_auc(labels,
                                                                                                random_init["knn"]))
    assert paired["knn_auc"]["value"] > 0 and paired["linear_probe_auc"]["value"] == 0
    sys.modules.pop("bench_pretrain", None)
