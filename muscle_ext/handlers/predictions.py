"""Inference outputs as a table: one row per input image in ``predictions.csv``, written by an Ignite handler.

Rows hold a running ``index``, the ``case_id`` (a hash of the input path, never its name) and the columns of a
task-specific column maker: :class:`ProbabilityColumns` (classification), :class:`ValueColumns` (regression),
:class:`MaskColumns` (segmentation, after ``muscle_ext.data.SaveMaskd`` wrote the mask), :class:`BoxColumns`
(detection, after ``muscle_ext.data.boxes.SaveBoxesd`` wrote the boxes). DICOM patient and study identifiers are added
only with ``include_patient_fields=True``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from muscle_ext.data.writers import case_id, dicom_patient_fields, source_path, write_csv
from muscle_ext.flags import as_flag
from muscle_ext.metrics._arrays import to_numpy

__all__ = ["BoxColumns", "MaskColumns", "PredictionSaver", "ProbabilityColumns", "ValueColumns"]

logger = logging.getLogger(__name__)


class ProbabilityColumns:
    """Classification columns: ``probability`` of the positive class and the ``label`` (1 when ``probability >=
    threshold``) with its ``class_name``; with more than two classes, one ``probability_<class>`` column each and
    the most probable class. ``pred`` holds class probabilities (softmax in the post-processing)."""

    def __init__(self, threshold: float = 0.5, class_names: Sequence[str] | None = None, pred_key: str = "pred",
                 digits: int = 6) -> None:
        self.threshold = float(threshold)
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        self.pred_key = pred_key
        self.digits = digits

    def _name(self, k: int) -> str:
        return self.class_names[k] if self.class_names and k < len(self.class_names) else str(k)

    def __call__(self, item: Mapping) -> dict[str, Any]:
        probs = to_numpy(item[self.pred_key], float).ravel()
        if probs.size <= 2:
            positive = float(probs[-1])
            label = int(positive >= self.threshold)
            return {"probability": round(positive, self.digits), "label": label, "class_name": self._name(label)}
        label = int(probs.argmax())
        row: dict[str, Any] = {f"probability_{self._name(k)}": round(float(p), self.digits) for k, p in
                               enumerate(probs)}
        row.update(label=label, class_name=self._name(label))
        return row


class ValueColumns:
    """Regression column ``name`` (e.g. ``bone_age_months``) from a de-normalised scalar prediction."""

    def __init__(self, name: str = "value", pred_key: str = "pred", digits: int = 3) -> None:
        self.name = name
        self.pred_key = pred_key
        self.digits = digits

    def __call__(self, item: Mapping) -> dict[str, Any]:
        return {self.name: round(float(to_numpy(item[self.pred_key], float).ravel()[0]), self.digits)}


class MaskColumns:
    """Segmentation columns: the written mask's file name (``<pred_key>_file``, set by ``SaveMaskd``), its size
    in the input's geometry and the fraction of the image each foreground class covers."""

    def __init__(self, pred_key: str = "pred", num_classes: int = 2, digits: int = 4) -> None:
        self.pred_key = pred_key
        self.num_classes = int(num_classes)
        self.digits = digits

    def __call__(self, item: Mapping) -> dict[str, Any]:
        mask = np.rint(np.squeeze(to_numpy(item[self.pred_key], float)))
        row: dict[str, Any] = {"mask_file": item.get(f"{self.pred_key}_file", ""), "rows": int(mask.shape[0]),
                               "columns": int(mask.shape[1])}
        for k in range(1, self.num_classes):
            name = "foreground_fraction" if self.num_classes == 2 else f"class_{k}_fraction"
            row[name] = round(float(np.mean(mask == k)), self.digits)
        return row


class BoxColumns:
    """``predictions.csv`` columns for detection (``muscle_ext.handlers.PredictionSaver``): the files
    :class:`~muscle_ext.data.boxes.SaveBoxesd` wrote for the image, its size and the number and best score of its
    boxes at or above ``score_threshold``."""

    def __init__(self, pred_key: str = "pred", label_key: str = "label", score_key: str | None = None,
                 score_threshold: float = 0.0, digits: int = 4) -> None:
        self.pred_key = pred_key
        self.score_key = score_key or f"{label_key}_scores"
        self.score_threshold = float(score_threshold)
        self.digits = digits

    def __call__(self, item: Mapping) -> dict[str, Any]:
        scores = to_numpy(item[self.pred_key][self.score_key], np.float32).reshape(-1)
        scores = scores[scores >= self.score_threshold]
        shape = item["image"].meta["spatial_shape"]
        return {"boxes_file": item.get(f"{self.pred_key}_file", ""),
                "boxes_csv_file": item.get(f"{self.pred_key}_csv_file", ""),
                "rows": int(shape[0]), "columns": int(shape[1]), "n_boxes": len(scores),
                "max_score": round(float(scores.max()), self.digits) if len(scores) else ""}


class PredictionSaver:
    """Collect one row per inference output item and write them as CSV when the evaluator completes.

    Args:
        path: the CSV file (written atomically).
        columns: the task's column maker, called with each post-processed item (batch and output keys merged).
        include_patient_fields: add DICOM patient/study identifiers (``muscle_ext.data.writers.PATIENT_FIELDS``)
            read from each input's header. Off by default: the table then identifies images by ``case_id`` only.
        image_key: key of the input image (its meta data names the input file).
        case_key: item key holding the case id (``datalist_from_folder`` sets it); absent: hash of the input path.
    """

    def __init__(self, path: str | os.PathLike, columns: Callable[[Mapping], Mapping[str, Any]],
                 include_patient_fields: bool = False, image_key: str = "image", case_key: str = "case_id") -> None:
        self.path = Path(path)
        self.columns = columns
        self.include_patient_fields = as_flag(include_patient_fields, "include_patient_fields")
        self.image_key = image_key
        self.case_key = case_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, Mapping):
            raise TypeError("PredictionSaver needs decollated outputs (the evaluator's default decollate=True)")
        for batch_item, out_item in zip(batch, output, strict=True):
            item = {**batch_item, **out_item}
            source = source_path(item, self.image_key)
            row: dict[str, Any] = {"index": len(self.rows),
                                   "case_id": str(item.get(self.case_key) or (case_id(source) if source else ""))}
            row.update(self.columns(item))
            if self.include_patient_fields:
                row.update(dicom_patient_fields(source))
            self.rows.append(row)

    def write(self, engine: Engine | None = None) -> Path:
        write_csv(self.path, self.rows)
        logger.info(f"{len(self.rows)} predictions written to {self.path}")
        return self.path
