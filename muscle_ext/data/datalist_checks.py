"""Datalist checks: :func:`validate_datalist` checks every entry at once (images decode, labels, masks and boxes fit)
and either stops with the full list of problems or, when asked, skips exactly those entries; :func:`screen_inputs`
does the same for a clinic's inference inputs."""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datalist_builders import DICOMDIR_REASON, is_dicomdir
from .readers import XRayReadError, read_mask, read_xray

__all__ = ["DatalistError", "DatalistIssue", "ValidationReport", "screen_inputs", "validate_datalist"]

logger = logging.getLogger(__name__)


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
