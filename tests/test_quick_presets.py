"""The quick preset of every bundle, chained as the README runs them, on the real corpus: MD-MoCo pre-training ->
continual learning from its backbone -> fine-tuning pneumonia from the continual backbone. Run from one working
folder with no tracking settings, all three land in the one MLflow store every bundle shares by default
(mlflow.db there), and the lineage of each backbone is in its run's tags."""

from __future__ import annotations

import json
import re

import pytest

from muscle_ext.networks import load_backbone_checkpoint

from tests.bundle_utils import run_bundle


def _configs(bundle: str) -> list[str]:
    if bundle == "downstream":
        return ["common.yaml", "classification.yaml", "quick.yaml"]
    return ["train.yaml", "quick.yaml"]


@pytest.mark.slow  # ~4 minutes; the synthetic main-job test covers the chain in the default suite
@pytest.mark.timeout(1200)
def test_quick_presets_chain_into_one_store_with_lineage(tmp_path, xray_root):
    import mlflow

    ws = tmp_path / "workspace"  # the user's working folder
    ws.mkdir()
    runs = ws / "runs"

    def run(bundle: str, **overrides):
        return run_bundle(bundle, _configs(bundle), {"dataset_dir": xray_root, **overrides}, cwd=ws,
                          default_store=True, timeout=900)

    pretrain = run("muscle_pretrain", output_dir=runs / "md_moco")
    knn = [float(v) for v in re.findall(r"knn_auc: ([0-9.]+)", pretrain.stdout + pretrain.stderr)]
    assert len(knn) == 2 and all(0 <= v <= 1 for v in knn)  # the kNN monitor ran after each epoch
    md_moco = runs / "md_moco" / "models" / "backbone.pt"

    continual = run("muscle_continual", init_weights=md_moco, output_dir=runs / "muscle")
    assert "task lung (8 steps)" in continual.stdout + continual.stderr  # quick.yaml's budget entry for one task
    matrix = json.loads((runs / "muscle" / "forgetting.json").read_text())
    first = {v["task"]: v[v["task"]] for v in reversed(matrix["visits"])}  # each task's score after its first visit
    assert first["pneumonia"] > matrix["initial"]["pneumonia"] + 0.1, matrix  # training a task moves its score
    muscle = runs / "muscle" / "models" / "backbone.pt"  # under its output folder, not the bundle's models/
    assert load_backbone_checkpoint(muscle)["source"]["iteration"] == 3 * (12 + 12 + 8)

    down = run("downstream", init="checkpoint", init_weights=muscle, output_dir=runs / "pneumonia")
    aucs = [float(v) for v in re.findall(r"Epoch\[\d\] Metrics -- val_auc: ([0-9.]+)", down.stdout)]
    assert len(aucs) == 3 and max(aucs) > 0.7, aucs

    # one store, in the working folder; none in the output folders
    assert (ws / "mlflow.db").is_file() and not list(runs.rglob("mlruns.db")) and not list(runs.rglob("mlflow.db"))
    client = mlflow.MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    found = {}
    for name in ("muscle_pretrain", "muscle_continual", "muscle_downstream"):
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None, name
        training = [r for r in client.search_runs([experiment.experiment_id])
                    if r.data.tags.get("muscle.workflow", "train") == "train"]
        assert len(training) == 1, (name, [r.data.tags for r in training])
        found[name] = training[0]
    pre, cont, fine = found["muscle_pretrain"], found["muscle_continual"], found["muscle_downstream"]
    assert all(r.info.status == "FINISHED" for r in found.values())
    assert pre.data.params["datalist.pretrain.count"] == "3313"  # training 2739 + validation 574: hashes, no paths
    assert len(pre.data.params["datalist.pretrain.sha256"]) == 64
    assert {"train_loss", "knn_auc"} <= set(pre.data.metrics)
    assert any("backbone" in a.path for a in client.list_artifacts(pre.info.run_id))
    assert load_backbone_checkpoint(md_moco)["source"]["mlflow_run_id"] == pre.info.run_id
    assert cont.data.tags["muscle.parent_run_id"] == pre.info.run_id
    assert cont.data.tags["muscle.parent_bundle"] == "muscle_pretrain"
    assert fine.data.tags["muscle.parent_run_id"] == cont.info.run_id
    assert fine.data.tags["muscle.parent_bundle"] == "muscle_continual"
