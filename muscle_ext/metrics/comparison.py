"""Paired comparison of two models scored on the same test cases (the evaluate reports' ``per_case.csv``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .bootstrap import bootstrap_mean_ci, ci_dict, paired_difference_ci
from .classification import roc_auc
from .report import read_case_scores

__all__ = ["paired_difference"]


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
