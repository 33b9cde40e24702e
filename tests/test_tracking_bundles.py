"""Every bundle run tracked on a real ``mlflow server``: pre-training, fine-tuning from its backbone and the test
report arrive with params, metrics, artifacts and lineage; a server that dies mid-run costs one warning, not the
run; and no patient identifier (DICOM fields, folder and file names) reaches the store, the logs or the outputs.

Runs are the bundles' smallest configs (about 30 s each on two shared CPU cores). One pre-training run on marked
DICOMs serves the tracking, lineage and privacy tests (a second one would cost another 30 s).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from muscle_ext.data import load_datalist, subset
from muscle_ext.handlers import datalist_fingerprint
from muscle_ext.networks import file_sha256, load_backbone_checkpoint

from tests.bundle_utils import bundle_command, bundle_env, run_bundle
from tests.bundle_utils import tiny_pretrain as pretrain_tiny
from tests.bundle_utils import write_dicom as _write_dicom
from tests.mlflow_server import MlflowServer

mlflow = pytest.importorskip("mlflow")

MARKER = "QQTRACKMARK2093"  # in DICOM PatientName/PatientID, file names and the data folder's name
PRETRAIN = ["train.yaml"]
CLASSIFICATION = ["common.yaml", "classification.yaml"]
UNAVAILABLE = "tracking store unavailable ("


def downstream_tiny(tmp: Path, xray_root: Path, **extra) -> dict:
    """As tests/test_downstream_bundle.py: one epoch on 24 images per split at 64 px (3 training iterations)."""
    return {"dataset_dir": xray_root, "output_dir": tmp / "out", "model_dir": tmp / "models", "image_size": 64,
            "batch_size": 8, "num_epochs": 1, "max_items": 24, "num_workers": 0, "n_bootstrap": 200, **extra}


def _client(server):
    return mlflow.MlflowClient(server.uri)


def _only_run(client, experiment: str, workflow: str | None = None):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} on the server"
    query = f"tags.`muscle.workflow` = '{workflow}'" if workflow else ""
    runs = client.search_runs([exp.experiment_id], filter_string=query)
    assert len(runs) == 1, [(r.info.run_name, r.data.tags.get("muscle.workflow")) for r in runs]
    return runs[0]


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact path of a run (folders walked)."""
    out = set()
    for entry in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return out


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def marked_datalist(tmp_path_factory, xray_root) -> Path:
    """Real chest X-rays saved as DICOM with the marker in PatientName/PatientID and file names, in a folder whose
    name holds the marker, with a pretrain datalist (``dataset``/``body_part`` tags, paths relative to it)."""
    folder = tmp_path_factory.mktemp("data") / f"site_{MARKER}"
    folder.mkdir()
    items = []
    for k, item in enumerate(subset(load_datalist(xray_root / "pneumonia_nih" / "datalist.json", "training"), 8)):
        pixels = np.asarray(Image.open(item["image"]).convert("L").resize((256, 256))).astype(np.uint16) * 16
        name = f"{MARKER}_{k}.dcm"
        _write_dicom(folder / name, pixels, patient=f"{MARKER}^Jane")
        items.append({"image": name, "dataset": ["nih_chestxray14", "clinic_b"][k % 2], "body_part": "chest"})
    datalist = folder / "pretrain_datalist.json"
    datalist.write_text(json.dumps({"training": items}, indent=1))
    return datalist


@pytest.fixture(scope="module")
def spare_server(tmp_path_factory, store_template):
    """A second server, for the test that stops its server. Started without waiting: it boots while the shared
    server boots and the first bundle runs (``pretrain`` requests it first for that reason); wait_ready() before use.
    """
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_spare"), store_template).start()
    yield server
    server.stop(grace=3)


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory, spare_server, marked_datalist, mlflow_server) -> dict:
    """The pretrain bundle's train config (tiny: 1 epoch of 8 iterations), tracked through MLFLOW_TRACKING_URI."""
    root = tmp_path_factory.mktemp("pretrain")
    overrides = pretrain_tiny(root, marked_datalist.parent, num_epochs=1, use_tracking=True)
    proc = run_bundle("muscle_pretrain", PRETRAIN, overrides, env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    return {"root": root, "backbone": root / "models" / "backbone.pt", "datalist": marked_datalist,
            "logs": proc.stdout + proc.stderr}


# ----------------------------------------------------------------------------------------- 1. what arrives, lineage
def test_pretrain_run_arrives_with_params_metrics_and_artifacts(pretrain, mlflow_server):
    client = _client(mlflow_server)
    run = _only_run(client, "muscle_pretrain")
    assert run.info.status == "FINISHED" and run.data.tags["muscle.workflow"] == "train"
    assert run.data.tags["muscle.bundle"] == "MUSCLE MD-MoCo pre-training (X-ray)"  # from configs/metadata.json
    assert run.data.tags["muscle.bundle_version"] == "0.1.0"
    p = run.data.params
    # the resolved config, flattened, after the command-line overrides; data locations as hashes only
    assert p["config.num_epochs"] == "1" and p["config.image_size"] == "32" and p["config.arch"] == "resnet18"
    assert p["config.train.optimizer._target_"] == "torch.optim.SGD"
    assert p["config.dataset_dir"].startswith("sha256:") and p["config.pretrain_datalist"].startswith("sha256:")
    assert {"version.muscle_ext", "version.monai", "version.torch", "version.mlflow", "torch_initial_seed"} <= set(p)
    assert p["version.torch"] == torch.__version__ and p["seed"] == "0"
    fingerprint = datalist_fingerprint(pretrain["datalist"])
    assert p["datalist.pretrain.sha256"] == fingerprint["sha256"] and p["datalist.pretrain.count"] == "8"
    assert p["max_epochs"] == "1" and p["epoch_length"] == "8"

    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == list(range(1, 9))  # one value per iteration
    assert all(np.isfinite(m.value) for m in losses)

    artifacts = _artifacts(client, run.info.run_id)
    assert {"backbone.pt", "config/config.json", "summary/metrics.json", "summary/metrics.png"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "backbone.pt", str(pretrain["root"] / "dl")))
    assert file_sha256(local) == file_sha256(pretrain["backbone"])  # the uploaded backbone is the exported one
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary/metrics.json",
                                                        str(pretrain["root"] / "dl"))).read_text())
    assert summary["iterations"] == 8 and "train_loss" in summary["last_logged"]
    source = load_backbone_checkpoint(pretrain["backbone"])["source"]
    assert source["mlflow_run_id"] == run.info.run_id and source["bundle"] == "muscle_pretrain"
    assert f"run {run.info.run_id} complete; everything was logged" in pretrain["logs"]


def test_downstream_runs_carry_the_pretrain_lineage(pretrain, mlflow_server, xray_root, tmp_path):
    """Fine-tuning from the exported backbone (tracking_uri override) and its test report (MLFLOW_TRACKING_URI)."""
    client = _client(mlflow_server)
    parent = _only_run(client, "muscle_pretrain")
    settings = downstream_tiny(tmp_path, xray_root, init="checkpoint", init_weights=pretrain["backbone"],
                               log_models=True)
    run_bundle("downstream", CLASSIFICATION, {**settings, "tracking_uri": mlflow_server.uri})

    train = _only_run(client, "muscle_downstream", "train")
    assert train.info.status == "FINISHED"
    tags, p = train.data.tags, train.data.params
    assert tags["muscle.parent_run_id"] == parent.info.run_id
    assert tags["muscle.parent_checkpoint_sha256"] == file_sha256(pretrain["backbone"])
    assert tags["muscle.parent_bundle"] == "muscle_pretrain" and tags["muscle.parent_epoch"] == "1"
    assert p["config.init"] == "checkpoint" and p["config.max_items"] == "24" and p["seed"] == "0"
    assert p["config.init_weights"].startswith("sha256:")  # a path outside the bundle and output folders
    assert {"version.muscle_ext", "version.monai", "version.torch"} <= set(p)
    fingerprint = datalist_fingerprint(xray_root / "pneumonia_nih" / "datalist.json")
    assert p["datalist.datalist.sha256"] == fingerprint["sha256"]
    assert p["datalist.datalist.count"] == str(fingerprint["count"])
    assert [m.step for m in client.get_metric_history(train.info.run_id, "train_loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val_auc")] == [1]  # the validator joined
    artifacts = _artifacts(client, train.info.run_id)
    assert {"model.pt", "backbone.pt", "config/config.json", "summary/metrics.json"} <= artifacts
    exported = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")["source"]
    assert exported["mlflow_run_id"] == train.info.run_id  # the next stage's lineage starts here

    evaluate = {k: v for k, v in settings.items() if k != "init_weights"}
    run_bundle("downstream", [*CLASSIFICATION, "evaluate.yaml"], evaluate,
               env={"MLFLOW_TRACKING_URI": mlflow_server.uri})
    report = _only_run(client, "muscle_downstream", "evaluate")
    assert report.info.status == "FINISHED" and report.info.run_id != train.info.run_id
    model_sha = file_sha256(tmp_path / "models" / "model.pt")
    assert report.data.tags["muscle.parent_checkpoint_sha256"] == model_sha
    uploaded = client.download_artifacts(train.info.run_id, "model.pt", str(tmp_path / "dl"))
    assert file_sha256(uploaded) == model_sha  # the evaluated model is the training run's artifact
    assert "test_roc_auc" in report.data.metrics and "test_accuracy_ci_low" in report.data.metrics
    artifacts = _artifacts(client, report.info.run_id)
    assert {"metrics.json", "figures/roc_curve.png", "summary/metrics.json"} <= artifacts
    local = client.download_artifacts(report.info.run_id, "metrics.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text()) == json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert not (tmp_path / "out" / "mlruns.db").exists()  # everything went to the server


# ------------------------------------------------------------------------------------- 2. the server dies mid-run
def test_server_stopped_mid_run_training_finishes(spare_server, xray_root, tmp_path):
    try:
        server = spare_server.wait_ready()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    overrides = pretrain_tiny(tmp_path, xray_root, num_epochs=1, use_tracking=True)  # 8 iterations of 8 real PNGs
    ckpt_dir = tmp_path / "out" / "checkpoints"
    log = tmp_path / "run.log"
    env = bundle_env(extra={"MLFLOW_TRACKING_URI": server.uri})
    with open(log, "w") as out:
        proc = subprocess.Popen(bundle_command("muscle_pretrain", PRETRAIN, overrides), env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (ckpt_dir / "checkpoint_3.pt").exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.05)
            # Freeze training while the server goes down, so that the outage surely falls in the middle of the run
            # (the poll sees the checkpoint within 50 ms; the 5 iterations left decode 40 PNGs of 1024 px).
            proc.send_signal(signal.SIGSTOP)
            assert not (ckpt_dir / "checkpoint_8.pt").exists(), "the run ended before the server could be stopped"
            server.stop()
            proc.send_signal(signal.SIGCONT)
            t0 = time.monotonic()
            assert proc.wait(timeout=300) == 0, log.read_text()[-6000:]
            rest = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    text = log.read_text()

    assert (ckpt_dir / "checkpoint_8.pt").is_file()
    source = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")["source"]
    assert source["iteration"] == 8 and source["mlflow_run_id"]  # the run was opened before the outage
    assert text.count(UNAVAILABLE) == 1, text[-6000:]  # one warning, not one per iteration
    summary = re.findall(r"tracking incomplete for run (\w+): not logged (\d+) params, (\d+) tags, (\d+) metrics, "
                         r"(\d+) artifacts \(the store was still unreachable at the end\)", text)
    assert len(summary) == 1, text[-6000:]
    run_id, _, _, metrics, artifacts = summary[0]
    assert run_id == source["mlflow_run_id"]
    assert int(metrics) > 0 and int(artifacts) >= 3  # backbone.pt, summary/metrics.json and metrics.png at least
    assert rest < 120  # the 5 iterations left and the end of the run: a dead server costs seconds, not minutes


# -------------------------------------------------------------------------------------------------- 3. privacy
def test_no_patient_identifier_reaches_store_logs_or_outputs(pretrain, mlflow_server):
    run = _only_run(_client(mlflow_server), "muscle_pretrain")
    assert run.data.params["datalist.pretrain.count"] == "8"  # the data was fingerprinted, not left out
    assert MARKER not in pretrain["logs"], [ln for ln in pretrain["logs"].splitlines() if MARKER in ln][:5]
    assert "dataset_dir: sha256:" in pretrain["logs"]  # MONAI's input summary, redacted
    checked = []
    for folder in (mlflow_server.root, pretrain["root"]):  # srv.db, artifacts/, server.log; out/, models/
        for path in folder.rglob("*"):
            assert MARKER not in str(path.relative_to(folder)), path
            if path.is_file():  # SQLite pages and torch zip checkpoints alike: search the raw bytes
                assert MARKER.encode() not in path.read_bytes(), path
                checked.append(path.name)
    assert (mlflow_server.db).is_file() and list(mlflow_server.artifacts.rglob("backbone.pt"))
    # the store, the server log, the uploaded and the local backbone, the resumable state were all searched
    assert {mlflow_server.db.name, "backbone.pt", "checkpoint_8.pt", "metrics.json"} <= set(checked), checked


def test_input_summary_lines_are_redacted(tmp_path, monkeypatch):
    """The filter that `check_overrides` (the first step of every config's `initialize`, which MONAI runs before it
    prints its input summary of every command-line argument) puts on MONAI's logger, on the lines MONAI writes: keys
    by the key rule, paths by the allowed roots. Importing muscle_ext installs nothing."""
    import logging
    import pprint
    import sys

    from muscle_ext.bundle_checks import check_overrides
    from muscle_ext.handlers import InputSummaryRedactor

    target = logging.getLogger("monai.bundle.scripts")
    monkeypatch.setattr(target, "filters", [f for f in target.filters if not isinstance(f, InputSummaryRedactor)])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # check_overrides installs the error hook too
    check_overrides("test bundle", argv=[])
    check_overrides("test bundle", argv=[])  # a second workflow in the same process: still one filter
    installed = [f for f in target.filters if isinstance(f, InputSummaryRedactor)]
    assert len(installed) == 1
    data = f"/mnt/site_{MARKER}/{'a long folder name/' * 6}images"  # pprint splits it (at spaces) over lines
    args = {"bundle_root": str(tmp_path / "bundle"), "output_dir": str(tmp_path / "out"),
            "logging_file": str(tmp_path / "bundle" / "configs" / "logging.conf"), "dataset_dir": data,
            "train#dataset#data_root": "relative", "cache_dir": data, "ckpt_interval": 3, "tracking_uri": "http://h:5000",
            "model_dir": str(tmp_path / "out" / "models"), "init_weights": str(tmp_path / "out" / "w.pt"),
            "extra_list": ["a", data], "note": "plain words"}
    lines = ["--- input summary of monai.bundle.scripts.run ---"]
    lines += [f"> {k}: {pprint.pformat(v)}" for k, v in args.items()]
    assert "\n" in lines[4]  # the case the filter must parse back
    out = []
    for line in lines:
        record = logging.LogRecord("monai.bundle.scripts", logging.INFO, __file__, 1, line, None, None)
        assert installed[0].filter(record)  # never drops a line
        out.append(record.getMessage())
    text = "\n".join(out)
    assert MARKER not in text and "relative" not in text
    kept = {k: args[k] for k in ("bundle_root", "output_dir", "logging_file", "ckpt_interval", "tracking_uri",
                                 "model_dir", "init_weights", "note")}
    for key, value in kept.items():
        assert f"> {key}: {pprint.pformat(value)}" in out, key
    assert "> dataset_dir: sha256:" in text and "> train#dataset#data_root: sha256:" in text
    assert "> cache_dir: sha256:" in text and "> extra_list: ['a', 'sha256:" in text
