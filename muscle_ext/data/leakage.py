"""Leakage between datalists: an evaluation image (or its patient) that also sits in a pre-training pool or a training
split inflates every number measured on it. The MUSCLE paper pooled Shenzhen and Montgomery for pre-training and
used their masks for lung segmentation: exactly this risk.

:func:`find_leaks` compares the entries of ``test`` datalist sections against ``reference`` ones by

- **file identity**: the same SHA-256 of the file bytes (an exact copy under another name);
- **near duplicates**: the Pearson correlation of 64 x 64 grey thumbnails (each read as a viewer shows it,
  :func:`~muscle_ext.data.read_xray`, resized with area averaging) at or above ``threshold`` (0.975 by default:
  a resized, re-encoded or re-windowed copy of one radiograph; the corpus under ``../shared/data/xray`` was built
  with the same test, see its SOURCES.md);
- **patients**: the same ``patient_id`` (within the same ``dataset`` where entries name one).

What it finds is reported per pair (datalist entry indices and the reason), never with patient identifiers in logs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datalist import load_datalist
from .readers import read_xray

__all__ = ["Leak", "check_datalists", "find_leaks", "thumbnail"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leak:
    """One evaluation entry that also appears in a reference set: ``test_index`` / ``reference_index`` are entry
    positions in the lists given to :func:`find_leaks`; ``reason`` is ``identical file``, ``near duplicate`` (with its
    ``correlation``) or ``same patient``."""

    test_index: int
    reference_index: int
    reason: str
    correlation: float | None = None


@functools.lru_cache(maxsize=20_000)  # a reference pool checked against several test sets is read once (~16 KB each)
def thumbnail(path: str | Path, size: int = 64) -> np.ndarray:
    """The image as a ``(size * size,)`` float32 vector, zero mean and unit norm (so a dot product is the Pearson
    correlation of two thumbnails): read as a viewer shows it, area-averaged to ``size x size``."""
    import torch
    import torch.nn.functional as F

    image, _ = read_xray(path)
    small = F.adaptive_avg_pool2d(torch.as_tensor(image, dtype=torch.float32)[None, None], size)[0, 0].numpy()
    vector = small.ravel() - small.mean()
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)


@functools.lru_cache(maxsize=100_000)
def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _patient(item: Mapping[str, Any]) -> tuple[str, str] | None:
    patient = item.get("patient_id")
    return None if patient is None else (str(item.get("dataset", "")), str(patient))


def find_leaks(test: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
               threshold: float = 0.975, size: int = 64, image_key: str = "image",
               near_duplicates: bool = True) -> list[Leak]:
    """Every ``test`` entry that is also in ``reference``: the same file bytes, a near-duplicate thumbnail, or the
    same patient. Image paths must be absolute (as :func:`~muscle_ext.data.load_datalist` returns them).

    Args:
        test: the evaluation entries (e.g. a task's ``test`` section).
        reference: the entries that must not hold them (a pre-training pool, training sections).
        threshold: thumbnail correlation at or above which two images count as one radiograph.
        size: thumbnail side in pixels.
        near_duplicates: also compare thumbnails (reads every image once); ``False``: file hashes and patients only.

    Returns:
        The leaks, one per (test entry, reference entry) pair, ordered by test entry; an entry that is an identical
        file is not also listed as a near duplicate of the same reference entry.

    Raises:
        FileNotFoundError, XRayReadError: an image that cannot be read (named).
        ValueError: a threshold outside (0, 1].
    """
    if not 0 < float(threshold) <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    leaks: dict[tuple[int, int], Leak] = {}
    hashes: dict[str, list[int]] = {}
    for j, item in enumerate(reference):
        hashes.setdefault(_sha256(item[image_key]), []).append(j)
    for i, item in enumerate(test):
        for j in hashes.get(_sha256(item[image_key]), []):
            leaks[(i, j)] = Leak(i, j, "identical file", 1.0)
    patients: dict[tuple[str, str], list[int]] = {}
    for j, item in enumerate(reference):
        key = _patient(item)
        if key is not None:
            patients.setdefault(key, []).append(j)
    for i, item in enumerate(test):
        key = _patient(item)
        for j in patients.get(key, []) if key is not None else []:
            leaks.setdefault((i, j), Leak(i, j, "same patient"))
    if near_duplicates and test and reference:
        a = np.stack([thumbnail(item[image_key], size) for item in test])
        b = np.stack([thumbnail(item[image_key], size) for item in reference])
        correlation = a @ b.T
        for i, j in zip(*np.nonzero(correlation >= float(threshold)), strict=True):
            pair = (int(i), int(j))
            if pair not in leaks or leaks[pair].reason == "same patient":
                leaks[pair] = Leak(pair[0], pair[1], "near duplicate", round(float(correlation[i, j]), 4))
    found = sorted(leaks.values(), key=lambda leak: (leak.test_index, leak.reference_index))
    logger.info(f"leakage check: {len(found)} pair(s) among {len(test)} test and {len(reference)} reference entries")
    return found


def _entries(path: str | Path, section: str) -> list[dict]:
    # patient ids are compared within a dataset: entries that name none belong to their datalist's folder
    return [{"dataset": Path(path).parent.name, **item} for item in load_datalist(path, section)]


def check_datalists(test: Sequence[tuple[str | Path, str]], reference: Sequence[tuple[str | Path, str]],
                    threshold: float = 0.975, near_duplicates: bool = True) -> list[dict[str, Any]]:
    """:func:`find_leaks` of each ``(datalist, section)`` in ``test`` against all of ``reference`` together.

    Returns:
        One summary per test section: ``{"datalist", "section", "n", "leaks": [{"entry", "reference", "reference_entry",
        "reason", "correlation"}]}`` with entry positions and the reference's ``"<datalist>:<section>"``, never file
        names or patient ids (the summary goes to logs and reports).

    Raises:
        FileNotFoundError, ValueError: a datalist or section that cannot be read (named).
    """
    where = [(str(p), s, i, item) for p, s in reference for i, item in enumerate(_entries(p, s))]
    pool = [w[3] for w in where]
    summaries = []
    for path, section in test:
        entries = _entries(path, section)
        leaks = find_leaks(entries, pool, threshold=threshold, near_duplicates=near_duplicates)
        found = []
        for leak in leaks:
            ref_path, ref_section, ref_entry, _ = where[leak.reference_index]
            found.append({"entry": leak.test_index, "reference": f"{ref_path}:{ref_section}",
                          "reference_entry": ref_entry, "reason": leak.reason, "correlation": leak.correlation})
        summaries.append({"datalist": str(path), "section": section, "n": len(entries), "leaks": found})
    return summaries
