"""Metrics: bootstrap CIs against an independent loop, AUC against sklearn, hand-made masks, COCO mAP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, recall_score, roc_auc_score

from muscle_ext.metrics import (
    binary_classification_report,
    bootstrap_ci,
    bootstrap_mean_ci,
    detection_report,
    paired_difference_ci,
    regression_report,
    roc_auc,
    roc_curve,
    runs_mean_ci,
    segmentation_report,
    segmentation_scores,
)


def _binary_data(n: int = 120, seed: int = 1):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    # rounded scores: many ties, across and within classes
    score = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.2, n), 0, 1), 1)
    return y, score


def _reference_bootstrap(metric, y, s, n_resamples, alpha, seed, stratified):
    """Written independently of the library: a plain loop over the documented resampling scheme."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(y.tolist()))
    stats = []
    for _ in range(n_resamples):
        if stratified:
            idx = []
            for c in classes:
                members = np.where(y == c)[0]
                idx.extend(members[rng.integers(0, len(members), len(members))])
            idx = np.array(idx)
        else:
            idx = rng.integers(0, len(y), len(y))
        if len(set(y[idx].tolist())) < 2:
            continue
        stats.append(metric(y[idx], s[idx]))
    return np.quantile(stats, alpha / 2), np.quantile(stats, 1 - alpha / 2), len(stats)


def test_roc_auc_is_the_mann_whitney_statistic_with_ties():
    from scipy.stats import mannwhitneyu

    y, s = _binary_data()
    assert len(np.unique(s)) < 15  # ties present
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic  # independent: U counts ties as one half
    assert roc_auc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)
    from sklearn.metrics import roc_auc_score

    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)  # the value scikit-learn gives
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert np.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    fpr, tpr, thresholds = roc_curve(y, s)
    assert thresholds[0] == np.inf and (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    for f, t, h in zip(fpr[1:], tpr[1:], thresholds[1:], strict=True):  # each point, counted by hand
        assert t == pytest.approx(np.mean(s[y == 1] >= h)) and f == pytest.approx(np.mean(s[y == 0] >= h))
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))


@pytest.mark.parametrize("stratified", [True, False])
def test_bootstrap_matches_independent_loop(stratified):
    y, s = _binary_data()
    point, low, high = bootstrap_ci(roc_auc_score, y, s, n_resamples=200, alpha=0.1, seed=7, stratified=stratified)
    ref_low, ref_high, _ = _reference_bootstrap(roc_auc_score, y, s, 200, 0.1, 7, stratified)
    assert point == pytest.approx(roc_auc_score(y, s))
    assert low == pytest.approx(ref_low) and high == pytest.approx(ref_high)
    assert low < point < high


def test_paired_difference_matches_independent_loop():
    y, s = _binary_data()
    rng = np.random.default_rng(1)
    other = s + rng.normal(0, 0.5, len(s))  # a worse model on the same cases
    point, low, high = paired_difference_ci(roc_auc, y, s, other, n_resamples=200, seed=5)
    # independent: sklearn on the same stratified resamples, both models drawn with the same indices
    rng = np.random.default_rng(5)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    diffs = []
    for _ in range(200):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        diffs.append(roc_auc_score(y[idx], s[idx]) - roc_auc_score(y[idx], other[idx]))
    assert point == pytest.approx(roc_auc_score(y, s) - roc_auc_score(y, other))
    assert (low, high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
    assert 0 < low < point < high  # pairing: the noisy copy is detectably worse
    assert paired_difference_ci(roc_auc, y, s, s, n_resamples=50) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("metric", ["roc_auc", "dice", "mae"])
def test_runs_mean_ci_matches_an_independent_loop_over_cases_then_runs(metric):
    y, s = _binary_data(60)
    rng = np.random.default_rng(2)
    runs = {"roc_auc": s + rng.normal(0, 0.2, (3, 60)), "dice": rng.uniform(0, 1, (3, 60)),
            "mae": y + rng.normal(0, 0.5, (3, 60))}[metric]
    if metric == "dice":
        runs[:, :4] = np.nan  # images without foreground: no Dice
    labels = None if metric == "dice" else y

    def score(run, idx):  # the metric from its definition, one run at a time
        if metric == "roc_auc":
            return roc_auc_score(y[idx], run[idx])
        return np.nanmean(run[idx]) if metric == "dice" else mean_absolute_error(y[idx], run[idx])

    result = runs_mean_ci(metric, runs, labels, n_resamples=150, seed=3, alpha=0.1)
    # independent: cases as in bootstrap_indices (stratified for AUC), then the runs from a second generator
    cases, draws = np.random.default_rng(3), np.random.default_rng(4)
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if metric == "roc_auc" else [np.arange(60)]
    means = []
    for _ in range(150):
        idx = np.concatenate([g[cases.integers(0, len(g), len(g))] for g in groups])
        means.append(np.mean([score(runs[r], idx) for r in draws.integers(0, 3, 3)]))
    everything = np.arange(60)
    assert result["per_run"] == pytest.approx([score(run, everything) for run in runs])
    assert result["value"] == pytest.approx(np.mean(result["per_run"]))
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(tuple(np.percentile(means, [5, 95])))
    assert result["ci_low"] < result["value"] < result["ci_high"]
    assert (result["metric"], result["n"], result["runs"]) == (metric, 60, 3)


def test_runs_mean_ci_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="expected one of roc_auc, dice, mae"):
        runs_mean_ci("accuracy", np.zeros((2, 4)), np.zeros(4))
    with pytest.raises(ValueError, match="mae needs the labels"):
        runs_mean_ci("mae", np.zeros((2, 4)))
    with pytest.raises(ValueError, match="the runs score 4 cases"):
        runs_mean_ci("roc_auc", np.zeros((2, 4)), np.array([0, 1, 0]))


@pytest.mark.filterwarnings("ignore:Only one class is present")
def test_bootstrap_skips_undefined_resamples():
    # 2 positives in 12: some unstratified resamples have no positive, where AUC is undefined
    y = np.array([1, 1] + [0] * 10)
    s = np.linspace(0, 1, 12)[::-1]
    _, _, n_valid = _reference_bootstrap(roc_auc_score, y, s, 200, 0.05, 3, False)
    assert n_valid < 200
    point, low, high = bootstrap_ci(roc_auc, y, s, n_resamples=200, seed=3, stratified=False)
    ref_low, ref_high, _ = _reference_bootstrap(roc_auc_score, y, s, 200, 0.05, 3, False)
    assert (point, low, high) == pytest.approx((1.0, ref_low, ref_high))
    # the metric raising ValueError (sklearn on one class) counts as undefined too
    assert bootstrap_ci(roc_auc_score, y, s, n_resamples=200, seed=3, stratified=False) == pytest.approx(
        (point, low, high))
    # undefined on all data: NaN everywhere
    assert all(np.isnan(bootstrap_ci(roc_auc, np.ones(5), np.arange(5.0), n_resamples=10)))


def test_bootstrap_interval_covers_auc_statistically():
    # the percentile interval of a strong classifier sits around its AUC and shrinks with n
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 800):
        y = rng.integers(0, 2, n)
        s = y + rng.normal(0, 1.0, n)
        point, low, high = bootstrap_ci(roc_auc, y, s, n_resamples=300, seed=1)
        assert low < point < high and high - low < 0.3
        widths.append(high - low)
    assert widths[1] < widths[0] * 0.6  # ~ 1/sqrt(8) in theory


def test_binary_classification_report():
    y, s = _binary_data()
    report = binary_classification_report(y, s, threshold=0.5, n_resamples=200, seed=0)
    pred = s >= 0.5
    assert report["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, s))
    assert report["accuracy"]["value"] == pytest.approx(np.mean(pred == y))
    assert report["sensitivity"]["value"] == pytest.approx(recall_score(y, pred))
    assert report["specificity"]["value"] == pytest.approx(recall_score(1 - y, ~pred))
    (tn, fp), (fn, tp) = report["confusion_matrix"]
    assert (tn, fp, fn, tp) == (np.sum(~pred & (y == 0)), np.sum(pred & (y == 0)), np.sum(~pred & (y == 1)),
                                np.sum(pred & (y == 1)))
    assert report["n"] == len(y) and report["n_positive"] == int(y.sum())
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        assert report[name]["ci_low"] <= report[name]["value"] <= report[name]["ci_high"]
    # (N, 2) softmax output gives the same report
    two_column = binary_classification_report(y, np.stack([1 - s, s], 1), n_resamples=200, seed=0)
    assert two_column == report
    with pytest.raises(ValueError):
        binary_classification_report([0, 2], [0.1, 0.9])


def test_regression_report():
    rng = np.random.default_rng(0)
    y = rng.normal(100, 30, 60)
    pred = y + rng.normal(0, 5, 60)
    report = regression_report(y, pred, n_resamples=200)
    assert report["mae"]["value"] == pytest.approx(mean_absolute_error(y, pred))
    assert report["rmse"]["value"] == pytest.approx(np.sqrt(np.mean((y - pred) ** 2)))
    assert report["mae"]["ci_low"] < report["mae"]["value"] < report["mae"]["ci_high"]
    assert report["n"] == 60


def _masks():
    # image 0: 4x4 square vs the same square shifted by one column -> |A∩B| = 12, |A|=|B| = 16
    y = np.zeros((3, 8, 8), dtype=np.int64)
    p = np.zeros_like(y)
    y[0, 2:6, 2:6] = 1
    p[0, 2:6, 3:7] = 1
    # image 1: perfect
    y[1, 1:4, 1:4] = 1
    p[1, 1:4, 1:4] = 1
    # image 2: no foreground in the ground truth, 2 false-positive pixels
    p[2, 0, :2] = 1
    return p, y


def test_segmentation_scores_on_hand_made_masks():
    p, y = _masks()
    s = segmentation_scores(p, y, num_classes=2)
    assert s["dice"].shape == (3, 1)
    assert s["dice"][0, 0] == pytest.approx(2 * 12 / 32)
    assert s["iou"][0, 0] == pytest.approx(12 / 20)
    assert s["dice"][1, 0] == 1.0 and s["iou"][1, 0] == 1.0
    assert np.isnan(s["dice"][2, 0])  # empty ground truth is ignored by default
    filled = segmentation_scores(p, y, num_classes=2, ignore_empty=False)
    assert filled["dice"][2, 0] == 0.0  # MONAI's convention: prediction not empty -> 0

    report = segmentation_report(torch.as_tensor(p)[:, None], y, num_classes=2, n_resamples=100)
    assert report["dice"]["value"] == pytest.approx((0.75 + 1.0) / 2)
    assert report["miou"]["value"] == pytest.approx((0.6 + 1.0) / 2)
    assert report["dice_per_class"][1]["value"] == pytest.approx(0.875)
    # pooled over the set, background included: foreground I=12+9, U=20+9+2; background over 192 pixels
    fg_inter, fg_union = 21, 31
    bg_inter, bg_union = 192 - fg_union, 192 - fg_inter
    assert report["miou_pooled"]["value"] == pytest.approx((fg_inter / fg_union + bg_inter / bg_union) / 2)
    fg_dice = 2 * 21 / (16 + 9 + 2 + 16 + 9)
    bg_dice = 2 * bg_inter / ((192 - 27) + (192 - 25))
    assert report["dice_pooled"]["value"] == pytest.approx((fg_dice + bg_dice) / 2)
    assert report["n"] == 3
    with pytest.raises(ValueError):
        segmentation_scores(np.random.rand(2, 8, 8), y[:2])


def test_bootstrap_mean_ignores_nan():
    point, low, high = bootstrap_mean_ci([0.5, np.nan, 1.0, 0.75], n_resamples=100)
    assert point == pytest.approx(0.75) and 0.5 <= low <= point <= high <= 1.0


def _detections():
    targets = [
        {"boxes": np.array([[10, 10, 40, 50], [60, 60, 90, 100]], float), "labels": np.array([0, 1])},
        {"boxes": np.array([[20, 30, 70, 60]], float), "labels": np.array([0])},
        {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)},
    ]
    perfect = [{"boxes": torch.as_tensor(t["boxes"]), "labels": torch.as_tensor(t["labels"]),
                "labels_scores": torch.linspace(0.9, 0.8, len(t["labels"]))} for t in targets]
    return targets, perfect


def test_detection_map_perfect_and_shifted():
    targets, perfect = _detections()
    report = detection_report(perfect, targets, classes=["active", "latent"])
    assert report["map"] == pytest.approx(1.0, abs=1e-6)
    assert report["ap50"] == pytest.approx(1.0, abs=1e-6)
    assert report["per_class"]["latent"]["ap"] == pytest.approx(1.0, abs=1e-6)
    assert report["n_gt"] == {"active": 2, "latent": 1} and report["n_images"] == 3

    # shift every box by 10% of its size along both axes: IoU = 0.81 / 1.19 = 0.68 -> found at IoU 0.50..0.65
    shifted = []
    for p in perfect:
        boxes = p["boxes"].clone()
        size = boxes[:, 2:] - boxes[:, :2]
        shifted.append({**p, "boxes": boxes + 0.1 * torch.cat([size, size], 1)})
    report = detection_report(shifted, targets, classes=["active", "latent"])
    assert report["ap50"] == pytest.approx(1.0, abs=1e-6)
    assert report["map"] == pytest.approx(0.4, abs=1e-6)
    assert report["ap75"] == 0.0

    # a class with no ground truth is undefined, not a zero that drags the mean down
    report = detection_report(perfect, targets, classes=["active", "latent", "other"])
    assert np.isnan(report["per_class"]["other"]["ap"]) and report["map"] == pytest.approx(1.0, abs=1e-6)


def test_frozen_probes_separate_separable_features_and_leave_the_global_rng_alone():
    from muscle_ext.metrics import knn_scores, linear_probe_scores

    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(2, 16, generator=gen) * 3
    train_y = torch.arange(80) % 2
    query_y = torch.arange(40) % 2
    train_x = centres[train_y] + torch.randn(80, 16, generator=gen)
    query_x = centres[query_y] + torch.randn(40, 16, generator=gen)
    state = torch.random.get_rng_state()
    probe = linear_probe_scores(train_x, train_y, query_x, 2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe leaves torch's global RNG alone
    assert torch.equal(probe, linear_probe_scores(train_x, train_y, query_x, 2))  # deterministic
    knn = knn_scores(train_x, train_y, query_x, 2, k=5)
    for scores in (probe, knn):
        assert scores.shape == (40, 2) and torch.allclose(scores.sum(1), torch.ones(40))
        assert roc_auc(query_y.numpy(), scores[:, 1].numpy()) > 0.95
    assert roc_auc(query_y.numpy(), knn_scores(train_x, 1 - train_y, query_x, 2, k=5)[:, 1].numpy()) < 0.05


def test_continual_metrics_count_a_joint_visit_for_every_task_it_trains():
    from muscle_ext.metrics.continual import continual_metrics

    out = continual_metrics([[0.6, 0.5], [0.8, 0.7], [0.7, 0.9]], [("a", "b")] * 3, ["a", "b"])
    assert out["per_task"]["a"]["after_own_last_visit"] == 0.7 and out["per_task"]["a"]["bwt"] is None
    assert out["per_task"]["a"]["forgetting"] == pytest.approx(0.1) and out["per_task"]["b"]["forgetting"] < 0
    with pytest.raises(ValueError, match="not columns"):
        continual_metrics([[0.5]], [("a", "z")], ["a"])


def test_continual_metrics_follow_their_definitions():
    from muscle_ext.metrics.continual import continual_metrics

    # three visits of tasks a, b, a; computed by hand from the definitions (Lopez-Paz & Ranzato 2017)
    r = [[0.8, 0.5, 0.6],   # after visit 1 (a)
         [0.7, 0.9, 0.65],  # after visit 2 (b)
         [0.85, 0.6, 0.7]]  # after visit 3 (a)
    out = continual_metrics(r, ["a", "b", "a"], ["a", "b", "c"], initial=[0.5, 0.5, 0.5])
    a, b, c = (out["per_task"][t] for t in "abc")
    assert a["bwt"] is None and a["after_own_last_visit"] == 0.85  # a was trained last
    assert b["bwt"] == pytest.approx(0.6 - 0.9) and b["forgetting"] == pytest.approx(0.9 - 0.6)
    assert a["forgetting"] == pytest.approx(0.8 - 0.85)  # better at the end than ever before
    assert c["bwt"] is None and c["fwt"] is None and c["forgetting"] is None  # never trained
    assert b["fwt"] == pytest.approx(0.5 - 0.5) and a["fwt"] is None  # a was visited first
    assert out["average"] == pytest.approx((0.85 + 0.6 + 0.7) / 3) and out["bwt"] == pytest.approx(-0.3)
    # an error metric (lower is better): positive forgetting still means worse
    err = continual_metrics([[10.0, 5.0], [14.0, 4.0]], ["x", "y"], ["x", "y"], higher_is_better=False)
    x = err["per_task"]["x"]
    assert x["bwt"] == pytest.approx(-4.0) and x["forgetting"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="shape"):
        continual_metrics([[1.0]], ["a", "b"], ["a"])
