"""The MD-MoCo pre-training pool from converted datalists: the format of ``pretrain_datalist.json`` that
``bundles/muscle_pretrain/configs/train.yaml`` reads (``training``/``validation`` entries ``{"image", "dataset",
"body_part"}``, paths relative to the pool's folder). The bundle pre-processes each ``dataset`` tag its own way
(``preprocessing``) and augments by ``body_part`` (``augmentation``)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..datalist import subset

logger = logging.getLogger(__name__)

POOL_SECTIONS = ("training", "validation")  # never test: pre-training must not see a downstream test image


def _tag(item: Mapping, top: Mapping, key: str, path: Path) -> str:
    value = item.get(key) or top.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}: entry {item.get('image')!r} has no '{key}' (and the datalist no top-level "
                         f"'{key}'): convert the dataset with `muscle data convert` first")
    return value


def pool_datalists(datalists: Sequence[str | os.PathLike], out: str | os.PathLike,
                   weights: Mapping[str, float] | None = None, limits: Mapping[str, int] | None = None) -> dict:
    """Write the pre-training pool ``out`` (a JSON file) from converted datalists and return its content.

    Only the ``training`` and ``validation`` sections are read (never ``test``), images only: each entry becomes
    ``{"image": path relative to out's folder, "dataset": ..., "body_part": ...}`` (an entry's own tag, else the
    datalist's top-level one). Entries are grouped by dataset in the order given; an image listed twice (the same
    file) is kept once.

    Args:
        datalists: ``datalist.json`` files written by the converters (or any with those tags).
        out: the pool file, e.g. ``data/pretrain_datalist.json``.
        weights: ``{dataset: weight}``; recorded as the top-level ``dataset_weights`` (in the order of the pool's
            datasets); the pretrain bundle samples by them with ``--dataset_weighting datalist``.
        limits: ``{dataset: n}``: at most ``n`` training entries of that dataset (evenly spaced, deterministic) and
            validation entries in the same proportion.

    Returns:
        The pool's content: ``training``, ``validation``, ``datasets`` (per dataset: source, licence, datalist and
        counts) and ``dataset_weights`` when ``weights`` are given.

    Raises:
        FileNotFoundError: a datalist that does not exist.
        ValueError: an entry without ``dataset``/``body_part``, weights or limits for a dataset not in the pool,
            a negative weight or a limit below 1.
    """
    out = Path(out)
    base = out.parent.resolve()
    sections: dict[str, dict[str, list[dict]]] = {s: {} for s in POOL_SECTIONS}
    datasets: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for path in map(Path, datalists):
        if not path.is_file():
            raise FileNotFoundError(f"no datalist at {path}")
        top = json.loads(path.read_text())
        for section in POOL_SECTIONS:
            for item in top.get(section, []):
                image = (path.parent / item["image"]).resolve()
                if str(image) in seen:
                    continue
                seen.add(str(image))
                name = _tag(item, top, "dataset", path)
                sections[section].setdefault(name, []).append(
                    {"image": os.path.relpath(image, base), "dataset": name,
                     "body_part": _tag(item, top, "body_part", path)})
                info = datasets.setdefault(name, {"source": top.get("source"), "licence": top.get("licence"),
                                                  "datalists": []})
                if os.path.relpath(path.resolve(), base) not in info["datalists"]:
                    info["datalists"].append(os.path.relpath(path.resolve(), base))
    for what, table in (("weights", weights or {}), ("limits", limits or {})):
        unknown = sorted(set(table) - set(datasets))
        if unknown:
            raise ValueError(f"{what} for dataset(s) {unknown} not in the pool (it has {sorted(datasets)})")
    for name, n in (limits or {}).items():
        if int(n) < 1:
            raise ValueError(f"limit for {name} must be >= 1, got {n}")
        train = sections["training"].get(name, [])
        valid = sections["validation"].get(name, [])
        keep_valid = math.ceil(len(valid) * min(1.0, int(n) / max(1, len(train))))
        sections["training"][name] = subset(train, int(n))
        sections["validation"][name] = subset(valid, keep_valid)
    content: dict[str, Any] = {s: [i for name in datasets for i in sections[s].get(name, [])] for s in POOL_SECTIONS}
    for name, info in datasets.items():
        info.update(training=len(sections["training"].get(name, [])),
                    validation=len(sections["validation"].get(name, [])))
    content["datasets"] = datasets
    if weights:
        if any(float(w) < 0 for w in weights.values()) or not any(float(w) > 0 for w in weights.values()):
            raise ValueError(f"dataset weights must be >= 0 and not all 0, got {dict(weights)}")
        content["dataset_weights"] = {name: float(weights.get(name, 1.0)) for name in datasets}
        content["dataset_weights_note"] = ("read by bundles/muscle_pretrain with --dataset_weighting datalist; "
                                           "unlisted datasets weigh 1.0")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(content, indent=1) + "\n")
    logger.info("pool %s: %d training, %d validation images of %d datasets", out, len(content["training"]),
                len(content["validation"]), len(datasets))
    return content
