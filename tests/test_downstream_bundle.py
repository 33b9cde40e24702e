"""The downstream bundle as users run it, on the real X-ray subsets: fine-tuning + test report for pneumonia, knee
OA, bone age and lungs (from scratch, ImageNet weights and an MD-MoCo checkpoint), resume, inference on real DICOM,
PNG and NIfTI files in each input's own geometry, TorchScript export, and what never reaches an output file."""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from muscle_ext.data import case_id, datalist_from_folder, is_dicomdir, load_datalist, read_xray, screen_inputs, subset
from muscle_ext.metrics import roc_auc
from muscle_ext.networks import build_backbone, file_sha256, load_backbone_checkpoint, save_backbone

from tests.bundle_utils import BUNDLES, EXPORT_REASONS, MARKER, pacs_export, run_bundle, torchvision_resnet18_state_dict
from tests.bundle_utils import check_skipped as _check_skipped
from tests.bundle_utils import downstream_configs as configs
from tests.bundle_utils import marked_dicoms as _marked_dicoms
from tests.bundle_utils import read_csv as _read_csv
from tests.bundle_utils import tiny_downstream as tiny

CONFIGS = BUNDLES / "downstream" / "configs"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """An ImageNet state dict in torchvision's layout and an MD-MoCo backbone checkpoint with lineage."""
    root = tmp_path_factory.mktemp("weights")
    imagenet = root / "resnet18-imagenet.pth"
    torch.save(torchvision_resnet18_state_dict(), imagenet)
    checkpoint = root / "md_moco_backbone.pt"
    torch.manual_seed(1)
    save_backbone(checkpoint, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True},
                  source={"bundle": "muscle_pretrain", "mlflow_run_id": "parentrun42", "epoch": 7})
    return {"imagenet": imagenet, "checkpoint": checkpoint}


def _run_settings(task: str, root: Path, xray_root: Path, weights: dict[str, Path]) -> dict:
    if task == "pneumonia":  # scratch, tracking on
        return tiny(root, xray_root)
    if task == "knee":  # ImageNet weights, no tracking
        return tiny(root, xray_root, datalist=xray_root / "knee_oa" / "datalist.json", init="imagenet",
                    init_weights=weights["imagenet"], flip_prob=0.5, class_names="['normal','abnormal']",
                    use_tracking="false")  # as users type it
    if task == "regression":  # MD-MoCo checkpoint, with lineage
        return tiny(root, xray_root, init="checkpoint", init_weights=weights["checkpoint"])
    return tiny(root, xray_root, init="checkpoint", init_weights=weights["checkpoint"])  # segmentation


@pytest.fixture(scope="module")
def trained(tmp_path_factory, xray_root, weights):
    """Fine-tune each task once (module scope) and hand its folder and settings to every test that needs a model."""
    done: dict[str, tuple[Path, dict]] = {}

    def train(task: str) -> tuple[Path, dict]:
        if task not in done:
            root = tmp_path_factory.mktemp(task)
            settings = _run_settings(task, root, xray_root, weights)
            proc = run_bundle("downstream", configs(task), settings)
            (root / "train.log").write_text(proc.stdout + proc.stderr)
            done[task] = (root, settings)
        return done[task]

    return train


def _eval_settings(settings: dict) -> dict:
    # keep init (input normalisation) but not the weights file: evaluation and inference load models/model.pt
    return {k: v for k, v in settings.items() if k != "init_weights"}


# ------------------------------------------------------------------------------------------- fine-tune + evaluate
def _default_datalist(task: str, xray_root: Path) -> Path:
    folder = {"pneumonia": "pneumonia_nih", "regression": "hand_boneage", "segmentation": "lung_seg_cxr"}[task]
    return xray_root / folder / "datalist.json"


EXPECTED = {
    "pneumonia": (("accuracy", "sensitivity", "specificity", "roc_auc", "ece"),
                  {"roc_curve.png", "confusion_matrix.png", "reliability.png"}),
    "knee": (("accuracy", "sensitivity", "specificity", "roc_auc", "ece"),
             {"roc_curve.png", "confusion_matrix.png", "reliability.png"}),
    "regression": (("mae", "rmse"), {"scatter.png"}),
    "segmentation": (("dice", "miou", "dice_pooled", "miou_pooled"), {f"overlay_{k}.png" for k in range(4)}),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_finetune_and_evaluate_on_the_real_test_split(task, trained, xray_root):
    root, settings = trained(task)
    backbone = load_backbone_checkpoint(root / "models" / "backbone.pt")
    assert backbone["source"]["task"] == {"pneumonia": "classification", "knee": "classification"}.get(task, task)
    assert backbone["arch"] == "resnet18" and backbone["backbone_kwargs"] == {"imagenet_stem": True}
    assert (root / "models" / "model.pt").is_file()

    proc = run_bundle("downstream", configs(task, "evaluate.yaml"), _eval_settings(settings))
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    names, figures = EXPECTED[task]
    test_items = load_datalist(Path(settings.get("datalist") or _default_datalist(task, xray_root)), "test")
    assert metrics["split"] == "test" and metrics["n"] == min(16, len(test_items))
    assert metrics["confidence_level"] == 0.95 and metrics["bootstrap"]["resamples"] == 200
    for name in names:
        entry = metrics[name]
        assert set(entry) == {"value", "ci_low", "ci_high"}, name
        # every metric is defined on these test images (both classes present, masks not empty), so is its interval
        assert None not in entry.values(), (name, entry)
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], (name, entry)
        assert f"test_{name}_ci_low" in proc.stdout  # printed by StatsHandler (and logged to MLflow)
    assert {Path(f).name for f in metrics["figures"]} == figures
    assert all((root / "out" / f).stat().st_size > 1000 for f in metrics["figures"])
    if task == "regression":
        assert metrics["unit"] == "months" and 0 < metrics["mae"]["value"] < 250
    # per-case scores for paired comparisons: one row per test image, no file names, and they give the headline
    with (root / "out" / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["n"] and [int(r["index"]) for r in rows] == list(range(len(rows)))
    column = {name: np.array([float(r[name]) for r in rows]) for name in rows[0] if name != "index"}
    if "score" in column:
        assert set(column) == {"label", "score"}
        assert roc_auc(column["label"], column["score"]) == pytest.approx(metrics["roc_auc"]["value"])
    elif "pred" in column:
        assert set(column) == {"label", "pred"}
        assert np.mean(np.abs(column["pred"] - column["label"])) == pytest.approx(metrics["mae"]["value"], rel=1e-5)
    else:
        assert set(column) == {"dice", "iou"}
        assert np.nanmean(column["dice"]) == pytest.approx(metrics["dice"]["value"])
        assert np.nanmean(column["iou"]) == pytest.approx(metrics["miou"]["value"])
    assert metrics["per_case"] == "per_case.csv"
    if task == "pneumonia":  # the report and figures were uploaded to the evaluation run
        assert list((root / "out" / "mlruns").glob("*/artifacts/metrics.json"))
        assert list((root / "out" / "mlruns").glob("*/artifacts/figures/roc_curve.png"))
    if task == "knee":
        assert not (root / "out" / "mlruns.db").exists()  # use_tracking: false drops every tracker


def test_checkpoint_lineage_reaches_mlflow(trained, weights):
    root, _ = trained("regression")
    with sqlite3.connect(root / "out" / "mlruns.db") as db:  # the training run's tags (evaluation runs have their own)
        tags = dict(db.execute("select key, value from tags where run_uuid in (select run_uuid from tags where "
                               "key = 'muscle.workflow' and value = 'train')").fetchall())
    assert tags["muscle.parent_checkpoint_sha256"] == file_sha256(weights["checkpoint"])
    assert tags["muscle.parent_run_id"] == "parentrun42" and tags["muscle.parent_bundle"] == "muscle_pretrain"


def test_rerun_resumes_from_the_last_checkpoint(trained, tmp_path):
    root, settings = trained("regression")
    for name in ("out", "models"):
        shutil.copytree(root / name, tmp_path / name, ignore=shutil.ignore_patterns("mlruns*"))
    ckpts = tmp_path / "out" / "checkpoints"
    (kept,) = ckpts.glob("*.pt")  # keep_checkpoints 1: the newest resumable state only (model.pt is elsewhere)
    first = torch.load(kept, weights_only=True)
    assert first["best"]["best_metric_epoch"] == 1 and kept.name == f"checkpoint_{first['trainer']['iteration']}.pt"
    rerun = {**settings, "output_dir": tmp_path / "out", "model_dir": tmp_path / "models", "use_tracking": False}
    proc = run_bundle("downstream", configs("regression"), {**rerun, "num_epochs": 2})
    assert f"Restored all variables from {kept}" in proc.stdout
    assert "continuing with epoch 2 of 2" in proc.stdout
    (newest,) = ckpts.glob("*.pt")
    final = torch.load(newest, weights_only=True)
    assert final["trainer"]["iteration"] == 2 * first["trainer"]["iteration"]  # one more epoch, not a fresh run
    # the best-model record survived the restart: epoch 2 replaced models/model.pt only if it was better
    best = final["best"]
    assert best["best_metric_epoch"] in (1, 2) and best["saver"]
    assert best["best_metric"] <= first["best"]["best_metric"] + 1e-6

    # the same command again: the run is finished, and it says so (and how to extend it) before any data is read
    again = run_bundle("downstream", configs("regression"), {**rerun, "num_epochs": 2, "dataset_dir": tmp_path / "no"})
    assert f"training already finished at epoch 2 (checkpoint {newest}): nothing to do; to train longer, pass a " \
           "larger --num_epochs" in again.stdout + again.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == [newest.name]  # nothing written
    # a shorter schedule than the one the folder holds is refused, with both numbers and the fix
    import subprocess

    from tests.bundle_utils import bundle_command, bundle_env

    shorter = subprocess.run(bundle_command("downstream", configs("regression"), {**rerun, "num_epochs": 1}),
                             capture_output=True, text=True, timeout=300, env=bundle_env())
    assert shorter.returncode != 0
    assert "has trained 2 epochs" in shorter.stderr and "--num_epochs 1 is fewer" in shorter.stderr
    assert "Traceback" not in shorter.stderr


# ------------------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("task", ["classification", "regression", "segmentation"])
def test_every_init_kind_loads_its_weights(task, weights):
    from monai.bundle import ConfigParser

    reference = load_backbone_checkpoint(weights["checkpoint"])["state_dict"]
    imagenet = torch.load(weights["imagenet"], weights_only=True)
    for init in ("scratch", "imagenet", "checkpoint"):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / f"{task}.yaml")])
        parser.update({"init": init, "init_weights": str(weights.get(init, "")) or None, "device": "cpu"})
        net = parser.get_parsed_content("network")
        state = net.backbone.state_dict()
        if init == "checkpoint":
            assert all(torch.equal(state[k], v) for k, v in reference.items())
        elif init == "imagenet":
            torch.testing.assert_close(state["conv1.weight"], imagenet["conv1.weight"].sum(1, keepdim=True))
            assert parser.get_parsed_content("input_mean") == pytest.approx(0.449)
        else:
            assert not torch.equal(state["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
            assert parser.get_parsed_content("input_std") == 1.0


def test_linear_probe_keeps_the_backbone_fixed(weights):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "classification.yaml")])
    parser.update({"init": "checkpoint", "init_weights": str(weights["checkpoint"]), "freeze_backbone": True,
                   "device": "cpu", "layer_decay": 0.5, "head_lr_mult": 10.0})
    net = parser.get_parsed_content("network")
    groups = parser.get_parsed_content("optimizer_params")
    assert [g["name"] for g in groups] == ["head"] and groups[0]["lr"] == pytest.approx(0.003)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    net.train()
    net(torch.rand(4, 1, 64, 64))  # BatchNorm statistics would move in train mode
    assert all(torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())


# ------------------------------------------------------------------------------------------------------ inference
def _assert_marker_absent(folder: Path, *texts: str) -> None:
    for text in texts:
        assert MARKER not in text
    for path in folder.rglob("*"):
        if path.is_file():
            assert MARKER.encode() not in path.read_bytes(), path
            assert MARKER not in path.name, path


def test_classification_inference_on_real_dicoms(trained, xray_root, tmp_path):
    root, settings = trained("pneumonia")
    inputs = tmp_path / "clinic"
    shutil.copytree(xray_root / "dicom", inputs, ignore=shutil.ignore_patterns("*.json"))
    _marked_dicoms(inputs / "marked", xray_root)
    out = tmp_path / "predictions"
    proc = run_bundle("downstream", configs("pneumonia", "inference.yaml"),
                      {**_eval_settings(settings), "input_dir": inputs, "output_dir": out, "threshold": 0.45})
    rows = _read_csv(out / "predictions.csv")
    files = sorted(p for p in inputs.rglob("*.dcm"))
    assert len(rows) == len(files) == 8
    assert [r["case_id"] for r in rows] == [case_id(p, inputs) for p in files]
    assert list(rows[0]) == ["index", "case_id", "probability", "label", "class_name"]
    for row in rows:
        p = float(row["probability"])
        assert 0 <= p <= 1 and int(row["label"]) == int(p >= 0.45)
        assert row["class_name"] == ["no_finding", "pneumonia"][int(row["label"])]
    _assert_marker_absent(out, proc.stdout, proc.stderr)


def test_evaluation_on_marked_dicoms_keeps_patient_fields_out(trained, xray_root, tmp_path):
    root, settings = trained("pneumonia")
    items = _marked_dicoms(tmp_path / "clinic", xray_root, count=6)
    datalist = tmp_path / "clinic" / "datalist.json"
    datalist.write_text(json.dumps({"test": [{**i, "image": Path(i["image"]).name} for i in items]}))
    out = tmp_path / "report"
    proc = run_bundle("downstream", configs("pneumonia", "evaluate.yaml"),
                      {**_eval_settings(settings), "datalist": datalist, "output_dir": out})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["roc_auc"]["value"] is not None
    assert (out / "mlruns.db").is_file() and list(out.glob("mlruns/*/artifacts/metrics.json"))
    _assert_marker_absent(out, proc.stdout, proc.stderr)


def _segmentation_inputs(folder: Path, xray_root: Path) -> dict[str, Path]:
    """Real lung X-rays as PNG (square, flipped, non-square crop), the crop as NIfTI with a non-trivial affine, a real
    MONOCHROME1 DICOM and a marked DICOM."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    item = load_datalist(xray_root / "lung_seg_cxr" / "datalist.json", "test")[0]
    image = np.asarray(Image.open(item["image"]).convert("L"))
    crop = image[10:210, 20:250].copy()  # 200 rows x 230 columns
    paths = {"png": folder / "a.png", "flipped": folder / "a_flipped.png", "crop": folder / "crop.png",
             "nifti": folder / "crop.nii.gz", "dicom": folder / "mono1.dcm"}
    Image.fromarray(image).save(paths["png"])
    Image.fromarray(image[:, ::-1].copy()).save(paths["flipped"])
    Image.fromarray(crop).save(paths["crop"])
    # rotated and scaled, with square pixels (0.5 mm) so that its mask must equal the PNG crop's exactly; non-square
    # pixels are resampled square first (tests/test_reader_variants.py)
    affine = np.array([[0.0, -0.5, 0, 12], [0.5, 0.0, 0, -3], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(crop.T.astype(np.float32)[:, :, None], affine), paths["nifti"])  # x first, as ITK
    shutil.copy(xray_root / "dicom" / "derived" / "RG1_half_uncompressed_MONOCHROME1.dcm", paths["dicom"])
    paths["marked"] = Path(_marked_dicoms(folder / "marked", xray_root, count=1)[0]["image"])
    return paths


def _mask_of(out: Path, source: Path, root: Path) -> Path:
    return next((out / "masks").glob(f"{case_id(source, root)}_mask.*"))


def test_segmentation_masks_are_written_in_each_inputs_geometry(trained, xray_root, tmp_path):
    import nibabel as nib

    root, settings = trained("segmentation")
    inputs = _segmentation_inputs(tmp_path / "clinic", xray_root)
    out = tmp_path / "lungs"
    proc = run_bundle("downstream", configs("segmentation", "inference.yaml"),
                      {**_eval_settings(settings), "input_dir": tmp_path / "clinic", "output_dir": out})
    rows = {r["case_id"]: r for r in _read_csv(out / "predictions.csv")}
    assert len(rows) == len(inputs)
    for name, source in inputs.items():
        mask_path = _mask_of(out, source, tmp_path / "clinic")
        image, _ = read_xray(source)
        mask, _ = read_xray(mask_path)
        assert mask.shape == image.shape, name  # (rows, columns) of the input
        row = rows[case_id(source, tmp_path / "clinic")]
        assert row["mask_file"] == mask_path.name and (int(row["rows"]), int(row["columns"])) == image.shape
        if name == "nifti":
            src, written = nib.load(source), nib.load(mask_path)
            assert written.shape == src.shape and np.allclose(written.affine, src.affine)
            assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}
        else:
            assert mask_path.suffix == ".png" and set(np.unique(mask)) <= {0, 255}
    _assert_marker_absent(out, proc.stdout, proc.stderr)


class BrightRegionSegmenter(torch.nn.Module):
    """Stand-in for a trained segmenter whose answer is known: class 1 wherever the pre-processed image is > 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10


def _reference_mask(path: Path) -> np.ndarray:
    from monai.transforms import ScaleIntensityRangePercentiles

    image, _ = read_xray(path)
    return np.asarray(ScaleIntensityRangePercentiles(0.5, 99.5, 0, 1, clip=True)(image)) > 0.5


def test_inverted_masks_match_the_input_pixel_for_pixel(xray_root, tmp_path):
    """Through the bundle's own inference pipeline (its transforms, Invertd and writers) with a network whose masks
    are known: each mask lies on the bright region of its input file, in the file's own orientation, and the mask
    of a flipped input is the flipped mask. Also: patient fields reach the CSV only when asked for."""
    from monai.bundle import ConfigParser

    inputs = _segmentation_inputs(tmp_path / "clinic", xray_root)
    for include in (False, True):
        out = tmp_path / f"out_{include}"
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in configs("segmentation", "inference.yaml")])
        parser.update({"input_dir": str(tmp_path / "clinic"), "output_dir": str(out), "image_size": 128,
                       "tracking": False, "num_workers": 0, "device": "cpu", "amp": False,
                       "include_patient_fields": include})
        parser["network"] = BrightRegionSegmenter()
        parser["handlers#0#_disabled_"] = True  # no model.pt to load
        parser["from_model"] = {}  # nor its settings: the config's apply
        parser.parse()
        parser.get_parsed_content("evaluator").run()
        rows = _read_csv(out / "predictions.csv")
        assert any(MARKER in str(r.get("PatientName", "")) for r in rows) == include

    masks = {name: read_xray(_mask_of(out, path, tmp_path / "clinic"))[0] > 0 for name, path in inputs.items()}
    for name, path in inputs.items():
        agreement = np.mean(masks[name] == _reference_mask(path))
        assert agreement > 0.95, (name, agreement)
        assert 0.05 < masks[name].mean() < 0.95, name  # not trivially empty or full
    assert np.mean(masks["flipped"] == masks["png"][:, ::-1]) > 0.98
    assert np.array_equal(masks["nifti"], masks["crop"])  # NIfTI axis order and affine handled like the PNG


# ------------------------------------------------------------------------------------- inference on a PACS export
def test_classification_inference_on_a_pacs_export_skips_what_is_not_an_image(trained, xray_root, tmp_path):
    root, settings = trained("pneumonia")
    inputs = tmp_path / "export"
    usable, bad = pacs_export(inputs, xray_root)
    out = tmp_path / "predictions"
    proc = run_bundle("downstream", configs("pneumonia", "inference.yaml"),
                      {**_eval_settings(settings), "input_dir": inputs, "output_dir": out, "use_tracking": "false"})
    rows = _read_csv(out / "predictions.csv")
    assert [r["case_id"] for r in rows] == [case_id(p, inputs) for p in usable]  # one row per image, path order
    assert all(0 <= float(r["probability"]) <= 1 for r in rows)
    _check_skipped(out, inputs, bad, proc.stdout)
    _assert_marker_absent(out, proc.stdout, proc.stderr)


def test_inference_on_bad_data_raise_stops_naming_the_files(trained, xray_root, tmp_path):
    import subprocess

    from tests.bundle_utils import bundle_command, bundle_env

    root, settings = trained("pneumonia")
    inputs = tmp_path / "export"
    _, bad = pacs_export(inputs, xray_root)
    out = tmp_path / "predictions"
    cmd = bundle_command("downstream", configs("pneumonia", "inference.yaml"),
                         {**_eval_settings(settings), "input_dir": inputs, "output_dir": out, "use_tracking": "false",
                          "on_bad_data": "raise"})
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=bundle_env())
    assert proc.returncode != 0
    message = proc.stderr[proc.stderr.index("DatalistError"):]
    assert f"4 of {len(bad) + 3} datalist entries are unusable" in message and "--on_bad_data skip" in message
    for kind, path in bad.items():
        assert f"{path}: " in message and EXPORT_REASONS[kind] in message, kind
    assert not (out / "predictions.csv").exists() and not (out / "skipped.csv").exists()


def test_segmentation_inference_on_a_pacs_export(trained, xray_root, tmp_path):
    root, settings = trained("segmentation")
    inputs = tmp_path / "export"
    usable, bad = pacs_export(inputs, xray_root)
    out = tmp_path / "lungs"
    proc = run_bundle("downstream", configs("segmentation", "inference.yaml"),
                      {**_eval_settings(settings), "input_dir": inputs, "output_dir": out, "use_tracking": "false"})
    rows = _read_csv(out / "predictions.csv")
    assert [r["case_id"] for r in rows] == [case_id(p, inputs) for p in usable]
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(r["mask_file"] for r in rows)
    for row, path in zip(rows, usable, strict=True):
        assert (int(row["rows"]), int(row["columns"])) == read_xray(path)[0].shape
    _check_skipped(out, inputs, bad, proc.stdout)
    _assert_marker_absent(out, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("task", ["pneumonia", "segmentation"])
def test_torchscript_export_matches_the_eager_model(task, trained, tmp_path):
    from monai.bundle import ConfigParser, ckpt_export

    root, settings = trained(task)
    files = [str(CONFIGS / f) for f in configs(task)]
    ts = tmp_path / "model.ts"
    ckpt_export("network_def", filepath=str(ts), ckpt_file=str(root / "models" / "model.pt"), key_in_ckpt="model",
                meta_file=str(CONFIGS / "metadata.json"), config_file=files)
    parser = ConfigParser()
    parser.read_config(files)
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True)["model"])
    scripted = torch.jit.load(str(ts))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager.eval()(x))


def test_metadata_and_network_io_verify(tmp_path):
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(BUNDLES / "metadata_schema.json"))
    for task, outputs in (("classification", 2), ("regression", 1), ("segmentation", 2)):
        verify_net_in_out("network_def", meta_file=str(CONFIGS / "metadata.json"), device="cpu",
                          config_file=[str(CONFIGS / "common.yaml"), str(CONFIGS / f"{task}.yaml")],
                          **{"_meta_#network_data_format#outputs#pred#num_channels": outputs,
                             "_meta_#network_data_format#inputs#image#spatial_shape": [64, 64]})


@pytest.mark.parametrize("task", ["classification", "regression", "segmentation"])
@pytest.mark.parametrize("extra", [(), ("evaluate.yaml",), ("inference.yaml",)])
def test_configs_parse(task, extra):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("common.yaml", f"{task}.yaml", *extra)])
    parser.parse()
    assert parser.get("run")


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_training_batches_are_plain_tensors_and_validation_keeps_meta(task, xray_root, tmp_path):
    """Training skips MetaTensor bookkeeping (its cost: benchmarks/results/trainers.md); the validation and test
    chains keep the meta data the reports and inverted outputs read."""
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("common.yaml", f"{task}.yaml")])
    parser.update({"bundle_root": str(BUNDLES / "downstream"), "output_dir": str(tmp_path), "image_size": 32,
                   "datalist": str(_default_datalist("segmentation" if task == "segmentation" else "pneumonia",
                                                     xray_root)), "max_items": 4, "use_tracking": False})
    parser.parse()
    train = parser.get_parsed_content("train#dataset")[0]
    validation = parser.get_parsed_content("validate#dataset")[0]
    assert type(train["image"]) is torch.Tensor and type(train["label"]) is torch.Tensor
    assert isinstance(validation["image"], MetaTensor) and "filename_or_obj" in validation["image"].meta
    assert train["image"].shape == validation["image"].shape == (1, 32, 32)


# -------------------------------------------------------------------------------------------------------- reports
def test_report_with_one_class_writes_null_auc_and_no_roc(tmp_path):
    from ignite.engine import Engine

    from muscle_ext.handlers import ClassificationReport

    batch = [{"pred": torch.tensor([0.3, 0.7]), "label": torch.tensor([0.0, 1.0])} for _ in range(5)]
    engine = Engine(lambda e, b: b)  # the "evaluator" emits decollated, post-processed items
    ClassificationReport(tmp_path, n_resamples=20, metric_prefix="x_").attach(engine)
    engine.run([batch, batch], max_epochs=1)
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: the undefined AUC is null
    assert metrics["n"] == 10 and metrics["roc_auc"]["value"] is None and metrics["sensitivity"]["value"] == 1.0
    assert metrics["figures"] == ["figures/confusion_matrix.png", "figures/reliability.png"]
    assert engine.state.metrics["x_accuracy"] == 1.0
    rows = (tmp_path / "per_case.csv").read_text().splitlines()
    assert rows[0] == "index,label,score" and len(rows) == 11 and rows[1] == "0,1,0.699999988079071"  # float32 0.7


# ----------------------------------------------------------------------------------------------------- datalists
def test_folder_datalist_and_subset(tmp_path, xray_root):
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(xray_root / "dicom" / "derived" / "RG3_half_uncompressed_MONOCHROME2.dcm", tmp_path / "a" / "b" / "IM1")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    items = datalist_from_folder(tmp_path)
    assert [Path(i["image"]).name for i in items] == ["IM1", "x.png"]  # suffix-less DICOM found, text skipped
    assert items[0]["case_id"] == case_id(tmp_path / "a" / "b" / "IM1", tmp_path) != case_id(tmp_path / "a" / "x.png")
    # ids depend on the path inside the folder only: moving the folder keeps them
    shutil.move(tmp_path / "a", tmp_path / "moved")
    assert [i["case_id"] for i in datalist_from_folder(tmp_path / "moved")] == \
        [case_id(tmp_path / "a" / "b" / "IM1", tmp_path / "a"), case_id(tmp_path / "a" / "x.png", tmp_path / "a")]
    labels = [i["label"] for i in load_datalist(xray_root / "pneumonia_nih" / "datalist.json")]
    picked = subset([{"label": v} for v in labels], 24)
    assert len(picked) == 24 and 0 < sum(p["label"] for p in picked) < 24  # a prefix would be all pneumonia


def test_screen_inputs_keeps_images_and_reports_the_rest_by_case_id(tmp_path, xray_root):
    inputs = tmp_path / "export"
    usable, bad = pacs_export(inputs, xray_root)
    # by default a folder lists images only: no DICOMDIR, no text file (pixel-less and damaged files need decoding)
    assert [Path(i["image"]) for i in datalist_from_folder(inputs)] == \
        sorted([*usable, bad["no_pixels"], bad["truncated_png"]])
    assert is_dicomdir(bad["dicomdir"]) and not is_dicomdir(usable[0]) and not is_dicomdir(bad["text"])
    shutil.copy(bad["dicomdir"], tmp_path / "INDEX")
    assert is_dicomdir(tmp_path / "INDEX")  # by its Media Storage SOP Class, whatever its name

    items = datalist_from_folder(inputs, all_files=True)
    good = screen_inputs(items, root=inputs, report_file=tmp_path / "skipped.csv", include_paths="true")
    assert [i["image"] for i in good] == [str(p) for p in usable]
    rows = _read_csv(tmp_path / "skipped.csv")  # paths (relative to the folder) only when asked for
    assert {r["file"]: r["case_id"] for r in rows} == {p.relative_to(inputs).as_posix(): case_id(p, inputs)
                                                       for p in bad.values()}
    # nothing to skip: skipped.csv is still written, header only
    screen_inputs(good, root=inputs, report_file=tmp_path / "none.csv", on_error="raise")
    assert (tmp_path / "none.csv").read_text().splitlines() == ["case_id,reason"]
    # datalist entries (no folder): case ids as PredictionSaver computes them, from the path as given
    assert screen_inputs([{"image": str(usable[0])}])[0]["case_id"] == case_id(usable[0])
    with pytest.raises(ValueError, match="none of the 2 files is a usable image"):
        screen_inputs([{"image": str(bad["text"])}, {"image": str(bad["dicomdir"])}], root=inputs,
                      report_file=tmp_path / "all_bad.csv")
    assert len(_read_csv(tmp_path / "all_bad.csv")) == 2
