"""What every converter shares: layout checks that say what was looked for, the grouped stratified split, and the
datalist writer (MONAI decathlon JSON plus the dataset's source and licence at the top level)."""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..datalist import write_datalist

SECTIONS = ("training", "validation", "test")
# image files of the released layouts; macOS copies add "._name" resource forks, which are not images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DatasetInfo:
    """What the datalist records about a dataset: ``name`` (the ``dataset`` tag), where it comes from, its terms."""

    name: str
    title: str
    source: str
    licence: str
    citation: str
    body_part: str


def find_root(src: str | os.PathLike, dataset: str, marker: str, wrappers: Sequence[str] = ()) -> Path:
    """The folder of ``src`` (or of one of its ``wrappers`` sub-folders, as unzipped archives nest them) that holds
    ``marker``.

    Raises:
        FileNotFoundError: ``src`` is not a folder, or no candidate holds ``marker`` (named, with the candidates).
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{dataset}: source folder {src} not found")
    candidates = [src, *(src / w for w in wrappers)]
    for folder in candidates:
        if (folder / marker).exists():
            return folder
    where = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"{dataset}: '{marker}' not found in {where}: not the released {dataset} layout")


def require(path: Path, dataset: str, hint: str = "") -> Path:
    """``path`` itself, or a FileNotFoundError naming the dataset, the missing file/folder and where it was
    looked for."""
    if not path.exists():
        kind = "folder" if not path.suffix else "file"
        raise FileNotFoundError(f"{dataset}: {kind} '{path.name}' not found in {path.parent}{hint}")
    return path


def image_files(folder: Path) -> list[Path]:
    """PNG/JPEG files directly in ``folder``, sorted by name; resource forks and hidden files left out."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def read_csv(path: Path, dataset: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a released CSV; refuses one without the named ``columns`` (names them and what it has)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in columns if c not in fields]
        if missing:
            raise ValueError(f"{dataset}: {path.name} has no column(s) {missing} (found {fields})")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _carve(items: list[dict], fraction: float, stratum: Callable[[dict], Any], group: Callable[[dict], Any],
           seed: int) -> tuple[list[dict], list[dict]]:
    """``(rest, held)``: about ``fraction`` of the patient groups of ``items``, stratified, as one fold of
    scikit-learn's StratifiedGroupKFold (shuffled with ``seed``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = [str(group(i)) for i in items]
    strata = [str(stratum(i)) for i in items]
    # scikit-learn needs n_splits <= the number of groups and <= the largest stratum: tiny sets get bigger folds
    n_splits = min(max(2, round(1 / fraction)), len(set(groups)), max((strata.count(s) for s in set(strata)),
                                                                       default=0))
    if n_splits < 2:  # one patient: nothing to hold out without taking everything
        return items, []
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits": expected for rare strata and tiny sets
        warnings.simplefilter("ignore", UserWarning)
        _, held_index = next(folds.split(np.zeros(len(items)), strata, groups))
    held = set(held_index.tolist())
    return [x for k, x in enumerate(items) if k not in held], [x for k, x in enumerate(items) if k in held]


def grouped_split(items: Iterable[dict], stratum: Callable[[dict], Any], group: Callable[[dict], Any] | None = None,
                  test: float | None = 0.15, validation: float = 0.15, seed: int = 0) -> dict[str, list[dict]]:
    """Training/validation(/test) sections of ``items``, stratified by ``stratum(item)`` and grouped by
    ``group(item)`` (default: the ``patient_id`` field), so that a patient never straddles sections.

    ``test`` and ``validation`` are shares of all items (about 70/15/15 by default); ``test=None`` carves only a
    validation section (for datasets whose official split provides the test section). Deterministic: items are
    put in a canonical order (group, image) first, then split with a fixed ``seed``.
    """
    group = group or (lambda item: item["patient_id"])
    rest = sorted(items, key=lambda i: (str(group(i)), str(i["image"])))
    sections: dict[str, list[dict]] = {}
    if test:
        rest, sections["test"] = _carve(rest, test, stratum, group, seed)
        validation = validation / (1 - test)
    rest, sections["validation"] = _carve(rest, validation, stratum, group, seed)
    sections["training"] = rest
    return {name: sections[name] for name in SECTIONS if name in sections}


def write_converted(out: str | os.PathLike, info: DatasetInfo, sections: Mapping[str, Sequence[Mapping]],
                    label_names: Sequence[str] = (), **metadata: Any) -> dict:
    """Write ``out/datalist.json`` and return its content.

    Sections are sorted by image path; ``image`` and ``mask`` paths (absolute here) become relative to ``out``
    (:func:`muscle_ext.data.write_datalist`). Top level: ``dataset``, ``title``, ``source``, ``licence``,
    ``citation``, ``body_part``, ``label_names`` (``{"0": name, ...}``: class index, or position in a multi-label
    vector; a mapping, since list values at the top level are read as datalist sections) and ``metadata`` (label
    policy, split, ...).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "datalist.json"
    ordered = {name: sorted(sections.get(name, []), key=lambda i: str(i["image"])) for name in SECTIONS}
    write_datalist(path, ordered, path_keys=("image", "mask"))
    content = {"dataset": info.name, "title": info.title, "source": info.source, "licence": info.licence,
               "citation": info.citation, "body_part": info.body_part,
               "label_names": {str(k): n for k, n in enumerate(label_names)}, **metadata,
               **json.loads(path.read_text())}
    path.write_text(json.dumps(content, indent=1) + "\n")
    return content


def entry(image: Path, info: DatasetInfo, view: str, patient_id: str | None = None, body_part: str | None = None,
          **fields: Any) -> dict:
    """One datalist entry in the shared field order: ``image``, the dataset's own fields, ``patient_id``,
    ``dataset``, ``body_part``, ``view``."""
    item: dict[str, Any] = {"image": str(image.resolve()), **fields}
    if patient_id is not None:
        item["patient_id"] = patient_id
    item.update(dataset=info.name, body_part=body_part or info.body_part, view=view)
    return item
