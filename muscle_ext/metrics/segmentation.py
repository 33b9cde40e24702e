"""Segmentation summaries: Dice and IoU per image (MONAI's ``compute_dice``/``compute_iou``) and pooled.

Two conventions are reported because they differ a lot:

- per image (MONAI): Dice/IoU of each foreground class in each image, averaged over classes, then over images;
- pooled over the test set, all classes including background (PaddleSeg's ``mIoU``/``Dice``, which the MUSCLE
  paper reports: its lung mIoU is above what its Dice implies for the lungs alone, so background is included).

Inputs are integer label maps ``(B, H, W)`` or ``(B, 1, H, W)`` (e.g. ``argmax`` of the logits), numpy or torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot
from numpy.typing import ArrayLike

from muscle_ext.metrics.bootstrap import bootstrap_ci, bootstrap_mean_ci, ci_dict

__all__ = ["per_image_means", "pooled_scores", "segmentation_report", "segmentation_scores"]


def _one_hot(labels: ArrayLike | torch.Tensor, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"expected label maps (B, H, W) or (B, 1, H, W), got shape {tuple(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError("label maps must hold integer class indices (take argmax of the logits first)")
    return one_hot(t.long(), num_classes=num_classes, dim=1).bool()


def segmentation_scores(y_pred: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor, num_classes: int = 2,
                        include_background: bool = False, ignore_empty: bool = True) -> dict[str, np.ndarray]:
    """Per-image, per-class ``dice`` and ``iou`` ``(B, C')`` and per-class ``intersection``/``union``/``pred_area``/
    ``true_area`` pixel counts ``(B, C)`` (all classes, for pooled scores).

    ``ignore_empty``: a class absent from an image's ground truth scores NaN (left out of the means); otherwise 1
    if it is also absent from the prediction, else 0 (MONAI's convention).
    """
    pred, true = _one_hot(y_pred, num_classes), _one_hot(y, num_classes)
    if pred.shape != true.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {tuple(pred.shape)} vs {tuple(true.shape)}")
    dice = compute_dice(pred.float(), true.float(), include_background=include_background, ignore_empty=ignore_empty)
    iou = compute_iou(pred.float(), true.float(), include_background=include_background, ignore_empty=ignore_empty)
    dims = (2, 3)
    return {"dice": dice.numpy(), "iou": iou.numpy(),
            "intersection": (pred & true).sum(dims).numpy(), "union": (pred | true).sum(dims).numpy(),
            "pred_area": pred.sum(dims).numpy(), "true_area": true.sum(dims).numpy()}


def per_image_means(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image ``dice`` and ``iou`` ``(B,)``: means over the classes of :func:`segmentation_scores`'s output that
    the image's ground truth holds (NaN where it holds none)."""
    return {"dice": _nanmean_rows(scores["dice"]), "iou": _nanmean_rows(scores["iou"])}


def pooled_scores(intersection: np.ndarray, union: np.ndarray, pred_area: np.ndarray,
                  true_area: np.ndarray) -> dict[str, float]:
    """PaddleSeg-style scores from per-image counts ``(B, C)``: sum over images, per-class IoU/Dice, mean over
    classes (classes absent from both prediction and ground truth everywhere are left out)."""
    inter, uni = intersection.sum(0), union.sum(0)
    areas = pred_area.sum(0) + true_area.sum(0)
    present = uni > 0
    if not present.any():
        return {"miou": float("nan"), "mdice": float("nan")}
    return {"miou": float(np.mean(inter[present] / uni[present])),
            "mdice": float(np.mean(2 * inter[present] / areas[present]))}


def segmentation_report(y_pred: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor, num_classes: int = 2,
                        include_background: bool = False, ignore_empty: bool = True, n_resamples: int = 1000,
                        seed: int = 0, alpha: float = 0.05) -> dict:
    """Segmentation summary, every score ``{"value", "ci_low", "ci_high"}`` (bootstrap over images):

    - ``dice``, ``miou``: per-image mean over foreground classes (``include_background=False``), mean over images;
    - ``dice_per_class``: ``{class_index: score}`` of the per-image Dice;
    - ``dice_pooled``, ``miou_pooled``: pooled over all pixels of the set, all classes incl. background (the
      paper's convention), intervals by resampling images;
    - ``n``: number of images.
    """
    s = segmentation_scores(y_pred, y, num_classes, include_background, ignore_empty)
    per_image = per_image_means(s)
    first_class = 0 if include_background else 1
    counts = np.stack([s["intersection"], s["union"], s["pred_area"], s["true_area"]], axis=1)  # (B, 4, C)

    def pooled(key: str):
        return lambda _, c: pooled_scores(c[:, 0], c[:, 1], c[:, 2], c[:, 3])[key]

    index = np.arange(len(counts))
    report = {
        "dice": ci_dict(bootstrap_mean_ci(per_image["dice"], n_resamples, alpha, seed)),
        "miou": ci_dict(bootstrap_mean_ci(per_image["iou"], n_resamples, alpha, seed)),
        "dice_per_class": {first_class + k: ci_dict(bootstrap_mean_ci(s["dice"][:, k], n_resamples, alpha, seed))
                           for k in range(s["dice"].shape[1])},
        "dice_pooled": ci_dict(bootstrap_ci(pooled("mdice"), index, counts, n_resamples, alpha, seed, False)),
        "miou_pooled": ci_dict(bootstrap_ci(pooled("miou"), index, counts, n_resamples, alpha, seed, False)),
        "n": len(counts),
    }
    return report


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Row means ignoring NaN; NaN (not a warning) for all-NaN rows."""
    valid = ~np.isnan(x)
    total = np.where(valid, x, 0.0).sum(axis=1)
    count = valid.sum(axis=1)
    return np.divide(total, count, out=np.full(len(x), np.nan), where=count > 0)
