"""Phantom radiographs with learnable labels: every stage of the main job runs on them without any data.

:func:`write_synthetic_corpus` draws simple X-ray-like phantoms of four "body parts" (8-bit PNG, bone and soft
tissue bright on a dark background, smooth gradients, film grain):

- ``chest``: a rib cage outline with two dark lung fields; half of them carry a bright round opacity in a lung
  field (the "finding": label 1). Masks of both lung fields are written for segmentation;
- ``hand``: five finger rays of phalanges; ``knee``: two long bones meeting at a joint gap; ``skull``: an oval vault
  with an inner table.

and writes MONAI datalists in the layout the ``quick`` preset reads (paths relative to each datalist):

- ``pretrain_datalist.json``: every image (``training``/``validation``), with ``dataset`` and ``body_part`` tags;
- ``chest_findings/datalist.json``: chest images with ``label`` 0/1 (``training``/``validation``/``test``);
- ``chest_lungs/datalist.json``: chest images with ``label`` the lung mask (``training``/``validation``/``test``).

The labels are learnable by construction (the opacity is visible; the lungs are the dark fields), so the pipeline
shows learning curves; nothing about real X-rays follows from numbers measured on phantoms.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BODY_PARTS", "write_synthetic_corpus"]

BODY_PARTS = ("chest", "hand", "knee", "skull")
SPLITS = ("training", "validation", "test")


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _chest(rng: np.random.Generator, size: int, finding: bool) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    image = np.where(_ellipse(yy, xx, size * 0.52, size * 0.5, size * 0.42, size * 0.40), 0.75, 0.05)
    lungs = np.zeros((size, size), bool)
    for side in (-1, 1):
        cx = size * (0.5 + side * rng.uniform(0.17, 0.21))
        lungs |= _ellipse(yy, xx, size * rng.uniform(0.47, 0.53), cx, size * rng.uniform(0.27, 0.32),
                          size * rng.uniform(0.11, 0.14))
    image = np.where(lungs, 0.25, image)
    for k in range(6):  # ribs: faint bright arcs across the lung fields
        y = size * (0.28 + 0.09 * k)
        image = np.where(np.abs(yy - y - 0.04 * size * np.cos((xx / size - 0.5) * 3.0)) < size * 0.012,
                         image + 0.12, image)
    if finding:  # a bright round opacity inside a lung field
        ys, xs = np.nonzero(lungs & (np.abs(yy - size * 0.5) < size * 0.2))
        i = rng.integers(len(ys))
        image = np.where(_ellipse(yy, xx, ys[i], xs[i], size * 0.07, size * 0.07), image + 0.35, image)
    return image, lungs


def _hand(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    image = np.where(_ellipse(yy, xx, size * 0.72, size * 0.5, size * 0.2, size * 0.26), 0.55, 0.05)
    for k in range(5):
        cx = size * (0.26 + 0.12 * k + rng.uniform(-0.01, 0.01))
        for j in range(3):  # phalanges, with joint gaps
            cy = size * (0.45 - 0.12 * j)
            image = np.where(_ellipse(yy, xx, cy, cx, size * 0.05, size * 0.025), 0.8, image)
    return image


def _knee(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    image = np.where(np.abs(xx - size * 0.5) < size * 0.3, 0.35, 0.05)  # soft tissue
    gap = size * rng.uniform(0.02, 0.05)
    image = np.where((np.abs(xx - size * 0.5) < size * 0.12) & (yy < size * 0.5 - gap), 0.85, image)  # femur
    image = np.where((np.abs(xx - size * 0.5) < size * 0.11) & (yy > size * 0.5 + gap), 0.8, image)  # tibia
    return image


def _skull(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    ry, rx = size * rng.uniform(0.38, 0.42), size * rng.uniform(0.32, 0.36)
    outer = _ellipse(yy, xx, size * 0.5, size * 0.5, ry, rx)
    inner = _ellipse(yy, xx, size * 0.5, size * 0.5, ry * 0.9, rx * 0.88)
    return np.where(outer & ~inner, 0.9, np.where(inner, 0.4, 0.05))


def _film(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    size = image.shape[0]
    gradient = np.linspace(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), size)[None, :]
    noisy = image * rng.uniform(0.85, 1.1) + gradient + rng.normal(0, 0.03, image.shape)
    return (np.clip(noisy, 0, 1) * 255).astype(np.uint8)


def write_synthetic_corpus(root: str | os.PathLike, n_chest: tuple[int, int, int] = (64, 24, 24),
                           n_other: int = 24, size: int = 96, seed: int = 0) -> dict[str, Path]:
    """Write the phantom corpus under ``root`` (see the module docstring); returns ``{name: datalist path}`` for
    ``pretrain``, ``chest_findings``, ``chest_lungs``.

    Args:
        root: an empty or new folder.
        n_chest: chest images in the training, validation and test splits (half with a finding in each).
        n_other: images of each other body part (pre-training pool only; a fifth of them for validation).
        size: image side in pixels.
        seed: the same seed writes the same files.

    Raises:
        FileExistsError: ``root`` already holds a ``pretrain_datalist.json`` (nothing is overwritten).
    """
    root = Path(root)
    if (root / "pretrain_datalist.json").exists():
        raise FileExistsError(f"{root} already holds a corpus (pretrain_datalist.json): give a new folder")
    rng = np.random.default_rng(seed)
    images = root / "images"
    masks = root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    pool: dict[str, list[dict]] = {"training": [], "validation": []}
    findings: dict[str, list[dict]] = {split: [] for split in SPLITS}
    lungs: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for split, count in zip(SPLITS, n_chest, strict=True):
        for i in range(count):
            finding = i % 2 == 1
            image, lung = _chest(rng, size, finding)
            name = f"chest_{split}_{i:03d}.png"
            Image.fromarray(_film(rng, image)).save(images / name)
            Image.fromarray((lung * 255).astype(np.uint8)).save(masks / name)
            findings[split].append({"image": f"../images/{name}", "label": int(finding), "patient_id": f"{split}{i}"})
            lungs[split].append({"image": f"../images/{name}", "label": f"../masks/{name}"})
            if split != "test":  # the test split stays out of pre-training
                pool[split].append({"image": f"images/{name}", "dataset": "phantom_chest", "body_part": "chest"})
    draw = {"hand": _hand, "knee": _knee, "skull": _skull}
    for part, fn in draw.items():
        for i in range(n_other):
            name = f"{part}_{i:03d}.png"
            Image.fromarray(_film(rng, fn(rng, size))).save(images / name)
            split = "validation" if i % 5 == 0 else "training"
            pool[split].append({"image": f"images/{name}", "dataset": f"phantom_{part}", "body_part": part})
    out = {"pretrain": root / "pretrain_datalist.json", "chest_findings": root / "chest_findings" / "datalist.json",
           "chest_lungs": root / "chest_lungs" / "datalist.json"}
    for name, content in (("pretrain", pool), ("chest_findings", findings), ("chest_lungs", lungs)):
        out[name].parent.mkdir(parents=True, exist_ok=True)
        out[name].write_text(json.dumps(content, indent=1) + "\n")
    return out
