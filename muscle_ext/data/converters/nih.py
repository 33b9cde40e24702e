"""NIH ChestX-ray14 (Wang et al., CVPR 2017; https://nihcc.app.box.com/v/ChestXray-NIHCC): 112 120 frontal chest
radiographs of 30 805 patients, 14 findings text-mined from reports."""

from __future__ import annotations

import os
from pathlib import Path

from ._common import DatasetInfo, entry, find_root, grouped_split, read_csv, require, write_converted

INFO = DatasetInfo(
    name="nih_chestxray14", title="NIH ChestX-ray14", source="https://nihcc.app.box.com/v/ChestXray-NIHCC",
    licence="NIH Clinical Center: no restriction on use; acknowledge the NIH Clinical Center and cite the paper",
    citation="Wang et al., ChestX-ray8, CVPR 2017", body_part="chest")

# the paper's order; an image's label is a 0/1 vector in this order, "No Finding" is all zeros
FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
            "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")


def _image_index(root: Path) -> dict[str, Path]:
    """File name -> path over ``images/`` and the per-archive ``images_001/images/`` ... folders."""
    folders = [root / "images", *sorted(root.glob("images_*/images"))]
    index: dict[str, Path] = {}
    for folder in (f for f in folders if f.is_dir()):
        for e in os.scandir(folder):
            if e.name.endswith(".png"):
                index.setdefault(e.name, Path(e.path))
    if not index:
        raise FileNotFoundError(f"{INFO.name}: no PNG in {root}/images/ or {root}/images_*/images/")
    return index


def _labels(findings: str, line: int) -> list[int]:
    names = [f.strip() for f in findings.split("|") if f.strip()]
    unknown = [n for n in names if n not in FINDINGS and n != "No Finding"]
    if unknown:
        raise ValueError(f"{INFO.name}: Data_Entry_2017.csv line {line}: unknown finding(s) {unknown}")
    return [int(f in names) for f in FINDINGS]


def convert_nih_chestxray14(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert the released NIH ChestX-ray14 folder into ``out/datalist.json``.

    Layout: ``Data_Entry_2017.csv`` (or ``_v2020``; columns Image Index, Finding Labels such as
    ``Pneumonia|Effusion``, Patient ID, View Position), ``train_val_list.txt``, ``test_list.txt`` and the images in
    ``images/`` or ``images_001/images/`` ... (the archives as unpacked). Images are referenced in place.

    Decides: ``label`` = 14 ints (0/1) in :data:`FINDINGS` order (``No Finding``: all 0); ``test`` = the official
    ``test_list.txt``; ``validation`` = ~15 % of ``train_val_list.txt`` patients (stratified by any-finding,
    grouped by patient, ``seed``); ``patient_id`` = the 8-digit id of the file names; ``view`` = ``pa``/``ap``.

    Raises:
        FileNotFoundError: a missing CSV, list or image folder, or images the CSV names that are not there.
        ValueError: a CSV without the needed columns, an unknown finding.
    """
    root = find_root(src, INFO.name, "train_val_list.txt", wrappers=("ChestX-ray14", "CXR8"))
    csv_path = next((root / n for n in CSV_NAMES if (root / n).is_file()), root / CSV_NAMES[0])
    require(csv_path, INFO.name, " (the NIH label table)")
    require(root / "test_list.txt", INFO.name, " (the official test list)")
    split = {line.strip(): "test" for line in (root / "test_list.txt").read_text().splitlines() if line.strip()}
    split.update({line.strip(): "train_val" for line in (root / "train_val_list.txt").read_text().splitlines()
                  if line.strip()})
    rows = read_csv(csv_path, INFO.name, ["Image Index", "Finding Labels", "Patient ID", "View Position"])
    files = _image_index(root)
    missing = [r["Image Index"] for r in rows if r["Image Index"] not in files]
    if missing:
        raise FileNotFoundError(f"{INFO.name}: {len(missing)} image(s) of {csv_path.name} not found under images/ or "
                                f"images_*/images/ (first: {missing[0]}); unpack every archive")
    parts: dict[str, list[dict]] = {"train_val": [], "test": []}
    for line, row in enumerate(rows, start=2):
        name = row["Image Index"]
        if name not in split:
            continue  # in neither official list: not part of the released benchmark
        parts[split[name]].append(entry(files[name], INFO, row["View Position"].lower(),
                                        f"{int(row['Patient ID']):08d}",
                                        label=_labels(row["Finding Labels"], line)))
    sections = grouped_split(parts["train_val"], stratum=lambda i: int(any(i["label"])), test=None, seed=seed)
    sections["test"] = parts["test"]
    return write_converted(
        out, INFO, sections, FINDINGS,
        label_policy="multi-label: label[k] = 1 if FINDINGS[k] is in 'Finding Labels' (text-mined, ~90 % accurate)",
        split=f"official test_list.txt = test; validation = ~15 % of train_val_list.txt patients (seed {seed})")
