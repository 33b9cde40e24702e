"""Datalists: MONAI decathlon-style JSON is the one format (``image``, ``label``, optional ``mask``, ``box``,
``body_part``, ``dataset``). This module reads, writes and cuts them; builders that turn common layouts into it are
in :mod:`.datalist_builders`, and :func:`validate_datalist` (:mod:`.datalist_checks`) checks every entry at once and
either stops with the full list of problems or, when asked, skips exactly those entries. All are importable from here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import load_decathlon_datalist

from .datalist_builders import (
    DICOMDIR_REASON,
    DICOMDIR_SOP_CLASS,
    datalist_from_class_folders,
    datalist_from_csv,
    datalist_from_dicom_tree,
    datalist_from_folder,
    is_dicomdir,
)
from .datalist_checks import DatalistError, DatalistIssue, ValidationReport, screen_inputs, validate_datalist

__all__ = [
    "DICOMDIR_REASON",
    "DICOMDIR_SOP_CLASS",
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

