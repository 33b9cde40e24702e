"""Comparisons over the evaluate reports' ``per_case.csv``: two models scored on the same test cases (a paired
difference), and the mean of several runs (seeds) on the same cases with an interval over cases and runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .bootstrap import bootstrap_indices, bootstrap_mean_ci, ci_dict, paired_difference_ci
from .classification import roc_auc
from .report import read_case_scores

__all__ = ["mean_over_runs", "paired_difference"]


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


def _headline(table: dict[str, np.ndarray]) -> tuple[str, Any, bool]:
    """(metric name, ``fn(table, indices) -> value``, stratify by label) for a ``per_case.csv`` table."""
    if "score" in table:
        return "roc_auc", lambda t, idx: roc_auc(t["label"][idx], t["score"][idx]), True
    if "dice" in table:
        return "dice", lambda t, idx: float(np.nanmean(t["dice"][idx])), False
    if "pred" in table and "label" in table:
        return "mae", lambda t, idx: float(np.mean(np.abs(t["pred"][idx] - t["label"][idx]))), False
    raise ValueError(f"per_case.csv columns {sorted(table)}: expected label+score, dice, or label+pred")


def mean_over_runs(per_case: Sequence[str | os.PathLike], n_resamples: int = 1000, seed: int = 0,
                   alpha: float = 0.05) -> dict[str, Any]:
    """The headline metric averaged over several runs (e.g. seeds of one fine-tuning) scored on the same test cases.

    The metric follows the columns as in :func:`paired_difference` (ROC AUC, mean Dice or MAE). The interval is a
    percentile bootstrap that resamples the test cases (stratified by label for AUC) and, within each resample,
    the runs (with replacement), so it covers both the test sample and the run-to-run spread.

    Returns:
        ``{"metric", "value", "ci_low", "ci_high", "per_run": [...], "n", "runs"}``.

    Raises:
        ValueError: no files, or files that scored different cases.
    """
    if not per_case:
        raise ValueError("mean_over_runs needs at least one per_case.csv")
    tables = [read_case_scores(p) for p in per_case]
    first = tables[0]
    if any(set(t) != set(first) or len(next(iter(t.values()))) != len(next(iter(first.values())))
           or ("label" in first and not np.array_equal(t["label"], first["label"])) for t in tables[1:]):
        raise ValueError(f"{[str(p) for p in per_case]} scored different cases: compare runs evaluated on the same "
                         "split with the same settings")
    metric, fn, stratified = _headline(first)
    n = len(next(iter(first.values())))
    everything = np.arange(n)
    per_run = [fn(t, everything) for t in tables]
    rng = np.random.default_rng(seed + 1)
    strata = first["label"] if stratified else np.zeros(n)
    values = []
    for idx in bootstrap_indices(strata, n_resamples, seed, stratified=stratified):
        runs = rng.integers(0, len(tables), len(tables))
        values.append(np.mean([fn(tables[r], idx) for r in runs]))
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    low, high = (np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(values)
                 else (float("nan"), float("nan")))
    return {"metric": metric, "value": float(np.nanmean(per_run)), "ci_low": float(low), "ci_high": float(high),
            "per_run": [float(v) for v in per_run], "n": int(n), "runs": len(tables)}
