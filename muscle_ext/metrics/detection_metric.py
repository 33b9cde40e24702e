"""``DetectionCOCOMetric``: the validation mAP of a detection run, an Ignite metric over the whole (distributed)
validation set."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.utils.enums import CommonKeys as Keys

from muscle_ext.metrics._arrays import cpu_tensors
from muscle_ext.metrics.detection import detection_report

__all__ = ["DetectionCOCOMetric"]


def predictions_and_targets(output: Sequence[Mapping]) -> tuple[list, list]:
    """``from_engine(["pred", "label"])`` for the per-image outputs of a detection evaluator."""
    return [o[Keys.PRED] for o in output], [o[Keys.LABEL] for o in output]


class DetectionCOCOMetric(Metric):
    """COCO mAP (IoU 0.50:0.95) over the epoch's images, with :func:`~muscle_ext.metrics.detection_report`: the key
    metric of a detection validator (the best validation mAP picks ``models/model.pt``).

    Predictions and targets are kept (on CPU) for the whole epoch, then matched once. Under ``torch.distributed``
    every process sends its images to all the others before matching (``all_gather_object``, in rank order), so
    each rank scores the whole validation set and all get the same value, as the model zoo's detection bundle does
    (a ``DistributedSampler`` that pads its shards scores its few repeated images twice). ``compute`` is then a
    collective: every rank must call it. ``engine.state.metrics`` gets ``<name>`` = mAP and ``<name>_ap50``,
    ``<name>_ap75``, ``<name>_ap_<class>``; the full report is kept as :attr:`report`. Test-set reports with
    confidence intervals: :class:`muscle_ext.handlers.DetectionReport`.
    """

    def __init__(self, classes: Sequence[str], box_key: str = "box", label_key: str = "label",
                 score_key: str | None = None, max_detections: int = 100, output_transform: Callable | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.classes = [str(c) for c in classes]
        self.box_key, self.label_key = box_key, label_key
        self.score_key = score_key or f"{label_key}_scores"  # RetinaNetDetector's naming
        self.max_detections = max_detections
        self.report: dict[str, Any] | None = None
        super().__init__(output_transform=output_transform or predictions_and_targets, device=device)

    def reset(self) -> None:
        self._predictions: list[dict] = []
        self._targets: list[dict] = []

    def update(self, output: tuple[Sequence[Mapping], Sequence[Mapping]]) -> None:
        predictions, targets = output
        if any(t is None for t in targets):
            raise ValueError("DetectionCOCOMetric needs ground-truth boxes for every image")
        for p, t in zip(predictions, targets, strict=True):
            self._predictions.append(cpu_tensors(p, (self.box_key, self.label_key, self.score_key)))
            self._targets.append(cpu_tensors(t, (self.box_key, self.label_key)))

    def gathered(self) -> tuple[list[dict], list[dict]]:
        """The predictions and targets of every process, rank 0's first (this process's alone without
        ``torch.distributed``)."""
        if idist.get_world_size() < 2:
            return self._predictions, self._targets
        shards = idist.all_gather((self._predictions, self._targets))
        return [p for preds, _ in shards for p in preds], [t for _, targets in shards for t in targets]

    def compute(self) -> float:
        predictions, targets = self.gathered()
        self.report = detection_report(predictions, targets, self.classes, max_detections=self.max_detections,
                                       box_key=self.box_key, label_key=self.label_key, score_key=self.score_key)
        return self.report["map"]

    def completed(self, engine: Engine, name: str) -> None:
        engine.state.metrics[name] = self.compute()
        report = self.report
        engine.state.metrics[f"{name}_ap50"] = report["ap50"]
        engine.state.metrics[f"{name}_ap75"] = report["ap75"]
        for cls, scores in report["per_class"].items():
            engine.state.metrics[f"{name}_ap_{cls}"] = scores["ap"]
