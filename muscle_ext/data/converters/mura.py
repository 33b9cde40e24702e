"""MURA v1.1, musculoskeletal radiographs (Rajpurkar et al., MIDL 2018, arXiv:1712.06957;
https://stanfordmlgroup.github.io/competitions/mura/): 40 561 images of 14 863 upper-extremity studies, each study
labelled normal or abnormal by radiologists."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ._common import IMAGE_SUFFIXES, DatasetInfo, entry, find_root, grouped_split, require, write_converted

INFO = DatasetInfo(
    name="mura", title="MURA v1.1 (musculoskeletal radiographs)",
    source="https://stanfordmlgroup.github.io/competitions/mura/",
    licence="Stanford University School of Medicine MURA Dataset Research Use Agreement: personal, non-commercial "
            "research only; no redistribution",
    citation="Rajpurkar et al., MURA, arXiv:1712.06957 / MIDL 2018", body_part="upper_extremity")
LABEL_NAMES = ("negative", "positive")
_STUDY = re.compile(r"^study\d+_(?P<label>positive|negative)$")


def _split_entries(root: Path, split: str) -> list[dict]:
    folder = require(root / split, INFO.name, " (official split folders train/ and valid/)")
    items = []
    for part in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("XR_")):
        for study in sorted(part.glob("patient*/study*")):
            match = _STUDY.match(study.name)
            if not study.is_dir() or match is None:
                raise ValueError(f"{INFO.name}: study folder {study} is not named studyN_positive|negative")
            label = LABEL_NAMES.index(match["label"])
            for image in sorted(study.iterdir()):
                if image.suffix.lower() in IMAGE_SUFFIXES and not image.name.startswith("."):  # "._x.png": macOS
                    items.append(entry(image, INFO, "unknown", study.parent.name,
                                       body_part=part.name.removeprefix("XR_").lower(), label=label,
                                       study=f"{part.name}/{study.parent.name}/{study.name}"))
    if not items:
        raise FileNotFoundError(f"{INFO.name}: no XR_*/patient*/study*/*.png under {folder}")
    return items


def convert_mura(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert ``MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/studyN_<positive|negative>/imageN.png`` into
    ``out/datalist.json``; images are referenced in place.

    Decides: ``label`` = the study's label (0 negative, 1 positive) for each of its images, ``study`` names it;
    ``body_part`` = the folder's part in lower case (elbow, finger, forearm, hand, humerus, shoulder, wrist);
    ``view`` ``unknown`` (not recorded); ``test`` = the official ``valid`` split (MURA's test set is not public);
    ``validation`` = ~15 % of the official ``train`` patients, stratified by body part and label, ``seed``.

    Raises:
        FileNotFoundError: no ``train``/``valid`` folder or no images in one.
        ValueError: a study folder not named ``studyN_positive`` / ``studyN_negative``.
    """
    root = find_root(src, INFO.name, "valid", wrappers=("MURA-v1.1",))
    train, test = _split_entries(root, "train"), _split_entries(root, "valid")
    sections = grouped_split(train, stratum=lambda i: f"{i['body_part']}{i['label']}", test=None, seed=seed)
    sections["test"] = test
    return write_converted(out, INFO, sections, LABEL_NAMES,
                           label_policy="study-level label (folder suffix) given to each image of the study",
                           split=f"official valid = test; validation = ~15 % of official train patients, stratified "
                                 f"by body part and label (seed {seed})")
