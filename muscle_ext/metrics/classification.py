"""Classification and regression summaries with bootstrap intervals (the paper's Acc/Sen/Spe/AUC (95% CI)).

ROC AUC, the ROC curve and the confusion matrix are scikit-learn's (``sklearn.metrics``), ranks scipy's; this module
adds the conventions of our reports (NaN where a metric is undefined, the positive class as column 1) and the
bootstrap intervals.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata
from sklearn import metrics as skm

from muscle_ext.metrics.bootstrap import bootstrap_ci, ci_dict

__all__ = [
    "accuracy",
    "average_ranks",
    "binary_classification_report",
    "confusion_matrix",
    "mae",
    "regression_report",
    "rmse",
    "roc_auc",
    "roc_curve",
    "sensitivity",
    "specificity",
    "to_positive_prob",
]


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks with ties given their mean rank (``scipy.stats.rankdata(method="average")``)."""
    return rankdata(np.asarray(values).ravel(), method="average")


def _binary(y_true: ArrayLike) -> np.ndarray:
    return np.asarray(y_true).ravel().astype(bool)


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve: P(score_pos > score_neg) + 0.5 P(tie), as ``sklearn.metrics.roc_auc_score`` gives
    it, computed as the Mann-Whitney U statistic of the positives' ranks (``scipy.stats.rankdata``, ties averaged;
    Hanley & McNeil 1982). The same number as scikit-learn's (tested), without its input checks, which cost ~40x
    the computation in the thousands of bootstrap resamples of every report. NaN when only one class is present
    (scikit-learn raises there)."""
    y_true = _binary(y_true)
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(y_score, dtype=float).ravel())
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y_true: ArrayLike, y_score: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and thresholds (descending), starting at (0, 0) with ``inf``:
    ``sklearn.metrics.roc_curve`` with every threshold kept. Needs both classes (ValueError otherwise)."""
    y_true = _binary(y_true)
    if y_true.all() or not y_true.any():
        raise ValueError("a ROC curve needs positive and negative cases")
    fpr, tpr, thresholds = skm.roc_curve(y_true, np.asarray(y_score, dtype=float).ravel(), drop_intermediate=False)
    return fpr, tpr, thresholds


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Binary confusion matrix ``[[TN, FP], [FN, TP]]`` (rows: truth, columns: prediction),
    ``sklearn.metrics.confusion_matrix`` with both labels always present."""
    return skm.confusion_matrix(_binary(y_true), _binary(y_pred), labels=[False, True]).astype(np.int64)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


def sensitivity(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """True-positive rate (recall of class 1); NaN without positives."""
    y_true = np.asarray(y_true).ravel().astype(bool)
    return float(np.mean(np.asarray(y_pred).ravel().astype(bool)[y_true])) if y_true.any() else float("nan")


def specificity(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """True-negative rate; NaN without negatives."""
    y_true = np.asarray(y_true).ravel().astype(bool)
    return float(np.mean(~np.asarray(y_pred).ravel().astype(bool)[~y_true])) if (~y_true).any() else float("nan")


def to_positive_prob(y_prob: ArrayLike) -> np.ndarray:
    """Accept ``(N,)`` positive-class probabilities or ``(N, 2)`` two-class probabilities; return ``(N,)``."""
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim == 2 and y_prob.shape[1] == 2:
        return y_prob[:, 1]
    if y_prob.ndim == 2 and y_prob.shape[1] == 1:
        return y_prob[:, 0]
    if y_prob.ndim != 1:
        raise ValueError(f"expected (N,), (N, 1) or (N, 2) probabilities, got shape {y_prob.shape}")
    return y_prob


def binary_classification_report(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = 0.5,
                                 n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Accuracy, sensitivity, specificity and ROC AUC, each ``{"value", "ci_low", "ci_high"}`` (stratified
    percentile bootstrap, paired across metrics), plus the confusion matrix ``[[TN, FP], [FN, TP]]`` at
    ``y_prob >= threshold``, ``n``, ``n_positive`` and ``threshold``. ``y_true`` holds 0/1 labels."""
    y_true = np.asarray(y_true).ravel()
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold binary 0/1 labels")
    y_true = y_true.astype(np.int64)
    y_prob = to_positive_prob(y_prob)

    def thresholded(fn):
        return lambda t, p: fn(t, p >= threshold)

    metrics = {"accuracy": thresholded(accuracy), "sensitivity": thresholded(sensitivity),
               "specificity": thresholded(specificity), "roc_auc": roc_auc}
    report: dict = {name: ci_dict(bootstrap_ci(fn, y_true, y_prob, n_resamples, alpha, seed, stratified=True))
                    for name, fn in metrics.items()}
    report["confusion_matrix"] = confusion_matrix(y_true, y_prob >= threshold).tolist()
    report["n"] = int(y_true.size)
    report["n_positive"] = int(y_true.sum())
    report["threshold"] = float(threshold)
    return report


def mae(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    return float(np.mean(np.abs(np.asarray(y_true, dtype=float) - np.asarray(y_pred, dtype=float))))


def rmse(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    return float(np.sqrt(np.mean((np.asarray(y_true, dtype=float) - np.asarray(y_pred, dtype=float)) ** 2)))


def regression_report(y_true: ArrayLike, y_pred: ArrayLike, n_resamples: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> dict:
    """MAE and RMSE, each ``{"value", "ci_low", "ci_high"}`` (unstratified bootstrap), and ``n``."""
    y_true = np.asarray(y_true, dtype=float).ravel()
    y_pred = np.asarray(y_pred, dtype=float).ravel()
    report: dict = {name: ci_dict(bootstrap_ci(fn, y_true, y_pred, n_resamples, alpha, seed, stratified=False))
                    for name, fn in (("mae", mae), ("rmse", rmse))}
    report["n"] = int(y_true.size)
    return report
