"""The muscle_continual bundle run as users run it, on real X-rays of the paper's four tasks: from an MD-MoCo-format
checkpoint, tracked in MLflow, extended by a rerun with more rounds (which resumes from the last round), exported for
the downstream bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from muscle_ext.networks import build_backbone, load_backbone_checkpoint

from tests.bundle_utils import BUNDLES, run_bundle

TRAIN = ["train.yaml"]
TASKS = ("pneumonia", "knee", "lung", "tb")
METRICS = {"pneumonia_auc", "knee_auc", "lung_dice", "tb_map"}


def tiny(tmp: Path, xray_root: Path, start: Path, **extra) -> dict:
    """Rounds of 4 task visits x 2 iterations of batch 8 at 64 px, validating on 16 images per task."""
    return {"dataset_dir": xray_root, "output_dir": tmp / "out", "model_dir": tmp / "models", "init_weights": start,
            "image_size": 64, "batch_size": 8, "rounds": 2, "steps_per_visit": 2, "max_items": 16, "num_workers": 0,
            "tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", **extra}


def _visits(log: str) -> list[tuple[int, str]]:
    return [(int(r), t) for r, t in re.findall(r"round (\d+): task (\w+) \(", log)]


def test_continual_rounds_resume_and_export(tmp_path, xray_root, start):
    overrides = tiny(tmp_path, xray_root, start)
    first = run_bundle("muscle_continual", TRAIN, overrides)
    visits = _visits(first.stdout)
    assert [r for r, _ in visits] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert all(sorted(t for r, t in visits if r == n) == sorted(TASKS) for n in (1, 2))

    metrics = json.loads((tmp_path / "out" / "task_metrics.json").read_text())
    assert sorted(metrics["rounds"]) == ["1", "2"]
    assert all(METRICS <= set(m) for m in metrics["rounds"].values())  # detection: AP50, AP75 beside its mAP
    assert METRICS <= set(metrics["summary"]) and "tb_map_ap50" in metrics["rounds"]["2"]

    # R[visit, task]: every task validated after every visit, with its summaries
    matrix = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert [(v["round"], v["task"]) for v in matrix["visits"]] == visits and set(matrix["initial"]) == set(TASKS)
    assert matrix["visits"][-1]["pneumonia"] == metrics["rounds"]["2"]["pneumonia_auc"]  # the round-end score
    assert {"average", "bwt", "fwt", "mean_forgetting"} <= set(matrix["summary"])
    assert (tmp_path / "out" / "forgetting_matrix.png").stat().st_size > 1000

    after_two = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")["state_dict"]
    # one more round: resumes at the end of round 2 (history kept), continues the schedule with round 3, and trains
    # (the learning-rate schedule follows the new number of rounds, not the finished run's)
    more = run_bundle("muscle_continual", TRAIN, {**overrides, "rounds": 3})
    assert _visits(more.stdout) == [(3, t) for _, t in _visits(more.stdout)] and len(_visits(more.stdout)) == 4
    metrics = json.loads((tmp_path / "out" / "task_metrics.json").read_text())
    assert sorted(metrics["rounds"]) == ["1", "2", "3"]
    rows = (tmp_path / "out" / "forgetting_matrix.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 and rows[-1].split(",")[:2] == ["12", "3"]  # the resumed run kept the earlier visits

    payload = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")
    assert payload["arch"] == "resnet18" and payload["backbone_kwargs"] == {"imagenet_stem": True}
    assert payload["source"]["bundle"] == "muscle_continual" and payload["source"]["iteration"] == 24
    assert payload["source"]["tasks"] == list(TASKS)
    assert not torch.equal(payload["state_dict"]["layer4.1.conv2.weight"], after_two["layer4.1.conv2.weight"])
    backbone = build_backbone("resnet18", imagenet_stem=True)
    backbone.load_state_dict(payload["state_dict"])  # strict: the downstream bundle's init=checkpoint loads it
    # a rerun of the finished run says so and how to extend it, instead of ending silently
    again = run_bundle("muscle_continual", TRAIN, {**overrides, "rounds": 3})
    said = again.stdout + again.stderr
    assert "training already finished at round 3" in said and "--rounds 6" in said

    # configs/evaluate.yaml: every head of the newest checkpoint on its task's test split; the image size comes
    # from backbone.pt, and a contradicting one is refused before any image is read
    evaluate = {k: v for k, v in overrides.items() if k not in ("image_size", "init_weights")}
    run_bundle("muscle_continual", [*TRAIN, "evaluate.yaml"], evaluate)
    report = json.loads((tmp_path / "out" / "test_metrics.json").read_text())
    assert set(report) == set(TASKS) and report["lung"]["n"] == 16 and 0 <= report["lung"]["lung_dice"] <= 1
    assert report["pneumonia"]["pneumonia_auc"] is not None and report["knee"]["n"] == 16
    assert 0 <= report["tb"]["tb_map"] <= 1 and report["tb"]["n"] == 16
    import subprocess

    from tests.bundle_utils import bundle_command, bundle_env

    for extra, said in (({"image_size": 96}, "image_size"), ({"tasks": "['pneumonia','lung']"}, "--tasks")):
        refused = subprocess.run(bundle_command("muscle_continual", [*TRAIN, "evaluate.yaml"], {**evaluate, **extra}),
                                 capture_output=True, text=True, timeout=300, env=bundle_env())
        assert refused.returncode != 0 and said in refused.stderr and "Traceback" not in refused.stderr, refused.stderr

    import mlflow

    client = mlflow.MlflowClient(overrides["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("muscle_continual").experiment_id])
    logged = {key for run in runs for key in run.data.metrics}
    assert {"pneumonia_loss", "knee_loss", "lung_loss", "tb_loss", *METRICS} <= logged
    assert str(xray_root) not in json.dumps([run.data.params for run in runs])  # no data paths in MLflow


def test_joint_baseline_trains_every_task_in_every_step(tmp_path, xray_root, start):
    """--task_mixing joint: one visit per round trains all tasks (their losses logged apart), the matrix has a row per
    round, and the exported backbone says how it was trained; a memorization weight given with it is refused."""
    overrides = {**tiny(tmp_path, xray_root, start, tasks="['pneumonia','tb']"), "task_mixing": "joint",
                 "use_tracking": False}
    proc = run_bundle("muscle_continual", TRAIN, overrides)
    assert _visits(proc.stdout) == [(1, "joint"), (2, "joint")]
    matrix = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert [v["task"] for v in matrix["visits"]] == ["joint", "joint"]
    assert matrix["summary"]["bwt"] is None and matrix["summary"]["per_task"]["tb"]["forgetting"] is not None
    assert load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")["source"]["task_mixing"] == "joint"
    import subprocess

    from tests.bundle_utils import bundle_command, bundle_env

    refused = subprocess.run(bundle_command("muscle_continual", TRAIN, {**overrides, "memorization_weight": 0.01}),
                             capture_output=True, text=True, timeout=300, env=bundle_env())
    assert refused.returncode != 0 and "--memorization_weight is ignored with task_mixing joint" in refused.stderr


@pytest.mark.timeout(300)
def test_multi_gpu_train_runs_two_gloo_processes(tmp_path, xray_root, start):
    """configs/multi_gpu_train.yaml under torchrun: each process trains on its shard, the replicas stay identical
    (ReplicaSync checks at the end), and rank 0 alone writes the checkpoint, backbone.pt and the metric files."""
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29753", "-m"]
    overrides = {**tiny(tmp_path, xray_root, start, image_size=32, batch_size=4, max_items=12),
                 "tasks": "['pneumonia','lung','tb']", "use_tracking": False}
    proc = run_bundle("muscle_continual", [*TRAIN, "multi_gpu_train.yaml"], overrides, launcher=launcher, timeout=280)
    log = proc.stdout + proc.stderr
    assert log.count("replicas in sync on 2 processes (largest parameter difference 0)") == 2
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["checkpoint_12.pt"]
    assert log.count("backbone saved: backbone.pt") == 1
    matrix = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert len(matrix["visits"]) == 6 and set(matrix["initial"]) == {"pneumonia", "lung", "tb"}
    assert all(0 <= row["tb"] <= 1 for row in matrix["visits"])  # detection mAP gathered from both ranks


def test_metadata_verifies():
    from monai.bundle import verify_metadata

    configs = BUNDLES / "muscle_continual" / "configs"
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(BUNDLES / "metadata_schema.json"))
