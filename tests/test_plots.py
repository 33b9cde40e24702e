"""Report figures: the data drawn (checked against hand-computed values and scikit-learn) and the PNG written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from muscle_ext.metrics import plots
from muscle_ext.metrics.plots import (
    plot_confusion_matrix,
    plot_regression_scatter,
    plot_roc_curve,
    plot_segmentation_overlay,
)


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plot functions save (still readable after ``_save`` closes them)."""
    figures = []
    save = plots._save

    def keep(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def _check_png(path, min_side: int = 200) -> np.ndarray:
    """A PNG that shows something: big enough, and neither blank nor one colour."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert min(pixels.shape[:2]) >= min_side, pixels.shape
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    return pixels


def test_roc_curve_draws_the_curve_and_auc_of_its_scores(tmp_path, drawn):
    # hand-computed: thresholds 0.8, 0.4, 0.35, 0.1 give (FPR, TPR) (0, .5), (.5, .5), (.5, 1), (1, 1); AUC 0.75
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    path = plot_roc_curve(y, np.stack([1 - p, p], 1), tmp_path / "roc.png", auc_ci=(0.5, 0.9))
    curve, chance = drawn[0].axes[0].lines
    np.testing.assert_allclose(curve.get_xdata(), [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(curve.get_ydata(), [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(chance.get_xydata(), [[0, 0], [1, 1]])
    assert [t.get_text() for t in drawn[0].axes[0].get_legend().get_texts()] == ["AUC = 0.750 (0.500-0.900)"]
    _check_png(path)

    # a larger set: the points and the AUC are scikit-learn's (every threshold kept)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = np.clip(0.5 * y + rng.random(50) * 0.6, 0, 1)
    plot_roc_curve(y, p, tmp_path / "roc_50.png")
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    curve = drawn[1].axes[0].lines[0]
    np.testing.assert_allclose(curve.get_xdata(), fpr)
    np.testing.assert_allclose(curve.get_ydata(), tpr)
    expected = f"AUC = {skm.roc_auc_score(y, p):.3f}"
    assert [t.get_text() for t in drawn[1].axes[0].get_legend().get_texts()] == [expected]


def test_confusion_matrix_shows_counts_and_row_shares(tmp_path, drawn):
    matrix = np.array([[20, 5], [3, 22]])  # rows: truth
    path = plot_confusion_matrix(matrix, tmp_path / "sub" / "cm.png", class_names=("normal", "pneumonia"))
    ax = drawn[0].axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.8, 0.2], [3 / 25, 22 / 25]])
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells == {(0, 0): "20\n80.0%", (0, 1): "5\n20.0%", (1, 0): "3\n12.0%", (1, 1): "22\n88.0%"}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["normal", "pneumonia"]
    assert ax.get_ylabel() == "true" and ax.get_xlabel() == "predicted"
    _check_png(path, min_side=150)


def test_segmentation_overlay_draws_image_prediction_and_outline_in_place(tmp_path, drawn):
    rng = np.random.default_rng(0)
    image = rng.random((40, 60))
    label = np.zeros((40, 60), int)
    label[10:30, 15:45] = 1
    pred = np.roll(label, 3, axis=1)
    path = plot_segmentation_overlay(image[None], tmp_path / "overlay.png", pred=pred, label=label, title="lung")
    ax = drawn[0].axes[0]
    grey, overlay = ax.images
    np.testing.assert_allclose(grey.get_array(), image)
    assert grey.origin == overlay.origin == "upper"  # row 0 at the top, as in (C, H, W)
    np.testing.assert_array_equal(~np.ma.getmaskarray(overlay.get_array()), pred == 1)  # only the prediction
    # the ground truth outline runs along the label's border (pixel centres 15..44 x 10..29, half-pixel contour)
    outline = np.concatenate([p.vertices for p in ax.collections[0].get_paths()])
    np.testing.assert_allclose([outline[:, 0].min(), outline[:, 0].max()], [14.5, 44.5], atol=0.01)
    np.testing.assert_allclose([outline[:, 1].min(), outline[:, 1].max()], [9.5, 29.5], atol=0.01)
    assert ax.get_title() == "lung"
    _check_png(path)


def test_regression_scatter_draws_every_case_and_the_identity(tmp_path, drawn):
    y_true = np.array([24.0, 100.0, 150.0, 216.0])
    y_pred = np.array([30.0, 90.0, 160.0, 200.0])
    path = plot_regression_scatter(y_true, y_pred, tmp_path / "scatter.png", unit="months")
    ax = drawn[0].axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.stack([y_true, y_pred], 1))
    np.testing.assert_allclose(ax.lines[0].get_xydata(), [[24, 24], [216, 216]])
    assert ax.get_xlabel() == "true (months)" and ax.get_ylabel() == "predicted (months)"
    _check_png(path)
