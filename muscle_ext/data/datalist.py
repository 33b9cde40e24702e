"""Datalists: MONAI decathlon-style JSON is the one format (``image``, ``label``, optional ``mask``, ``box``,
``body_part``, ``dataset``). Builders turn common layouts into it; :func:`validate_datalist` checks every entry
at once and either stops with the full list of problems or, when asked, skips exactly those entries.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

from .readers import XRayReadError, read_mask, read_xray, xray_format

__all__ = [
    "DatalistError",
    "DatalistIssue",
    "ValidationReport",
    "datalist_from_class_folders",
    "datalist_from_csv",
    "datalist_from_dicom_tree",
    "datalist_from_folder",
    "datalist_section",
    "is_dicomdir",
    "load_datalist",
    "screen_inputs",
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


# Media Storage Directory Storage: the SOP class of a DICOMDIR (DICOM PS3.4 annex F, PS3.10)
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
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


def _scrub(text: str, path: str, root: Path | None) -> str:
    """``text`` without the file's path, path relative to ``root`` or name (they may carry a patient's name)."""
    names = {path, str(Path(path).absolute()), Path(path).name}
    if root is not None:
        try:
            names.add(Path(path).absolute().relative_to(root.absolute()).as_posix())
        except ValueError:
            pass
    for name in sorted((n for n in names if n), key=len, reverse=True):
        text = text.replace(name, "<file>")
    return text


def screen_inputs(items: Iterable[Mapping], root: str | os.PathLike | None = None, on_error: str = "skip",
                  report_file: str | os.PathLike | None = None, include_paths: Any = False, image_key: str = "image",
                  source: str = "inputs", max_logged: int = 20) -> list[dict]:
    """The inference inputs that can be used: every item whose image decodes as an X-ray (checked by
    :func:`validate_datalist`; labels, masks and boxes are not looked at), each with its ``case_id`` (kept when the
    item has one, else the hash of its path relative to ``root``, or of its absolute path when ``root`` is None, as
    :class:`muscle_ext.handlers.PredictionSaver` computes it). DICOMDIRs (:func:`is_dicomdir`) are unusable with
    their own reason.

    ``on_error="skip"``: unusable items are left out and logged as one warning by ``case_id`` and reason.
    ``report_file`` (``skipped.csv`` beside the predictions) lists them with columns ``case_id``, ``reason`` and,
    with ``include_paths=True`` only, ``file`` (the path relative to ``root``: paths may hold patient names). The
    file is written on every successful screening, with its header only when nothing was skipped, so that scripts
    can always read it. Reasons never hold the file's path or name.

    ``on_error="raise"``: stops with a :class:`DatalistError` naming every unusable file by its path (the person
    running it has to find the file), before any prediction is made.

    Raises ``ValueError`` when no item is usable (after writing ``report_file``).
    """
    from muscle_ext.flags import as_flag

    from .writers import case_id, write_csv

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    include_paths = as_flag(include_paths, "include_paths")
    root_path = Path(root) if root is not None else None
    items = [dict(i) for i in items]
    if not items:
        raise ValueError(f"{source}: no input files")
    report = ValidationReport(total=len(items))
    checked: list[int] = []
    for index, item in enumerate(items):
        image = item.get(image_key)
        if isinstance(image, (str, os.PathLike)):
            item.setdefault("case_id", case_id(image, root))
            if is_dicomdir(image):
                report.issues.append(DatalistIssue(index, str(image), DICOMDIR_REASON))
                continue
        checked.append(index)
    try:
        validate_datalist([items[i] for i in checked], image_key=image_key, mask_key=None, box_key=None,
                          on_error="raise", source=source)
    except DatalistError as e:  # its report lists every problem; its indices count the checked items
        report.issues += [DatalistIssue(checked[i.index], i.file, i.problem) for i in e.report.issues]
    report.issues.sort(key=lambda i: i.index)
    if report.issues and on_error == "raise":
        error = DatalistError(report, source)
        error.args = (f"{source}: {report.summary()}\nRemove or fix these files, or leave them out with "
                      "--on_bad_data skip (in Python: on_error='skip').",)
        raise error

    bad = report.bad_indices
    rows = []
    for index in bad:
        image = str(items[index].get(image_key))
        reasons = "; ".join(i.problem if i.problem == DICOMDIR_REASON else _scrub(i.problem, image, root_path)
                            for i in report.issues if i.index == index)
        row = {"case_id": items[index].get("case_id", ""), "reason": reasons}
        if include_paths:
            try:
                row["file"] = Path(image).absolute().relative_to(root_path.absolute()).as_posix()
            except (AttributeError, ValueError):  # no root, or outside it
                row["file"] = image
        rows.append(row)
    if report_file is not None:
        write_csv(report_file, rows, ["case_id", "reason", *(["file"] if include_paths else [])])
    if rows:
        listed = [f"  {r['case_id']}: {r['reason']}" for r in rows[:max_logged]]
        if len(rows) > max_logged:
            listed.append(f"  ... and {len(rows) - max_logged} more")
        logger.warning("%s: skipping %d of %d files that are not usable images (by case_id%s):\n%s", source,
                       len(rows), len(items), f"; all listed in {report_file}" if report_file else "",
                       "\n".join(listed))
    skipped = set(bad)
    good = [item for i, item in enumerate(items) if i not in skipped]
    if not good:
        raise ValueError(f"{source}: none of the {len(items)} files is a usable image"
                         + (f" (reasons in {report_file})" if report_file else ""))
    return good


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


def datalist_section(path: str | os.PathLike, section: str = "training", max_items: int | None = None,
                     on_error: str = "raise", **checks: Any) -> list[dict]:
    """One datalist section as a training or evaluation run uses it: loaded (:func:`load_datalist`), cut to at most
    ``max_items`` evenly spaced entries (:func:`subset`) and checked (:func:`validate_datalist`, problems named with
    the section). ``checks`` are :func:`validate_datalist`'s keywords: ``classes=[0, 1]`` (class indices),
    ``numeric_labels=True`` (a measurement), ``mask_key="label"`` (segmentation masks), ...

    In a bundle config: ``$muscle_ext.data.datalist_section(@datalist, 'training', @max_items,
    on_error=@on_bad_data, **@datalist_checks)``.

    Raises:
        DatalistError: with every problem, when ``on_error="raise"`` and an entry is unusable.
        ValueError: for an unknown ``on_error``; ``FileNotFoundError`` / ``KeyError`` as :func:`load_datalist`.
    """
    checks.setdefault("source", section)
    return validate_datalist(subset(load_datalist(path, section), max_items), on_error=on_error, **checks)


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
        super().__init__(f"{source}: {report.summary()}\nFix these entries, or leave them out with --on_bad_data skip "
                         "(in Python: on_error='skip').")


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


def _is_class_index_list(classes: Sequence[Any] | None) -> bool:
    """True when ``classes`` are class indices (ints, e.g. ``range(n)``): labels must then be whole numbers."""
    return classes is not None and all(isinstance(c, numbers.Integral) and not isinstance(c, (bool, np.bool_))
                                       for c in classes)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _class_index(value: Any, classes: Sequence[int]) -> tuple[Any, str | None]:
    """``value`` as a class index and the problem with it (``None`` when it is fine).

    Integer-valued floats (``1.0``, as pandas writes a label column once a value is missing) become ints; bools,
    strings, null, NaN and fractional numbers are problems that name the value and its type.
    """
    if isinstance(value, (bool, np.bool_)):  # JSON true/false: which class is "true" is a guess
        return value, f"label {value!r} is a bool, not a class index (write the class number, e.g. 0 or 1)"
    if isinstance(value, numbers.Integral):
        index = int(value)
    elif isinstance(value, numbers.Real):
        if math.isnan(value):
            return value, "label is NaN (float): a missing value, not a class index"
        if not float(value).is_integer():
            return value, f"label {value!r} (float) is not a whole number, so not a class index"
        index = int(value)
    else:
        return value, f"label {value!r} is {_type_name(value)}, not a class index (a whole number)"
    if index not in classes:
        return index, f"label {index} is not one of the declared classes {list(classes)}"
    return index, None


def _check_labels(item: dict, classes: Sequence[Any] | None, box_key: str | None, numeric_labels: bool) -> list[str]:
    """Problems with ``item["label"]``; integer-valued float class indices are normalised to ints in ``item``."""
    if "label" not in item:
        return []
    label = item["label"]
    if classes is not None:
        per_box = isinstance(label, (list, tuple)) and bool(box_key) and box_key in item
        values = list(label) if per_box else [label]
        what = "box label" if per_box else "label"
        if not _is_class_index_list(classes):  # class names or other values: membership only
            unknown = [v for v in values if v not in classes]
            return [f"{what} {unknown[0]!r} is not one of the declared classes {list(classes)}"] if unknown else []
        checked = [_class_index(v, classes) for v in values]
        problems = [p.replace("label", what, 1) for _, p in checked if p]
        if not problems:
            item["label"] = [i for i, _ in checked] if per_box else checked[0][0]
        return problems[:1]
    if numeric_labels:
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, numbers.Real):
            return [f"label {label!r} is {_type_name(label)}, not a number"]
        if not math.isfinite(label):
            return [f"label is {label!r} (float): a missing value, not a number"]
    return []


def _warn_absent_classes(items: Sequence[Mapping], classes: Sequence[int], box_key: str | None,
                         source: str) -> dict[int, int]:
    """Count the (box) labels of each class and warn, naming ``source``, when a class has none."""
    counts = Counter()
    for item in items:
        if "label" in item:
            label = item["label"]
            counts.update(label if isinstance(label, list) and box_key and box_key in item else [label])
    counts = {c: counts.get(c, 0) for c in classes}
    absent = [c for c, n in counts.items() if n == 0]
    if absent and any(counts.values()):
        logger.warning("%s: no entries of class %s (class counts %s): metrics that need every class (ROC AUC, "
                       "per-class AP) are undefined (NaN) on this split, and a model trained on it never sees %s",
                       source, ", ".join(map(str, absent)), ", ".join(f"{c}: {n}" for c, n in counts.items()),
                       "that class" if len(absent) == 1 else "those classes")
    return counts


def _check_item(item: Mapping, classes: Sequence[Any] | None, image_key: str, mask_key: str | None,
                box_key: str | None, decode: bool, numeric_labels: bool = False) -> list[str]:
    image = item.get(image_key)
    if not isinstance(image, (str, os.PathLike)):
        return [f"entry has no '{image_key}' path"]
    problems = _check_labels(item, classes, box_key, numeric_labels)  # before decoding: all problems at once
    shape: tuple[int, ...] | None = None
    try:
        if decode:
            shape = read_xray(image)[0].shape
        elif not Path(image).is_file():
            raise FileNotFoundError(f"{image}: no such file")
    except FileNotFoundError:
        return ["missing file", *problems]
    except XRayReadError as e:
        return [e.cause, *problems]
    except Exception as e:  # any decoder failure is a bad entry, reported with its type
        return [f"unreadable ({type(e).__name__}: {e})", *problems]
    if mask_key and item.get(mask_key) is not None:
        try:
            mask_shape = read_mask(item[mask_key])[0].shape if decode else None
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
                      on_error: str = "raise", source: str = "datalist", numeric_labels: bool = False) -> list[dict]:
    """Check every entry (file exists and decodes, label of the right type and in ``classes``, mask size equals
    image size, boxes non-empty and inside the image) and report all problems at once.

    Labels: with ``classes`` given as class indices (ints, e.g. ``list(range(n))``) each label (or each box label)
    must be a whole number in ``classes``; integer-valued floats (``1.0``) become ints in the returned items, and
    bools, strings, null, NaN and fractional numbers are problems naming the value and its type. With
    ``numeric_labels=True`` (regression: a measurement such as bone age in months) each label must be a finite
    int or float; it is returned unchanged. Without either, labels are not checked (e.g. a mask path).

    A warning names ``source`` and the class counts when a declared class has no entry in the returned items:
    ROC AUC and other metrics that need every class are undefined on such a split.

    ``on_error="raise"`` stops with a :class:`DatalistError` listing each bad entry; ``on_error="skip"`` returns
    the good entries only and logs how many and which were left out (never silently).

    Raises:
        DatalistError: with every problem, when ``on_error="raise"`` and an entry is unusable.
        ValueError: for an unknown ``on_error``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    items = [dict(i) for i in items]
    report = ValidationReport(total=len(items))
    for index, item in enumerate(items):
        for problem in _check_item(item, classes, image_key, mask_key, box_key, decode, numeric_labels):
            report.issues.append(DatalistIssue(index, str(item.get(image_key)), problem))
    if report.issues and on_error == "raise":
        raise DatalistError(report, source)
    if report.issues:
        bad = set(report.bad_indices)
        logger.warning("%s: skipping %d of %d entries\n%s", source, len(bad), len(items), report.summary())
        items = [item for i, item in enumerate(items) if i not in bad]
    if _is_class_index_list(classes):
        _warn_absent_classes(items, list(classes), box_key, source)
    return items
