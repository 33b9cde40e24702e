"""Tasks as specs in muscle_continual (issue #13): the spec checks (one line, before any data), the factory for each
kind on real X-rays (heads on one backbone, loaders, losses, validation metrics), and the bundle run as users run it:
a subset of tasks, an unknown task name, and a hospital's own labelled task added by one spec entry."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from muscle_ext.engines import TaskSet, TaskValidation, parse_task_specs
from muscle_ext.handlers import MetricHistory
from muscle_ext.networks import (
    BackboneClassifier,
    BackboneRegressor,
    BackboneSegmenter,
    build_backbone,
    load_backbone_checkpoint,
)
from muscle_ext.settings import SettingsError

from tests.bundle_utils import REPO, bundle_command, bundle_env, run_bundle

TRAIN = ["train.yaml"]


def _specs(root: Path) -> dict:
    return {"pneumonia": {"kind": "classification", "datalist": str(root / "pneumonia_nih" / "datalist.json")},
            "lung": {"kind": "segmentation", "datalist": str(root / "lung_seg_cxr" / "datalist.json"),
                     "mask_key": "label", "steps": 3},
            "boneage": {"kind": "regression", "datalist": str(root / "hand_boneage" / "datalist.json"), "flip": True,
                        "loss_weight": 0.5}}


# ------------------------------------------------------------------------------------------------ spec checks
def test_selection_keeps_the_order_asked_for_and_fills_defaults(xray_root):
    specs = parse_task_specs(_specs(xray_root), steps_per_visit=7)
    assert [s.name for s in specs] == ["pneumonia", "lung", "boneage"]  # all, in the order of task_specs
    assert [s.steps for s in specs] == [7, 3, 7]
    assert [s.metric for s in specs] == ["pneumonia_auc", "lung_dice", "boneage_mae"]
    assert specs[0].num_classes == 2 and specs[2].flip and specs[2].loss_weight == 0.5 and specs[2].lower_is_better
    assert [s.name for s in parse_task_specs(_specs(xray_root), ["boneage", "pneumonia"])] == ["boneage", "pneumonia"]


def test_unknown_task_is_one_line_naming_the_known_ones(xray_root):
    with pytest.raises(SettingsError) as err:
        parse_task_specs(_specs(xray_root), ["pneumonia", "lungs"])
    message = str(err.value)
    assert "\n" not in message
    assert "unknown task 'lungs'" in message and "pneumonia, lung, boneage" in message
    assert "did you mean 'lung'" in message


@pytest.mark.parametrize("spec, expected", [
    ({"kind": "clasification", "datalist": "x.json"}, "did you mean 'classification'"),
    ({"datalist": "x.json"}, "has no kind"),
    ({"kind": "detection", "datalist": "x.json", "anchor_shapes": [[32]]}, "anchor_shapes must list [rows, cols]"),
    ({"kind": "detection", "datalist": "x.json", "returned_layers": [0, 5]}, "returned_layers must list distinct"),
    ({"kind": "detection", "datalist": "x.json", "mask_key": "m"}, "unknown setting 'mask_key' for a detection"),
    ({"kind": "classification", "datalist": "x.json", "on_bad_data": "ignore"}, "on_bad_data must be raise or skip"),
    ({"kind": "classification"}, "datalist must be the path"),
    ({"kind": "classification", "datalist": "x.json", "clases": ["a", "b"]}, "did you mean 'classes'"),
    ({"kind": "segmentation", "datalist": "x.json", "num_classes": 3}, "unknown setting 'num_classes'"),
    ({"kind": "classification", "datalist": "x.json", "classes": ["a", "b"], "num_classes": 3}, "num_classes 3 but"),
    ({"kind": "classification", "datalist": "x.json", "steps": 0}, "steps must be a whole number >= 1"),
    ({"kind": "classification", "datalist": "x.json", "flip": "maybe"}, "flip must be true or false"),
    ({"kind": "regression", "datalist": "x.json", "label_std": 0}, "label_std must be a number > 0"),
    ("x.json", "must be a mapping"),
])
def test_spec_mistakes_name_the_task_and_the_fix(spec, expected):
    with pytest.raises(SettingsError, match=re.escape(expected)) as err:
        parse_task_specs({"mine": spec})
    assert "task_specs#mine" in str(err.value)


def test_task_set_reads_no_data_until_asked(tmp_path):
    tasks = TaskSet({"mine": {"kind": "classification", "datalist": str(tmp_path / "absent.json")}})
    assert tasks.names == ["mine"] and tasks.steps == {"mine": 1} and tasks.lower_is_better == []
    with pytest.raises(FileNotFoundError):
        tasks.data("mine", "training")


# ------------------------------------------------------------------------------------------------ the factory
@pytest.fixture(scope="module")
def task_set(xray_root) -> TaskSet:
    return TaskSet(_specs(xray_root), steps_per_visit=2, image_size=32, batch_size=4, max_items=8, num_workers=0)


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnet18")


def test_networks_share_one_backbone_with_a_head_per_kind(task_set):
    backbone = _backbone()
    nets = task_set.networks(backbone)
    assert list(nets) == ["pneumonia", "lung", "boneage"]
    assert isinstance(nets["pneumonia"], BackboneClassifier) and isinstance(nets["lung"], BackboneSegmenter)
    assert isinstance(nets["boneage"], BackboneRegressor)
    assert all(net.backbone is backbone for net in nets.values())
    x = torch.randn(2, 1, 32, 32)
    assert nets["pneumonia"](x).shape == (2, 2) and nets["lung"](x).shape == (2, 2, 32, 32)
    assert nets["boneage"](x).shape == (2, 1)


@pytest.mark.parametrize("name, label_shape", [("pneumonia", (4,)), ("lung", (4, 1, 32, 32)), ("boneage", (4, 1))])
def test_each_kind_trains_on_real_batches(task_set, name, label_shape):
    nets = task_set.networks(_backbone())
    task = task_set.train_tasks(nets)[name]
    assert task.weight == (0.5 if name == "boneage" else 1.0)
    batch = next(iter(task.data_loader))
    assert batch["image"].shape == (4, 1, 32, 32) and set(batch) == {"image", "label"}
    assert tuple(batch["label"].shape) == label_shape
    if name == "lung":
        assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    loss = task.loss_function(task.network(batch["image"]), batch["label"])
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert task.network.backbone.conv1.weight.grad is not None


def test_detection_task_learns_on_real_boxes(xray_root):
    """TB boxes (TBX11K): list batches through the RetinaNet on the shared backbone; the loss falls over a few steps
    on one batch, and the validator scores COCO mAP with AP50 beside it."""
    from monai.engines import SupervisedEvaluator

    from muscle_ext.engines import DetectionTask
    from muscle_ext.engines.detection import DetectionEvaluator

    datalist = str(xray_root / "tb_detection_tbx11k" / "datalist.json")
    tasks = TaskSet({"tb": {"kind": "detection", "datalist": datalist, "classes": ["active", "obsolete"],
                            "on_bad_data": "skip"}}, image_size=64, batch_size=4, max_items=8)
    backbone = _backbone()
    nets = tasks.networks(backbone)
    task = tasks.train_tasks(nets)["tb"]
    assert isinstance(task, DetectionTask) and nets["tb"].network.feature_extractor.backbone is backbone
    batch = next(iter(task.data_loader))
    assert isinstance(batch, list) and batch[0]["box"].shape[-1] == 4 and set(batch[0]) == {"image", "box", "label"}
    inputs, targets = task.prepare_batch(batch, "cpu", False)
    nets.train()
    optimizer = torch.optim.AdamW(nets.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        pred, loss = task.forward_loss(inputs, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(pred) == {"loss_cls", "loss_box"} and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    evaluator = tasks.evaluators(nets)["tb"]
    assert isinstance(evaluator, DetectionEvaluator) and isinstance(evaluator, SupervisedEvaluator)
    evaluator.run()
    assert 0 <= evaluator.state.metrics["tb_map"] <= 1 and "tb_map_ap50" in evaluator.state.metrics


def test_regression_target_is_scaled_from_the_training_labels(task_set, xray_root):
    mean, std = task_set.target_scale("boneage")
    months = [float(i["label"]) for i in task_set.data("boneage", "training")]
    assert mean == pytest.approx(sum(months) / len(months)) and 20 < std < 80
    scaled = torch.cat([b["label"] for b in task_set.val_loader("boneage")])
    assert scaled.abs().max() < 5  # normalised, not months
    fixed = TaskSet({"b": {"kind": "regression", "datalist": str(xray_root / "hand_boneage" / "datalist.json"),
                           "label_mean": 127.0, "label_std": 41.0}})
    assert fixed.target_scale("b") == (127.0, 41.0)


def test_training_batches_are_plain_tensors_and_validation_keeps_meta(task_set):
    """Training skips MetaTensor bookkeeping (its cost: benchmarks/results/trainers.md); validation keeps it."""
    from monai.data import MetaTensor

    for name in ("pneumonia", "lung"):
        train = task_set.transform(name, training=True)(task_set.data(name, "training")[0])
        validation = task_set.transform(name, training=False)(task_set.data(name, "validation")[0])
        assert type(train["image"]) is torch.Tensor and type(train["label"]) is torch.Tensor, name
        assert isinstance(validation["image"], MetaTensor), name


def test_every_task_is_validated_by_its_metric(task_set):
    nets = task_set.networks(_backbone())
    history = MetricHistory("unused.json", lower_is_better=task_set.lower_is_better)
    made = []

    def stats():  # a handler made for each evaluator (a `_mode_: callable` component in the config)
        made.append(object())
        return None

    evaluators = task_set.evaluators(nets, [history, stats, None])
    assert list(evaluators) == ["pneumonia", "lung", "boneage"] and len(made) == 3
    for evaluator in evaluators.values():
        evaluator.run()
    metrics = {k: v for m in history.rounds.values() for k, v in m.items()}
    assert set(metrics) == {"pneumonia_auc", "lung_dice", "boneage_mae"}
    assert 0 <= metrics["pneumonia_auc"] <= 1 and 0 <= metrics["lung_dice"] <= 1
    assert metrics["boneage_mae"] > 1  # back in months, the labels' unit
    assert len(TaskValidation(evaluators).handlers) == 3


def test_segmentation_mask_under_another_key(tmp_path, xray_root):
    source = json.loads((xray_root / "lung_seg_cxr" / "datalist.json").read_text())
    base = xray_root / "lung_seg_cxr"
    renamed = {split: [{"image": str(base / i["image"]), "mask": str(base / i["label"]), "label": 1}
                       for i in source[split][:4]] for split in ("training", "validation")}
    (tmp_path / "datalist.json").write_text(json.dumps(renamed))
    spec = {"kind": "segmentation", "datalist": str(tmp_path / "datalist.json"), "mask_key": "mask"}
    tasks = TaskSet({"lungs": spec}, image_size=32, batch_size=2)
    batch = next(iter(tasks.train_loader("lungs")))
    assert batch["label"].shape == (2, 1, 32, 32) and 0 < float(batch["label"].mean()) < 1


def test_history_judges_lower_is_better_metrics_by_their_lowest_value(tmp_path):
    history = MetricHistory(tmp_path / "m.json", lower_is_better=["b_mae"])
    history.rounds = {1: {"a_auc": 0.6, "b_mae": 20.0}, 2: {"a_auc": 0.8, "b_mae": 12.0},
                      3: {"a_auc": 0.7, "b_mae": 15.0}}
    summary = history.summary()
    assert summary["a_auc"]["best_round"] == 2 and summary["a_auc"]["forgetting"] == pytest.approx(0.1)
    assert summary["b_mae"]["best"] == 12.0 and summary["b_mae"]["forgetting"] == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------------ the bundle
def tiny(tmp: Path, xray_root: Path, start: Path, **extra) -> dict:
    """Rounds of task visits x 2 iterations of batch 8 at 64 px, validating on 16 images per task; no tracking."""
    return {"dataset_dir": xray_root, "output_dir": tmp / "out", "model_dir": tmp / "models", "init_weights": start,
            "image_size": 64, "batch_size": 8, "rounds": 2, "steps_per_visit": 2, "max_items": 16, "num_workers": 0,
            "use_tracking": False, **extra}


def _visits(log: str) -> list[tuple[int, str]]:
    return [(int(r), t) for r, t in re.findall(r"round (\d+): task (\w+) \(", log)]


def test_a_subset_of_tasks_trains_and_validates_only_those(tmp_path, xray_root, start):
    run_bundle("muscle_continual", TRAIN, tiny(tmp_path, xray_root, start, tasks="['lung','pneumonia']"))
    metrics = json.loads((tmp_path / "out" / "task_metrics.json").read_text())
    assert sorted(metrics["rounds"]) == ["1", "2"]
    assert all(set(m) == {"pneumonia_auc", "lung_dice"} for m in metrics["rounds"].values())
    payload = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")
    assert payload["source"]["tasks"] == ["lung", "pneumonia"] and payload["source"]["iteration"] == 8
    state = torch.load(sorted((tmp_path / "out" / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert {k.split(".")[0] for k in state["network"]} == {"lung", "pneumonia"}  # no knee head was built


def test_unknown_task_name_stops_at_once_with_one_line(tmp_path, xray_root, start):
    overrides = tiny(tmp_path, xray_root, start, tasks="['pneumonia','lungs']")
    began = time.monotonic()
    proc = subprocess.run(bundle_command("muscle_continual", TRAIN, overrides), capture_output=True, text=True,
                          timeout=300, env=bundle_env(), cwd=REPO)
    took = time.monotonic() - began
    assert proc.returncode != 0
    line = "unknown task 'lungs' in tasks; the task_specs are: pneumonia, knee, lung, tb (did you mean 'lung'?)"
    assert line in proc.stderr
    assert "Traceback" not in proc.stderr.split(line)[-1]  # the short block, not a trace from the trainer
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "cache").exists()
    assert "MultiTaskTrainer" not in proc.stderr and "round 1" not in proc.stdout + proc.stderr
    assert took < 120, took


def test_a_hospital_adds_its_own_labelled_task_with_one_spec_entry(tmp_path, xray_root, start):
    """The hospital's task (bone age regression on hand X-rays, standing in for its own data) is one command-line
    entry; it trains in the schedule beside the chosen default tasks and is validated after every round."""
    spec = {"kind": "regression", "datalist": str(xray_root / "hand_boneage" / "datalist.json"), "flip": True}
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    overrides = tiny(tmp_path, xray_root, start, use_tracking=True, tracking_uri=uri, **{"task_specs#boneage": spec},
                     tasks="['pneumonia','knee','lung','boneage']")
    proc = run_bundle("muscle_continual", TRAIN, overrides)
    visits = _visits(proc.stdout + proc.stderr)
    assert sorted(t for r, t in visits if r == 1) == ["boneage", "knee", "lung", "pneumonia"]
    metrics = json.loads((tmp_path / "out" / "task_metrics.json").read_text())
    assert sorted(metrics["rounds"]) == ["1", "2"]
    for scores in metrics["rounds"].values():
        assert set(scores) == {"pneumonia_auc", "knee_auc", "lung_dice", "boneage_mae"}
        assert 1 < scores["boneage_mae"] < 200  # months
    summary = metrics["summary"]["boneage_mae"]
    assert summary["best"] == min(s["boneage_mae"] for s in metrics["rounds"].values())
    assert load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")["source"]["tasks"][-1] == "boneage"

    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("muscle_continual").experiment_id])
    logged = {key for run in runs for key in run.data.metrics}
    assert {"boneage_loss", "boneage_mae", "lung_loss", "lung_dice"} <= logged
    assert str(xray_root) not in json.dumps([run.data.params for run in runs])  # no data paths in MLflow


def test_a_hospital_task_from_a_config_file_merged_after_train_yaml(tmp_path, xray_root, start):
    """The same through a small YAML (a held-back slice of the second pneumonia site as the hospital's data: its
    `test` section trains, `validation` validates), with --tasks choosing it and one guardrail task."""
    extra = tmp_path / "my_task.yaml"
    extra.write_text("task_specs#site2: {kind: classification, datalist: $@dataset_dir + "
                     "'/pneumonia_site2/datalist.json', classes: [no_finding, pneumonia], train_split: test, "
                     "steps: 3}\n")
    run_bundle("muscle_continual", [*TRAIN, str(extra)],
               tiny(tmp_path, xray_root, start, tasks="['site2','lung']", rounds=1))
    metrics = json.loads((tmp_path / "out" / "task_metrics.json").read_text())
    assert set(metrics["rounds"]["1"]) == {"site2_auc", "lung_dice"}
    assert load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")["source"]["iteration"] == 5


def test_a_hospital_continues_a_muscle_run_with_the_earlier_tasks_as_guardrails(tmp_path, xray_root, start):
    """The hospital workflow: a finished MUSCLE run (pneumonia, lung) is continued with the hospital's own labelled
    task (a held-back slice of the second pneumonia site stands in for it). The earlier tasks keep their trained heads
    and become guardrails: their scores before training are the earlier run's final ones, and the table says what
    the new task did to each."""
    earlier = tiny(tmp_path / "earlier", xray_root, start, tasks="['pneumonia','lung']", rounds=1)
    run_bundle("muscle_continual", TRAIN, earlier)
    earlier_final = json.loads((tmp_path / "earlier" / "out" / "forgetting.json").read_text())["visits"][-1]

    site2 = {"kind": "classification", "datalist": str(xray_root / "pneumonia_site2" / "datalist.json"),
             "train_split": "test"}
    hospital = tiny(tmp_path / "hospital", xray_root, tmp_path / "earlier" / "models" / "backbone.pt", rounds=1,
                    tasks="['pneumonia','lung','site2']", init_heads=tmp_path / "earlier" / "out" / "checkpoints",
                    guardrail_margin=0.0, **{"task_specs#site2": site2})
    proc = run_bundle("muscle_continual", TRAIN, hospital)
    log = proc.stdout + proc.stderr
    assert "task heads from checkpoint_4.pt: pneumonia, lung; fresh heads: site2" in log
    with open(tmp_path / "hospital" / "out" / "guardrails.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["pneumonia", "lung"]
    for row in rows:  # the start is the earlier run's result: its backbone with its own head for the task
        assert float(row["start"]) == pytest.approx(earlier_final[row["task"]], abs=1e-6)
        change = float(row["final"]) - float(row["start"])
        assert float(row["change"]) == pytest.approx(change)
        assert (row["fell"] == "True") == (change < 0)
        assert (f"guardrail: task {row['task']} fell by" in log) == (change < 0)

    # the earlier run's checkpoint with another backbone (here the MD-MoCo start): refused before training
    mixed = {**hospital, "init_weights": start, "output_dir": tmp_path / "mixed"}
    refused = subprocess.run(bundle_command("muscle_continual", TRAIN, mixed), capture_output=True, text=True,
                             timeout=300, env=bundle_env(), cwd=REPO)
    assert refused.returncode != 0 and "holds another backbone than init_weights" in refused.stderr
    assert "round 1" not in refused.stdout + refused.stderr and not list((tmp_path / "mixed").rglob("*.pt"))
    # a margin without a run to guard is a mistake, not a no-op
    alone = {k: v for k, v in hospital.items() if k != "init_heads"}
    refused = subprocess.run(bundle_command("muscle_continual", TRAIN, {**alone, "output_dir": tmp_path / "alone"}),
                             capture_output=True, text=True, timeout=300, env=bundle_env(), cwd=REPO)
    assert refused.returncode != 0 and "--guardrail_margin is ignored" in refused.stderr
