"""The NLM tuberculosis sets (Jaeger et al., Quant Imaging Med Surg 4(6), 2014;
https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets): Shenzhen (China-Set, 662 PA
radiographs) and Montgomery County (138, with manual left/right lung masks), and the Kaggle "Chest X-ray Masks and
Labels" copy of both with lung masks (https://www.kaggle.com/datasets/nikhilpandey360/chest-xray-masks-and-labels)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ._common import DatasetInfo, entry, find_root, grouped_split, image_files, require, write_converted

_NLM_LICENCE = ("public (U.S. National Library of Medicine); research use, cite the papers; "
                "no patient identifiers may be sought")
SHENZHEN = DatasetInfo(
    name="shenzhen", title="Shenzhen chest X-ray set (China-Set)",
    source="https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets",
    licence=_NLM_LICENCE, citation="Jaeger et al., QIMS 4(6):475-477, 2014", body_part="chest")
MONTGOMERY = DatasetInfo(
    name="montgomery", title="Montgomery County chest X-ray set",
    source="https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets",
    licence=_NLM_LICENCE, citation="Jaeger et al., QIMS 4(6):475-477, 2014; Candemir et al., IEEE TMI 33(2), 2014",
    body_part="chest")
MASKS_AND_LABELS = DatasetInfo(
    name="chest_xray_masks_labels", title="Chest X-ray Masks and Labels (Shenzhen + Montgomery with lung masks)",
    source="https://www.kaggle.com/datasets/nikhilpandey360/chest-xray-masks-and-labels",
    licence=_NLM_LICENCE + " (the images are the NLM sets'; Shenzhen masks: Stirenko et al. 2018)",
    citation="Jaeger et al. 2014; Candemir et al. 2014; Stirenko et al., IEEE ELNANO 2018", body_part="chest")
LABEL_NAMES = ("normal", "tuberculosis")
_LABEL_POLICY = ("label 1 = tuberculosis: the _0/_1 suffix of the file name; without one, the clinical reading "
                 "(0 when its last line is 'normal')")
_SUFFIX = re.compile(r"^(?P<patient>[A-Z]+_\d+)_(?P<tb>[01])$")


def _tb_label(image: Path, readings: Path | None, dataset: str) -> int:
    match = _SUFFIX.match(image.stem.removesuffix("_mask"))
    if match:
        return int(match["tb"])
    reading = readings / f"{image.stem}.txt" if readings is not None else None
    if reading is None or not reading.is_file():
        raise FileNotFoundError(f"{dataset}: {image.name} has no _0/_1 suffix and no clinical reading "
                                f"ClinicalReadings/{image.stem}.txt")
    lines = [line.strip().lower() for line in reading.read_text(errors="replace").splitlines() if line.strip()]
    return int(not lines or lines[-1] != "normal")


def _patient(image: Path) -> str:
    match = _SUFFIX.match(image.stem.removesuffix("_mask"))
    return match["patient"] if match else image.stem


def _tb_entries(root: Path, info: DatasetInfo) -> list[dict]:
    folder = require(root / "CXR_png", info.name, f" (the {info.title} radiographs)")
    readings = root / "ClinicalReadings" if (root / "ClinicalReadings").is_dir() else None
    images = image_files(folder)
    if not images:
        raise FileNotFoundError(f"{info.name}: no PNG in {folder}")
    return [entry(p, info, "pa", _patient(p), label=_tb_label(p, readings, info.name)) for p in images]


def convert_shenzhen(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert the NLM Shenzhen set (``ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png``, optional
    ``ClinicalReadings/*.txt``) into ``out/datalist.json``; images are referenced in place.

    Decides: ``label`` 0 normal / 1 TB (file-name suffix, else the clinical reading); no official split: ~70/15/15
    stratified by label, grouped by patient (``CHNCXR_0001``; one radiograph per patient), ``seed``.

    Raises:
        FileNotFoundError: no ``CXR_png`` folder, or an image without a label source.
    """
    root = find_root(src, SHENZHEN.name, "CXR_png", wrappers=("ChinaSet_AllFiles",))
    sections = grouped_split(_tb_entries(root, SHENZHEN), stratum=lambda i: i["label"], seed=seed)
    return write_converted(out, SHENZHEN, sections, LABEL_NAMES, label_policy=_LABEL_POLICY,
                           split=f"no official split: ~70/15/15 stratified by label, grouped by patient (seed {seed})")


def _merge_masks(left: Path, right: Path, target: Path) -> Path:
    """One lung mask (0/255 PNG) from the left and right lung masks (foreground: > 0 in either)."""
    with Image.open(left) as a, Image.open(right) as b:
        if a.size != b.size:
            raise ValueError(f"{MONTGOMERY.name}: {left.name}: left mask is {a.size[0]}x{a.size[1]} pixels, right "
                             f"mask {b.size[0]}x{b.size[1]}")
        merged = (np.asarray(a.convert("L")) > 0) | (np.asarray(b.convert("L")) > 0)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(merged.astype(np.uint8) * 255).save(target)
    return target


def convert_montgomery(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert the NLM Montgomery County set (``MontgomerySet/CXR_png/MCUCXR_0001_0.png``,
    ``ManualMask/leftMask/`` and ``ManualMask/rightMask/`` of the same names, optional ``ClinicalReadings/``) into
    ``out/datalist.json``.

    Decides: ``label`` 0 normal / 1 TB (file-name suffix, else the clinical reading); ``mask`` = the left and right
    lung masks merged into one 0/255 PNG written to ``out/masks/`` (images themselves are referenced in place);
    no official split: ~70/15/15 stratified by label, grouped by patient (``MCUCXR_0001``), ``seed``.

    Raises:
        FileNotFoundError: no ``CXR_png`` or ``ManualMask/leftMask|rightMask`` folder, or an image without both masks.
        ValueError: a left and right mask of different sizes.
    """
    root = find_root(src, MONTGOMERY.name, "CXR_png", wrappers=("MontgomerySet",))
    masks = {side: require(root / "ManualMask" / side, MONTGOMERY.name, " (the manual lung masks)")
             for side in ("leftMask", "rightMask")}
    items = _tb_entries(root, MONTGOMERY)
    for item in items:
        name = Path(item["image"]).name
        left, right = (require(masks[side] / name, MONTGOMERY.name, " (every radiograph has both lung masks)")
                       for side in ("leftMask", "rightMask"))
        item["mask"] = str(_merge_masks(left, right, Path(out).resolve() / "masks" / name))
    items = [{"image": i["image"], "label": i["label"], "mask": i["mask"],
              **{k: v for k, v in i.items() if k not in ("image", "label", "mask")}} for i in items]
    sections = grouped_split(items, stratum=lambda i: i["label"], seed=seed)
    return write_converted(out, MONTGOMERY, sections, LABEL_NAMES, label_policy=_LABEL_POLICY,
                           mask_policy="left and right lung masks merged (0/255 PNG, out/masks/)",
                           split=f"no official split: ~70/15/15 stratified by label, grouped by patient (seed {seed})")


def convert_chest_xray_masks_labels(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert the Kaggle "Chest X-ray Masks and Labels" copy (``Lung Segmentation/CXR_png/``, ``masks/`` with
    Shenzhen masks named ``CHNCXR_0001_0_mask.png`` and Montgomery ones ``MCUCXR_0001_0.png``, ``ClinicalReadings/``)
    into ``out/datalist.json``; images and masks are referenced in place.

    Decides: only radiographs with a lung mask (the copy has ~100 Shenzhen images without one; their count is
    recorded as ``left_out``); ``label`` 0 normal / 1 TB; ``mask`` = the lung mask; ``origin`` = shenzhen or
    montgomery; no official split: ~70/15/15 stratified by origin and label, grouped by patient, ``seed``.

    Raises:
        FileNotFoundError: no ``CXR_png`` or ``masks`` folder, or no radiograph with a mask.
    """
    root = find_root(src, MASKS_AND_LABELS.name, "CXR_png", wrappers=("Lung Segmentation", "data/Lung Segmentation"))
    folder = require(root / "masks", MASKS_AND_LABELS.name, " (the lung masks)")
    masks = {p.stem.removesuffix("_mask"): p for p in image_files(folder)}
    items, left_out = [], 0
    for item in _tb_entries(root, MASKS_AND_LABELS):
        image = Path(item["image"])
        if image.stem not in masks:
            left_out += 1
            continue
        origin = "shenzhen" if image.name.startswith("CHNCXR") else "montgomery"
        items.append({"image": item["image"], "label": item["label"], "mask": str(masks[image.stem].resolve()),
                      "origin": origin, **{k: v for k, v in item.items() if k not in ("image", "label")}})
    if not items:
        raise FileNotFoundError(f"{MASKS_AND_LABELS.name}: no radiograph of {root / 'CXR_png'} has a mask in {folder}")
    sections = grouped_split(items, stratum=lambda i: f"{i['origin']}{i['label']}", seed=seed)
    return write_converted(out, MASKS_AND_LABELS, sections, LABEL_NAMES, label_policy=_LABEL_POLICY,
                           mask_policy="the released lung mask (both lungs in one file)",
                           left_out={"count": left_out, "reason": "no lung mask"},
                           split=f"no official split: ~70/15/15 stratified by origin and label, grouped by patient "
                                 f"(seed {seed})")
