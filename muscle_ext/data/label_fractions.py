"""Label-efficiency subsets: a fraction of a training split, drawn the way label-efficiency studies need it.

The field judges pre-training with little labelled data by curves over fractions of the training labels (1 %, 10 %,
100 %; e.g. MGCA, Wang et al. NeurIPS 2022, and the MUSCLE paper's own few-label settings). For such a curve to mean
something the subsets must be

- **stratified**: each class keeps its share (a 1 % subset of a 10 %-positive split is not all negatives);
- **grouped by patient** where the datalist names one: all images of a patient are in or out together, so that a
  subset never holds a near-duplicate of another of its images' patient (and the group is the unit counted);
- **nested**: for one seed the 1 % subset is inside the 10 % subset, inside 100 %, so the curve varies the amount
  of data and not which data;
- **reproducible**: the same items, seed and fraction give the same subset on any machine.

:func:`label_fraction_subset` draws one subset: per stratum (class, or one stratum where items have no class label,
e.g. segmentation), a seeded permutation of the stratum's patient groups, of which the first ``ceil(fraction * n)``
(at least ``min_per_class``) are kept. Prefixes of one permutation make the subsets nested.

:func:`k_shot_subset` is the few-shot version for adapting a model to a new site: ``k`` patients per class from the
same permutations (the 5-shot set inside the 10-shot set for one seed), never a patient or image of the evaluation
cases it is given.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["k_shot_subset", "label_fraction_subset"]

logger = logging.getLogger(__name__)


def _stable_seed(seed: int, stratum: str) -> list[int]:
    # numpy's SeedSequence from the seed and a hash of the stratum name: independent of dict and set order
    digest = int.from_bytes(hashlib.sha256(stratum.encode()).digest()[:8], "little")
    return [int(seed), digest]


def _class_of(item: Mapping[str, Any], label_key: str) -> str | None:
    label = item.get(label_key)
    if isinstance(label, bool) or not isinstance(label, (numbers.Integral, str)):
        return None  # a mask path is a str too: callers pass stratify=False for segmentation
    return str(label)


def _strata(items: Sequence[Mapping[str, Any]], label_key: str, group_key: str | None, stratify: bool,
            seed: int) -> tuple[dict[str, list[str]], dict[str, list[int]]]:
    """``({stratum: patient keys in their seeded order}, {patient key: item indices})``."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        key = str(item[group_key]) if group_key and item.get(group_key) is not None else f"#item{index}"
        groups.setdefault(key, []).append(index)
    strata: dict[str, list[str]] = {}
    for key, members in groups.items():
        if stratify:
            classes = {_class_of(items[i], label_key) for i in members}
            if None in classes:
                bad = next(i for i in members if _class_of(items[i], label_key) is None)
                raise ValueError(f"item {bad} ({items[bad].get('image')}) has label {items[bad].get(label_key)!r}, "
                                 "not a class: pass stratify=False for segmentation or regression")
            stratum = min(classes)  # a patient with images of several classes: counted in its lowest class
        else:
            stratum = ""
        strata.setdefault(stratum, []).append(key)
    ordered = {}
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])  # a canonical order before the seeded permutation
        order = np.random.default_rng(_stable_seed(seed, stratum)).permutation(len(keys))
        ordered[stratum] = [keys[k] for k in order]
    return ordered, groups



def label_fraction_subset(items: Sequence[Mapping[str, Any]], fraction: float, seed: int = 0,
                          label_key: str = "label", group_key: str | None = "patient_id", stratify: bool = True,
                          min_per_class: int = 5) -> list[dict]:
    """The training items of a label-efficiency run: ``fraction`` of ``items``, stratified by class, grouped by
    patient, nested across fractions for one ``seed``, in the items' original order.

    Args:
        items: the full training split (datalist entries).
        fraction: the share of patient groups to keep per stratum, in ``(0, 1]``; ``1`` returns every item.
        seed: which subset; the same seed gives nested subsets across fractions.
        label_key: the class label (an integer or a string); used for strata when ``stratify``.
        group_key: the patient identifier; items without it are their own group. ``None``: every item its own group.
        stratify: strata by class (classification); ``False``: one stratum (segmentation masks, regression).
        min_per_class: keep at least this many groups of every stratum (all of a smaller stratum), so that a 1 %
            subset still has examples of each class.

    Returns:
        The kept items (copies), in their order in ``items``.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]``, ``min_per_class < 1``, or ``stratify`` with an item whose label
            is not a class (a float, a list, missing).
    """
    if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool) or not 0 < float(fraction) <= 1:
        raise ValueError(f"label fraction must be a number in (0, 1], got {fraction!r}")
    if int(min_per_class) < 1:
        raise ValueError(f"min_per_class must be >= 1, got {min_per_class}")
    items = [dict(i) for i in items]
    if float(fraction) == 1.0:
        return items
    strata, groups = _strata(items, label_key, group_key, stratify, seed)
    kept: list[int] = []
    for keys in strata.values():
        count = min(len(keys), max(int(min_per_class), math.ceil(float(fraction) * len(keys))))
        kept += [i for key in keys[:count] for i in groups[key]]
    patients = sum(min(len(keys), max(int(min_per_class), math.ceil(float(fraction) * len(keys))))
                   for keys in strata.values())
    logger.info(f"label fraction {float(fraction):g} (seed {seed}): {len(kept)} of {len(items)} training items, "
                f"{patients} of {len(groups)} patients")
    return [items[i] for i in sorted(kept)]


def k_shot_subset(items: Sequence[Mapping[str, Any]], k: int, seed: int = 0, label_key: str = "label",
                  group_key: str | None = "patient_id", exclude: Sequence[Mapping[str, Any]] = ()) -> list[dict]:
    """``k`` patients of every class from ``items`` (all their images), for adapting a model to a new site with a
    few labelled cases: nested across ``k`` for one ``seed`` (the 5-shot set inside the 10-shot set), reproducible,
    in the items' original order.

    Args:
        items: the new site's labelled pool (datalist entries with a class ``label``).
        k: patients per class (all of a class that has fewer).
        seed: which draw; the same seed gives nested sets across ``k``.
        label_key, group_key: as :func:`label_fraction_subset`.
        exclude: entries that must never be drawn, e.g. the evaluation cases: any item sharing an image path or a
            patient with them leaves the pool first.

    Raises:
        ValueError: ``k < 1``, or an item whose label is not a class.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a whole number >= 1 (cases per class), got {k!r}")
    images = {str(e.get("image")) for e in exclude}
    patients = {str(e[group_key]) for e in exclude if group_key and e.get(group_key) is not None}
    pool = [dict(i) for i in items if str(i.get("image")) not in images
            and not (group_key and i.get(group_key) is not None and str(i[group_key]) in patients)]
    strata, groups = _strata(pool, label_key, group_key, True, seed)
    kept = [i for keys in strata.values() for key in keys[:int(k)] for i in groups[key]]
    return [pool[i] for i in sorted(kept)]
