"""CheXpert v1.0 (Irvin et al., AAAI 2019; https://stanfordmlgroup.github.io/competitions/chexpert/): 224 316 chest
radiographs of 65 240 patients, 14 observations labelled from reports as positive (1), negative (0), uncertain (-1)
or not mentioned (blank)."""

from __future__ import annotations

import os
from pathlib import Path

from ._common import DatasetInfo, entry, find_root, grouped_split, read_csv, require, write_converted

INFO = DatasetInfo(
    name="chexpert", title="CheXpert v1.0", source="https://stanfordmlgroup.github.io/competitions/chexpert/",
    licence="Stanford University School of Medicine CheXpert Dataset Research Use Agreement: personal, "
            "non-commercial research only; no redistribution",
    citation="Irvin et al., AAAI 2019", body_part="chest")
OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
# what an uncertain (-1) label becomes (Irvin et al. section 4: U-Ignore, U-Zeros, U-Ones)
UNCERTAIN_POLICIES = {"u_ones": 1, "u_zeros": 0, "ignore": -1}


def _value(text: str, policy: str, line: int, name: str) -> int:
    if text == "":
        return 0  # not mentioned in the report: negative, as in the paper
    try:
        value = int(float(text))
    except ValueError as e:
        raise ValueError(f"{INFO.name}: {name} line {line}: label {text!r} is not 1, 0, -1 or blank") from e
    return UNCERTAIN_POLICIES[policy] if value == -1 else value


def _rows(root: Path, name: str, policy: str) -> list[dict]:
    path = require(root / name, INFO.name, " (CheXpert-v1.0[-small]/train.csv and valid.csv)")
    items, missing = [], []
    for line, row in enumerate(read_csv(path, INFO.name, ["Path", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]),
                               start=2):
        # Path starts with the release's folder name (CheXpert-v1.0-small/train/...): resolve it next to that
        # folder, or inside it when the folder was renamed
        relative = Path(row["Path"])
        image = root.parent / relative
        if not image.is_file():
            image = root / Path(*relative.parts[1:])
        if not image.is_file():
            missing.append(row["Path"])
            continue
        view = "lateral" if row["Frontal/Lateral"].lower() == "lateral" else (row["AP/PA"].lower() or "frontal")
        patient = next((p for p in relative.parts if p.startswith("patient")), relative.stem)
        study = "/".join(relative.parts[-3:-1])
        items.append(entry(image, INFO, view, patient,
                           label=[_value(row[o], policy, line, name) for o in OBSERVATIONS], study=study))
    if missing:
        raise FileNotFoundError(f"{INFO.name}: {len(missing)} image(s) of {name} not found next to or inside {root} "
                                f"(first: {missing[0]})")
    return items


def convert_chexpert(src: str | os.PathLike, out: str | os.PathLike, uncertain: str = "u_ones", seed: int = 0) -> dict:
    """Convert ``CheXpert-v1.0[-small]/`` (``train.csv``, ``valid.csv``: Path, Frontal/Lateral, AP/PA and the 14
    observations; images ``train/patientNNNNN/studyN/viewN_frontal.jpg``) into ``out/datalist.json``; images are
    referenced in place.

    Decides: ``label`` = 14 ints in :data:`OBSERVATIONS` order; blank = 0; uncertain (-1) by ``uncertain``:
    ``u_ones`` -> 1 (default), ``u_zeros`` -> 0, ``ignore`` -> stays -1 (leave those positions out of the loss and
    the metrics: ``label >= 0``); ``view`` ``lateral``, ``ap`` or ``pa``; ``test`` = the official ``valid.csv``
    (the radiologist-labelled validation set; the test set is not in the release); ``validation`` = ~15 % of the
    training patients, stratified by No Finding, grouped by patient, ``seed``.

    Raises:
        FileNotFoundError: no ``train.csv``/``valid.csv``, or images they name that are missing.
        ValueError: an unknown ``uncertain`` policy, a CSV without the needed columns, a label not 1/0/-1/blank.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"{INFO.name}: uncertain label policy must be one of {sorted(UNCERTAIN_POLICIES)}, "
                         f"got {uncertain!r}")
    root = find_root(src, INFO.name, "train.csv", wrappers=("CheXpert-v1.0-small", "CheXpert-v1.0"))
    train, test = _rows(root, "train.csv", uncertain), _rows(root, "valid.csv", uncertain)
    sections = grouped_split(train, stratum=lambda i: i["label"][0], test=None, seed=seed)
    sections["test"] = test
    return write_converted(
        out, INFO, sections, OBSERVATIONS, uncertain_policy=uncertain,
        label_policy=f"multi-label in label_names order; blank = 0; uncertain -1 -> "
                     f"{UNCERTAIN_POLICIES[uncertain]} ({uncertain}"
                     f"{': mask positions with -1 out of loss and metrics' if uncertain == 'ignore' else ''})",
        split=f"official valid.csv = test; validation = ~15 % of train.csv patients, stratified by No Finding "
              f"(seed {seed})")
