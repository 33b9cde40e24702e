"""One labelled datalist from several sites or datasets of the same task, every section kept, each entry tagged
with the ``dataset`` it came from: a pooled task whose test metrics can then be read per dataset (the downstream
bundle's ``--subgroups "['dataset']"``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SECTIONS = ("training", "validation", "test")
PATH_KEYS = ("image", "mask")  # entry fields that name files (a segmentation label is a file too: see below)


def _dataset_name(path: Path, top: dict) -> str:
    return str(top.get("dataset") or (path.parent.name if path.stem == "datalist" else path.stem))


def merge_datalists(datalists: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Write ``out``: the ``training``, ``validation`` and ``test`` sections of every datalist, in the order given.

    Each entry keeps its fields; its file paths are made relative to ``out``'s folder; ``dataset`` is the entry's own
    tag, else the datalist's top-level ``dataset``, else its folder's name (``<name>/datalist.json``); a
    ``patient_id`` is prefixed with the dataset (two sites may number patients alike). A split stays a split: no
    entry moves between sections, so no test patient reaches training.

    Returns:
        The merged content (sections plus ``datasets``: per dataset its datalist and section sizes).

    Raises:
        FileNotFoundError: a datalist that does not exist.
        ValueError: fewer than two datalists, two with the same dataset name, or the same label named differently
            (``class_name``) in two datalists: their classes would be mixed up.
    """
    if len(datalists) < 2:
        raise ValueError("give at least two datalists to merge")
    out = Path(out)
    base = out.parent.resolve()
    merged: dict[str, Any] = {s: [] for s in SECTIONS}
    datasets: dict[str, dict[str, Any]] = {}
    class_names: dict[Any, tuple[str, str]] = {}
    for path in map(Path, datalists):
        if not path.is_file():
            raise FileNotFoundError(f"no datalist at {path}")
        top = json.loads(path.read_text())
        name = _dataset_name(path, top)
        if name in datasets:
            raise ValueError(f"two datalists are named {name!r} ({datasets[name]['datalist']} and {path}): rename "
                             "one's folder or give it a top-level 'dataset'")
        datasets[name] = {"datalist": os.path.relpath(path.resolve(), base)}
        for section in SECTIONS:
            entries = top.get(section, [])
            datasets[name][section] = len(entries)
            for item in entries:
                entry = dict(item)
                for key in (*PATH_KEYS, "label"):
                    value = entry.get(key)
                    if isinstance(value, str) and (key != "label" or (path.parent / value).is_file()):
                        entry[key] = os.path.relpath((path.parent / value).resolve(), base)
                entry["dataset"] = str(item.get("dataset") or name)
                if entry.get("patient_id") is not None:
                    entry["patient_id"] = f"{entry['dataset']}:{entry['patient_id']}"
                if "class_name" in entry and not isinstance(entry.get("label"), str):
                    known = class_names.setdefault(entry["label"], (entry["class_name"], name))
                    if known[0] != entry["class_name"]:
                        raise ValueError(f"label {entry['label']} is {known[0]!r} in {known[1]} but "
                                         f"{entry['class_name']!r} in {name}: map both to the same classes first")
                merged[section].append(entry)
    merged["datasets"] = datasets
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    logger.info("merged %s: %s", out, ", ".join(f"{s} {len(merged[s])}" for s in SECTIONS))
    return merged
