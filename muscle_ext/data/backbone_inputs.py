"""A datalist section as a trained backbone expects its input: the pre-training bundle's evaluation and the
pre-training and continual bundles' embedding export read images through this one loader."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from monai.data import DataLoader, Dataset
from monai.transforms import Compose, NormalizeIntensityd

from .datalist import load_datalist
from .datalist_checks import validate_datalist
from .transforms import xray_preprocessing

__all__ = ["backbone_input_loader"]


def backbone_input_loader(datalist: str | os.PathLike, section: str, model_settings: Mapping[str, Any],
                          batch_size: int = 64, num_workers: int = 2, label: str = "label") -> DataLoader:
    """The checked items of one datalist section, pre-processed as the backbone saw images in training, in order.

    Images go through :func:`~muscle_ext.data.xray_preprocessing` at ``model_settings["image_size"]`` and are
    normalised with its ``input_mean`` / ``input_std`` (defaults 224, 0 and 1: MD-MoCo backbones see [0, 1] images);
    every item is checked first (:func:`~muscle_ext.data.validate_datalist`, problems named with the file name).

    Args:
        datalist: a decathlon-style datalist file.
        section: its section (``training``, ``validation``, ``test``).
        model_settings: what the backbone file records (``muscle_ext.networks.read_backbone_settings``), after
            the run's overrides were checked against it.
        batch_size, num_workers: of the ``DataLoader`` (no shuffling).
        label: ``"label"`` keeps each item's label; ``"index"`` replaces it with the item's row in the section
            (for embeddings of unlabelled images).

    Returns:
        A MONAI ``DataLoader`` of dicts with ``image`` ``(B, 1, H, W)`` float32 and ``label`` ``(B,)``.

    Raises:
        DatalistError: an unusable entry (with every problem). ``ValueError``: an unknown ``label`` mode.
    """
    if label not in ("label", "index"):
        raise ValueError(f"label must be 'label' or 'index', got {label!r}")
    items = validate_datalist(load_datalist(datalist, section), source=os.path.basename(datalist))
    if label == "index":
        items = [{**item, "label": index} for index, item in enumerate(items)]
    transform = Compose([
        *xray_preprocessing("image", size=model_settings.get("image_size", 224)),
        NormalizeIntensityd("image", subtrahend=model_settings.get("input_mean", 0.0),
                            divisor=model_settings.get("input_std", 1.0)),
    ])
    return DataLoader(Dataset(items, transform), batch_size=batch_size, num_workers=num_workers)
