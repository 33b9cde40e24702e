"""RSNA Pneumonia Detection Challenge 2018 (Shih et al., Radiology: AI 1(1), 2019;
https://www.kaggle.com/c/rsna-pneumonia-detection-challenge): 26 684 DICOM chest radiographs (from NIH
ChestX-ray14) with lung-opacity boxes drawn by radiologists."""

from __future__ import annotations

import os
from pathlib import Path

from ._common import DatasetInfo, entry, find_root, grouped_split, read_csv, require, write_converted

INFO = DatasetInfo(
    name="rsna_pneumonia", title="RSNA Pneumonia Detection Challenge 2018",
    source="https://www.kaggle.com/c/rsna-pneumonia-detection-challenge",
    licence="the challenge's data terms (Kaggle competition rules): non-commercial research with citation; the "
            "images are NIH ChestX-ray14 images (NIH Clinical Center, unrestricted use)",
    citation="Shih et al., Radiology: Artificial Intelligence 1(1), 2019", body_part="chest")
BOX_CLASSES = ("lung_opacity",)
LABELS_CSV = "stage_2_train_labels.csv"
IMAGES = "stage_2_train_images"
CLASS_CSV = "stage_2_detailed_class_info.csv"


def _header(path: Path) -> dict[str, str]:
    """View and body part of a DICOM file; only these two tags are read, never a patient field."""
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition", "BodyPartExamined"])
    return {"view": str(header.get("ViewPosition", "") or "unknown").lower(),
            "body_part": str(header.get("BodyPartExamined", "") or INFO.body_part).lower()}


def convert_rsna_pneumonia(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert ``stage_2_train_labels.csv`` (patientId, x, y, width, height, Target; one row per box, blank box for
    Target 0) and ``stage_2_train_images/<patientId>.dcm`` (optional ``stage_2_detailed_class_info.csv``) into
    ``out/datalist.json``; the DICOM files are referenced in place.

    Decides: ``box`` = ``[x, y, x + width, y + height]`` in pixels and ``label`` = 0 (lung opacity) per box, on
    images with boxes only; ``pneumonia`` = Target (0/1) for every image, ``class_name`` from the class CSV when
    present; ``view`` (``pa``/``ap``) and ``body_part`` from the DICOM header (ViewPosition, BodyPartExamined;
    no other DICOM field is read); ``patient_id`` = the challenge's anonymous patientId. The stage 2 test images
    have no public labels: left out. No official labelled split: ~70/15/15 stratified by Target, grouped by
    patientId, ``seed``.

    Raises:
        FileNotFoundError: no labels CSV or image folder, or a patientId without its ``.dcm``.
        ValueError: a CSV without the needed columns, a Target 1 row without a box or a non-number in one.
    """
    root = find_root(src, INFO.name, LABELS_CSV)
    folder = require(root / IMAGES, INFO.name, " (the DICOM images)")
    classes = {}
    if (root / CLASS_CSV).is_file():
        classes = {r["patientId"]: r["class"] for r in read_csv(root / CLASS_CSV, INFO.name, ["patientId", "class"])}
    found: dict[str, dict] = {}
    for line, row in enumerate(read_csv(root / LABELS_CSV, INFO.name,
                                        ["patientId", "x", "y", "width", "height", "Target"]), start=2):
        patient = row["patientId"]
        if patient not in found:
            image = require(folder / f"{patient}.dcm", INFO.name)
            header = _header(image)
            found[patient] = entry(image, INFO, header["view"], patient, body_part=header["body_part"],
                                   box=[], label=[], pneumonia=0,
                                   **({"class_name": classes[patient]} if patient in classes else {}))
        if row["Target"] != "1":
            continue
        try:
            x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
        except ValueError as e:
            raise ValueError(f"{INFO.name}: {LABELS_CSV} line {line}: Target 1 without a box ({e})") from e
        item = found[patient]
        item["box"].append([x, y, x + w, y + h])
        item["label"].append(0)
        item["pneumonia"] = 1
    items = []
    for item in found.values():
        if not item["box"]:  # no box: no box/label keys (an empty box list is a datalist error)
            item = {k: v for k, v in item.items() if k not in ("box", "label")}
        items.append(item)
    sections = grouped_split(items, stratum=lambda i: i["pneumonia"], seed=seed)
    return write_converted(out, INFO, sections, BOX_CLASSES,
                           label_policy="box = [x, y, x + width, y + height], label 0 = lung opacity per box; "
                                        "pneumonia = Target",
                           split=f"no labelled official test split: ~70/15/15 stratified by Target, grouped by "
                                 f"patientId (seed {seed})")
