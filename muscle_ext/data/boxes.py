"""Bounding boxes for detection: datalist order to MONAI's, and boxes that follow the image's geometry.

Two conventions meet here:

- **datalist** (``box`` key, TBX11K/COCO style): ``[x1, y1, x2, y2]`` = ``[col_min, row_min, col_max, row_max]`` in
  pixels of the image file as stored, pixel-edge coordinates (``0`` is the left/top edge of the first pixel).
- **MONAI detection** (``StandardMode`` over array axes): ``[a0_min, a1_min, a0_max, a1_max]``; on our ``(C, H, W)``
  arrays that is ``[row_min, col_min, row_max, col_max]``, in pixels of the array the network sees.

:class:`SwapBoxAxesd` converts the axis order (its own inverse). :class:`BoxesFollowImaged` moves boxes from the
pixel grid of the file (as loaded) to the image's current grid, whatever resizing/padding/cropping happened in
between: MONAI's spatial transforms keep the image's ``affine`` up to date and ``LoadImaged`` stores the file's
``original_affine``, so ``inv(affine) @ original_affine`` maps file pixels to array pixels for any image size.
:func:`boxes_to_original_grid` is the way back, for writing predictions in the input file's coordinates.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.apps.detection.transforms.box_ops import apply_affine_to_boxes
from monai.apps.detection.transforms.dictionary import ClipBoxToImaged, RandZoomBoxd
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import (
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Transform,
)
from monai.utils import MetaKeys

from .transforms import xray_preprocessing
from .writers import case_id, source_path

__all__ = [
    "BOX_CSV_FIELDS",
    "BoxesFollowImaged",
    "ClipBoxToImageIfPresentd",
    "SaveBoxesd",
    "SwapBoxAxesd",
    "as_box_tensor",
    "boxes_to_original_grid",
    "detection_augmentation",
    "detection_preprocessing",
    "image_grid_transform",
    "swap_box_axes",
]


def as_box_tensor(boxes: Any) -> torch.Tensor:
    """``(N, 4)`` float32 tensor from a list of boxes, an array or a tensor; an empty list gives ``(0, 4)``."""
    if isinstance(boxes, torch.Tensor):
        t = boxes.detach().as_tensor() if isinstance(boxes, MetaTensor) else boxes.detach()
        t = t.to(torch.float32)
    else:
        t = torch.as_tensor(np.asarray(boxes, dtype=np.float32))
    if t.numel() == 0:
        return t.reshape(0, 4)
    if t.ndim != 2 or t.shape[1] != 4:
        raise ValueError(f"expected 2-D boxes of shape (N, 4), got shape {tuple(t.shape)}")
    return t


def swap_box_axes(boxes: torch.Tensor) -> torch.Tensor:
    """``[x1, y1, x2, y2]`` <-> ``[y1, x1, y2, x2]`` (2-D boxes; its own inverse)."""
    return boxes[:, [1, 0, 3, 2]]


class SwapBoxAxesd(MapTransform):
    """Datalist boxes ``[x1, y1, x2, y2]`` (column first) to MONAI's ``[row_min, col_min, row_max, col_max]`` on our
    rows-first arrays, as ``(N, 4)`` float32 tensors (``(0, 4)`` for an image without boxes). Also the way back."""

    def __init__(self, box_keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(box_keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = swap_box_axes(as_box_tensor(d[key]))
        return d


def image_grid_transform(image: MetaTensor) -> torch.Tensor:
    """``(3, 3)`` affine from pixel indices of the file as loaded to pixel indices of ``image`` now.

    ``original_affine`` (set by ``LoadImaged``) maps file indices to world coordinates, ``affine`` (kept current
    by MONAI's spatial transforms) maps the array's indices there; both may be ``(4, 4)`` for 2-D images.
    """
    if not isinstance(image, MetaTensor) or MetaKeys.ORIGINAL_AFFINE not in image.meta:
        raise ValueError("boxes can follow only a MetaTensor image that carries its original_affine "
                         "(load it with LoadImaged and keep meta tracking on)")
    current = to_affine_nd(2, torch.as_tensor(image.affine, dtype=torch.float64))
    original = to_affine_nd(2, torch.as_tensor(np.asarray(image.meta[MetaKeys.ORIGINAL_AFFINE]), dtype=torch.float64))
    return torch.linalg.solve(current, original)


def _map_edges(boxes: torch.Tensor, index_affine: torch.Tensor) -> torch.Tensor:
    # Box corners are pixel-edge coordinates, affines map pixel centres: shift by half a pixel around the mapping
    # (a resize by s then maps an edge e to e * s exactly, a pad by p to e + p).
    shifted = apply_affine_to_boxes(boxes.to(torch.float64) - 0.5, index_affine) + 0.5
    return shifted.to(torch.float32)


def boxes_to_original_grid(boxes: torch.Tensor, image: MetaTensor, clip: bool = True) -> torch.Tensor:
    """Boxes on ``image``'s current grid (MONAI order) back to pixels of the file it was loaded from (same order);
    clipped to the file's extent (``spatial_shape`` at load) when ``clip``."""
    out = _map_edges(as_box_tensor(boxes).cpu(), torch.linalg.inv(image_grid_transform(image)))
    shape = image.meta.get(MetaKeys.SPATIAL_SHAPE)
    if clip and shape is not None:
        rows, cols = (float(s) for s in np.asarray(shape)[:2])
        upper = torch.tensor([rows, cols, rows, cols], dtype=out.dtype)
        out = torch.minimum(torch.clamp(out, min=0.0), upper)
    return out


class BoxesFollowImaged(MapTransform):
    """Move boxes (MONAI order, file pixels) onto the current pixel grid of their reference image.

    Put it after the image's spatial transforms (resize, pad, crop, flips: anything MONAI records in the affine).
    Boxes stay axis-aligned (the bounding box of the mapped corners).
    """

    def __init__(self, box_keys: KeysCollection, box_ref_image_keys: str = "image",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(box_keys, allow_missing_keys)
        self.box_ref_image_keys = box_ref_image_keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        transform = image_grid_transform(d[self.box_ref_image_keys])
        for key in keys:
            boxes = as_box_tensor(d[key])
            d[key] = _map_edges(boxes, transform) if len(boxes) else boxes
        return d


class ClipBoxToImageIfPresentd(ClipBoxToImaged):
    """MONAI's ``ClipBoxToImaged`` (clip boxes to the image, drop empty ones with their labels) that lets items
    without boxes through (inference): MONAI's reads the box and label keys even with ``allow_missing_keys``."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.box_keys not in data and self.allow_missing_keys:
            return dict(data)
        return super().__call__(data)


def detection_preprocessing(image_key: str = "image", box_key: str = "box", label_key: str = "label",
                            size: int | Sequence[int] = 256, **xray_kwargs: Any) -> list[Transform]:
    """The deterministic chain for detection items: :func:`~muscle_ext.data.xray_preprocessing` on the image
    (load, scale, resize the longest side, pad to a square), then the datalist's boxes converted to MONAI order on
    the resized image's grid (clipped to it, empty ones dropped with their labels) and labels as ``int64``.
    Items without boxes (inference) pass through: box and label keys may be missing."""
    return [
        *xray_preprocessing(image_key, size=size, **xray_kwargs),
        SwapBoxAxesd(box_key, allow_missing_keys=True),
        EnsureTyped(label_key, dtype=torch.int64, track_meta=False, allow_missing_keys=True),
        BoxesFollowImaged(box_key, image_key, allow_missing_keys=True),
        ClipBoxToImageIfPresentd(box_key, label_key, image_key, remove_empty=True, allow_missing_keys=True),
    ]


def detection_augmentation(image_key: str = "image", box_key: str = "box", label_key: str = "label",
                           zoom_prob: float = 0.3, zoom_range: tuple[float, float] = (0.85, 1.15),
                           intensity_prob: float = 0.3) -> list[Transform]:
    """Random transforms that keep boxes right: zoom in/out about the centre (image and boxes, same size out), boxes
    clipped to the image (boxes zoomed out of view are dropped with their labels), then intensity changes.
    No flips: chest X-rays keep their laterality, as in pre-training (ours)."""
    return [
        RandZoomBoxd(image_keys=image_key, box_keys=box_key, box_ref_image_keys=image_key, prob=zoom_prob,
                     min_zoom=zoom_range[0], max_zoom=zoom_range[1], keep_size=True, padding_mode="constant"),
        ClipBoxToImaged(box_key, label_key, image_key, remove_empty=True),
        RandScaleIntensityd(image_key, factors=0.15, prob=intensity_prob),
        RandShiftIntensityd(image_key, offsets=0.1, prob=intensity_prob),
        RandAdjustContrastd(image_key, gamma=(0.7, 1.5), prob=intensity_prob),
        RandGaussianNoised(image_key, std=0.02, prob=intensity_prob / 3),
    ]


BOX_CSV_FIELDS = ("x1", "y1", "x2", "y2", "label", "class_name", "score")


class SaveBoxesd(MapTransform):
    """Post-processing transform: write each image's detections as ``<case_id>_boxes.json`` and
    ``<case_id>_boxes.csv`` in ``output_dir``, boxes ``[x1, y1, x2, y2]`` (x = column, y = row) in pixels of the
    input file, and store the two file names under ``<key>_file`` and ``<key>_csv_file``.

    ``keys`` name the detector's prediction dicts (``{box_key, label_key, <label_key>_scores}`` on the network's
    grid, MONAI order); :func:`boxes_to_original_grid` undoes the pre-processing (resize, pad). As for masks
    (``muscle_ext.data.SaveMaskd``), names come from the item's ``case_key`` or a hash of the input path, never
    the file name; the files hold boxes, classes, scores and the input's size only (no path, no DICOM field).
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, class_names: Sequence[str],
                 image_key: str = "image", case_key: str = "case_id", box_key: str = "box", label_key: str = "label",
                 score_key: str | None = None, score_threshold: float = 0.0, decimals: int = 2,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.image_key, self.case_key = image_key, case_key
        self.box_key, self.label_key = box_key, label_key
        self.score_key = score_key or f"{label_key}_scores"  # RetinaNetDetector's naming
        self.score_threshold = float(score_threshold)
        self.decimals = decimals

    def _class_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def detections(self, pred: Mapping[str, Any], image: MetaTensor) -> list[dict[str, Any]]:
        """The prediction as ``[{"box": [x1, y1, x2, y2], "label", "class_name", "score"}]`` in input pixels."""
        scores = torch.as_tensor(pred[self.score_key]).detach().float().cpu().reshape(-1)
        keep = scores >= self.score_threshold
        boxes = as_box_tensor(pred[self.box_key]).cpu()[keep]
        boxes = swap_box_axes(boxes_to_original_grid(boxes, image)) if len(boxes) else boxes
        labels = torch.as_tensor(pred[self.label_key]).cpu().reshape(-1)[keep].tolist()
        return [{"box": [round(float(v), self.decimals) for v in box], "label": int(label),
                 "class_name": self._class_name(int(label)), "score": round(float(score), 4)}
                for box, label, score in zip(boxes.tolist(), labels, scores[keep].tolist(), strict=True)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        source = source_path(d, self.image_key)
        name = str(d.get(self.case_key) or (case_id(source) if source else "image"))
        rows, cols = (int(v) for v in np.asarray(image.meta[MetaKeys.SPATIAL_SHAPE])[:2])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for key in self.key_iterator(d):
            detections = self.detections(d[key], image)
            stem = f"{name}_boxes" if len(self.keys) == 1 else f"{name}_{key}"
            record = {"case_id": name, "width": cols, "height": rows,
                      "box_format": "[x1, y1, x2, y2]: x = column, y = row, pixels of the input image",
                      "class_names": self.class_names, "detections": detections}
            json_path = self.output_dir / f"{stem}.json"
            json_path.write_text(json.dumps(record, indent=1) + "\n")
            csv_path = self.output_dir / f"{stem}.csv"
            with open(csv_path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(BOX_CSV_FIELDS)
                writer.writerows([*det["box"], det["label"], det["class_name"], det["score"]] for det in detections)
            d[f"{key}_file"], d[f"{key}_csv_file"] = json_path.name, csv_path.name
        return d
