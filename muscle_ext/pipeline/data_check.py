"""The main job's data check, before any stage: does an image or a patient of a downstream test split also sit in
the pre-training pool or in a split some stage trains on? (The MUSCLE paper pooled Shenzhen and Montgomery for
pre-training and used their masks for lung segmentation: exactly this risk.) The check is
:func:`muscle_ext.data.leakage.check_datalists`; its result, ``<out>/leakage.json``, is reused while the datalists'
bytes stay the same, and the report has a section on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .runner import Stage, file_digest, with_placeholders

__all__ = ["LEAKAGE_FILE", "check_job_data", "leakage_sets"]

LEAKAGE_FILE = "leakage.json"


def _sections(path: Path) -> list[str]:
    return [k for k, v in json.loads(path.read_text()).items() if isinstance(v, list)]


def leakage_sets(stages: Sequence[Stage]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """``(test, reference)`` ``(datalist, section)`` pairs of a job: every downstream task's ``test`` section (and
    that of another site it is scored at), against every other section of every datalist a stage trains on (the
    pre-training pool whole, the tasks' training and validation splits; not another site's, which nothing trains on)."""
    sections: dict[Path, list[str]] = {}  # each datalist read once (every start of a task names the same one)
    test: dict[Path, None] = {}
    read: dict[Path, None] = {}
    for stage in stages:
        external = stage.extra.get("external_datalist")
        for path in (Path(p) for p in stage.inputs if Path(p).suffix == ".json"):
            if path not in sections:
                sections[path] = _sections(path)
            if stage.extra.get("kind") == "downstream" and "test" in sections[path]:
                test[path] = None
            if str(path) != external:
                read[path] = None
    reference = [(path, section) for path in read for section in sections[path] if section != "test"]
    return [(path, "test") for path in test], reference


def _digest(pairs: Sequence[tuple[Path, str]], threshold: float) -> str:
    digest = hashlib.sha256(json.dumps([[str(p), s] for p, s in pairs] + [threshold]).encode())
    for path in dict.fromkeys(p for p, _ in pairs):
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def check_job_data(stages: Sequence[Stage], out: str | os.PathLike, placeholders: Mapping[str, str] | None = None,
                   threshold: float = 0.975) -> dict[str, Any]:
    """Run (or reuse) the leakage check of the job's datalists; writes and returns ``<out>/leakage.json``:
    ``{"fingerprint", "threshold", "reference": [...], "tests": [summary per test split], "leaks": total}`` with
    datalist paths written with ``placeholders`` (e.g. ``<data>/...``), entry positions only.

    Raises:
        FileNotFoundError, XRayReadError, ValueError: a datalist or image that cannot be read (named).
    """
    from ..data.leakage import check_datalists

    test, reference = leakage_sets(stages)
    path = Path(out) / LEAKAGE_FILE
    fingerprint = _digest([*test, *reference], threshold)
    try:
        found = json.loads(path.read_text())
        if found.get("fingerprint") == fingerprint:
            return found
    except (OSError, ValueError):
        pass

    summaries = check_datalists(test, reference, threshold=threshold) if test and reference else []
    for summary in summaries:
        summary["datalist"] = with_placeholders(summary["datalist"], placeholders)
        for leak in summary["leaks"]:
            leak["reference"] = with_placeholders(leak["reference"], placeholders)
    result = {"fingerprint": fingerprint, "threshold": threshold,
              "reference": [f"{with_placeholders(str(p), placeholders)}:{s}" for p, s in reference], "tests": summaries,
              "leaks": sum(len(s["leaks"]) for s in summaries)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result
