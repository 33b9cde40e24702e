"""Datalist builders: common layouts (class folders, a CSV, a DICOM tree, a clinic's folder) turned into MONAI
decathlon-style items (``image``, ``label``, optional ``body_part``, ``case_id``)."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dicom import MEDIA_STORAGE_DIRECTORY
from .readers import xray_format

__all__ = ["DICOMDIR_REASON", "DICOMDIR_SOP_CLASS", "datalist_from_class_folders", "datalist_from_csv",
           "datalist_from_dicom_tree", "datalist_from_folder", "is_dicomdir"]

logger = logging.getLogger(__name__)


def _split(items: list[dict], fractions: Mapping[str, float] | None, seed: int) -> dict[str, list[dict]]:
    if not fractions:
        return {"training": items}
    total = sum(fractions.values())
    order = np.random.default_rng(seed).permutation(len(items))
    out, start = {}, 0
    names = list(fractions)
    for i, name in enumerate(names):
        stop = len(items) if i == len(names) - 1 else start + round(len(items) * fractions[name] / total)
        out[name] = [items[j] for j in order[start:stop]]
        start = stop
    return out


def datalist_from_class_folders(root: str | os.PathLike, classes: Sequence[str] | None = None,
                                split: Mapping[str, float] | None = None, seed: int = 0,
                                **tags: Any) -> dict[str, list[dict]]:
    """One sub-folder per class (``root/<class>/*.png|dcm|...``); labels are class indices in ``classes`` order
    (default: sorted folder names). ``tags`` (e.g. ``dataset=..., body_part=...``) are added to every item."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    classes = list(classes) if classes is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-folders")
    items = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: class folder '{name}' not found")
        for file in sorted(folder.rglob("*")):
            if file.is_file() and xray_format(file) is not None:
                items.append({"image": str(file), "label": label, "class_name": name, **tags})
    return _split(items, split, seed)


def datalist_from_csv(csv_path: str | os.PathLike, image_column: str = "image", label_column: str | None = "label",
                      base_dir: str | os.PathLike | None = None, extra_columns: Sequence[str] = (),
                      label_type: Callable[[str], Any] = int, split_column: str | None = None,
                      **tags: Any) -> dict[str, list[dict]]:
    """Rows of a CSV become items; image paths resolve against ``base_dir`` (default: the CSV's folder).
    With ``split_column`` the value of that column names the section (training/validation/test)."""
    csv_path = Path(csv_path)
    base = Path(base_dir) if base_dir is not None else csv_path.parent
    sections: dict[str, list[dict]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in [image_column, label_column, split_column, *extra_columns] if c and c not in
                   (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            item: dict[str, Any] = {"image": str(base / row[image_column]), **tags}
            if label_column:
                try:
                    item["label"] = label_type(row[label_column])
                except ValueError as e:
                    raise ValueError(f"{csv_path}:{line}: bad label '{row[label_column]}' ({e})") from e
            item.update({c: row[c] for c in extra_columns})
            sections.setdefault(row[split_column] if split_column else "training", []).append(item)
    return sections


def datalist_from_dicom_tree(root: str | os.PathLike, split: Mapping[str, float] | None = None, seed: int = 0,
                             **tags: Any) -> dict[str, list[dict]]:
    """Every DICOM file under ``root`` (with or without ``.dcm`` suffix) becomes an unlabelled item; ``body_part``
    comes from BodyPartExamined when the file has it. Patient fields are never copied into the datalist."""
    import pydicom

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    items = []
    for file in sorted(root.rglob("*")):
        if not file.is_file() or xray_format(file) != "dicom":
            continue
        item: dict[str, Any] = {"image": str(file), **tags}
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["BodyPartExamined"])
            if "body_part" not in item and header.get("BodyPartExamined"):
                item["body_part"] = str(header.BodyPartExamined).lower()
        except Exception as e:  # an unreadable file is reported by validate_datalist, not here
            logger.debug("skipping header of unreadable DICOM: %s", e)
        items.append(item)
    return _split(items, split, seed)


def datalist_from_folder(root: str | os.PathLike, recursive: bool = True, all_files: bool = False,
                         **tags: Any) -> list[dict]:
    """Every X-ray file under ``root`` (DICOM with or without suffix, PNG/JPEG/TIFF, NIfTI, MHA/NRRD), sorted by
    path, as an unlabelled item ``{"image": path, "case_id": ...}`` for inference on a clinic's own files.

    ``case_id`` is a hash of the path relative to ``root`` (:func:`muscle_ext.data.writers.case_id`): output file
    names and prediction tables use it instead of file names, which may carry patient names. Files of other types
    and DICOMDIRs (:func:`is_dicomdir`: the index of a CD/PACS export, not an image) are left out; only suffix-less
    files (DICOM preamble) and DICOM headers are read here. Files that do not decode are reported by
    :func:`validate_datalist` or :func:`screen_inputs`.

    ``all_files=True`` lists every file instead, so that :func:`screen_inputs` can say why each unusable one is
    not used (inference writes them to ``skipped.csv``).
    """
    from .writers import case_id

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    files = [f for f in sorted(root.rglob("*") if recursive else root.iterdir()) if f.is_file()]
    if not all_files:
        files = [f for f in files if xray_format(f) is not None and not is_dicomdir(f)]
    items = [{"image": str(f), "case_id": case_id(f, root), **tags} for f in files]
    if not items:
        raise ValueError(f"{root}: no DICOM, PNG/JPEG/TIFF, NIfTI or MHA/NRRD files found")
    return items


DICOMDIR_SOP_CLASS = MEDIA_STORAGE_DIRECTORY  # the SOP class of a DICOMDIR (DICOM PS3.4 annex F, PS3.10)
DICOMDIR_REASON = "DICOMDIR: the index of a DICOM media export (Media Storage Directory), not an image"


def is_dicomdir(path: str | os.PathLike) -> bool:
    """True for a DICOMDIR, the index file of a CD/DVD/USB or PACS export: named ``DICOMDIR`` (the standard's name
    for it), or a DICOM file whose Media Storage SOP Class is Media Storage Directory Storage. Reads the file meta
    header of DICOM files only."""
    path = Path(path)
    if path.name.upper() == "DICOMDIR":
        return True
    if not path.is_file() or xray_format(path) != "dicom":
        return False
    from pydicom.filereader import read_file_meta_info

    try:
        meta = read_file_meta_info(path)
    except Exception:  # not DICOM after all, or damaged: the reader says why later
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS
