"""Dataset converters (issue #18): each public dataset's released layout, rebuilt in miniature with its quirks (tiny
PNG/JPEG/DICOM files), becomes the expected datalist; official splits are kept, made splits are grouped by patient;
a tree in another layout is refused with a message that names the dataset and what is missing. Nothing is
downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from muscle_ext.cli import main
from muscle_ext.data import CONVERTERS, convert_dataset, load_datalist, pool_datalists, validate_datalist
from muscle_ext.data.converters import DATASETS

SECTIONS = ("training", "validation", "test")


def png(path: Path, size: tuple[int, int] = (8, 8), value: int = 128, array: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array if array is not None else np.full(size[::-1], value, dtype=np.uint8)
    Image.fromarray(data).save(path)
    return path


def text(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def everything(content: dict) -> list[dict]:
    return sorted((i for s in SECTIONS for i in content[s]), key=lambda i: i["image"])


def assert_grouped(content: dict, key: str = "patient_id") -> None:
    seen = [{i[key] for i in content[s]} for s in SECTIONS]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def assert_same_file(content: dict, out: Path) -> None:
    assert json.loads((out / "datalist.json").read_text()) == content


def tags(view: str, body_part: str, dataset: str) -> dict:
    return {"dataset": dataset, "body_part": body_part, "view": view}


# ------------------------------------------------------------------------------------------------- NIH ChestX-ray14
@pytest.fixture
def nih(tmp_path) -> Path:
    src = tmp_path / "src"
    rows = []
    names = {"train": [], "test": []}
    for patient in range(1, 11):
        for k in range(2):
            name = f"{patient:08d}_{k:03d}.png"
            findings = "Pneumonia|Effusion" if patient % 3 == 0 else ("Hernia" if k else "No Finding")
            # the images come in several archives: images_001/images, images_002/images
            png(src / f"images_{1 + patient % 2:03d}" / "images" / name)
            rows.append(f"{name},{findings},{k},{patient},40,M,{'PA' if k == 0 else 'AP'},1024,1024,0.14,0.14,")
            names["test" if patient > 8 else "train"].append(name)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")  # the released header, trailing comma
    text(src / "Data_Entry_2017.csv", "\n".join([header, *rows]) + "\n")
    text(src / "train_val_list.txt", "\n".join(names["train"]) + "\n")
    text(src / "test_list.txt", "\n".join(names["test"]) + "\n")
    return src


def nih_label(findings: str) -> list[int]:
    names = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
             "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
    return [int(n in findings.split("|")) for n in names]


def test_nih_keeps_the_official_test_list_and_groups_validation_by_patient(nih, tmp_path):
    out = tmp_path / "out"
    content = convert_dataset("nih_chestxray14", nih, out)
    assert_same_file(content, out)
    assert content["test"] == sorted([
        {"image": f"../src/images_{1 + p % 2:03d}/images/{p:08d}_{k:03d}.png",
         "label": nih_label("Pneumonia|Effusion" if p % 3 == 0 else ("Hernia" if k else "")),
         "patient_id": f"{p:08d}", **tags("pa" if k == 0 else "ap", "chest", "nih_chestxray14")}
        for p in (9, 10) for k in range(2)], key=lambda i: i["image"])
    assert content["test"][2]["label"][2] == content["test"][2]["label"][6] == 1  # 00000009: Effusion, Pneumonia
    train_val = sorted(content["training"] + content["validation"], key=lambda i: i["image"])
    assert [i["image"] for i in train_val] == sorted(
        f"../src/images_{1 + p % 2:03d}/images/{p:08d}_{k:03d}.png" for p in range(1, 9) for k in range(2))
    assert content["validation"] and content["training"]
    assert_grouped(content)
    assert content["dataset"] == "nih_chestxray14" and content["label_names"]["13"] == "Hernia"
    assert {"source", "licence", "citation", "label_policy", "split"} <= set(content)
    assert validate_datalist(load_datalist(out / "datalist.json", "test"))  # the paths resolve and decode


def test_nih_refuses_missing_lists_and_images(nih, tmp_path):
    (nih / "test_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"nih_chestxray14: file 'test_list.txt' not found in .*src"):
        convert_dataset("nih_chestxray14", nih, tmp_path / "out")
    text(nih / "test_list.txt", "")
    (nih / "images_002" / "images" / "00000001_000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"nih_chestxray14: 1 image\(s\) of Data_Entry_2017.csv not found "
                                                r"under images/ .*first: 00000001_000.png"):
        convert_dataset("nih_chestxray14", nih, tmp_path / "out")


# ------------------------------------------------------------------------------------- Shenzhen, Montgomery, masks
def test_shenzhen_labels_from_file_names_or_clinical_readings_split_by_patient(tmp_path):
    root = tmp_path / "src" / "ChinaSet_AllFiles"
    for k in range(1, 13):
        png(root / "CXR_png" / f"CHNCXR_{k:04d}_{k % 2}.png")
        text(root / "ClinicalReadings" / f"CHNCXR_{k:04d}_{k % 2}.txt", "male 35yrs\nnormal\n")
    png(root / "CXR_png" / "CHNCXR_0099.png")  # no _0/_1 suffix: the clinical reading decides
    text(root / "ClinicalReadings" / "CHNCXR_0099.txt", "female 23yrs\nPTB in the left upper field\n")
    text(root / "CXR_png" / "Thumbs.db", "not an image")
    out = tmp_path / "out"
    content = convert_dataset("shenzhen", tmp_path / "src", out, seed=0)
    expected = [{"image": f"../src/ChinaSet_AllFiles/CXR_png/CHNCXR_{k:04d}_{k % 2}.png", "label": k % 2,
                 "patient_id": f"CHNCXR_{k:04d}", **tags("pa", "chest", "shenzhen")} for k in range(1, 13)]
    expected.append({"image": "../src/ChinaSet_AllFiles/CXR_png/CHNCXR_0099.png", "label": 1,
                     "patient_id": "CHNCXR_0099", **tags("pa", "chest", "shenzhen")})
    assert everything(content) == expected
    assert all(content[s] for s in SECTIONS) and len(content["training"]) > len(content["test"])
    assert_grouped(content)
    assert {i["label"] for i in content["test"]} == {0, 1}  # stratified
    assert convert_dataset("shenzhen", tmp_path / "src", tmp_path / "again") == content  # deterministic


@pytest.fixture
def montgomery(tmp_path) -> Path:
    root = tmp_path / "src" / "MontgomerySet"
    left, right = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    left[2:6, 1:3], right[2:6, 5:7] = 255, 255
    for k in range(1, 9):
        name = f"MCUCXR_{k:04d}_{k % 2}.png"
        png(root / "CXR_png" / name)
        png(root / "ManualMask" / "leftMask" / name, array=left)
        png(root / "ManualMask" / "rightMask" / name, array=right)
        text(root / "ClinicalReadings" / name.replace(".png", ".txt"), "Patient's Sex: M\nPatient's Age: 040Y\n")
    return tmp_path / "src"


def test_montgomery_merges_left_and_right_lung_masks_into_new_files(montgomery, tmp_path):
    out = tmp_path / "out"
    content = convert_dataset("montgomery", montgomery, out)
    assert everything(content) == [
        {"image": f"../src/MontgomerySet/CXR_png/MCUCXR_{k:04d}_{k % 2}.png", "label": k % 2,
         "mask": f"masks/MCUCXR_{k:04d}_{k % 2}.png", "patient_id": f"MCUCXR_{k:04d}",
         **tags("pa", "chest", "montgomery")} for k in range(1, 9)]
    merged = np.asarray(Image.open(out / "masks" / "MCUCXR_0001_1.png"))
    expected = np.zeros((8, 8), np.uint8)
    expected[2:6, 1:3] = expected[2:6, 5:7] = 255
    np.testing.assert_array_equal(merged, expected)
    assert_grouped(content)
    # the masks match their images: the datalist passes the mask check
    assert validate_datalist(load_datalist(out / "datalist.json", "training"), mask_key="mask")


def test_montgomery_refuses_a_tree_without_the_right_lung_masks(montgomery, tmp_path):
    for f in (montgomery / "MontgomerySet" / "ManualMask" / "rightMask").iterdir():
        f.unlink()
    (montgomery / "MontgomerySet" / "ManualMask" / "rightMask").rmdir()
    with pytest.raises(FileNotFoundError, match=r"montgomery: folder 'rightMask' not found in .*ManualMask"):
        convert_dataset("montgomery", montgomery, tmp_path / "out")


def test_chest_xray_masks_and_labels_pairs_both_mask_namings(tmp_path):
    root = tmp_path / "src" / "Lung Segmentation"
    for k in range(1, 7):
        png(root / "CXR_png" / f"CHNCXR_{k:04d}_{k % 2}.png")
        png(root / "masks" / f"CHNCXR_{k:04d}_{k % 2}_mask.png", value=255)  # Shenzhen masks: "_mask" suffix
        png(root / "CXR_png" / f"MCUCXR_{k:04d}_{k % 2}.png")
        png(root / "masks" / f"MCUCXR_{k:04d}_{k % 2}.png", value=255)  # Montgomery masks: the image's name
    png(root / "CXR_png" / "CHNCXR_0007_1.png")  # no mask: left out
    content = convert_dataset("chest_xray_masks_labels", tmp_path / "src", tmp_path / "out")
    assert everything(content) == sorted(
        [{"image": f"../src/Lung Segmentation/CXR_png/{p}_{k:04d}_{k % 2}.png", "label": k % 2,
          "mask": f"../src/Lung Segmentation/masks/{p}_{k:04d}_{k % 2}{'_mask' if p == 'CHNCXR' else ''}.png",
          "origin": origin, "patient_id": f"{p}_{k:04d}", **tags("pa", "chest", "chest_xray_masks_labels")}
         for k in range(1, 7) for p, origin in (("CHNCXR", "shenzhen"), ("MCUCXR", "montgomery"))],
        key=lambda i: i["image"])
    assert content["left_out"] == {"count": 1, "reason": "no lung mask"}
    assert_grouped(content)


# -------------------------------------------------------------------------------------- Indiana / Open-i, bone age
def test_indiana_openi_keeps_views_and_both_views_of_a_report_together(tmp_path):
    src = tmp_path / "src"
    rows = ["uid,filename,projection"]
    for uid in range(1, 9):
        for view in ("Frontal", "Lateral"):
            name = f"{uid}_IM-00{uid:02d}-{1 if view == 'Frontal' else 2}001.dcm.png"
            png(src / "images" / "images_normalized" / name)
            rows.append(f"{uid},{name},{view}")
    text(src / "indiana_projections.csv", "\n".join(rows) + "\n")
    content = convert_dataset("indiana_openi", src, tmp_path / "out")
    assert everything(content) == sorted(
        [{"image": f"../src/images/images_normalized/{uid}_IM-00{uid:02d}-{1 if v == 'frontal' else 2}001.dcm.png",
          "patient_id": str(uid), **tags(v, "chest", "indiana_openi")} for uid in range(1, 9)
         for v in ("frontal", "lateral")], key=lambda i: i["image"])
    assert_grouped(content)
    assert content["label_names"] == {}


def test_rsna_boneage_reads_the_nested_kaggle_folder(tmp_path):
    src = tmp_path / "src"
    rows = ["id,boneage,male"]
    for k in range(9):
        png(src / "boneage-training-dataset" / "boneage-training-dataset" / f"{1377 + k}.png")
        rows.append(f"{1377 + k},{20 * (k + 1)},{'True' if k % 2 else 'False'}")
    text(src / "boneage-training-dataset.csv", "\n".join(rows) + "\n")
    content = convert_dataset("rsna_boneage", src, tmp_path / "out")
    assert everything(content) == [
        {"image": f"../src/boneage-training-dataset/boneage-training-dataset/{1377 + k}.png",
         "label": float(20 * (k + 1)), "male": bool(k % 2), "patient_id": str(1377 + k),
         **tags("pa", "hand", "rsna_boneage")} for k in range(9)]
    assert all(content[s] for s in SECTIONS)
    items = load_datalist(tmp_path / "out" / "datalist.json", "training")
    assert validate_datalist(items, numeric_labels=True) == items


# ------------------------------------------------------------------------------------------- Kermany, MURA
def test_kermany_keeps_the_official_folders_and_reads_patients_from_file_names(tmp_path):
    root = tmp_path / "src" / "chest_xray"
    files = {"train": ["NORMAL/IM-0115-0001.jpeg", "NORMAL/NORMAL2-IM-1427-0001.jpeg",
                       "PNEUMONIA/person1_bacteria_1.jpeg", "PNEUMONIA/person1_virus_6.jpeg"],
             "val": ["NORMAL/NORMAL2-IM-1430-0001.jpeg", "PNEUMONIA/person1946_bacteria_4874.jpeg"],
             "test": ["NORMAL/IM-0001-0001.jpeg", "PNEUMONIA/person100_bacteria_475.jpeg"]}
    for split, names in files.items():
        for name in names:
            png(root / split / name)
    text(root / "train" / "NORMAL" / ".DS_Store", "")
    content = convert_dataset("kermany_pneumonia", tmp_path / "src", tmp_path / "out")

    def item(split: str, name: str, label: int, patient: str, kind: str) -> dict:
        return {"image": f"../src/chest_xray/{split}/{name}", "label": label,
                "class_name": ["no_finding", "pneumonia"][label], "pneumonia_type": kind, "patient_id": patient,
                **tags("ap", "chest", "kermany_pneumonia")}

    assert {s: content[s] for s in SECTIONS} == {
        "training": [item("train", "NORMAL/IM-0115-0001.jpeg", 0, "IM-0115", "none"),
                     item("train", "NORMAL/NORMAL2-IM-1427-0001.jpeg", 0, "NORMAL2-IM-1427", "none"),
                     item("train", "PNEUMONIA/person1_bacteria_1.jpeg", 1, "person1", "bacteria"),
                     item("train", "PNEUMONIA/person1_virus_6.jpeg", 1, "person1", "virus")],
        "validation": [item("val", "NORMAL/NORMAL2-IM-1430-0001.jpeg", 0, "NORMAL2-IM-1430", "none"),
                       item("val", "PNEUMONIA/person1946_bacteria_4874.jpeg", 1, "person1946", "bacteria")],
        "test": [item("test", "NORMAL/IM-0001-0001.jpeg", 0, "IM-0001", "none"),
                 item("test", "PNEUMONIA/person100_bacteria_475.jpeg", 1, "person100", "bacteria")]}
    assert content["label_names"] == {"0": "no_finding", "1": "pneumonia"}


def test_kermany_names_the_missing_class_folder(tmp_path):
    for split in ("train", "val", "test"):
        png(tmp_path / "src" / split / "NORMAL" / "IM-0001-0001.jpeg")
    with pytest.raises(FileNotFoundError, match=r"kermany_pneumonia: folder 'PNEUMONIA' not found in .*train"):
        convert_dataset("kermany_pneumonia", tmp_path / "src", tmp_path / "out")


@pytest.fixture
def mura(tmp_path) -> Path:
    root = tmp_path / "src" / "MURA-v1.1"
    for p in range(1, 9):
        part = "XR_ELBOW" if p % 2 else "XR_WRIST"
        for s, outcome in ((1, "positive" if p % 3 else "negative"), (2, "negative")):
            for k in (1, 2):
                png(root / "train" / part / f"patient{p:05d}" / f"study{s}_{outcome}" / f"image{k}.png")
    png(root / "valid" / "XR_HAND" / "patient11185" / "study1_positive" / "image1.png")
    text(root / "valid" / "XR_HAND" / "patient11185" / "study1_positive" / "._image1.png", "resource fork")
    return tmp_path / "src"


def test_mura_study_labels_body_parts_and_official_valid_as_test(mura, tmp_path):
    content = convert_dataset("mura", mura, tmp_path / "out")
    assert content["test"] == [
        {"image": "../src/MURA-v1.1/valid/XR_HAND/patient11185/study1_positive/image1.png", "label": 1,
         "study": "XR_HAND/patient11185/study1_positive", "patient_id": "patient11185",
         **tags("unknown", "hand", "mura")}]
    train = sorted(content["training"] + content["validation"], key=lambda i: i["image"])
    expected = []
    for p in range(1, 9):
        part = "XR_ELBOW" if p % 2 else "XR_WRIST"
        for s, outcome in ((1, "positive" if p % 3 else "negative"), (2, "negative")):
            for k in (1, 2):
                study = f"{part}/patient{p:05d}/study{s}_{outcome}"
                expected.append({"image": f"../src/MURA-v1.1/train/{study}/image{k}.png",
                                 "label": int(outcome == "positive"), "study": study, "patient_id": f"patient{p:05d}",
                                 **tags("unknown", part[3:].lower(), "mura")})
    assert train == sorted(expected, key=lambda i: i["image"])
    assert content["validation"]
    assert_grouped(content)


def test_mura_refuses_a_tree_without_the_valid_split(mura, tmp_path):
    import shutil

    shutil.rmtree(mura / "MURA-v1.1" / "valid")
    with pytest.raises(FileNotFoundError, match=r"mura: 'valid' not found in .*src or .*MURA-v1.1: not the released"):
        convert_dataset("mura", mura, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- TBX11K
def voc(path: Path, boxes: list[tuple[str, int, int, int, int]], size: int = 32) -> None:
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                      f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in boxes)
    text(path, f"<annotation><filename>{path.stem}.png</filename><size><width>{size}</width><height>{size}</height>"
               f"<depth>3</depth></size>{objects}</annotation>")


def test_tbx11k_boxes_scaled_to_the_stored_images_and_official_val_as_test(tmp_path):
    root = tmp_path / "src" / "TBX11K"
    train, val = [], []
    for k in range(1, 7):
        png(root / "imgs" / "health" / f"h{k:04d}.png", size=(16, 16))
        png(root / "imgs" / "tb" / f"tb{k:04d}.png", size=(16, 16))
        # XML boxes in pixels of a 32 x 32 scan: the released images are smaller (here 16 x 16)
        voc(root / "annotations" / "xml" / f"tb{k:04d}.xml", [("ActiveTuberculosis", 2, 4, 10, 12)]
            + ([("ObsoletePulmonaryTuberculosis", 20, 20, 30, 28)] if k == 1 else []))
        train += [f"health/h{k:04d}.png", f"tb/tb{k:04d}.png"]
    png(root / "imgs" / "sick" / "s0001.png", size=(16, 16))
    val.append("sick/s0001.png")
    text(root / "lists" / "TBX11K_train.txt", "\n".join(train) + "\n")
    text(root / "lists" / "TBX11K_val.txt", "\n".join(val) + "\n")
    content = convert_dataset("tbx11k", tmp_path / "src", tmp_path / "out")
    assert content["test"] == [{"image": "../src/TBX11K/imgs/sick/s0001.png", "tb": 0,
                                "image_class": "sick_but_non_tb", **tags("frontal", "chest", "tbx11k")}]
    train_items = sorted(content["training"] + content["validation"], key=lambda i: i["image"])
    first = next(i for i in train_items if i["image"].endswith("tb0001.png"))
    assert first == {"image": "../src/TBX11K/imgs/tb/tb0001.png",
                     "box": [[1.0, 2.0, 5.0, 6.0], [10.0, 10.0, 15.0, 14.0]], "label": [0, 1], "tb": 1,
                     "image_class": "tb", **tags("frontal", "chest", "tbx11k")}
    healthy = next(i for i in train_items if i["image"].endswith("h0001.png"))
    assert healthy == {"image": "../src/TBX11K/imgs/health/h0001.png", "tb": 0, "image_class": "healthy",
                       **tags("frontal", "chest", "tbx11k")}
    assert len(train_items) == 12 and content["validation"]
    assert content["label_names"] == {"0": "ActiveTuberculosis", "1": "ObsoletePulmonaryTuberculosis",
                                      "2": "PulmonaryTuberculosis"}
    boxed = [i for i in load_datalist(tmp_path / "out" / "datalist.json", "training") if "box" in i]
    assert validate_datalist(boxed, classes=[0, 1, 2]) == boxed  # boxes inside the stored images


def test_tbx11k_reads_coco_boxes_without_the_xml_folder(tmp_path):
    root = tmp_path / "src" / "TBX11K"
    for k in range(1, 5):
        png(root / "imgs" / "tb" / f"tb{k:04d}.png", size=(16, 16))
    text(root / "lists" / "TBX11K_train.txt", "\n".join(f"tb/tb{k:04d}.png" for k in range(1, 4)) + "\n")
    text(root / "lists" / "TBX11K_val.txt", "imgs/tb/tb0004.png\n")  # some copies prefix the lines with imgs/
    coco = {"categories": [{"id": 1, "name": "ActiveTuberculosis"}, {"id": 2, "name": "ObsoletePulmonaryTuberculosis"}],
            "images": [{"id": k, "file_name": f"tb{k:04d}.png", "width": 16, "height": 16} for k in range(1, 5)],
            "annotations": [{"id": k, "image_id": k, "category_id": 1 + k % 2, "bbox": [1, 2, 3, 4]}
                            for k in range(1, 5)]}
    text(root / "annotations" / "json" / "all_trainval.json", json.dumps(coco))
    content = convert_dataset("tbx11k", tmp_path / "src", tmp_path / "out")
    assert content["test"] == [{"image": "../src/TBX11K/imgs/tb/tb0004.png", "box": [[1.0, 2.0, 4.0, 6.0]],
                                "label": [0], "tb": 1, "image_class": "tb", **tags("frontal", "chest", "tbx11k")}]


def test_tbx11k_names_the_missing_list(tmp_path):
    png(tmp_path / "src" / "TBX11K" / "imgs" / "tb" / "tb0001.png")
    text(tmp_path / "src" / "TBX11K" / "annotations" / "xml" / "tb0001.xml", "<annotation/>")
    (tmp_path / "src" / "TBX11K" / "lists").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tbx11k: file 'TBX11K_train.txt' not found in .*lists"):
        convert_dataset("tbx11k", tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- CheXpert
@pytest.fixture
def chexpert(tmp_path) -> Path:
    root = tmp_path / "src" / "CheXpert-v1.0-small"
    header = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
              "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
              "Fracture,Support Devices")
    rows = [header]
    for p in range(1, 9):
        for view, kind, ap in (("view1_frontal", "Frontal", "AP"), ("view2_lateral", "Lateral", "")):
            path = f"CheXpert-v1.0-small/train/patient{p:05d}/study1/{view}.jpg"
            png(tmp_path / "src" / path)
            # No Finding blank, Cardiomegaly uncertain (-1), Edema positive, Pneumonia negative
            rows.append(f"{path},Female,68,{kind},{ap},,,-1.0,,,1.0,,0.0,,,,,,")
    png(root / "valid" / "patient64541" / "study1" / "view1_frontal.jpg")
    text(root / "valid.csv", "\n".join([header, "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg,"
                                        "Male,73,Frontal,PA,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,"
                                        "1.0"]) + "\n")
    text(root / "train.csv", "\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("policy, uncertain", [("u_ones", 1), ("u_zeros", 0), ("ignore", -1)])
def test_chexpert_uncertain_label_policy(chexpert, tmp_path, policy, uncertain):
    content = convert_dataset("chexpert", chexpert, tmp_path / policy, uncertain=policy)
    label = [0, 0, uncertain, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    train = sorted(content["training"] + content["validation"], key=lambda i: i["image"])
    assert train == sorted(
        [{"image": f"../src/CheXpert-v1.0-small/train/patient{p:05d}/study1/{v}.jpg", "label": label,
          "study": f"patient{p:05d}/study1", "patient_id": f"patient{p:05d}",
          **tags("ap" if v == "view1_frontal" else "lateral", "chest", "chexpert")}
         for p in range(1, 9) for v in ("view1_frontal", "view2_lateral")], key=lambda i: i["image"])
    assert content["test"] == [
        {"image": "../src/CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
         "label": [1] + [0] * 12 + [1], "study": "patient64541/study1", "patient_id": "patient64541",
         **tags("pa", "chest", "chexpert")}]
    assert content["uncertain_policy"] == policy
    assert_grouped(content)


def test_chexpert_refuses_an_unknown_policy(chexpert, tmp_path):
    with pytest.raises(ValueError, match=r"chexpert: uncertain label policy must be one of .*'u_one'"):
        convert_dataset("chexpert", chexpert, tmp_path / "out", uncertain="u_one")
    with pytest.raises(ValueError, match=r"shenzhen: option\(s\) \['uncertain'\] not taken"):
        convert_dataset("shenzhen", chexpert, tmp_path / "out", uncertain="u_ones")


# ------------------------------------------------------------------------------------- RSNA Pneumonia (DICOM)
def dicom(path: Path, view: str, patient_name: str = "Doe^Jane") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, path.stem, "19700101"
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", view, "CHEST"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.arange(256, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def rsna(tmp_path) -> Path:
    src = tmp_path / "src"
    rows = ["patientId,x,y,width,height,Target"]
    for k in range(10):
        pid = f"00{k}a1b2c3-0000-4000-8000-00000000000{k}"
        dicom(src / "stage_2_train_images" / f"{pid}.dcm", "PA" if k % 2 else "AP")
        if k < 4:  # opacity: one row per box
            rows += [f"{pid},2.0,3.0,4.0,5.0,1"] + ([f"{pid},8,8,6,7,1"] if k == 0 else [])
        else:
            rows.append(f"{pid},,,,,0")
    text(src / "stage_2_train_labels.csv", "\n".join(rows) + "\n")
    return src


def test_rsna_pneumonia_dicom_boxes_to_corners_and_no_patient_fields(rsna, tmp_path):
    out = tmp_path / "out"
    content = convert_dataset("rsna_pneumonia", rsna, out)
    items = everything(content)
    pid = [f"00{k}a1b2c3-0000-4000-8000-00000000000{k}" for k in range(10)]
    assert items[0] == {"image": f"../src/stage_2_train_images/{pid[0]}.dcm",
                        "box": [[2.0, 3.0, 6.0, 8.0], [8.0, 8.0, 14.0, 15.0]], "label": [0, 0], "pneumonia": 1,
                        "patient_id": pid[0], **tags("ap", "chest", "rsna_pneumonia")}
    assert items[1]["box"] == [[2.0, 3.0, 6.0, 8.0]] and items[1]["view"] == "pa"
    assert items[5] == {"image": f"../src/stage_2_train_images/{pid[5]}.dcm", "pneumonia": 0,
                        "patient_id": pid[5], **tags("pa", "chest", "rsna_pneumonia")}
    assert "Doe" not in (out / "datalist.json").read_text() and "19700101" not in (out / "datalist.json").read_text()
    assert_grouped(content)
    boxed = [i for s in SECTIONS for i in load_datalist(out / "datalist.json", s) if "box" in i]
    assert len(boxed) == 4 and validate_datalist(boxed, classes=[0]) == boxed  # DICOM decodes, boxes inside


def test_rsna_pneumonia_names_a_missing_dicom(rsna, tmp_path):
    next((rsna / "stage_2_train_images").glob("003*.dcm")).unlink()
    with pytest.raises(FileNotFoundError, match=r"rsna_pneumonia: file '003a1b2c3-.*\.dcm' not found in "
                                                r".*stage_2_train_images"):
        convert_dataset("rsna_pneumonia", rsna, tmp_path / "out")


# ------------------------------------------------------------------------------------- wrong layouts, the registry
REFUSALS = {
    "nih_chestxray14": r"nih_chestxray14: 'train_val_list.txt' not found in",
    "shenzhen": r"shenzhen: 'CXR_png' not found in .*ChinaSet_AllFiles",
    "montgomery": r"montgomery: 'CXR_png' not found in .*MontgomerySet",
    "indiana_openi": r"indiana_openi: 'indiana_projections.csv' not found in",
    "rsna_boneage": r"rsna_boneage: 'boneage-training-dataset.csv' not found in",
    "kermany_pneumonia": r"kermany_pneumonia: 'train' not found in .*chest_xray",
    "mura": r"mura: 'valid' not found in .*MURA-v1.1",
    "chest_xray_masks_labels": r"chest_xray_masks_labels: 'CXR_png' not found in .*Lung Segmentation",
    "tbx11k": r"tbx11k: 'lists' not found in .*TBX11K",
    "chexpert": r"chexpert: 'train.csv' not found in .*CheXpert-v1.0-small",
    "rsna_pneumonia": r"rsna_pneumonia: 'stage_2_train_labels.csv' not found in",
}


@pytest.mark.parametrize("name", list(CONVERTERS))
def test_every_converter_refuses_another_layout_naming_what_it_looked_for(name, tmp_path):
    png(tmp_path / "src" / "some" / "image.png")  # a folder of images, not the released layout
    with pytest.raises(FileNotFoundError, match=REFUSALS[name] + r".*not the released " + name + " layout"):
        convert_dataset(name, tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_registry_names_match_dataset_tags_and_unknown_names_get_a_suggestion():
    assert set(REFUSALS) == set(CONVERTERS) == set(DATASETS)
    assert all(DATASETS[n].licence and DATASETS[n].source.startswith("https://") for n in DATASETS)
    with pytest.raises(ValueError, match=r"unknown dataset 'chexpret'. Did you mean 'chexpert'\? Known: nih_"):
        convert_dataset("chexpret", ".", ".")


# ------------------------------------------------------------------------------------------ CLI and the pool
def test_cli_convert_and_pool_make_the_pretrain_bundles_format(montgomery, mura, rsna, tmp_path, capsys):
    # the three fixtures share tmp_path/src: Montgomery, MURA and RSNA Pneumonia side by side
    converted = tmp_path / "converted"
    for name in ("montgomery", "mura", "rsna_pneumonia"):
        assert main(["data", "convert", name, str(tmp_path / "src"), str(converted / name)]) == 0
    assert "montgomery (training" in capsys.readouterr().out
    pool = tmp_path / "data" / "pretrain_datalist.json"
    argv = ["data", "pool", *(str(converted / n / "datalist.json") for n in ("montgomery", "mura", "rsna_pneumonia")),
            "--out", str(pool), "--weight", "mura=2", "--limit", "rsna_pneumonia=3"]
    assert main(argv) == 0
    content = json.loads(pool.read_text())
    def pooled(name: str, section: str = "training") -> list[str]:  # converted paths, seen from data/
        items = json.loads((converted / name / "datalist.json").read_text())[section]
        return ["../src/" + i["image"].removeprefix("../../src/") for i in items]

    assert content["training"][0] == {"image": pooled("montgomery")[0], "dataset": "montgomery", "body_part": "chest"}
    assert all(set(i) == {"image", "dataset", "body_part"} for s in ("training", "validation") for i in content[s])
    assert [i["image"] for i in content["training"] if i["dataset"] == "mura"] == pooled("mura")
    assert [i["body_part"] for i in content["training"] if i["dataset"] == "mura"][:2] == ["elbow", "elbow"]
    assert sum(i["dataset"] == "rsna_pneumonia" for i in content["training"]) == 3
    assert not any("valid/XR_HAND" in i["image"] for s in ("training", "validation") for i in content[s])  # no test
    assert "test" not in content
    assert content["dataset_weights"] == {"montgomery": 1.0, "mura": 2.0, "rsna_pneumonia": 1.0}
    assert content["datasets"]["mura"]["licence"].startswith("Stanford")
    for section in ("training", "validation"):
        items = load_datalist(pool, section)
        assert validate_datalist(items, source=section) == items  # every pooled image exists and decodes
    # the pretrain bundle's sampler takes the recorded weights (--dataset_weighting datalist), in the pool's order
    from muscle_ext.data import PooledSampler, pool_datasets, pool_weights

    pooled_data = pool_datasets(load_datalist(pool, "training"), {"default": []})
    weights = pool_weights(pool, pooled_data)
    assert pooled_data.names == ["montgomery", "mura", "rsna_pneumonia"] and weights == [1.0, 2.0, 1.0]
    sampler = PooledSampler(pooled_data, weights=weights, num_replicas=1, rank=0)
    assert sampler.probabilities.tolist() == [0.25, 0.5, 0.25] and pool_weights(pool, pooled_data, "balanced") is None
    unweighted = tmp_path / "unweighted.json"
    unweighted.write_text(json.dumps({k: v for k, v in content.items() if k != "dataset_weights"}))
    with pytest.raises(ValueError, match="no dataset_weights recorded; write them with `muscle data pool"):
        pool_weights(unweighted, pooled_data)
    unweighted.write_text(json.dumps({**content, "dataset_weights": {"murra": 2.0}}))
    with pytest.raises(ValueError, match=r"dataset_weights name \['murra'\], not in the pool"):
        pool_weights(unweighted, pooled_data)
    # a weight for a dataset the pool does not hold, an unknown dataset name: one line, exit 2
    assert main([*argv[:-4], "--weight", "nih=1"]) == 2
    assert "weights for dataset(s) ['nih'] not in the pool" in capsys.readouterr().err
    assert main(["data", "convert", "montgomry", str(tmp_path / "src"), str(tmp_path / "x")]) == 2
    assert "Did you mean 'montgomery'?" in capsys.readouterr().err
    assert main(["data", "convert", "chexpert", str(tmp_path / "src"), str(tmp_path / "x")]) == 2
    assert "chexpert: 'train.csv' not found" in capsys.readouterr().err
    assert main(["data", "convert", "--list"]) == 0
    assert "rsna_pneumonia" in capsys.readouterr().out


def test_pool_function_reads_top_level_tags_and_skips_repeated_images(tmp_path):
    png(tmp_path / "a" / "x.png")
    text(tmp_path / "a" / "datalist.json", json.dumps({
        "dataset": "clinic", "body_part": "knee", "training": [{"image": "x.png"}, {"image": "./x.png"}],
        "validation": [], "test": [{"image": "x.png"}]}))
    content = pool_datalists([tmp_path / "a" / "datalist.json"], tmp_path / "pool.json")
    assert content["training"] == [{"image": "a/x.png", "dataset": "clinic", "body_part": "knee"}]
    text(tmp_path / "b" / "datalist.json", json.dumps({"training": [{"image": "y.png"}]}))
    with pytest.raises(ValueError, match=r"entry 'y.png' has no 'dataset'"):
        pool_datalists([tmp_path / "b" / "datalist.json"], tmp_path / "pool.json")


def test_merge_keeps_every_split_tags_the_dataset_and_refuses_mixed_up_classes(tmp_path, capsys):
    from muscle_ext.cli import main
    from muscle_ext.data import load_datalist

    for site, names in (("site_a", ("normal", "pneumonia")), ("site_b", ("normal", "pneumonia")),
                        ("site_c", ("pneumonia", "normal"))):
        folder = tmp_path / site
        (folder / "images").mkdir(parents=True)
        sections = {}
        for section in ("training", "validation", "test"):
            sections[section] = []
            for i in range(2):
                image = folder / "images" / f"{section}{i}.png"
                image.write_bytes(b"x")
                sections[section].append({"image": f"images/{section}{i}.png", "label": i, "class_name": names[i],
                                          "patient_id": f"p{i}"})
        (folder / "datalist.json").write_text(json.dumps(sections))
    out = tmp_path / "pooled" / "pneumonia.json"
    a, b, c = (str(tmp_path / site / "datalist.json") for site in ("site_a", "site_b", "site_c"))
    assert main(["data", "merge", a, b, "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert [len(merged[s]) for s in ("training", "validation", "test")] == [4, 4, 4]
    assert [e["dataset"] for e in merged["test"]] == ["site_a", "site_a", "site_b", "site_b"]
    assert merged["test"][2]["patient_id"] == "site_b:p0"  # two sites may number patients alike
    test = load_datalist(out, "test")
    assert Path(test[3]["image"]).resolve() == (tmp_path / "site_b" / "images" / "test1.png").resolve()
    assert main(["data", "merge", a, c, "--out", str(tmp_path / "bad.json")]) == 2
    assert "label 0 is 'normal' in site_a but 'pneumonia' in site_c" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()
