"""Detection on real TBX11K X-rays: box geometry, fine-tuning + test report as users run the bundle (from scratch
and from a backbone checkpoint), and inference boxes in each input file's own pixels."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image

from muscle_ext.data import case_id, load_datalist
from muscle_ext.data.boxes import (
    BOX_CSV_FIELDS,
    SaveBoxesd,
    boxes_to_original_grid,
    detection_preprocessing,
    swap_box_axes,
)
from muscle_ext.handlers import DetectionReport
from muscle_ext.metrics import DetectionCOCOMetric
from muscle_ext.networks import build_backbone, load_backbone_checkpoint, save_backbone

from tests.bundle_utils import BUNDLES, MARKER, pacs_export, run_bundle
from tests.bundle_utils import check_skipped as _check_skipped
from tests.bundle_utils import detection_datalist as _slice_datalist
from tests.bundle_utils import tiny_detection as tiny

TASK = "tb_detection_tbx11k"
CLASSES = ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"]
TRAIN = ["common.yaml", "detection.yaml"]


def _items(xray_root: Path, section: str) -> list[dict]:
    return load_datalist(xray_root / TASK / "datalist.json", section)


def _crop_columns(item: dict, tmp: Path, width: int = 200) -> dict | None:
    """A non-square real image: ``width`` columns of a TBX11K image around its boxes, boxes moved along (``None``
    when the boxes span more than ``width`` columns)."""
    x_min, x_max = min(b[0] for b in item["box"]), max(b[2] for b in item["box"])
    array = np.asarray(Image.open(item["image"]))
    start = int(min(max(0.0, x_min - 10), array.shape[1] - width))
    if x_max > start + width:
        return None
    path = tmp / f"crop_{Path(item['image']).stem}.png"
    Image.fromarray(array[:, start:start + width]).save(path)
    boxes = [[x1 - start, y1, x2 - start, y2] for x1, y1, x2, y2 in item["box"]]
    return {"image": str(path), "box": boxes, "label": list(item["label"])}


def _marker(item: dict, tmp: Path) -> str:
    """A mask drawn from the datalist boxes, read as x = column, y = row: what the annotator marked."""
    h, w = np.asarray(Image.open(item["image"])).shape
    mask = np.zeros((h, w), np.uint8)
    for x1, y1, x2, y2 in item["box"]:
        mask[int(round(y1)):int(round(y2)), int(round(x1)):int(round(x2))] = 255
    path = tmp / f"marker_{Path(item['image']).stem}.png"
    Image.fromarray(mask).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------- box geometry
def test_datalist_boxes_follow_the_image_through_preprocessing(tmp_path, xray_root):
    # a training image with one box that is clearly taller than wide (a swapped x/y could not match it), away from
    # the image centre line, and narrow enough for the non-square crop below
    item = next(i for i in _items(xray_root, "training")
                if len(i["box"]) == 1 and (i["box"][0][3] - i["box"][0][1]) > 1.3 * (i["box"][0][2] - i["box"][0][0])
                and _crop_columns(i, tmp_path) is not None)
    x1, y1, x2, y2 = item["box"][0]
    square = {**item, "marker": _marker(item, tmp_path)}
    out = Compose(detection_preprocessing(size=96, mask_keys="marker"))(square)
    assert tuple(out["image"].shape) == (1, 96, 96) and out["label"].tolist() == item["label"]
    s = 96 / 256
    torch.testing.assert_close(out["box"], torch.tensor([[y1 * s, x1 * s, y2 * s, x2 * s]]), atol=1e-4, rtol=0)

    # non-square (256 rows x 200 columns): resized to 96 x 75, padded to 96 x 96 (10 columns left, 11 right)
    crop = _crop_columns(item, tmp_path)
    crop["marker"] = _marker(crop, tmp_path)
    out = Compose(detection_preprocessing(size=96, mask_keys="marker"))(crop)
    box = out["box"][0]
    rows, cols = torch.nonzero(out["marker"][0] > 0, as_tuple=True)
    marked = torch.tensor([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], dtype=torch.float32)
    assert torch.allclose(box, marked, atol=1.01), (box, marked)  # MONAI order: rows first, on the padded grid
    assert float(box[1]) > 10 - 1e-3 and float(box[3]) < 86 + 1e-3  # inside the image, not the padding
    # the image content moved with the box: the same marker mask lies under it
    back = swap_box_axes(boxes_to_original_grid(out["box"], out["image"]))
    torch.testing.assert_close(back, torch.tensor(crop["box"], dtype=torch.float32), atol=1e-3, rtol=0)


def test_image_without_boxes_keeps_empty_targets(xray_root):
    item = {**_items(xray_root, "training")[0], "box": [], "label": []}
    out = Compose(detection_preprocessing(size=64))(item)
    assert tuple(out["box"].shape) == (0, 4) and tuple(out["label"].shape) == (0,)


def test_metric_report_and_box_files_in_input_pixels(tmp_path, xray_root):
    """Perfect predictions on the network grid: mAP 1, and boxes written back in each input file's pixels."""
    chain = Compose(detection_preprocessing(size=96))
    items = [c for i in _items(xray_root, "test") if i["box"] and (c := _crop_columns(i, tmp_path))][:4]
    outputs = []
    for item in items:
        out = chain(item)
        pred = {"box": out["box"], "label": out["label"], "label_scores": torch.linspace(0.9, 0.5, len(out["box"]))}
        outputs.append({"image": out["image"], "pred": pred, "label": {"box": out["box"], "label": out["label"]}})
    engine = SimpleNamespace(state=SimpleNamespace(output=outputs, metrics={}))

    metric = DetectionCOCOMetric(CLASSES)
    metric.update(([o["pred"] for o in outputs], [o["label"] for o in outputs]))
    metric.completed(engine, "val_map")
    assert engine.state.metrics["val_map"] == pytest.approx(1.0) and engine.state.metrics["val_map_ap50"] == 1.0

    report = DetectionReport(tmp_path / "eval", CLASSES, n_resamples=30, num_overlays=2)
    report.collect(engine)
    payload = report.write(engine)
    assert payload["map"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0} and payload["ap50"]["value"] == 1.0
    assert engine.state.metrics["test_map"] == 1.0 and engine.state.metrics["test_ap50_ci_low"] == 1.0
    assert sorted(payload["figures"]) == ["figures/detections_0.png", "figures/detections_1.png"]
    assert (tmp_path / "eval" / "figures" / "detections_0.png").stat().st_size > 1000

    save = SaveBoxesd("pred", tmp_path / "boxes", CLASSES)
    for item, output in zip(items, outputs, strict=True):
        written = save(output)
        name = case_id(item["image"])
        assert written["pred_file"] == f"{name}_boxes.json" and written["pred_csv_file"] == f"{name}_boxes.csv"
        record = json.loads((tmp_path / "boxes" / written["pred_file"]).read_text())
        assert (record["width"], record["height"]) == (200, 256) and record["case_id"] == name
        np.testing.assert_allclose([d["box"] for d in record["detections"]], item["box"], atol=0.011)
        with open(tmp_path / "boxes" / written["pred_csv_file"], newline="") as f:
            rows = list(csv.DictReader(f))
        np.testing.assert_allclose([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in rows], item["box"],
                                   atol=0.011)
        assert [r["class_name"] for r in rows] == [CLASSES[k] for k in item["label"]]


# ---------------------------------------------------------------------------------------------------- bundle runs
def _no_tracking(tmp: Path) -> str:
    # an added config file sets it as well as `--use_tracking false` would
    path = tmp / "no_tracking.yaml"
    path.write_text("use_tracking: false\n")
    return str(path)


def _check_metrics(path: Path, n_images: int) -> dict:
    report = json.loads(path.read_text())
    assert report["task"] == "detection" and report["split"] == "test" and report["n"] == n_images
    assert set(report["per_class"]) == set(CLASSES) and report["n_gt"]["ObsoletePulmonaryTuberculosis"] > 0
    for name in ("map", "ap50", "ap75"):
        entry = report[name]
        assert 0.0 <= entry["ci_low"] <= entry["value"] <= entry["ci_high"] <= 1.0, (name, entry)
    assert all(0.0 <= c["ap"] <= 1.0 for c in report["per_class"].values())
    assert report["bootstrap"]["resamples"] == 20 and len(report["figures"]) == 4
    return report


def test_finetune_from_scratch_then_test_report(tmp_path, xray_root):
    datalist = _slice_datalist(xray_root, tmp_path)
    overrides = tiny(tmp_path, datalist, init="scratch")
    run_bundle("downstream", TRAIN, overrides)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert any(k.startswith("network.feature_extractor.backbone.") for k in state)
    backbone = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")
    assert backbone["arch"] == "resnet18" and backbone["source"]["task"] == "detection"

    run_bundle("downstream", [*TRAIN, "evaluate.yaml"], overrides)
    _check_metrics(tmp_path / "out" / "metrics.json", n_images=6)
    assert (tmp_path / "out" / "mlruns.db").is_file()  # MLflow tracking is on by default


def test_finetune_from_checkpoint_backbone_evaluate_and_infer(tmp_path, xray_root):
    torch.manual_seed(7)
    pretrained = build_backbone("resnet18")
    save_backbone(tmp_path / "pretrained.pt", pretrained, "resnet18", {"imagenet_stem": True},
                  source={"bundle": "muscle_pretrain"})
    datalist = _slice_datalist(xray_root, tmp_path)
    configs = [*TRAIN, _no_tracking(tmp_path)]
    # learning rate 0: the backbone weights that come out must be exactly the checkpoint's
    overrides = tiny(tmp_path, datalist, init="checkpoint", init_weights=tmp_path / "pretrained.pt",
                     num_epochs=1, learning_rate=0.0, amp=False)
    run_bundle("downstream", configs, overrides)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    prefix = "network.feature_extractor.backbone."
    for key, value in pretrained.state_dict().items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm statistics follow the data
            assert torch.equal(state[prefix + key], value), key

    run_bundle("downstream", [*configs, "evaluate.yaml"], overrides)
    _check_metrics(tmp_path / "out" / "metrics.json", n_images=6)

    # inference on a folder: a non-square PNG and a DICOM (MONOCHROME1, 880 x 880), boxes in their own pixels
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    crop = next(c for i in _items(xray_root, "test") if i["box"] and (c := _crop_columns(i, inputs)))
    dicom = xray_root / "dicom" / "derived" / "RG3_half_uncompressed_MONOCHROME1.dcm"
    (inputs / "scan.dcm").write_bytes(dicom.read_bytes())
    run_bundle("downstream", [*configs, "inference_detection.yaml"],
               {**overrides, "input_dir": inputs, "inference#boxes_dir": tmp_path / "boxes",
                "detector#score_thresh": 0.0, "inference#score_threshold": 0.0})
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        table = {row["case_id"]: row for row in csv.DictReader(f)}
    sizes = {case_id(crop["image"], inputs): (200, 256), case_id(inputs / "scan.dcm", inputs): (880, 880)}
    assert set(table) == set(sizes)
    for name, (width, height) in sizes.items():
        text = (tmp_path / "boxes" / f"{name}_boxes.json").read_text()
        record = json.loads(text)
        assert set(record) == {"case_id", "width", "height", "box_format", "class_names", "detections"}
        assert (record["width"], record["height"]) == (width, height)
        assert "CompressedSamples" not in text and "scan" not in text and "crop" not in text  # no names
        boxes = np.array([d["box"] for d in record["detections"]])
        assert len(boxes) > 0 and (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 3] <= height).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        with open(tmp_path / "boxes" / f"{name}_boxes.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(boxes) and tuple(rows[0]) == BOX_CSV_FIELDS
        assert all(math.isfinite(float(r["score"])) for r in rows)
        row = table[name]
        assert (int(row["columns"]), int(row["rows"]), int(row["n_boxes"])) == (width, height, len(boxes))
        assert row["boxes_file"] == f"{name}_boxes.json"


def test_inference_on_a_pacs_export_skips_what_is_not_an_image(tmp_path, xray_root):
    """A FileSet export (DICOMDIR, suffix-less DICOMs, one without pixels) plus a truncated PNG and a text file: boxes
    for the three images, the four others in skipped.csv. What is checked is the handling of the inputs, not the
    boxes, so models/model.pt holds the untrained network of the same configs (no training run needed)."""
    from monai.bundle import ConfigParser

    inputs = tmp_path / "export"
    usable, bad = pacs_export(inputs, xray_root)
    overrides = tiny(tmp_path, _slice_datalist(xray_root, tmp_path), init="scratch", amp=False)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "downstream" / "configs" / c) for c in TRAIN])
    parser.update({"image_size": 64, "detector#fpn_channels": 32, "device": "cpu"})
    (tmp_path / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "models" / "model.pt")
    proc = run_bundle("downstream", [*TRAIN, _no_tracking(tmp_path), "inference_detection.yaml"],
                      {**overrides, "input_dir": inputs, "inference#boxes_dir": tmp_path / "boxes",
                       "detector#score_thresh": 0.0, "inference#score_threshold": 0.0})
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == [case_id(p, inputs) for p in usable]
    assert sorted(p.name for p in (tmp_path / "boxes").glob("*_boxes.json")) == \
        sorted(f"{case_id(p, inputs)}_boxes.json" for p in usable)
    _check_skipped(tmp_path / "out", inputs, bad, proc.stdout)
    for path in [*(tmp_path / "out").rglob("*"), *(tmp_path / "boxes").rglob("*")]:
        assert path.is_dir() or MARKER.encode() not in path.read_bytes(), path
    assert MARKER not in proc.stdout + proc.stderr


@pytest.mark.parametrize("extra", [[], ["evaluate.yaml"], ["inference_detection.yaml"]])
def test_configs_parse(extra):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "downstream" / "configs" / c) for c in [*TRAIN, *extra]])
    parser["from_model"] = {}  # evaluate/inference read it from models/model.pt: the defaults here
    assert parser.get_parsed_content("class_names") == CLASSES and parser["task"] == "detection" and parser["run"]
    assert "$import muscle_ext.engines.detection" in parser["imports"]
