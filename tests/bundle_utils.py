"""Helpers shared by test modules: run bundles the way users do (``python -m monai.bundle run``) in a subprocess,
the small settings of those runs, and the inputs several modules build (DICOM files, a PACS export, weights in
torchvision's layout, a saved best model). A helper used by one module stays in that module."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


def bundle_command(bundle: str, configs: Sequence[str], overrides: Mapping[str, object], run_id: str | None = None,
                   launcher: Sequence[str] = (sys.executable, "-m")) -> list[str]:
    root = BUNDLES / bundle
    files = [str(root / "configs" / c) for c in configs]
    cmd = [*launcher, "monai.bundle", "run"] + ([run_id] if run_id else [])
    cmd += ["--config_file", repr(files) if len(files) > 1 else files[0], "--bundle_root", str(root)]
    cmd += ["--logging_file", str(root / "configs" / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


# where bundle runs of the tests track when a test names no store: never the bundles' default (mlflow.db in the
# working folder, which is the repository for most tests)
FALLBACK_STORE = Path(tempfile.gettempdir()) / f"muscle_tests_{os.getuid()}" / "mlflow.db"


def bundle_env(threads: int = 1, extra: Mapping[str, str] | None = None,
               default_store: bool = False) -> dict[str, str]:
    """The environment of a bundle subprocess: this one's, minus a tracking server the developer may have exported
    (tests choose their store: :data:`FALLBACK_STORE` unless ``default_store``), plus ``extra`` (e.g.
    ``MLFLOW_TRACKING_URI``)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    if not default_store:
        FALLBACK_STORE.parent.mkdir(parents=True, exist_ok=True)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{FALLBACK_STORE}"
    env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    env.update(extra or {})
    return env


def run_bundle(bundle: str, configs: Sequence[str], overrides: Mapping[str, object], timeout: float = 600,
               run_id: str | None = None, launcher: Sequence[str] = (sys.executable, "-m"),
               cwd: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None, default_store: bool = False) -> subprocess.CompletedProcess:
    """Run a bundle; ``env`` adds environment variables (see :func:`bundle_env`). Raises with the output on failure.

    MLflow goes to ``<output_dir>/mlruns.db`` unless the test names a store (``tracking_uri``, or
    ``MLFLOW_TRACKING_URI`` in ``env``) or asks for the bundles' default (``default_store``: ``mlflow.db`` in
    ``cwd``)."""
    cmd = bundle_command(bundle, configs, overrides, run_id, launcher)
    extra = dict(env or {})
    named = "tracking_uri" in overrides  # the environment would win over it: leave the variable unset
    if "output_dir" in overrides and not (named or default_store or "MLFLOW_TRACKING_URI" in extra):
        # each test's own store in its output folder (the default, mlflow.db in the working folder, would put the
        # runs of all tests in one store in the repository): tests that check the default pass default_store
        extra["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(overrides['output_dir']).absolute()}/mlruns.db"
    full_env = bundle_env(extra=extra, default_store=default_store or named)
    if tuple(launcher) == (sys.executable, "-m") and os.environ.get("MUSCLE_TEST_PRELOAD", "1") != "0":
        proc = _run_preloaded(cmd, cwd or REPO, full_env, timeout)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


_SERVER = None


def _run_preloaded(cmd: list[str], cwd: str | os.PathLike, env: Mapping[str, str],
                   timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` in a fork of one server per test session that imported torch, MONAI and MLflow once (the main job's
    launcher, :mod:`muscle_ext.pipeline.preload`): the same process a fresh ``python -m monai.bundle run`` is, its
    stdout and stderr kept apart, without ~15 s of imports per run. ``MUSCLE_TEST_PRELOAD=0``: fresh interpreters."""
    global _SERVER
    import atexit

    from muscle_ext.pipeline.preload import PreloadServer

    if _SERVER is None:
        _SERVER = PreloadServer(bundle_env())
        atexit.register(_SERVER.close)
    with tempfile.TemporaryDirectory() as logs:
        out, err = Path(logs) / "stdout", Path(logs) / "stderr"
        status, _ = _SERVER.run(cmd, out, env, cwd=cwd, timeout=timeout, stderr_log=err)
        return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


# ------------------------------------------------------------------------------------- settings of small bundle runs
DOWNSTREAM_TASK_CONFIG = {"pneumonia": "classification.yaml", "knee": "classification.yaml",
                          "regression": "regression.yaml", "segmentation": "segmentation.yaml"}


def downstream_configs(task: str, *extra: str) -> list[str]:
    """The downstream bundle's config files for ``task`` (a key of :data:`DOWNSTREAM_TASK_CONFIG`), then ``extra``."""
    return ["common.yaml", DOWNSTREAM_TASK_CONFIG[task], *extra]


def tiny_downstream(tmp: Path, xray_root: Path, **extra) -> dict:
    """Downstream: one epoch on 16 evenly spaced images per split at 64 px: seconds per run on two CPU cores."""
    return {"dataset_dir": xray_root, "output_dir": tmp / "out", "model_dir": tmp / "models", "image_size": 64,
            "batch_size": 8, "num_epochs": 1, "max_items": 16, "num_workers": 0, "n_bootstrap": 200,
            "log_models": False, **extra}


def tiny_pretrain(tmp: Path, xray_root: Path, **extra) -> dict:
    """muscle_pretrain: a deterministic run of 2 epochs x 8 iterations on 32 px crops, checkpointing every 3
    iterations."""
    return {"dataset_dir": xray_root, "output_dir": tmp / "out", "model_dir": tmp / "models", "image_size": 32,
            "batch_size": 8, "num_epochs": 2, "warmup_epochs": 1, "queue_size": 40, "bn_splits": 2,
            "train#sampler#num_samples": 64, "cache": "none", "num_workers": 0, "ckpt_interval": 3,
            "knn_monitor": "false", "amp": "false", "channels_last": "false", "use_tracking": "false",
            **extra}  # yes/no settings as users type them


def tiny_detection(tmp: Path, datalist: Path, **extra) -> dict:
    """Downstream detection: 64 px, batch 4, 2 epochs x 2 iterations, a narrow FPN: seconds on a CPU."""
    return {"datalist": datalist, "output_dir": tmp / "out", "model_dir": tmp / "models", "image_size": 64,
            "batch_size": 4, "num_epochs": 2, "num_workers": 0, "cache": "none", "detector#fpn_channels": 32,
            "n_bootstrap": 20, **extra}


def detection_datalist(xray_root: Path, tmp: Path, n_train: int = 8, n_val: int = 4, n_test: int = 6) -> Path:
    """A few real TBX11K items per split, with both classes in training and test; absolute image paths."""
    from muscle_ext.data import load_datalist

    def pick(section: str, n: int) -> list[dict]:
        items = load_datalist(xray_root / "tb_detection_tbx11k" / "datalist.json", section)
        latent = [i for i in items if 1 in i["label"]][:2]
        return latent + [i for i in items if i not in latent and i["box"]][: n - len(latent)]

    path = tmp / "datalist.json"
    path.write_text(json.dumps({"training": pick("training", n_train), "validation": pick("validation", n_val),
                                "test": pick("test", n_test)}))
    return path


# --------------------------------------------------------------------------------------------------------- inputs
MARKER = "ZZMARKER7731"  # written into DICOM patient fields and file names; must appear in no output


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", with_pixels: bool = True,
                patient: str = "Anon^Test") -> None:
    """A 12-bit CR DICOM file of ``pixels`` (rows, columns), pixel spacing 0.2 x 0.1 mm."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.Modality = patient, patient, "CR"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.2, 0.1]
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def marked_dicoms(folder: Path, xray_root: Path, count: int = 2, section: str = "test") -> list[dict]:
    """Real chest X-rays saved as DICOM (MONOCHROME1 and 2) with the marker in PatientName/PatientID and file name."""
    from PIL import Image

    from muscle_ext.data import load_datalist, subset

    items = subset(load_datalist(xray_root / "pneumonia_nih" / "datalist.json", section), count)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, item in enumerate(items):
        pixels = np.asarray(Image.open(item["image"]).convert("L")).astype(np.uint16) * 16
        mono1 = k % 2 == 0
        path = folder / f"{MARKER}_{k}.dcm"
        write_dicom(path, 4095 - pixels if mono1 else pixels, "MONOCHROME1" if mono1 else "MONOCHROME2",
                    patient=f"{MARKER}^Jane")
        out.append({"image": str(path), "label": int(item["label"])})
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# what screen_inputs must say about each unusable file of the export (a fragment of the reason)
EXPORT_REASONS = {"dicomdir": "DICOMDIR", "no_pixels": "no pixel data", "truncated_png": "truncated",
                  "text": "unsupported file type"}


def pacs_export(folder: Path, xray_root: Path) -> tuple[list[Path], dict[str, Path]]:
    """A CD/PACS export as pydicom's FileSet writes it: a DICOMDIR beside suffix-less files (PT*/ST*/SE*/IM*): two
    real pneumonia_nih test images (MONOCHROME1 and 2), a real DICOM of the corpus and a CR object without pixel data,
    every one with the marker in its patient fields; plus a truncated real PNG (marker in its name) and a stray text
    file. Returns the usable image files and the unusable ones by kind (keys of ``EXPORT_REASONS``)."""
    import pydicom
    from pydicom.fileset import FileSet
    from pydicom.uid import generate_uid

    from muscle_ext.data import load_datalist

    staging = folder.parent / f"{folder.name}_staging"
    sources = [Path(i["image"]) for i in marked_dicoms(staging, xray_root)]
    real = staging / "real.dcm"
    shutil.copy(xray_root / "dicom" / "derived" / "RG3_half_uncompressed_MONOCHROME2.dcm", real)
    no_pixels = staging / "no_pixels.dcm"
    write_dicom(no_pixels, np.zeros((8, 8), np.uint16), with_pixels=False, patient=f"{MARKER}^Jane")
    fileset = FileSet()
    study, series = generate_uid(), generate_uid()
    for k, path in enumerate([*sources, real, no_pixels]):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = f"{MARKER}^Jane", MARKER
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyID, ds.SeriesNumber = study, series, "1", 1
        ds.StudyDate, ds.StudyTime, ds.InstanceNumber = "20240101", "120000", k + 1
        fileset.add(ds)
    fileset.write(folder)
    written = {Path(instance.path) for instance in fileset}
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in written}
    bad = {"dicomdir": folder / "DICOMDIR",
           "no_pixels": by_uid[pydicom.dcmread(no_pixels, stop_before_pixels=True).SOPInstanceUID]}
    usable = sorted(written - {bad["no_pixels"]})
    png = load_datalist(xray_root / "pneumonia_nih" / "datalist.json", "test")[0]["image"]
    bad["truncated_png"] = folder / f"{MARKER}_photo.png"
    bad["truncated_png"].write_bytes(Path(png).read_bytes()[:3000])
    bad["text"] = folder / "README.TXT"
    bad["text"].write_text(f"export of {MARKER}\n")
    shutil.rmtree(staging)
    assert len(usable) == 3 and all(p.suffix == "" and p.parent != folder for p in usable)
    return usable, bad


def check_skipped(out: Path, inputs: Path, bad: dict[str, Path], stdout: str) -> None:
    """skipped.csv lists exactly the unusable files, by case id and reason only; the log warns about each."""
    from muscle_ext.data import case_id

    rows = read_csv(out / "skipped.csv")
    assert list(rows[0]) == ["case_id", "reason"]
    reasons = {r["case_id"]: r["reason"] for r in rows}
    assert reasons.keys() == {case_id(p, inputs) for p in bad.values()} and len(rows) == len(bad)
    for kind, path in bad.items():
        assert EXPORT_REASONS[kind] in reasons[case_id(path, inputs)], (kind, reasons)
        assert f"{case_id(path, inputs)}: {reasons[case_id(path, inputs)]}" in stdout  # the warning
    assert f"skipping {len(bad)} of {len(bad) + 3} files" in stdout


# -------------------------------------------------------------------------------------------------------- weights
def _bn(prefix: str, channels: int, counters: bool) -> dict[str, torch.Tensor]:
    sd = {f"{prefix}.weight": torch.rand(channels) + 0.5, f"{prefix}.bias": torch.randn(channels),
          f"{prefix}.running_mean": torch.randn(channels), f"{prefix}.running_var": torch.rand(channels) + 0.5}
    if counters:
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(7)
    return sd


def torchvision_resnet18_state_dict(counters: bool = True) -> dict[str, torch.Tensor]:
    """torchvision.models.resnet18().state_dict() layout: names and shapes written out from torchvision's
    ResNet/BasicBlock definitions (downsample = Sequential(conv1x1, bn) in the first block of layers 2-4)."""
    g = torch.Generator().manual_seed(0)
    sd = {"conv1.weight": torch.randn(64, 3, 7, 7, generator=g), **_bn("bn1", 64, counters)}
    in_planes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (2, 2, 2, 2), strict=True), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            stride = 2 if (stage > 1 and b == 0) else 1
            sd[f"{p}.conv1.weight"] = torch.randn(planes, in_planes, 3, 3, generator=g)
            sd.update(_bn(f"{p}.bn1", planes, counters))
            sd[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3, generator=g)
            sd.update(_bn(f"{p}.bn2", planes, counters))
            if stride != 1 or in_planes != planes:
                sd[f"{p}.downsample.0.weight"] = torch.randn(planes, in_planes, 1, 1, generator=g)
                sd.update(_bn(f"{p}.downsample.1", planes, counters))
            in_planes = planes
    sd["fc.weight"] = torch.randn(1000, 512, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    return sd


def save_best_model(model_dir: Path, network: torch.nn.Module, settings: dict) -> Path:
    """models/model.pt as the bundles' BestModelSaver writes it at a new best validation score."""
    from ignite.engine import Engine

    from muscle_ext.handlers import BestModelSaver

    saver = BestModelSaver(str(model_dir), {"model": network}, settings=settings, save_key_metric=True,
                           key_metric_filename="model.pt")
    engine = Engine(lambda e, b: None)
    engine.state.key_metric_name, engine.state.metrics = "val", {"val": 0.5}
    saver._key_metric_checkpoint(engine)  # what its EPOCH_COMPLETED handler runs
    return model_dir / "model.pt"
