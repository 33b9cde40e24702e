"""``DetectionReport``: the test-set detection report (COCO mAP, AP50, AP75 with bootstrap intervals, per-class AP,
figures of the detections), attached to a :class:`~muscle_ext.engines.detection.DetectionEvaluator`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine

from muscle_ext.handlers.evaluation import EvaluationReport
from muscle_ext.metrics._arrays import cpu_tensors
from muscle_ext.metrics.detection import BOOTSTRAPPED, COCO_IOU_RANGE, detection_report

__all__ = ["DetectionReport"]


class DetectionReport(EvaluationReport):
    """Test-set detection report (``metrics.json`` + ``figures/``), attached to a :class:`DetectionEvaluator` like
    the other tasks' reports (``configs/evaluate.yaml``).

    ``map`` (COCO AP@[.50:.95]), ``ap50`` and ``ap75`` with percentile bootstrap intervals over images (matching
    runs once; each resample re-ranks: ~10 ms), ``mar``, ``per_class`` AP / AP50 / AP75 (``null`` for a class
    without ground truth), ``n_gt`` per class; figures ``detections_<k>.png`` of the first ``num_overlays`` images
    (ground truth in green, the ``overlay_top_k`` highest-scoring detections in red). Scalars ``test_map``,
    ``test_map_ci_low``, ... go to ``engine.state.metrics``.

    Args beyond :class:`~muscle_ext.handlers.evaluation.EvaluationReport`'s: ``class_names`` (index = label),
    ``max_detections`` per image, ``box_key``/``class_key``/``score_key`` inside the prediction and target dicts.
    """

    task = "detection"
    summary_metrics = BOOTSTRAPPED

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str], max_detections: int = 100,
                 num_overlays: int = 4, overlay_top_k: int = 5, image_key: str = "image", box_key: str = "box",
                 class_key: str = "label", score_key: str | None = None, **kwargs: Any) -> None:
        self.class_names = [str(c) for c in class_names]
        self.max_detections = int(max_detections)
        self.num_overlays, self.overlay_top_k = int(num_overlays), int(overlay_top_k)
        self.image_key, self.box_key, self.class_key = image_key, box_key, class_key
        self.score_key = score_key or f"{class_key}_scores"
        super().__init__(output_dir, **kwargs)

    def reset(self, engine: Engine | None = None) -> None:
        super().reset(engine)
        self.images: list[Any] = []

    def add(self, item: Mapping) -> None:
        target = item[self.label_key]
        if target is None:
            raise ValueError("DetectionReport needs ground-truth boxes for every image")
        self.preds.append(cpu_tensors(item[self.pred_key], (self.box_key, self.class_key, self.score_key)))
        self.labels.append(cpu_tensors(target, (self.box_key, self.class_key)))
        if len(self.images) < self.num_overlays and self.image_key in item:
            self.images.append(torch.as_tensor(item[self.image_key]).detach().float().cpu()[0].numpy())

    def compute(self) -> dict[str, Any]:
        r = detection_report(self.preds, self.labels, self.class_names, max_detections=self.max_detections,
                             box_key=self.box_key, label_key=self.class_key, score_key=self.score_key,
                             n_bootstrap=self.n_resamples, alpha=self.alpha, seed=self.seed)
        no_ci = {"ci_low": float("nan"), "ci_high": float("nan")}
        report: dict[str, Any] = {"n": r["n_images"]}
        report.update({k: r["ci"][k] if "ci" in r else {"value": r[k], **no_ci} for k in BOOTSTRAPPED})
        report.update(mar=r["mar"], per_class=r["per_class"], n_gt=r["n_gt"], class_names=self.class_names,
                      iou_range=list(COCO_IOU_RANGE), max_detections=self.max_detections)
        return report

    def figures(self, report: Mapping[str, Any], folder: Path) -> list[Path]:
        return [self._overlay(k, image, folder / f"detections_{k}.png") for k, image in enumerate(self.images)]

    def _overlay(self, k: int, image: Any, path: Path) -> Path:
        # the object API, not pyplot: no global backend switch in the process that trains
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        fig = Figure(figsize=(5, 5 * image.shape[0] / max(image.shape[1], 1)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(image, cmap="gray", origin="upper")
        pred, target = self.preds[k], self.labels[k]
        top = torch.argsort(pred[self.score_key], descending=True)[: self.overlay_top_k]
        drawn = [(target[self.box_key], target[self.class_key], None, "lime"),
                 (pred[self.box_key][top], pred[self.class_key][top], pred[self.score_key][top], "red")]
        for boxes, labels, scores, colour in drawn:
            for i, (r0, c0, r1, c1) in enumerate(boxes.reshape(-1, 4).tolist()):  # MONAI order: rows first
                ax.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, edgecolor=colour, linewidth=1))
                if scores is not None:
                    name = self.class_names[int(labels[i])] if int(labels[i]) < len(self.class_names) else labels[i]
                    ax.text(c0, r0, f"{name} {float(scores[i]):.2f}", color=colour, fontsize=6, va="bottom")
        ax.set_axis_off()
        ax.set_title(f"{self.split} image {k}: ground truth (green), top {self.overlay_top_k} detections (red)",
                     fontsize=8)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        return path
