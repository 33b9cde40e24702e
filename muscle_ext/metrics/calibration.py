"""Calibration and operating points of a binary classifier: is a predicted 0.8 right 80 % of the time, and does the
threshold chosen at home give the same sensitivity at a new site?

- :func:`expected_calibration_error` and :func:`reliability_curve`: the positive-class probability against the
  observed positive rate in probability bins (Naeini et al., AAAI 2015; Guo et al., ICML 2017). The curve is
  scikit-learn's ``calibration_curve``; ECE weights each bin's gap by its share of cases.
- :func:`operating_threshold`: a threshold chosen on one split (the internal validation split): Youden's J
  (the ROC point furthest above the diagonal) or the highest threshold that reaches a target sensitivity;
  :func:`at_threshold` gives the sensitivity and specificity it yields on any other split (test, external site).
- :func:`fit_recalibration`: temperature scaling (Guo et al. 2017; one scale of the logit, fitted by scipy) or
  Platt scaling (Platt 1999; scikit-learn's logistic regression on the logit) on a small labelled slice of the
  new site; the returned callable maps probabilities to recalibrated ones.

Probabilities are of the positive class, shape ``(N,)``; labels are 0/1, shape ``(N,)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression

from muscle_ext.metrics.classification import roc_curve, sensitivity, specificity, to_positive_prob

__all__ = ["at_threshold", "expected_calibration_error", "fit_recalibration", "operating_threshold",
           "reliability_curve"]

_EPS = 1e-6


def _inputs(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).ravel()
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must hold binary 0/1 labels")
    y_prob = to_positive_prob(y_prob)
    if y_prob.shape != y_true.shape:
        raise ValueError(f"{y_prob.shape[0]} probabilities for {y_true.shape[0]} labels")
    if ((y_prob < 0) | (y_prob > 1)).any() or not np.isfinite(y_prob).all():
        raise ValueError("probabilities must lie in [0, 1]")
    return y_true.astype(np.int64), y_prob


def _bin_edges(n_bins: int) -> np.ndarray:
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return np.linspace(0.0, 1.0, int(n_bins) + 1)


def reliability_curve(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> dict[str, list[float]]:
    """Mean predicted probability, observed positive rate and case count of each non-empty bin of ``n_bins`` equal
    width bins over [0, 1] (``sklearn.calibration.calibration_curve(strategy="uniform")``), for a reliability
    diagram: ``{"predicted", "observed", "count"}``."""
    y_true, y_prob = _inputs(y_true, y_prob)
    edges = _bin_edges(n_bins)
    observed, predicted = calibration_curve(y_true, y_prob, n_bins=int(n_bins), strategy="uniform")
    # the same binning as scikit-learn's (right-closed inner edges; 1.0 in the last bin)
    index = np.searchsorted(edges[1:-1], y_prob, side="right")
    counts = np.bincount(index, minlength=int(n_bins))
    return {"predicted": predicted.tolist(), "observed": observed.tolist(), "count": counts[counts > 0].tolist()}


def expected_calibration_error(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> float:
    """ECE of the positive-class probability: ``sum_b n_b / N * |observed_b - predicted_b|`` over equal-width bins
    (0 is perfectly calibrated; at most 1).

    Raises:
        ValueError: labels that are not 0/1, probabilities outside [0, 1], or a length mismatch.
    """
    curve = reliability_curve(y_true, y_prob, n_bins)
    counts = np.asarray(curve["count"], dtype=float)
    gaps = np.abs(np.asarray(curve["observed"]) - np.asarray(curve["predicted"]))
    return float((counts * gaps).sum() / counts.sum())


def operating_threshold(y_true: ArrayLike, y_prob: ArrayLike, rule: str = "youden",
                        target_sensitivity: float = 0.9) -> float:
    """A decision threshold on the positive-class probability, chosen on this split (cases with ``prob >= t`` are
    called positive).

    Args:
        rule: ``youden`` (maximise sensitivity + specificity - 1; the highest such threshold on ties) or
            ``sensitivity`` (the highest threshold whose sensitivity reaches ``target_sensitivity``).

    Raises:
        ValueError: an unknown rule, a target outside (0, 1], or a split with one class only.
    """
    y_true, y_prob = _inputs(y_true, y_prob)
    fpr, tpr, thresholds = roc_curve(y_true, y_prob)
    thresholds = np.minimum(thresholds, 1.0)  # the first point's inf: "call nothing positive"
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])  # argmax: the first, i.e. highest threshold on ties
    if rule == "sensitivity":
        if not 0 < float(target_sensitivity) <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
        reached = np.flatnonzero(tpr >= float(target_sensitivity) - 1e-12)
        return float(thresholds[reached[0]])
    raise ValueError(f"rule must be youden or sensitivity, got {rule!r}")


def at_threshold(y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of ``prob >= threshold`` on this split (e.g. a threshold chosen on the internal
    validation split, carried to an external site): ``{"threshold", "sensitivity", "specificity", "n"}``."""
    y_true, y_prob = _inputs(y_true, y_prob)
    predicted = y_prob >= float(threshold)
    return {"threshold": float(threshold), "sensitivity": sensitivity(y_true, predicted),
            "specificity": specificity(y_true, predicted), "n": int(y_true.size)}


def fit_recalibration(y_true: ArrayLike, y_prob: ArrayLike, method: str = "temperature") -> Callable[[ArrayLike],
                                                                                                       np.ndarray]:
    """Fit a recalibration map on a labelled slice of the new site; returns ``f(probabilities) -> probabilities``.

    ``temperature``: ``sigmoid(logit(p) / T)``, ``T`` minimising the negative log-likelihood (scipy's bounded
    scalar minimiser over [0.05, 20]); it keeps the ranking, so ROC AUC is unchanged. ``platt``:
    ``sigmoid(a * logit(p) + b)`` by scikit-learn's ``LogisticRegression`` (no penalty), which may also shift the
    operating point.

    Raises:
        ValueError: an unknown method, or a slice with one class only.
    """
    y_true, y_prob = _inputs(y_true, y_prob)
    if y_true.min() == y_true.max():
        raise ValueError("recalibration needs positive and negative cases in the labelled slice")
    z = logit(np.clip(y_prob, _EPS, 1 - _EPS))
    if method == "temperature":
        def nll(temperature: float) -> float:
            p = np.clip(expit(z / temperature), _EPS, 1 - _EPS)
            return float(-(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)).mean())

        temperature = float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)

        def scaled(p: ArrayLike) -> np.ndarray:
            return expit(logit(np.clip(to_positive_prob(p), _EPS, 1 - _EPS)) / temperature)

        scaled.temperature = temperature  # type: ignore[attr-defined]
        return scaled
    if method == "platt":
        model = LogisticRegression(C=np.inf).fit(z.reshape(-1, 1), y_true)

        def platt(p: ArrayLike) -> np.ndarray:
            x = logit(np.clip(to_positive_prob(p), _EPS, 1 - _EPS)).reshape(-1, 1)
            return model.predict_proba(x)[:, 1]

        return platt
    raise ValueError(f"method must be temperature or platt, got {method!r}")
