"""Indiana University chest X-rays from Open-i (Demner-Fushman et al., JAMIA 23(2), 2016; https://openi.nlm.nih.gov/),
in the layout of its widely used Kaggle copy with projection labels
(https://www.kaggle.com/datasets/raddar/chest-xrays-indiana-university): 7 470 frontal and lateral images of
3 851 reports."""

from __future__ import annotations

import os
from pathlib import Path

from ._common import DatasetInfo, entry, find_root, grouped_split, read_csv, require, write_converted

INFO = DatasetInfo(
    name="indiana_openi", title="Indiana University chest X-rays (Open-i)", source="https://openi.nlm.nih.gov/",
    licence="Open-i / Indiana University terms (the Kaggle copy is listed as CC BY-NC-ND 4.0; not re-checked "
            "offline): non-commercial research use with citation",
    citation="Demner-Fushman et al., JAMIA 23(2):304-310, 2016", body_part="chest")
VIEWS = {"frontal": "frontal", "lateral": "lateral"}


def convert_indiana_openi(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert the Indiana/Open-i images (``indiana_projections.csv`` with uid, filename, projection
    Frontal/Lateral; images in ``images/images_normalized/`` or ``images/``) into ``out/datalist.json``; images are
    referenced in place.

    Decides: images only (no ``label``; the reports are free text); ``view`` = ``frontal``/``lateral`` from the
    projection column; ``patient_id`` = the report ``uid`` (one study per report, both views together); no
    official split: ~70/15/15 stratified by view, grouped by uid, ``seed``.

    Raises:
        FileNotFoundError: no projections CSV or image folder, or a listed image that is missing.
        ValueError: an unknown projection.
    """
    root = find_root(src, INFO.name, "indiana_projections.csv")
    folder = next((f for f in (root / "images" / "images_normalized", root / "images") if f.is_dir()), None)
    if folder is None:
        require(root / "images", INFO.name, " (images/images_normalized/ or images/)")
    rows = read_csv(root / "indiana_projections.csv", INFO.name, ["uid", "filename", "projection"])
    items = []
    for line, row in enumerate(rows, start=2):
        view = VIEWS.get(row["projection"].lower())
        if view is None:
            raise ValueError(f"{INFO.name}: indiana_projections.csv line {line}: projection {row['projection']!r} "
                             "is neither Frontal nor Lateral")
        image = require(Path(folder) / row["filename"], INFO.name)
        items.append(entry(image, INFO, view, row["uid"]))
    sections = grouped_split(items, stratum=lambda i: i["view"], seed=seed)
    return write_converted(out, INFO, sections, (), label_policy="images only (no label)",
                           split=f"no official split: ~70/15/15 stratified by view, grouped by report uid "
                                 f"(seed {seed})")
