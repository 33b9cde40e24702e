"""Detection on real TBX11K X-rays: box geometry, fine-tuning + test evaluation as users run the bundle (from scratch
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

from muscle_ext.data import load_datalist
from muscle_ext.data.boxes import boxes_to_original_grid, detection_preprocessing, swap_box_axes
from muscle_ext.engines.detection import (
    DetectionBoxWriter,
    DetectionCOCOMetric,
    DetectionMetricsWriter,
    inference_items,
)
from muscle_ext.networks import build_backbone, load_backbone_checkpoint, save_backbone
from tests.bundle_utils import BUNDLES, run_bundle

TASK = "tb_detection_tbx11k"
CLASSES = ["ActiveTuberculosis", "ObsoletePulmonaryTuberculosis"]
# common.yaml (shared downstream settings) comes first once it exists, as users merge them
COMMON = ["common.yaml"] if (BUNDLES / "downstream" / "configs" / "common.yaml").is_file() else []
TRAIN = [*COMMON, "detection.yaml"]


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


def test_box_writer_and_metric_in_input_pixels(tmp_path, xray_root):
    """Perfect predictions on the network grid -> mAP 1 and boxes written back in the input file's pixels."""
    chain = Compose(detection_preprocessing(size=96))
    items = [c for i in _items(xray_root, "test") if i["box"] and (c := _crop_columns(i, tmp_path))][:4]
    outputs = []
    for item in items:
        out = chain(item)
        pred = {"box": out["box"], "label": out["label"], "label_scores": torch.linspace(0.9, 0.5, len(out["box"]))}
        outputs.append({"image": out["image"], "pred": pred, "label": {"box": out["box"], "label": out["label"]}})
    engine = SimpleNamespace(state=SimpleNamespace(output=outputs, metrics={}))

    metric = DetectionCOCOMetric(CLASSES, n_bootstrap=30)
    metric.reset()
    metric.update(([o["pred"] for o in outputs], [o["label"] for o in outputs]))
    metric.completed(engine, "test_map")
    assert engine.state.metrics["test_map"] == pytest.approx(1.0) and engine.state.metrics["test_map_ap50"] == 1.0
    DetectionMetricsWriter(tmp_path / "metrics.json", metric)(engine)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["map_ci"]["ci_low"] == report["map_ci"]["ci_high"] == 1.0

    writer = DetectionBoxWriter(tmp_path / "boxes", CLASSES)
    writer._reset(engine)
    writer(engine)
    for item in items:
        stem = Path(item["image"]).stem
        record = json.loads((tmp_path / "boxes" / f"{stem}.json").read_text())
        assert (record["width"], record["height"]) == (200, 256)
        np.testing.assert_allclose([d["box"] for d in record["detections"]], item["box"], atol=0.011)
        with open(tmp_path / "boxes" / f"{stem}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        np.testing.assert_allclose([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in rows], item["box"],
                                   atol=0.011)
        assert [r["label_name"] for r in rows] == [CLASSES[k] for k in item["label"]]


# ---------------------------------------------------------------------------------------------------- bundle runs
def _slice_datalist(xray_root: Path, tmp: Path, n_train: int = 8, n_val: int = 4, n_test: int = 6) -> Path:
    """A few real items per split, with both classes in training and test; absolute image paths."""
    def pick(section: str, n: int) -> list[dict]:
        items = _items(xray_root, section)
        latent = [i for i in items if 1 in i["label"]][:2]
        return latent + [i for i in items if i not in latent and i["box"]][: n - len(latent)]

    path = tmp / "datalist.json"
    path.write_text(json.dumps({"training": pick("training", n_train), "validation": pick("validation", n_val),
                                "test": pick("test", n_test)}))
    return path


def tiny(tmp: Path, datalist: Path, **extra) -> dict:
    """64 px, batch 4, 2 epochs x 2 iterations, a narrow FPN: seconds on a CPU."""
    return {"datalist": datalist, "output_dir": tmp / "out", "model_dir": tmp / "models", "image_size": 64,
            "batch_size": 4, "num_epochs": 2, "num_workers": 0, "cache": "none", "detector#fpn_channels": 32,
            "n_bootstrap": 20, **extra}


def _check_metrics(path: Path, n_images: int) -> dict:
    report = json.loads(path.read_text())
    assert report["task"] == "detection" and report["split"] == "test" and report["n_images"] == n_images
    assert set(report["per_class"]) == set(CLASSES) and report["n_gt"]["ObsoletePulmonaryTuberculosis"] > 0
    for value in (report["map"], report["ap50"], *(c["ap"] for c in report["per_class"].values())):
        assert 0.0 <= value <= 1.0
    ci = report["map_ci"]
    assert ci["ci_low"] <= ci["value"] == report["map"] <= ci["ci_high"] and ci["n_resamples"] == 20
    return report


def test_finetune_from_scratch_then_test_metrics(tmp_path, xray_root):
    datalist = _slice_datalist(xray_root, tmp_path)
    run_bundle("downstream", TRAIN, tiny(tmp_path, datalist, init="scratch"))
    report = _check_metrics(tmp_path / "out" / "metrics.json", n_images=6)
    assert report["init"] == "scratch"
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("network.feature_extractor.backbone.") for k in state)
    backbone = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")
    assert backbone["arch"] == "resnet18" and backbone["source"]["task"] == "detection"
    assert (tmp_path / "out" / "mlruns.db").is_file()  # MLflow tracking is on by default


def test_finetune_from_checkpoint_backbone_evaluate_and_infer(tmp_path, xray_root):
    torch.manual_seed(7)
    pretrained = build_backbone("resnet18")
    save_backbone(tmp_path / "pretrained.pt", pretrained, "resnet18", {"imagenet_stem": True},
                  source={"bundle": "muscle_pretrain"})
    datalist = _slice_datalist(xray_root, tmp_path)
    # learning rate 0: the backbone weights that come out must be exactly the checkpoint's
    overrides = tiny(tmp_path, datalist, init="checkpoint", init_weights=tmp_path / "pretrained.pt",
                     num_epochs=1, learning_rate=0.0, track_mlflow=False, amp=False)
    run_bundle("downstream", TRAIN, overrides)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    prefix = "network.feature_extractor.backbone."
    for key, value in pretrained.state_dict().items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm statistics follow the data
            assert torch.equal(state[prefix + key], value), key

    # evaluation alone, on the model just written
    (tmp_path / "out" / "metrics.json").unlink()
    run_bundle("downstream", [*TRAIN, "evaluate_detection.yaml"], overrides)
    assert _check_metrics(tmp_path / "out" / "metrics.json", n_images=6)["init"] == "checkpoint"

    # inference on a folder: a non-square PNG and a DICOM (MONOCHROME1, 880 x 880), boxes in their own pixels
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    crop = next(c for i in _items(xray_root, "test") if i["box"] and (c := _crop_columns(i, inputs)))
    dicom = xray_root / "dicom" / "derived" / "RG3_half_uncompressed_MONOCHROME1.dcm"
    (inputs / "scan.dcm").write_bytes(dicom.read_bytes())
    assert len(inference_items(inputs)) == 2
    run_bundle("downstream", [*TRAIN, "inference_detection.yaml"],
               {**overrides, "input": inputs, "boxes_dir": tmp_path / "boxes", "detector#score_thresh": 0.0})
    sizes = {Path(crop["image"]).stem: (200, 256), "scan": (880, 880)}
    for stem, (width, height) in sizes.items():
        text = (tmp_path / "boxes" / f"{stem}.json").read_text()
        record = json.loads(text)
        assert set(record) == {"image", "width", "height", "box_format", "classes", "detections"}
        assert (record["width"], record["height"]) == (width, height) and "/" not in record["image"]
        assert "CompressedSamples" not in text  # the DICOM's (synthetic) patient name
        boxes = np.array([d["box"] for d in record["detections"]])
        assert len(boxes) > 0 and (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all()
        assert (boxes[:, 3] <= height).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        with open(tmp_path / "boxes" / f"{stem}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(boxes) and list(rows[0]) == list(DetectionBoxWriter.CSV_FIELDS)
        assert all(math.isfinite(float(r["score"])) for r in rows)


@pytest.mark.parametrize("extra", [[], ["evaluate_detection.yaml"], ["inference_detection.yaml"]])
def test_configs_parse(extra):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "downstream" / "configs" / c) for c in [*TRAIN, *extra]])
    assert parser["classes"] == CLASSES and parser["run"]
