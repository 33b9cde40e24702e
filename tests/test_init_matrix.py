"""Every downstream task and every ``init`` kind, as users run them (``python -m monai.bundle run``, fine-tune then
test report) on the real subsets. The start is wired once, in the skeleton (``configs/common.yaml``), and a task
config only adds its head: so classification runs from every start, and each other task from one start each
(every start twice in all). Tiny budgets: this shows that each combination runs end to end and starts from the
weights it names, not how well it does (that is benchmarks/bench_downstream.py). About 2 minutes on 2 CPU cores."""

from __future__ import annotations

import json
import math

import pytest
import torch

from muscle_ext.networks import build_backbone, initialize_backbone, load_backbone_checkpoint, save_backbone

from tests.bundle_utils import detection_datalist as _slice_datalist
from tests.bundle_utils import run_bundle, tiny_detection, torchvision_resnet18_state_dict
from tests.bundle_utils import tiny_downstream as tiny

# task -> (config, the report's key metric)
TASKS = {"classification": ("classification.yaml", "roc_auc"), "regression": ("regression.yaml", "mae"),
         "segmentation": ("segmentation.yaml", "dice"), "detection": ("detection.yaml", "map")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("weights")
    torch.save(torchvision_resnet18_state_dict(), root / "imagenet.pth")
    torch.manual_seed(3)
    save_backbone(root / "backbone.pt", build_backbone("resnet18"), "resnet18", {"imagenet_stem": True},
                  source={"bundle": "muscle_pretrain"})
    return {"scratch": "", "imagenet": str(root / "imagenet.pth"), "checkpoint": str(root / "backbone.pt")}


@pytest.fixture(scope="module")
def starts(weights) -> dict[str, torch.Tensor]:
    """The first convolution of each non-random start, as the bundle converts it (ImageNet: RGB summed)."""
    return {init: initialize_backbone("resnet18", init=init, weights=path).state_dict()["conv1.weight"]
            for init, path in weights.items() if path}


COMBINATIONS = [("classification", "scratch"), ("classification", "imagenet"), ("classification", "checkpoint"),
                ("segmentation", "checkpoint"), ("detection", "imagenet"), ("regression", "scratch")]


@pytest.mark.parametrize("task,init", COMBINATIONS)
def test_finetune_and_report_from_each_init(task, init, weights, starts, tmp_path, xray_root):
    config, key = TASKS[task]
    init_settings = {"init": init, **({"init_weights": weights[init]} if weights[init] else {})}
    if task == "detection":
        settings = tiny_detection(tmp_path, _slice_datalist(xray_root, tmp_path), use_tracking=False, **init_settings)
    else:
        settings = tiny(tmp_path, xray_root, use_tracking=False, **init_settings)
    run_bundle("downstream", ["common.yaml", config], settings)
    # a few small steps move the weights little: the fine-tuned first convolution is still close to the weights the
    # run started from, and unrelated to the other files' (conv1 is the same shape in every start)
    tuned = load_backbone_checkpoint(tmp_path / "models" / "backbone.pt")["state_dict"]["conv1.weight"]
    for other, start in starts.items():
        correlation = torch.corrcoef(torch.stack([tuned.flatten(), start.flatten()]))[0, 1]
        assert (correlation > 0.9) == (other == init), (other, float(correlation))
    evaluation = {k: v for k, v in settings.items() if k != "init_weights"}
    run_bundle("downstream", ["common.yaml", config, "evaluate.yaml"], evaluation)
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["split"] == "test" and math.isfinite(report[key]["value"]), report.get(key)
