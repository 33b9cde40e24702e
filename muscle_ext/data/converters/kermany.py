"""Pediatric pneumonia chest X-rays of Guangzhou Women and Children's Medical Center (Kermany et al., Cell 172(5),
2018; Mendeley Data doi:10.17632/rscbjbr9sj.2; Kaggle "chest_xray"): 5 856 AP radiographs of children aged 1-5."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ._common import DatasetInfo, entry, find_root, image_files, require, write_converted

INFO = DatasetInfo(
    name="kermany_pneumonia", title="Pediatric pneumonia chest X-rays (Kermany et al. 2018)",
    source="https://data.mendeley.com/datasets/rscbjbr9sj/2", licence="CC BY 4.0",
    citation="Kermany et al., Cell 172(5):1122-1131, 2018", body_part="chest")
CLASSES = ("NORMAL", "PNEUMONIA")
LABEL_NAMES = ("no_finding", "pneumonia")
SPLITS = {"train": "training", "val": "validation", "test": "test"}
# person1_bacteria_1.jpeg / person1_virus_6.jpeg; normals IM-0115-0001.jpeg / NORMAL2-IM-1427-0001.jpeg
_PNEUMONIA = re.compile(r"^(?P<patient>person\d+)_(?P<type>bacteria|virus)_\d+$")
_NORMAL = re.compile(r"^(?P<patient>(?:NORMAL\d*-)?IM-\d+)-\d+$")


def _describe(image: Path, label: int) -> tuple[str, str]:
    """``(patient_id, pneumonia_type)`` from the file name."""
    match = (_PNEUMONIA if label else _NORMAL).match(image.stem)
    if match is None:  # an unexpected name: its own patient, type unknown
        return image.stem, "unknown" if label else "none"
    return match["patient"], match["type"] if label else "none"


def convert_kermany_pneumonia(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Convert ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` into ``out/datalist.json``; images are
    referenced in place.

    Decides: ``label`` 0 no finding / 1 pneumonia (folder), ``pneumonia_type`` bacteria/virus from the file name
    (``none`` for normals), ``patient_id`` ``personN`` (shared by a child's bacteria and virus files) or ``IM-NNNN``;
    the official train/val/test folders are kept as they are (val has only 16 images; patients are not
    guaranteed disjoint across the official folders), ``view`` ``ap``.

    Raises:
        FileNotFoundError: a missing split or class folder (named), or an empty one.
    """
    root = find_root(src, INFO.name, "train", wrappers=("chest_xray", "chest_xray/chest_xray"))
    sections: dict[str, list[dict]] = {}
    for folder, section in SPLITS.items():
        for label, name in enumerate(CLASSES):
            images = image_files(require(root / folder / name, INFO.name, f" (expected {folder}/{'|'.join(CLASSES)})"))
            for image in images:
                patient, kind = _describe(image, label)
                sections.setdefault(section, []).append(
                    entry(image, INFO, "ap", patient, label=label, class_name=LABEL_NAMES[label],
                          pneumonia_type=kind))
    return write_converted(out, INFO, sections, LABEL_NAMES,
                           label_policy="folder NORMAL = 0, PNEUMONIA = 1; pneumonia_type from the file name",
                           split="official train/val/test folders kept")
