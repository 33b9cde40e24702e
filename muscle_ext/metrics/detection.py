"""Detection summary: COCO mAP (IoU 0.50:0.95), AP50, AP75 and per-class AP with MONAI's ``COCOMetric``.

``COCOMetric`` defaults to IoU 0.10:0.50 (MONAI's lung-nodule setting); we set the standard COCO range.
Its overall mAP averages in ``-1`` for classes without ground truth; here such classes are NaN and left out of
the mean, as pycocotools does. Boxes are in MONAI's ``StandardMode`` ``[a0_min, a1_min, a0_max, a1_max]`` (the
detector's output format); class labels are ``0..len(classes)-1``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

from muscle_ext.metrics._arrays import to_numpy
from muscle_ext.metrics.bootstrap import BootstrapCI, bootstrap_indices, ci_dict

__all__ = ["COCO_IOU_RANGE", "detection_report"]

COCO_IOU_RANGE = (0.5, 0.95, 0.05)
BOOTSTRAPPED = ("map", "ap50", "ap75")


def _boxes(x) -> np.ndarray:
    return to_numpy(x, np.float64).reshape(-1, 4)


def _quiet_coco(record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.WARNING and record.getMessage().startswith("WARNING, no ")
                and record.pathname.replace("\\", "/").endswith("detection/metrics/coco.py"))


def detection_report(predictions: Sequence[dict], targets: Sequence[dict], classes: Sequence[str],
                     max_detections: int = 100, box_key: str = "boxes", label_key: str = "labels",
                     score_key: str = "labels_scores", n_bootstrap: int = 0, alpha: float = 0.05,
                     seed: int = 0) -> dict:
    """COCO-style detection scores over a test set.

    Args:
        predictions: one dict per image with ``box_key`` ``(D, 4)``, ``label_key`` ``(D,)`` and ``score_key``
            ``(D,)`` (``RetinaNetDetector`` eval output; ``"scores"`` is accepted when ``score_key`` is absent).
        targets: one dict per image with ``box_key`` ``(G, 4)`` and ``label_key`` ``(G,)``.
        classes: class names, index = label.
        n_bootstrap: resamples of the images (with replacement) for percentile intervals of ``map``, ``ap50`` and
            ``ap75``; 0: none.
            Detections are matched once, each resample only re-ranks them (about 10 ms per resample for ~100
            images on one CPU core).
        alpha, seed: interval level and resampling seed (``muscle_ext.metrics.bootstrap`` scheme, unstratified).

    Returns:
        ``{"map": AP@[.50:.95], "ap50", "ap75", "mar": recall@[.50:.95] with ``max_detections``,
        "per_class": {name: {"ap", "ap50", "ap75"}}, "n_images", "n_gt": {name: count}}``;
        NaN where undefined (no ground truth of a class). With ``n_bootstrap``, also ``"ci": {"map" | "ap50" |
        "ap75": {"value", "ci_low", "ci_high"}}`` (the same resamples for all three) and ``"ci_resamples"``.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    metric = COCOMetric(classes=list(classes), iou_list=(0.5, 0.75), iou_range=COCO_IOU_RANGE,
                        max_detection=(max_detections,), per_class=True, verbose=False)
    pred_scores = [to_numpy(p[score_key] if score_key in p else p["scores"], np.float64).ravel() for p in predictions]
    gt_classes = [to_numpy(t[label_key], np.int64).ravel() for t in targets]
    matches = matching_batch(
        iou_fn=box_iou, iou_thresholds=metric.iou_thresholds,
        pred_boxes=[_boxes(p[box_key]) for p in predictions],
        pred_classes=[to_numpy(p[label_key], np.int64).ravel() for p in predictions],
        pred_scores=pred_scores,
        gt_boxes=[_boxes(t[box_key]) for t in targets], gt_classes=gt_classes,
        max_detections=max_detections,
    )
    report = _summarize(metric, matches, gt_classes, classes, max_detections)
    if n_bootstrap > 0 and len(targets) > 0:
        stats: dict[str, list[float]] = {k: [] for k in BOOTSTRAPPED}
        for idx in bootstrap_indices(np.zeros(len(targets)), n_bootstrap, seed, stratified=False):
            resampled = _summarize(metric, [matches[i] for i in idx], [gt_classes[i] for i in idx], classes,
                                   max_detections)
            for key in BOOTSTRAPPED:
                if not np.isnan(resampled[key]):
                    stats[key].append(resampled[key])
        report["ci"] = {key: _percentile_ci(report[key], values, alpha) for key, values in stats.items()}
        report["ci_resamples"] = n_bootstrap
    return report


def _percentile_ci(point: float, values: list[float], alpha: float) -> dict[str, float]:
    if np.isnan(point) or not values:
        return ci_dict(BootstrapCI(point, float("nan"), float("nan")))
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return ci_dict(BootstrapCI(point, float(low), float(high)))


def _summarize(metric: COCOMetric, matches: list[dict], gt_classes: list[np.ndarray], classes: Sequence[str],
               max_detections: int) -> dict:
    """The report of :func:`detection_report` from per-image matching results."""
    # COCOMetric warns through the root logger (``import logging as logger``) for every class without results or
    # ground truth, which we report as NaN; a filter on the root logger drops just those records, just here.
    root = logging.getLogger()
    root.addFilter(_quiet_coco)
    try:
        scores, _ = metric(matches)
    finally:
        root.removeFilter(_quiet_coco)

    range_tag = f"IoU_{COCO_IOU_RANGE[0]:.2f}_{COCO_IOU_RANGE[1]:.2f}_{COCO_IOU_RANGE[2]:.2f}_MaxDet_{max_detections}"

    def value(key: str) -> float:
        v = scores.get(key, -1.0)
        return float("nan") if v < 0 else float(v)

    all_gt = np.concatenate(gt_classes) if gt_classes else np.zeros(0, np.int64)
    n_gt = {name: int(np.sum(all_gt == k)) for k, name in enumerate(classes)}
    per_class = {}
    for name in classes:
        entry = {"ap": value(f"{name}_mAP_{range_tag}"),
                 "ap50": value(f"{name}_AP_IoU_0.50_MaxDet_{max_detections}"),
                 "ap75": value(f"{name}_AP_IoU_0.75_MaxDet_{max_detections}")}
        if n_gt[name] == 0:  # COCOMetric scores 0 or -1 here depending on predictions: undefined either way
            entry = dict.fromkeys(entry, float("nan"))
        per_class[name] = entry

    def class_mean(key: str) -> float:
        values = [c[key] for c in per_class.values() if not np.isnan(c[key])]
        return float(np.mean(values)) if values else float("nan")

    return {"map": class_mean("ap"), "ap50": class_mean("ap50"), "ap75": class_mean("ap75"),
            "mar": value(f"mAR_{range_tag}"), "per_class": per_class, "n_images": len(gt_classes), "n_gt": n_gt}
