"""Converters from the released layouts of public X-ray datasets to MONAI decathlon datalists (issue #18), and the
MD-MoCo pre-training pool built from them.

Every converter reads a dataset as its publishers release it, checks the layout (a missing file or folder is named
with the dataset and where it was looked for), and writes ``OUT/datalist.json``:

- ``training`` / ``validation`` / ``test``: entries with ``image`` (and ``mask`` where a converter writes or finds
  one) relative to ``OUT``; the source images are referenced in place, not copied, so keep ``SRC`` where it is (only
  Montgomery's merged lung masks are new files, under ``OUT/masks``);
- per entry ``dataset``, ``body_part`` and ``view`` (``pa``, ``ap``, ``frontal``, ``lateral`` or ``unknown``), the
  dataset's labels and ``patient_id`` where one is released;
- at the top level ``dataset``, ``title``, ``source``, ``licence``, ``citation``, ``body_part``, ``label_names``,
  ``label_policy`` and ``split`` (what the converter decided).

The official split is kept where one exists; otherwise ~70/15/15 stratified, grouped by patient
(scikit-learn ``StratifiedGroupKFold``, fixed seed). docs/DATASETS.md says per dataset where to get it and its terms.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from typing import Any

from . import boneage, chexpert, kermany, mura, nih, nlm_tb, openi, rsna_pneumonia, tbx11k
from ._common import DatasetInfo
from .boneage import convert_rsna_boneage
from .chexpert import UNCERTAIN_POLICIES, convert_chexpert
from .kermany import convert_kermany_pneumonia
from .merge import merge_datalists
from .mura import convert_mura
from .nih import convert_nih_chestxray14
from .nlm_tb import convert_chest_xray_masks_labels, convert_montgomery, convert_shenzhen
from .openi import convert_indiana_openi
from .pool import pool_datalists
from .rsna_pneumonia import convert_rsna_pneumonia
from .tbx11k import convert_tbx11k

__all__ = ["CONVERTERS", "DATASETS", "UNCERTAIN_POLICIES", "DatasetInfo", "convert_dataset", "converter",
           "merge_datalists", "pool_datalists"]

# name (the `dataset` tag the datalist carries) -> converter(src, out, **options) -> datalist content
CONVERTERS: dict[str, Callable[..., dict]] = {
    "nih_chestxray14": convert_nih_chestxray14,
    "shenzhen": convert_shenzhen,
    "montgomery": convert_montgomery,
    "indiana_openi": convert_indiana_openi,
    "rsna_boneage": convert_rsna_boneage,
    "kermany_pneumonia": convert_kermany_pneumonia,
    "mura": convert_mura,
    "chest_xray_masks_labels": convert_chest_xray_masks_labels,
    "tbx11k": convert_tbx11k,
    "chexpert": convert_chexpert,
    "rsna_pneumonia": convert_rsna_pneumonia,
}

# name -> title, source, licence, citation, body part (what the datalist's top level records)
DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    nih.INFO, nlm_tb.SHENZHEN, nlm_tb.MONTGOMERY, openi.INFO, boneage.INFO, kermany.INFO, mura.INFO,
    nlm_tb.MASKS_AND_LABELS, tbx11k.INFO, chexpert.INFO, rsna_pneumonia.INFO)}
assert list(DATASETS) == list(CONVERTERS)  # every converter is registered under its dataset tag


def converter(name: str) -> Callable[..., dict]:
    """The converter registered as ``name``.

    Raises:
        ValueError: an unknown name; the message lists the known ones and suggests the closest.
    """
    if name in CONVERTERS:
        return CONVERTERS[name]
    close = difflib.get_close_matches(name.lower().replace("-", "_"), CONVERTERS, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown dataset '{name}'.{hint} Known: {', '.join(CONVERTERS)}")


def convert_dataset(name: str, src: str | os.PathLike, out: str | os.PathLike, **options: Any) -> dict:
    """Convert the released layout of dataset ``name`` under ``src`` into ``out/datalist.json``; returns its content.

    ``options`` go to the converter (``seed`` for the split of converters that make one, ``uncertain`` for CheXpert);
    an option a converter does not take is refused, ``None`` values are ignored.

    Raises:
        ValueError: an unknown ``name`` or option, or a layout with wrong content (named).
        FileNotFoundError: a layout without what the converter looks for (the dataset, file/folder and place named).
    """
    convert = converter(name)
    options = {k: v for k, v in options.items() if v is not None}
    accepted = set(inspect.signature(convert).parameters) - {"src", "out"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{name}: option(s) {unknown} not taken (it takes {sorted(accepted) or 'none'})")
    return convert(src, out, **options)
