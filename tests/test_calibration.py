"""Calibration and operating points (issue #17): each value against an independent computation in the test."""

from __future__ import annotations

import json

import numpy as np
import pytest

from muscle_ext.metrics.calibration import (
    at_threshold,
    expected_calibration_error,
    fit_recalibration,
    operating_threshold,
    reliability_curve,
)


def _overconfident(n: int = 4000, seed: int = 0, temperature: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); predictions sigmoid(temperature * z): over-confident by that temperature."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return y, 1 / (1 + np.exp(-temperature * z))


def _ece_by_hand(y, p, n_bins=10):
    """Equal-width bins, the first closed on both sides, the others (lo, hi]: the case-weighted |observed - mean p|
    (an independent computation, shared with tests/test_report_card_evaluate.py)."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (p > lo) & (p <= hi) if b else (p >= lo) & (p <= hi)
        if inside.any():
            total += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
    return total


def test_ece_equals_the_binned_gap_computed_by_hand():
    y, p = _overconfident()
    for n_bins in (5, 10, 15):
        assert expected_calibration_error(y, p, n_bins) == pytest.approx(_ece_by_hand(y, p, n_bins), abs=1e-9)
    curve = reliability_curve(y, p, 10)
    assert sum(curve["count"]) == len(y) and len(curve["count"]) == len(curve["observed"])
    calibrated = np.full(1000, 0.3)
    labels = np.r_[np.ones(300), np.zeros(700)].astype(int)
    assert expected_calibration_error(labels, calibrated) == pytest.approx(0.0)
    assert expected_calibration_error(labels, np.full(1000, 0.9)) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="0/1"):
        expected_calibration_error([0, 2], [0.1, 0.2])


def test_thresholds_match_a_brute_force_search():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.35 * y + rng.random(300) * 0.65, 0, 1)
    candidates = np.unique(p)
    youden = [np.mean(p[y == 1] >= t) + np.mean(p[y == 0] < t) - 1 for t in candidates]
    best = candidates[int(np.argmax(youden))]
    assert operating_threshold(y, p, "youden") == pytest.approx(best)
    reach = [t for t in candidates if np.mean(p[y == 1] >= t) >= 0.95]
    assert operating_threshold(y, p, "sensitivity", target_sensitivity=0.95) == pytest.approx(max(reach))
    # carried to another split: the sensitivity and specificity it gives there, counted by hand
    y2 = rng.integers(0, 2, 200)
    p2 = np.clip(0.2 * y2 + rng.random(200) * 0.8, 0, 1)
    moved = at_threshold(y2, p2, best)
    assert moved["sensitivity"] == pytest.approx(np.mean(p2[y2 == 1] >= best))
    assert moved["specificity"] == pytest.approx(np.mean(p2[y2 == 0] < best)) and moved["n"] == 200
    with pytest.raises(ValueError, match="youden or sensitivity"):
        operating_threshold(y, p, "f1")


def test_temperature_scaling_recovers_the_overconfidence_and_keeps_the_ranking():
    y, p = _overconfident(temperature=2.0)
    recalibrate = fit_recalibration(y[:2000], p[:2000], "temperature")
    assert recalibrate.temperature == pytest.approx(2.0, rel=0.15)
    after = recalibrate(p[2000:])
    assert np.array_equal(np.argsort(after, kind="stable"), np.argsort(p[2000:], kind="stable"))
    assert expected_calibration_error(y[2000:], after) < 0.5 * expected_calibration_error(y[2000:], p[2000:])
    platt = fit_recalibration(y[:2000], p[:2000], "platt")
    assert expected_calibration_error(y[2000:], platt(p[2000:])) < 0.5 * expected_calibration_error(y[2000:], p[2000:])
    with pytest.raises(ValueError, match="positive and negative"):
        fit_recalibration([1, 1, 1], [0.2, 0.5, 0.9])


def test_the_classification_report_carries_ece_and_the_reliability_figure(tmp_path):
    from muscle_ext.handlers import ClassificationReport

    y, p = _overconfident(n=300, seed=4)
    report = ClassificationReport(tmp_path, n_resamples=50)
    for label, prob in zip(y, p, strict=True):
        report.add({"pred": np.array([1 - prob, prob]), "label": np.eye(2)[label]})
    out = report.compute()
    assert out["ece"]["value"] == pytest.approx(expected_calibration_error(y, p))
    assert out["ece"]["ci_low"] <= out["ece"]["value"] <= out["ece"]["ci_high"]
    assert report.scalars(out)["test_ece"] == out["ece"]["value"]
    figures = report.figures(out, tmp_path)
    assert (tmp_path / "reliability.png") in figures and (tmp_path / "reliability.png").stat().st_size > 1000


def test_subgroup_metrics_equal_the_metrics_of_the_filtered_datalist(tmp_path):
    """A report by subgroup (issue #17): each row is what a report on that value's items alone gives."""
    from muscle_ext.handlers import ClassificationReport, RegressionReport

    rng = np.random.default_rng(5)
    y, p = _overconfident(n=240, seed=5)
    items = [{"image": f"{i}.png", "dataset": ["nih", "site2", "site3"][int(rng.integers(0, 3))],
              "sex": "F" if i % 3 else "M"} for i in range(len(y))]
    items[7].pop("sex")

    def report_on(subset: list[int], **kwargs) -> ClassificationReport:
        report = ClassificationReport(tmp_path, n_resamples=40, **kwargs)
        for i in subset:
            report.add({"pred": np.array([1 - p[i], p[i]]), "label": np.eye(2)[y[i]]})
        return report

    whole = report_on(range(len(y)), subgroups=["dataset", "sex"], items=items, min_group_size=70)
    tables = whole.subgroup_tables()
    assert [row["value"] for row in tables["sex"]] == ["F", "M", "missing"]
    for field, rows in tables.items():
        assert sum(row["n"] for row in rows) == len(y)
        for row in rows:
            chosen = [i for i, item in enumerate(items) if str(item.get(field, "missing")) == row["value"]]
            alone = report_on(chosen).compute()
            assert row["n"] == len(chosen)
            for metric in ("roc_auc", "accuracy", "ece"):  # NaN (AUC of one class) equal to NaN
                assert json.dumps(row[metric]) == json.dumps(alone[metric]), (field, row["value"], metric)
            assert ("warning" in row) == (len(chosen) < 70)
    assert len(whole.preds) == len(y)  # the report's own data is restored
    with pytest.raises(ValueError, match="would name patients, files or labels"):
        RegressionReport(tmp_path, subgroups=["patient_id"], items=items)
    with pytest.raises(ValueError, match="need the evaluated datalist entries"):
        RegressionReport(tmp_path, subgroups=["sex"])
