"""RSNA Pediatric Bone Age Challenge 2017 (Halabi et al., Radiology 290(2), 2019;
https://www.rsna.org/rsnai/ai-image-challenge/rsna-pediatric-bone-age-challenge-2017), in the layout of its Kaggle
copy (https://www.kaggle.com/datasets/kmader/rsna-bone-age): 12 611 labelled hand radiographs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._common import DatasetInfo, entry, find_root, grouped_split, read_csv, require, write_converted

INFO = DatasetInfo(
    name="rsna_boneage", title="RSNA Pediatric Bone Age Challenge 2017",
    source="https://www.rsna.org/rsnai/ai-image-challenge/rsna-pediatric-bone-age-challenge-2017",
    licence="RSNA challenge data terms: non-commercial research and education use with citation",
    citation="Halabi et al., Radiology 290(2):498-503, 2019", body_part="hand")
CSV_NAME = "boneage-training-dataset.csv"
_BOOL = {"true": True, "false": False, "1": True, "0": False}


def convert_rsna_boneage(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert ``boneage-training-dataset.csv`` (id, boneage in months, male True/False) and the images
    ``boneage-training-dataset/<id>.png`` (the Kaggle archive nests that folder in itself; both are read) into
    ``out/datalist.json``; images are referenced in place.

    Decides: ``label`` = bone age in months (float), ``male`` bool, ``view`` ``pa``; the unlabelled test images are
    left out; no official labelled split in this layout: ~70/15/15 stratified by age tertile, grouped by image id
    (one radiograph per child), ``seed``.

    Raises:
        FileNotFoundError: no CSV or image folder, or a listed image that is missing.
        ValueError: a CSV without id/boneage/male, or a value that is not a number / True / False.
    """
    root = find_root(src, INFO.name, CSV_NAME)
    folder = require(root / "boneage-training-dataset", INFO.name, " (the training images)")
    if (folder / "boneage-training-dataset").is_dir():
        folder = folder / "boneage-training-dataset"
    items = []
    for line, row in enumerate(read_csv(root / CSV_NAME, INFO.name, ["id", "boneage", "male"]), start=2):
        try:
            months, male = float(row["boneage"]), _BOOL[row["male"].lower()]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{INFO.name}: {CSV_NAME} line {line}: bad boneage/male {row['boneage']!r}/"
                             f"{row['male']!r}") from e
        image = require(Path(folder) / f"{row['id']}.png", INFO.name)
        items.append(entry(image, INFO, "pa", row["id"], label=months, male=male))
    cuts = np.quantile([i["label"] for i in items], [1 / 3, 2 / 3]) if items else []
    sections = grouped_split(items, stratum=lambda i: int(np.searchsorted(cuts, i["label"])), seed=seed)
    return write_converted(out, INFO, sections, (), label_policy="label = bone age in months (regression)",
                           split=f"no labelled official test split here: ~70/15/15 stratified by age tertile, grouped "
                                 f"by id (seed {seed})")
