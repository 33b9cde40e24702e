"""Datalists: MONAI decathlon-style JSON is the one format (``image``, ``label``, optional ``mask``, ``box``,
``body_part``, ``dataset``). Builders turn common layouts into it; :func:`validate_datalist` checks every entry
at once and either stops with the full list of problems or, when asked, skips exactly those entries.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

from .readers import XRayReadError, read_xray, xray_format

__all__ = [
    "DatalistError",
    "DatalistIssue",
    "ValidationReport",
    "datalist_from_class_folders",
    "datalist_from_csv",
    "datalist_from_dicom_tree",
    "datalist_from_folder",
    "load_datalist",
    "subset",
    "validate_datalist",
    "write_datalist",
]

logger = logging.getLogger(__name__)


def load_datalist(path: str | os.PathLike, section: str = "training", base_dir: str | os.PathLike | None = None,
                  is_segmentation: bool = False) -> list[dict]:
    """Read one section of a decathlon-style datalist; relative paths resolve against ``base_dir`` (default: the
    JSON file's folder). A thin wrapper of MONAI's ``load_decathlon_datalist`` that names the file on error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist not found")
    try:
        return load_decathlon_datalist(str(path), is_segmentation=is_segmentation, data_list_key=section,
                                       base_dir=None if base_dir is None else str(base_dir))
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read section '{section}' ({e})") from e


def write_datalist(path: str | os.PathLike, sections: Mapping[str, Sequence[Mapping]], relative_to_file: bool = True,
                   path_keys: Sequence[str] = ("image", "mask")) -> Path:
    """Write sections such as ``{"training": [...], "validation": [...]}``; paths become relative to the JSON
    file's folder so that the datalist moves with its data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, list] = {}
    for name, items in sections.items():
        rows = []
        for item in items:
            row = dict(item)
            if relative_to_file:
                for key in path_keys:
                    if isinstance(row.get(key), str) and os.path.isabs(row[key]):
                        row[key] = os.path.relpath(row[key], path.parent.resolve())
            rows.append(row)
        out[name] = rows
    path.write_text(json.dumps(out, indent=1))
    return path


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


def datalist_from_folder(root: str | os.PathLike, recursive: bool = True, **tags: Any) -> list[dict]:
    """Every X-ray file under ``root`` (DICOM with or without suffix, PNG/JPEG/TIFF, NIfTI, MHA/NRRD), sorted by
    path, as an unlabelled item ``{"image": path, "case_id": ...}`` for inference on a clinic's own files.

    ``case_id`` is a hash of the path relative to ``root`` (:func:`muscle_ext.data.writers.case_id`): output file
    names and prediction tables use it instead of file names, which may carry patient names. Nothing is read
    from the files here; unreadable ones are reported by :func:`validate_datalist`.
    """
    from .writers import case_id

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    files = sorted(root.rglob("*") if recursive else root.iterdir())
    items = [{"image": str(f), "case_id": case_id(f, root), **tags}
             for f in files if f.is_file() and xray_format(f) is not None]
    if not items:
        raise ValueError(f"{root}: no DICOM, PNG/JPEG/TIFF, NIfTI or MHA/NRRD files found")
    return items


def subset(items: Sequence[Mapping], max_items: int | None = None) -> list[dict]:
    """At most ``max_items`` evenly spaced items (all when ``None``), in their original order.

    For smoke tests and quick runs: unlike a prefix, evenly spaced items keep the mix of a datalist sorted by
    label or stratum.
    """
    items = [dict(i) for i in items]
    if max_items is None or max_items >= len(items):
        return items
    if max_items <= 0:
        return []
    index = np.linspace(0, len(items) - 1, int(max_items)).round().astype(int)
    return [items[i] for i in index]


@dataclass(frozen=True)
class DatalistIssue:
    index: int
    file: str
    problem: str

    def __str__(self) -> str:
        return f"  [{self.index}] {self.file}: {self.problem}"


@dataclass
class ValidationReport:
    total: int
    issues: list[DatalistIssue] = field(default_factory=list)

    @property
    def bad_indices(self) -> list[int]:
        return sorted({i.index for i in self.issues})

    def summary(self) -> str:
        lines = [f"{len(self.bad_indices)} of {self.total} datalist entries are unusable:"]
        lines += [str(i) for i in self.issues]
        return "\n".join(lines)


class DatalistError(ValueError):
    """Raised with every problem of a datalist at once."""

    def __init__(self, report: ValidationReport, source: str = "datalist") -> None:
        self.report = report
        super().__init__(f"{source}: {report.summary()}\nFix these entries, or pass on_error='skip' to leave them out.")


def _check_boxes(boxes: Any, labels: Any, shape: tuple[int, ...]) -> str | None:
    arr = np.asarray(boxes, dtype=float)
    if arr.size == 0:
        return "no boxes (empty 'box' list)"
    if arr.ndim != 2 or arr.shape[1] != 4:
        return f"boxes must be a list of [x1, y1, x2, y2], got shape {arr.shape}"
    if labels is not None and np.ndim(labels) > 0 and len(labels) != len(arr):
        return f"{len(arr)} boxes but {len(labels)} box labels"
    h, w = shape[-2:]
    if (arr[:, 2] <= arr[:, 0]).any() or (arr[:, 3] <= arr[:, 1]).any():
        return "empty box (x2 <= x1 or y2 <= y1)"
    if (arr[:, :2] < 0).any() or (arr[:, 2] > w).any() or (arr[:, 3] > h).any():
        return f"box outside the image ({w}x{h} pixels)"
    return None


def _check_item(item: Mapping, classes: Sequence[Any] | None, image_key: str, mask_key: str | None,
                box_key: str | None, decode: bool) -> list[str]:
    problems: list[str] = []
    image = item.get(image_key)
    if not isinstance(image, (str, os.PathLike)):
        return [f"entry has no '{image_key}' path"]
    shape: tuple[int, ...] | None = None
    try:
        if decode:
            shape = read_xray(image)[0].shape
        elif not Path(image).is_file():
            raise FileNotFoundError(f"{image}: no such file")
    except FileNotFoundError:
        return ["missing file"]
    except XRayReadError as e:
        return [e.cause]
    except Exception as e:  # any decoder failure is a bad entry, reported with its type
        return [f"unreadable ({type(e).__name__}: {e})"]
    if classes is not None and "label" in item:
        labels = item["label"] if isinstance(item["label"], list) and box_key and box_key in item else [item["label"]]
        unknown = [lab for lab in labels if lab not in classes]
        if unknown:
            problems.append(f"label {unknown[0]!r} is not one of the declared classes {list(classes)}")
    if mask_key and item.get(mask_key) is not None:
        try:
            mask_shape = read_xray(item[mask_key])[0].shape if decode else None
            if shape is not None and mask_shape is not None and mask_shape != shape:
                problems.append(f"mask {Path(item[mask_key]).name} is {mask_shape[1]}x{mask_shape[0]} pixels but "
                                f"the image is {shape[1]}x{shape[0]}")
        except FileNotFoundError:
            problems.append(f"mask file {item[mask_key]} is missing")
        except XRayReadError as e:
            problems.append(f"mask: {e.cause}")
    if box_key and box_key in item and shape is not None:
        problem = _check_boxes(item[box_key], item.get("label"), shape)
        if problem:
            problems.append(problem)
    return problems


def validate_datalist(items: Iterable[Mapping], classes: Sequence[Any] | None = None, image_key: str = "image",
                      mask_key: str | None = "mask", box_key: str | None = "box", decode: bool = True,
                      on_error: str = "raise", source: str = "datalist") -> list[dict]:
    """Check every entry (file exists and decodes, label in ``classes``, mask size equals image size, boxes
    non-empty and inside the image) and report all problems at once.

    ``on_error="raise"`` stops with a :class:`DatalistError` listing each bad entry; ``on_error="skip"`` returns
    the good entries only and logs how many and which were left out (never silently).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    items = [dict(i) for i in items]
    report = ValidationReport(total=len(items))
    for index, item in enumerate(items):
        for problem in _check_item(item, classes, image_key, mask_key, box_key, decode):
            report.issues.append(DatalistIssue(index, str(item.get(image_key)), problem))
    if not report.issues:
        return items
    if on_error == "raise":
        raise DatalistError(report, source)
    bad = set(report.bad_indices)
    logger.warning("%s: skipping %d of %d entries\n%s", source, len(bad), len(items), report.summary())
    return [item for i, item in enumerate(items) if i not in bad]
