"""Report figures are written as non-empty PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

import numpy as np

from muscle_ext.metrics.plots import plot_confusion_matrix, plot_roc_curve, plot_segmentation_overlay

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_SIGNATURE


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = np.clip(0.5 * y + rng.random(50) * 0.6, 0, 1)
    roc = plot_roc_curve(y, p, tmp_path / "roc.png", auc_ci=(0.8, 0.95))
    cm = plot_confusion_matrix([[20, 5], [3, 22]], tmp_path / "sub" / "cm.png", class_names=("normal", "pneumonia"))
    image = rng.random((40, 60))
    label = np.zeros((40, 60), int)
    label[10:30, 15:45] = 1
    pred = np.roll(label, 3, axis=1)
    overlay = plot_segmentation_overlay(image[None], tmp_path / "overlay.png", pred=pred, label=label, title="lung")
    assert all(_is_png(path) for path in (roc, cm, overlay))
