"""TBX11K (Liu et al., "Rethinking computer-aided tuberculosis diagnosis", CVPR 2020; https://mmcheng.net/tb/):
11 200 chest radiographs (healthy, sick but not TB, TB) at 512 x 512, TB areas boxed."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from ._common import DatasetInfo, entry, find_root, grouped_split, require, write_converted

INFO = DatasetInfo(
    name="tbx11k", title="TBX11K tuberculosis chest X-rays", source="https://mmcheng.net/tb/",
    licence="the TBX11K authors' terms: research use with citation (Kaggle copies are listed as CC BY 4.0; not "
            "re-checked offline)",
    citation="Liu et al., CVPR 2020", body_part="chest")
BOX_CLASSES = ("ActiveTuberculosis", "ObsoletePulmonaryTuberculosis", "PulmonaryTuberculosis")
IMAGE_CLASSES = {"health": "healthy", "sick": "sick_but_non_tb", "tb": "tb"}
LISTS = {"train": "TBX11K_train.txt", "val": "TBX11K_val.txt"}


def _xml_boxes(path: Path) -> tuple[list[list[float]], list[int], tuple[int, int] | None]:
    """``(boxes [x1, y1, x2, y2], class ids, (width, height) the XML declares or None)``."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    declared = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        declared = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    boxes, labels = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in BOX_CLASSES:
            raise ValueError(f"{INFO.name}: {path.name}: unknown box class {name!r} (known: {list(BOX_CLASSES)})")
        box = obj.find("bndbox")
        boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(BOX_CLASSES.index(name))
    return boxes, labels, declared


def _coco_boxes(folder: Path) -> dict[str, tuple[list[list[float]], list[int], tuple[int, int] | None]]:
    """File name -> boxes, classes, declared size from every COCO JSON in ``annotations/json``."""
    found: dict[str, tuple[list, list, tuple[int, int] | None]] = {}
    for path in sorted(folder.glob("*.json")):
        coco = json.loads(path.read_text())
        names = {c["id"]: c["name"] for c in coco.get("categories", [])}
        images = {i["id"]: i for i in coco.get("images", [])}
        for image in images.values():
            found.setdefault(Path(image["file_name"]).name, ([], [], (image.get("width"), image.get("height"))))
        for ann in coco.get("annotations", []):
            image = images[ann["image_id"]]
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes, labels, _ = found[Path(image["file_name"]).name]
            if [x, y, x + w, y + h] not in boxes:  # the json files overlap (all_train holds TBX11K_train)
                boxes.append([x, y, x + w, y + h])
                labels.append(BOX_CLASSES.index(names[ann["category_id"]]))
    return found


def _scaled(boxes: list[list[float]], declared: tuple[int, int] | None, image: Path) -> list[list[float]]:
    # some annotation files give boxes in the original scan's pixels while the released images are 512 x 512:
    # scale by the stored size over the declared one (a no-op where they agree)
    if not boxes or not declared or not all(declared):
        return boxes
    with Image.open(image) as img:
        sx, sy = img.width / declared[0], img.height / declared[1]
    return [[round(b[0] * sx, 2), round(b[1] * sy, 2), round(b[2] * sx, 2), round(b[3] * sy, 2)] for b in boxes]


def convert_tbx11k(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0) -> dict:
    """Convert ``TBX11K/`` (``imgs/{health,sick,tb}/``, ``lists/TBX11K_train.txt`` and ``TBX11K_val.txt`` with lines
    like ``tb/tb0003.png``, boxes in ``annotations/xml/<name>.xml`` (Pascal VOC) or else ``annotations/json/*.json``
    (COCO)) into ``out/datalist.json``; images are referenced in place.

    Decides: ``box`` = ``[x1, y1, x2, y2]`` pixels of the stored image and ``label`` = box class ids
    (:data:`BOX_CLASSES`) on images with boxes only (other images have neither key, so that a detection datalist
    check does not see empty box lists); ``tb`` 0/1 and ``image_class`` healthy / sick_but_non_tb / tb for every
    image; ``test`` = the official val list (TBX11K's test labels are not public, its test images are left out);
    ``validation`` = ~15 % of the official train list, stratified by image class, ``seed``. The ``extra`` images
    (``all_*`` lists: Shenzhen, Montgomery, ...) are left out: convert those sets on their own.

    Raises:
        FileNotFoundError: no ``imgs``, list file or annotation folder; an image a list names that is missing.
        ValueError: a list line outside ``health/``, ``sick/``, ``tb/``; an unknown box class.
    """
    root = find_root(src, INFO.name, "lists", wrappers=("TBX11K",))
    imgs = require(root / "imgs", INFO.name, " (imgs/health, imgs/sick, imgs/tb)")
    xml_dir, json_dir = root / "annotations" / "xml", root / "annotations" / "json"
    if not xml_dir.is_dir() and not json_dir.is_dir():
        require(xml_dir, INFO.name, " (or annotations/json: the TB boxes)")
    coco = _coco_boxes(json_dir) if not xml_dir.is_dir() else {}
    parts: dict[str, list[dict]] = {}
    for split, name in LISTS.items():
        lines = require(root / "lists" / name, INFO.name, " (the official split lists)").read_text().splitlines()
        for line in (x.strip().removeprefix("imgs/") for x in lines):
            if not line:
                continue
            folder = line.split("/")[0]
            if folder not in IMAGE_CLASSES:
                raise ValueError(f"{INFO.name}: lists/{name}: {line!r} is not in health/, sick/ or tb/")
            image = require(imgs / line, INFO.name)
            if xml_dir.is_dir():
                xml = xml_dir / f"{image.stem}.xml"
                boxes, labels, declared = _xml_boxes(xml) if xml.is_file() else ([], [], None)
            else:
                boxes, labels, declared = coco.get(image.name, ([], [], None))
            fields = {"box": _scaled(boxes, declared, image), "label": labels} if boxes else {}
            parts.setdefault(split, []).append(entry(image, INFO, "frontal", None, **fields,
                                                     tb=int(folder == "tb"), image_class=IMAGE_CLASSES[folder]))
    # no patient ids are released: each image is its own group
    sections = grouped_split(parts.get("train", []), stratum=lambda i: i["image_class"], group=lambda i: i["image"],
                             test=None, seed=seed)
    sections["test"] = parts.get("val", [])
    return write_converted(out, INFO, sections, BOX_CLASSES,
                           label_policy="label = class ids of the boxes (label_names); tb = 1 for imgs/tb images; "
                                        "images without boxes carry no box/label keys",
                           split=f"official val list = test; validation = ~15 % of the official train list, "
                                 f"stratified by image class (seed {seed}); unlabelled test images left out")
