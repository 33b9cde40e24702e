"""Percentile bootstrap confidence intervals (MONAI has none).

Resampling scheme, fixed so that results are reproducible and testable: ``rng = np.random.default_rng(seed)``;
for each resample, stratified: for each class of ``y_true`` in sorted order, ``rng.integers(0, n_c, n_c)``
indices within that class (concatenated in class order); unstratified: ``rng.integers(0, n, n)``.
Resamples where the metric is undefined (it returns NaN or raises ``ValueError``/``ZeroDivisionError``) are
skipped. All reports with the same ``seed`` and data draw the same resamples, so their intervals are paired.

``scipy.stats.bootstrap`` has no stratified resampling, hence this module; its unstratified percentile interval is
checked against scipy's (``method="percentile"``) in ``tests/test_reference_implementations.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["BootstrapCI", "bootstrap_ci", "bootstrap_indices", "bootstrap_mean_ci", "ci_dict", "paired_difference_ci"]


class BootstrapCI(NamedTuple):
    """Point estimate on all samples and the ``(1 - alpha)`` percentile interval; unpacks as a 3-tuple."""

    point: float
    low: float
    high: float


def bootstrap_indices(y_true: np.ndarray, n_resamples: int, seed: int = 0, stratified: bool = True):
    """Yield ``n_resamples`` index arrays following the module's resampling scheme."""
    rng = np.random.default_rng(seed)
    n = len(y_true)
    groups = [np.flatnonzero(y_true == c) for c in np.unique(y_true)] if stratified else None
    for _ in range(n_resamples):
        if groups is None:
            yield rng.integers(0, n, n)
        else:
            yield np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])


def _evaluate(metric_fn: Callable, y_true: np.ndarray, y_score: np.ndarray) -> float:
    try:
        value = float(metric_fn(y_true, y_score))
    except (ValueError, ZeroDivisionError):
        return float("nan")
    return value


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true: ArrayLike,
    y_score: ArrayLike,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> BootstrapCI:
    """Point value of ``metric_fn(y_true, y_score)`` and its percentile bootstrap interval.

    Samples are resampled along the first axis of both arrays (other axes ride along). ``stratified`` keeps the
    number of samples of each ``y_true`` value fixed: use it for class labels (AUC stays defined), not for
    continuous targets. Returns NaN bounds when no resample gives a defined metric, NaN everywhere when the
    metric is undefined on the full data.
    """
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if len(y_true) != len(y_score):
        raise ValueError(f"y_true and y_score lengths differ: {len(y_true)} vs {len(y_score)}")
    point = _evaluate(metric_fn, y_true, y_score)
    if np.isnan(point) or n_resamples <= 0:
        return BootstrapCI(point, float("nan"), float("nan"))
    stats = np.array([_evaluate(metric_fn, y_true[idx], y_score[idx])
                      for idx in bootstrap_indices(y_true, n_resamples, seed, stratified)])
    stats = stats[~np.isnan(stats)]
    if len(stats) < n_resamples / 2:
        warnings.warn(f"metric undefined in {n_resamples - len(stats)} of {n_resamples} bootstrap resamples",
                      stacklevel=2)
    if len(stats) == 0:
        return BootstrapCI(point, float("nan"), float("nan"))
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return BootstrapCI(point, float(low), float(high))


def bootstrap_mean_ci(values: ArrayLike, n_resamples: int = 1000, alpha: float = 0.05,
                      seed: int = 0) -> BootstrapCI:
    """Mean of per-sample values (e.g. per-image Dice) ignoring NaNs, with an unstratified bootstrap interval."""
    values = np.asarray(values, dtype=float)
    return bootstrap_ci(lambda _, v: np.nanmean(v) if np.any(~np.isnan(v)) else np.nan, values, values,
                        n_resamples, alpha, seed, stratified=False)


def paired_difference_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], y_true: ArrayLike,
                         score_a: ArrayLike, score_b: ArrayLike, n_resamples: int = 1000, alpha: float = 0.05,
                         seed: int = 0, stratified: bool = True) -> BootstrapCI:
    """``metric(a) - metric(b)`` of two models scored on the same cases, with a paired bootstrap interval: each
    resample draws the same cases for both, so case difficulty cancels out. An interval that excludes 0 says that the
    two differ on this population (two-sided ``alpha``), even where their separate intervals overlap; above 0 means
    ``a`` scores higher (better for AUC or Dice, worse for an error such as MAE)."""
    scores = np.stack([np.asarray(score_a), np.asarray(score_b)], axis=1)
    return bootstrap_ci(lambda y, s: metric_fn(y, s[:, 0]) - metric_fn(y, s[:, 1]), y_true, scores,
                        n_resamples, alpha, seed, stratified)


def ci_dict(ci: BootstrapCI) -> dict[str, float]:
    """``{"value", "ci_low", "ci_high"}``: the layout every report uses (JSON- and MLflow-friendly)."""
    return {"value": ci.point, "ci_low": ci.low, "ci_high": ci.high}
