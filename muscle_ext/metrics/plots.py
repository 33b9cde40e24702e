"""Report figures as PNG files: ROC curve, confusion matrix, regression scatter, segmentation overlay.

matplotlib is imported lazily with the Agg backend (it arrives with mlflow; training never needs it).
Every function returns the written path, ready for ``mlflow.log_artifact``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from muscle_ext.metrics.classification import roc_auc, roc_curve, to_positive_prob

__all__ = ["plot_adaptation_curves", "plot_confusion_matrix", "plot_embedding_maps", "plot_label_efficiency",
           "plot_regression_scatter", "plot_reliability", "plot_roc_curve", "plot_roc_curves",
           "plot_segmentation_overlay", "plot_training_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_roc_curve(y_true: ArrayLike, y_prob: ArrayLike, path: str | os.PathLike, title: str = "ROC curve",
                   auc_ci: Sequence[float] | None = None) -> Path:
    """ROC curve with its AUC (and ``auc_ci`` = (low, high) in the legend when given)."""
    return plot_roc_curves({"": (y_true, y_prob, auc_ci)}, path, title)


def plot_roc_curves(curves: Mapping[str, tuple[ArrayLike, ArrayLike, Sequence[float] | None]],
                    path: str | os.PathLike, title: str = "ROC curves") -> Path:
    """Several ROC curves in one figure (e.g. every starting point on one test set): ``{name: (y_true, y_prob,
    auc_ci or None)}``; the legend gives each name with its AUC (sklearn's ``roc_curve`` / ``roc_auc_score``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (y_true, y_prob, auc_ci) in curves.items():
        y_prob = to_positive_prob(y_prob)
        fpr, tpr, _ = roc_curve(y_true, y_prob)
        label = f"{name}: " if name else ""
        label += f"AUC = {roc_auc(y_true, y_prob):.3f}"
        if auc_ci is not None:
            label += f" ({auc_ci[0]:.3f}-{auc_ci[1]:.3f})"
        ax.plot(fpr, tpr, lw=2, label=label)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right", fontsize=8 if len(curves) > 1 else None)
    return _save(fig, path)


def plot_reliability(curve: Mapping[str, Sequence[float]], path: str | os.PathLike, ece: float | None = None,
                     title: str = "Reliability") -> Path:
    """Reliability diagram of :func:`~muscle_ext.metrics.calibration.reliability_curve` (``{"predicted",
    "observed", "count"}``): observed positive rate against mean predicted probability per bin, marker area by
    count, the diagonal of perfect calibration; the ECE in the title when given."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    counts = np.asarray(curve["count"], dtype=float)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.plot(curve["predicted"], curve["observed"], lw=1.5)
    ax.scatter(curve["predicted"], curve["observed"], s=20 + 180 * counts / max(counts.max(), 1), zorder=3)
    label = title if ece is None else f"{title} (ECE {ece:.3f})"
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="observed positive rate",
           title=label)
    return _save(fig, path)


def plot_training_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: str | os.PathLike,
                         validation: str, title: str = "Training") -> Path:
    """Training curves of several runs side by side: ``{run label: {"validation": [(step, value)], "train_loss":
    [(step, value)]}}``; left the validation metric (named ``validation``) against its step (epoch), right the
    training loss against its step (iteration). A run without one of the two is left out of that panel."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, series in curves.items():
        for ax, key in ((left, "validation"), (right, "train_loss")):
            points = sorted(series.get(key) or [])
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, lw=1.5, label=label)
    left.set(xlabel="epoch", ylabel=validation, title=f"{title}: validation")
    right.set(xlabel="iteration", ylabel="training loss", title=f"{title}: training loss")
    for ax in (left, right):
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion_matrix(matrix: ArrayLike, path: str | os.PathLike, class_names: Sequence[str] = ("0", "1"),
                          title: str = "Confusion matrix") -> Path:
    """Confusion matrix (rows: truth, columns: prediction) with counts and row percentages."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    row_totals = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * len(matrix) + 2.5, 1.2 * len(matrix) + 2))
    ax.imshow(matrix / row_totals, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        share = count / row_totals[i, 0]
        ax.text(j, i, f"{count}\n{100 * share:.1f}%", ha="center", va="center",
                color="white" if share > 0.5 else "black")
    ticks = np.arange(len(matrix))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=class_names, yticklabels=class_names, xlabel="predicted",
           ylabel="true", title=title)
    return _save(fig, path)


def plot_segmentation_overlay(image: ArrayLike, path: str | os.PathLike, pred: ArrayLike | None = None,
                              label: ArrayLike | None = None, title: str = "", alpha: float = 0.4) -> Path:
    """Grey image ``(H, W)`` or ``(1, H, W)`` with the predicted mask filled and the ground truth outlined.

    Rows are drawn top to bottom as in our ``(C, H, W)`` convention (``origin="upper"``).
    """
    plt = _pyplot()
    image = np.squeeze(np.asarray(image, dtype=float))
    fig, ax = plt.subplots(figsize=(5, 5 * image.shape[0] / max(image.shape[1], 1)))
    ax.imshow(image, cmap="gray", origin="upper")
    if pred is not None:
        pred = np.squeeze(np.asarray(pred))
        ax.imshow(np.ma.masked_where(pred == 0, pred), cmap="autumn", alpha=alpha, origin="upper",
                  interpolation="nearest")
    if label is not None:
        label = np.squeeze(np.asarray(label))
        for k in np.unique(label[label > 0]):
            ax.contour(label == k, levels=[0.5], colors="lime", linewidths=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_regression_scatter(y_true: ArrayLike, y_pred: ArrayLike, path: str | os.PathLike,
                            title: str = "Predicted vs true", unit: str = "") -> Path:
    """Predicted against true values with the identity line (points on it are exact)."""
    plt = _pyplot()
    y_true = np.asarray(y_true, dtype=float).ravel()
    y_pred = np.asarray(y_pred, dtype=float).ravel()
    lo = float(min(y_true.min(), y_pred.min())) if y_true.size else 0.0
    hi = float(max(y_true.max(), y_pred.max())) if y_true.size else 1.0
    suffix = f" ({unit})" if unit else ""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y_true, y_pred, s=12, alpha=0.7)
    ax.plot([lo, hi], [lo, hi], ls="--", c="grey", lw=1)
    ax.set(xlabel=f"true{suffix}", ylabel=f"predicted{suffix}", title=title)
    return _save(fig, path)


def plot_embedding_maps(maps: Mapping[str, tuple[ArrayLike, Sequence[str]]], path: str | os.PathLike,
                        title: str = "Backbone embeddings (t-SNE)") -> Path:
    """One panel per backbone: its 2-D map ``(N, 2)`` with each point coloured by its group (e.g. body part), the
    same colour for the same group in every panel."""
    plt = _pyplot()
    groups = sorted({str(g) for _, labels in maps.values() for g in labels})
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4), squeeze=False)
    for ax, (name, (points, labels)) in zip(axes[0], maps.items(), strict=True):
        points, labels = np.asarray(points), np.asarray([str(g) for g in labels])
        for group in groups:
            chosen = labels == group
            if chosen.any():
                ax.scatter(points[chosen, 0], points[chosen, 1], s=8, color=colours[group], label=group)
        ax.set(title=name, xticks=[], yticks=[])
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2)
    fig.suptitle(title)
    return _save(fig, path)



def plot_adaptation_curves(panels: Mapping[str, Mapping[str, Any]], path: str | os.PathLike,
                           title: str = "Adapting to the new site") -> Path:
    """One panel per source model: new-site ROC AUC (mean over k-shot draws, its 95 % interval as a band) against
    ``k`` (labelled patients per class), a line per adaptation method, ``none`` (the model as it came) dashed.

    ``panels``: ``{name: curves}`` with ``curves`` as :func:`muscle_ext.engines.adaptation_curves` returns them
    (``{"ks": [...], "methods": {method: {str(k): {"target_auc": {"value", "ci_low", "ci_high"}}}}}``)."""
    plt = _pyplot()
    methods = sorted({m for curves in panels.values() for m in curves["methods"]})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (name, curves) in zip(axes[0], panels.items(), strict=True):
        for method, by_k in curves["methods"].items():
            ks = [k for k in curves["ks"] if str(k) in by_k]
            cells = [by_k[str(k)]["target_auc"] for k in ks]
            values = [c["value"] for c in cells]
            style = {"ls": "--", "lw": 1.2} if method == "none" else {"lw": 1.8, "marker": "o", "ms": 4}
            ax.plot(ks, values, color=colours[method], label=method, **style)
            if method != "none":
                ax.fill_between(ks, [c["ci_low"] for c in cells], [c["ci_high"] for c in cells],
                                color=colours[method], alpha=0.12, lw=0)
        ax.axhline(0.5, c="grey", lw=0.8, ls=":")
        ax.set(title=name, xlabel="labelled patients per class (k)", xticks=curves["ks"], ylim=(0, 1))
    axes[0][0].set_ylabel("new-site ROC AUC")
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_label_efficiency(curves: Mapping[str, Mapping[float, Mapping[str, float]]], path: str | os.PathLike,
                          metric: str, title: str = "Label efficiency") -> Path:
    """The headline metric against the share of training labels (log axis, in %), a line per starting point with
    its 95 % interval as a band: ``{start: {fraction: {"value", "ci_low", "ci_high"}}}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, by_fraction in curves.items():
        fractions = sorted(by_fraction)
        percent = [100 * f for f in fractions]
        ax.plot(percent, [by_fraction[f]["value"] for f in fractions], marker="o", ms=4, lw=1.8, label=name)
        ax.fill_between(percent, [by_fraction[f]["ci_low"] for f in fractions],
                        [by_fraction[f]["ci_high"] for f in fractions], alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set(xlabel="training labels used (%)", ylabel=metric, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)
