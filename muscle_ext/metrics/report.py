"""Writing metric reports: one JSON file per run (``metrics.json``), and per-case score tables (CSV, one row per
evaluated case, no identifiers) for paired comparisons of two models on the same cases."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["json_safe", "read_case_scores", "write_case_scores", "write_report"]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (JSON has no NaN: an undefined metric, e.g. AUC with one class,
    is written as null) and NumPy scalars as Python numbers, through nested dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())
    return value


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write ``report`` as indented JSON (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2, sort_keys=True) + "\n")
    return path


def write_case_scores(path: str | os.PathLike, columns: Mapping[str, ArrayLike]) -> Path:
    """Write ``index`` (row number) and ``columns`` (equal lengths), one row per case; integers stay integers and
    floats are written with ``repr`` so that they read back exactly. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", *columns])
        for i, row in enumerate(zip(*(np.asarray(c) for c in columns.values()), strict=True)):
            writer.writerow([i, *(repr(v.item()) for v in row)])
    return path


def read_case_scores(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The columns of a :func:`write_case_scores` file, as float arrays (``index`` left out)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no cases")
    return {key: np.array([float(r[key]) for r in rows]) for key in rows[0] if key != "index"}
