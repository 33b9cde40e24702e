"""Comparisons over the evaluate reports' ``per_case.csv``: two models scored on the same test cases (a paired
difference), and the mean of several runs (seeds) on the same cases with an interval over cases and runs (from the
files, :func:`mean_over_runs`, or from arrays, :func:`runs_mean_ci`, which the adaptation curves use for their
k-shot draws)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata

from .bootstrap import bootstrap_indices, bootstrap_mean_ci, ci_dict, paired_difference_ci
from .classification import roc_auc
from .report import read_case_scores

__all__ = ["mean_over_runs", "paired_difference", "runs_mean_ci"]


def paired_difference(per_case_a: str | os.PathLike, per_case_b: str | os.PathLike, n_resamples: int = 1000,
                      seed: int = 0) -> dict[str, dict[str, float]]:
    """Model A's headline metric minus model B's over the same test cases, with a paired bootstrap 95 % interval.

    The metric follows the columns of the ``per_case.csv`` files (written by the downstream bundle's evaluation):
    ``label, score`` -> ROC AUC (higher is better); ``dice`` -> mean Dice (higher is better); ``label, pred`` ->
    mean absolute error (lower is better, so a negative difference favours A). Each resample draws the same cases
    for both models (stratified by label for AUC), so case difficulty cancels out: an interval that excludes 0 says
    the two differ even where their separate intervals overlap (Efron & Tibshirani 1993; :func:`paired_difference_ci`).

    Returns:
        ``{metric: {"value", "ci_low", "ci_high"}}`` with metric ``roc_auc``, ``dice`` or ``mae``.

    Raises:
        ValueError: the files did not score the same cases (other counts, labels, or Dice undefined on other images).
    """
    a, b = read_case_scores(per_case_a), read_case_scores(per_case_b)
    same = set(a) == set(b) and len({len(column) for column in (*a.values(), *b.values())}) == 1
    if same and "label" in a:
        same = np.array_equal(a["label"], b["label"])
    if same and "dice" in a:  # images without foreground have no Dice, in both or neither
        same = np.array_equal(np.isnan(a["dice"]), np.isnan(b["dice"]))
    if not same:
        raise ValueError(f"{per_case_a} and {per_case_b} scored different cases: compare evaluations of the same "
                         "split with the same settings")
    out: dict[str, Any]
    if "score" in a:
        out = {"roc_auc": ci_dict(paired_difference_ci(roc_auc, a["label"], a["score"], b["score"], n_resamples,
                                                       seed=seed))}
    elif "dice" in a:
        out = {"dice": ci_dict(bootstrap_mean_ci(a["dice"] - b["dice"], n_resamples, seed=seed))}
    else:
        errors = np.abs(a["pred"] - a["label"]) - np.abs(b["pred"] - b["label"])
        out = {"mae": ci_dict(bootstrap_mean_ci(errors, n_resamples, seed=seed))}
    return out


_RUN_METRICS = ("roc_auc", "dice", "mae")


def _per_run(metric: str, runs: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """``(R,)`` metric of each row of ``runs (R, n)`` (a subset of cases, ``labels (n,)`` the same subset)."""
    if metric == "roc_auc":  # roc_auc's rank-sum form, vectorised over rows (10^5 calls in an interval)
        positive = labels.astype(bool)
        n1, n0 = int(positive.sum()), int((~positive).sum())
        return (rankdata(runs, axis=1)[:, positive].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    # row by row: a 1-D mean sums in the same order whatever the number of runs (axis=1 may not, by an ulp)
    if metric == "dice":
        return np.array([np.nanmean(row) for row in runs])
    return np.array([np.mean(np.abs(row - labels)) for row in runs])


def runs_mean_ci(metric: str, runs: ArrayLike, labels: ArrayLike | None = None, n_resamples: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """A metric averaged over several runs scored on the same test cases, with an interval over cases and runs.

    The runs are e.g. the seeds of one fine-tuning, or the k-shot draws of one adaptation method. The value is the
    mean of each run's metric on all cases. The interval is a two-level percentile bootstrap (Efron & Tibshirani
    1993; resampling both levels of hierarchical data as in Davison & Hinkley 1997, section 3.8): each of
    ``n_resamples`` resamples draws the test cases (:func:`~muscle_ext.metrics.bootstrap_indices` with ``seed``,
    stratified by label for ROC AUC) and then the runs with replacement (``np.random.default_rng(seed + 1)``), and
    averages the drawn runs' metric on the drawn cases; so the interval covers both the test sample and the
    run-to-run spread. Resamples whose mean is not finite (e.g. Dice undefined on every drawn case) are skipped.
    ROC AUC is computed for all runs of a resample at once (the rank-sum form of
    :func:`~muscle_ext.metrics.roc_auc`, Hanley & McNeil 1982).

    Args:
        metric: ``"roc_auc"`` (higher is better), ``"dice"`` (mean Dice, NaN cases ignored) or ``"mae"`` (mean
            absolute error, in the unit of the labels).
        runs: ``(R, N)``, one row per run (a 1-D array is one run): the positive-class scores for ``roc_auc``, the
            per-case Dice (NaN where undefined) for ``dice``, the predictions for ``mae``.
        labels: ``(N,)``: the 0/1 labels for ``roc_auc`` (both classes, else every value is NaN), the targets for
            ``mae``; not used by ``dice``.
        n_resamples: bootstrap resamples.
        seed: seed of the resamples; the same seed draws the same cases for every call on the same labels.
        alpha: two-sided level: the interval spans the ``100 alpha / 2`` to ``100 (1 - alpha / 2)`` percentiles.

    Returns:
        ``{"metric", "value", "ci_low", "ci_high", "per_run": [...], "n", "runs"}``: ``value`` the mean of
        ``per_run`` (NaN runs ignored), ``n`` the number of cases, ``runs`` the number of runs; NaN bounds when no
        resample is finite.

    Raises:
        ValueError: an unknown metric, no run, ``labels`` missing for ``roc_auc`` or ``mae``, or lengths that differ.
    """
    if metric not in _RUN_METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(_RUN_METRICS)}")
    runs = np.atleast_2d(np.asarray(runs, dtype=float))
    n_runs, n = runs.shape
    if n_runs == 0:
        raise ValueError("runs_mean_ci needs at least one run")
    if metric != "dice":
        if labels is None:
            raise ValueError(f"{metric} needs the labels of the cases")
        labels = np.asarray(labels, dtype=float)
        if labels.shape != (n,):
            raise ValueError(f"labels have shape {labels.shape}, the runs score {n} cases")
    stratified = metric == "roc_auc"
    if stratified:
        per_run = np.array([roc_auc(labels, r) for r in runs])
    else:
        per_run = _per_run(metric, runs, labels)
    rng = np.random.default_rng(seed + 1)
    values = np.array([_per_run(metric, runs[:, idx], None if labels is None else labels[idx])[
                           rng.integers(0, n_runs, n_runs)].mean()
                       for idx in bootstrap_indices(labels if stratified else np.zeros(n), n_resamples, seed,
                                                    stratified=stratified)], dtype=float)
    values = values[np.isfinite(values)]
    low, high = (np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(values)
                 else (float("nan"), float("nan")))
    return {"metric": metric, "value": float(np.nanmean(per_run)), "ci_low": float(low), "ci_high": float(high),
            "per_run": [float(v) for v in per_run], "n": int(n), "runs": int(n_runs)}


def mean_over_runs(per_case: Sequence[str | os.PathLike], n_resamples: int = 1000, seed: int = 0,
                   alpha: float = 0.05) -> dict[str, Any]:
    """The headline metric averaged over several runs (e.g. seeds of one fine-tuning) scored on the same test cases:
    :func:`runs_mean_ci` on the runs' ``per_case.csv`` files.

    The metric follows the columns as in :func:`paired_difference`: ``label, score`` -> ROC AUC; ``dice`` -> mean
    Dice; ``label, pred`` -> mean absolute error.

    Returns:
        ``{"metric", "value", "ci_low", "ci_high", "per_run": [...], "n", "runs"}`` (:func:`runs_mean_ci`).

    Raises:
        ValueError: no files, files that scored different cases, or columns of no known metric.
    """
    if not per_case:
        raise ValueError("mean_over_runs needs at least one per_case.csv")
    tables = [read_case_scores(p) for p in per_case]
    first = tables[0]
    if any(set(t) != set(first) or len(next(iter(t.values()))) != len(next(iter(first.values())))
           or ("label" in first and not np.array_equal(t["label"], first["label"])) for t in tables[1:]):
        raise ValueError(f"{[str(p) for p in per_case]} scored different cases: compare runs evaluated on the same "
                         "split with the same settings")
    if "score" in first:
        metric, column = "roc_auc", "score"
    elif "dice" in first:
        metric, column = "dice", "dice"
    elif "pred" in first and "label" in first:
        metric, column = "mae", "pred"
    else:
        raise ValueError(f"per_case.csv columns {sorted(first)}: expected label+score, dice, or label+pred")
    return runs_mean_ci(metric, np.stack([t[column] for t in tables]), first.get("label"), n_resamples, seed, alpha)
