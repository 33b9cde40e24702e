"""The muscle_pretrain bundle run as users run it: on the pooled real X-rays, resumed after a kill, under torchrun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from muscle_ext.networks import load_backbone_checkpoint

from tests.bundle_utils import bundle_command, bundle_env, run_bundle
from tests.bundle_utils import tiny_pretrain as tiny

TRAIN = ["train.yaml"]


def test_pretrain_writes_a_backbone_from_pooled_real_xrays(tmp_path, xray_root):
    overrides = tiny(tmp_path, xray_root, knn_monitor=True,
                     monitor_datalist=xray_root / "pneumonia_nih" / "datalist.json", monitor_size=48, knn_interval=2,
                     amp=True, channels_last=True, use_tracking=True)
    proc = run_bundle("muscle_pretrain", TRAIN, overrides)
    payload = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")
    assert payload["arch"] == "resnet18" and payload["source"]["iteration"] == 16
    assert "knn_auc" in proc.stdout and "embedding_spread" in proc.stdout


def _final_state(folder: Path) -> dict:
    from muscle_ext.handlers import latest_checkpoint

    kept = sorted(p.name for p in folder.glob("*.pt"))
    assert len(kept) == 1, kept  # keep_checkpoints 1: the newest resumable state only
    return torch.load(latest_checkpoint(folder), map_location="cpu", weights_only=True)


def test_killed_run_resumes_to_the_same_weights(tmp_path, xray_root):
    reference = run_bundle("muscle_pretrain", TRAIN, tiny(tmp_path / "a", xray_root))
    assert "resuming mid-epoch" not in reference.stdout

    overrides = tiny(tmp_path / "b", xray_root)
    ckpt_dir = tmp_path / "b" / "out" / "checkpoints"
    proc = subprocess.Popen(bundle_command("muscle_pretrain", TRAIN, overrides), env=bundle_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(ckpt_dir.glob("checkpoint_6.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-epoch: 8 iterations per epoch
    proc.wait()
    assert not list(ckpt_dir.glob("checkpoint_16.pt")), "the run finished before it could be killed"
    resumed = run_bundle("muscle_pretrain", TRAIN, overrides)
    assert "resuming mid-epoch" in resumed.stdout

    again = run_bundle("muscle_pretrain", TRAIN, overrides)  # the finished run says so and how to extend it
    assert "training already finished at epoch 2" in again.stdout + again.stderr

    a, b = _final_state(tmp_path / "a" / "out" / "checkpoints"), _final_state(ckpt_dir)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 16
    assert int(a["model"]["queue_ptr"]) == int(b["model"]["queue_ptr"]) == (16 * 8) % 40
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_torchrun_two_processes_on_cpu(tmp_path, xray_root):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731", "-m"]
    overrides = tiny(tmp_path, xray_root, num_epochs=1)
    run_bundle("muscle_pretrain", ["train.yaml", "multi_gpu_train.yaml"], overrides, launcher=launcher)
    payload = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")
    # 64 draws per epoch split over 2 ranks of batch 8: 4 iterations.
    assert payload["source"]["iteration"] == 4
    ckpt = _final_state(tmp_path / "out" / "checkpoints")
    assert int(ckpt["model"]["queue_ptr"]) == (4 * 8 * 2) % 40  # keys of both ranks were enqueued


@pytest.mark.parametrize("name", ["train.yaml", "multi_gpu_train.yaml", "quick.yaml"])
def test_configs_parse(name):
    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundles" / "muscle_pretrain" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / name)])  # overrides merge after train.yaml
    assert parser.get("train#trainer#_target_") == "muscle_ext.engines.MoCoTrainer"


def test_evaluate_and_inference_configs(tmp_path, xray_root):
    """evaluate.yaml scores a frozen backbone (and the random-init baseline); inference.yaml embeds a datalist."""
    import csv
    import json

    import numpy as np

    from muscle_ext.metrics import roc_auc
    from muscle_ext.networks import build_backbone, save_backbone

    torch.manual_seed(0)
    backbone = tmp_path / "backbone.pt"
    save_backbone(backbone, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True}, {"bundle": "test"})
    common = {"dataset_dir": xray_root, "image_size": 32, "num_workers": 0}
    for init in ("checkpoint", "scratch"):
        weights = {"backbone_path": backbone} if init == "checkpoint" else {}  # scratch reads none: refused there
        run_bundle("muscle_pretrain", ["evaluate.yaml"], {**common, "init": init, **weights,
                                                          "output_dir": tmp_path / init, "n_resamples": 100})
        report = json.loads((tmp_path / init / "metrics.json").read_text())
        assert report["n_reference"] == 707 and report["n_query"] == 160 and report["init"] == init
        for key in ("knn_auc", "linear_probe_auc"):
            auc = report[key]
            assert 0 <= auc["ci_low"] <= auc["value"] <= auc["ci_high"] <= 1
        # per-case scores for paired comparisons: one row per test image, labels as in the datalist, no paths
        rows = list(csv.DictReader((tmp_path / init / "query_scores.csv").open()))
        labels = [item["label"] for item in json.loads((xray_root / "pneumonia_nih/datalist.json").read_text())["test"]]
        assert [int(r["label"]) for r in rows] == labels and list(rows[0]) == ["index", "label", "knn", "linear_probe"]
        assert roc_auc([int(r["label"]) for r in rows], [float(r["knn"]) for r in rows]) == pytest.approx(
            report["knn_auc"]["value"], abs=1e-12)
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / init / 'mlruns.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("muscle_pretrain").experiment_id])
        assert run.data.metrics["knn_auc.value"] == pytest.approx(report["knn_auc"]["value"])
        assert (run.data.tags.get("muscle.parent_checkpoint_sha256") is not None) == (init == "checkpoint")

    datalist = tmp_path / "few.json"
    datalist.write_text(json.dumps({"validation": [{"image": str(p)} for p in sorted(
        (xray_root / "dicom").rglob("*.dcm"))]}))
    run_bundle("muscle_pretrain", ["inference.yaml"], {**common, "backbone_path": backbone, "datalist": datalist,
                                                       "output_dir": tmp_path / "emb"})
    saved = np.load(tmp_path / "emb" / "embeddings.npz")
    assert saved["embeddings"].shape == (6, 512) and saved["index"].tolist() == list(range(6))
    exported = load_backbone_checkpoint(tmp_path / "emb" / "backbone.pt")
    reference = load_backbone_checkpoint(backbone)
    assert all(torch.equal(v, exported["state_dict"][k]) for k, v in reference["state_dict"].items())


def test_pretraining_continues_a_backbone_on_a_hospitals_own_images(tmp_path, xray_root, start):
    """Continual pre-training: a MUSCLE/MD-MoCo backbone (here the test's `start` file) continued by MoCo on a
    hospital's own unlabelled images (pneumonia_site2 stands in); the result keeps the start's constructor
    arguments, says where it started, and its weights stay near the start's (a fresh random init would not)."""
    import mlflow
    import torch.nn.functional as F

    overrides = tiny(tmp_path, xray_root, num_epochs=1, init="checkpoint", init_weights=start, use_tracking="true",
                     pretrain_datalist=xray_root / "pneumonia_site2" / "datalist.json")
    run_bundle("muscle_pretrain", TRAIN, overrides)
    payload = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")
    assert payload["source"]["init"] == "checkpoint" and payload["backbone_kwargs"] == {"imagenet_stem": True}
    assert payload["settings"]["init"] == "checkpoint" and payload["settings"]["init_weights"]
    before = load_backbone_checkpoint(start)["state_dict"]

    def similarity(key: str, other: dict) -> float:
        return float(F.cosine_similarity(payload["state_dict"][key].flatten(), other[key].flatten(), dim=0))

    assert similarity("layer3.0.conv1.weight", before) > 0.9
    from muscle_ext.networks import build_backbone

    torch.manual_seed(1)
    assert abs(similarity("layer3.0.conv1.weight", build_backbone("resnet18", imagenet_stem=True).state_dict())) < 0.2
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert any("mdmocorun7" in json.dumps(run.data.tags) for run in runs)  # lineage: the run it continued
