"""The downstream bundle's one training skeleton (issue #13 part B): the factories that replaced its long `$` chains,
the resume defaults (one atomic resumable state, a finished run that says so, no -1 placeholders), the short task
configs, the quick and multi-GPU configs, and the model zoo's own checks, offline."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from ignite.engine import Engine
from monai.transforms import Compose, RandAdjustContrastd, RandAffined, RandFlipd
from torch import nn

from muscle_ext.data import DatalistError, datalist_section, load_datalist, subset, validate_datalist
from muscle_ext.data.augment import mild_augmentation
from muscle_ext.handlers import KeyMetricState, ResumableCheckpoint, RunFinished, resume_checkpoint
from muscle_ext.settings import SettingsError

from tests.bundle_utils import BUNDLES, run_bundle

DOWNSTREAM = BUNDLES / "downstream"
CONFIGS = DOWNSTREAM / "configs"
TASKS = ("classification", "regression", "segmentation", "detection")


def _lines(path: Path) -> int:
    """Lines that are neither blank nor comments."""
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))


# ------------------------------------------------------------------------------------------------ the factories
def test_datalist_section_is_load_subset_validate(xray_root):
    path = xray_root / "pneumonia_nih" / "datalist.json"
    chain = validate_datalist(subset(load_datalist(path, "validation"), 12), classes=[0, 1], source="validation")
    assert datalist_section(path, "validation", 12, classes=[0, 1]) == chain
    assert len(chain) == 12 and {i["label"] for i in chain} == {0, 1}


def test_datalist_section_names_the_section_of_a_bad_entry(tmp_path, xray_root):
    good = load_datalist(xray_root / "pneumonia_nih" / "datalist.json", "test")[0]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"test": [good, {"image": str(tmp_path / "gone.png"), "label": 1}]}))
    with pytest.raises(DatalistError, match=r"^test: 1 of 2 datalist entries are unusable:\n.*gone\.png: missing file"):
        datalist_section(path, "test", classes=[0, 1])
    assert datalist_section(path, "test", on_error="skip", classes=[0, 1]) == [good]


def test_mild_augmentation_moves_masks_with_the_image():
    image_only = mild_augmentation("image", size=96, flip_prob=0.5)
    assert [type(t) for t in image_only] == [RandAffined, RandFlipd, RandAdjustContrastd]
    affine, flip, contrast = image_only
    assert affine.keys == ("image",) and affine.prob == 0.5 and flip.prob == 0.5 and contrast.keys == ("image",)
    assert affine.rand_affine.rand_affine_grid.translate_range == pytest.approx((4.8,))  # 5 % of 96 px
    affine, flip, contrast = mild_augmentation("image", mask_keys="label", size=64)
    assert affine.keys == flip.keys == ("image", "label") and contrast.keys == ("image",)
    assert list(affine.mode) == ["bilinear", "nearest"] and flip.prob == 0.0
    # a mask drawn from the image stays aligned with it through the same random draws
    image = torch.zeros(1, 64, 64)
    image[:, 20:44, 12:40] = 1.0
    chain = Compose(mild_augmentation("image", mask_keys="label", size=64, flip_prob=1.0))
    chain.set_random_state(seed=3)
    for _ in range(5):
        out = chain({"image": image.clone(), "label": image.clone()})
        assert set(np.unique(np.asarray(out["label"]))) <= {0.0, 1.0}  # nearest: still a mask
        assert np.mean((np.asarray(out["image"]) > 0.5) == (np.asarray(out["label"]) > 0.5)) > 0.97


# ------------------------------------------------------------------------------------------------ resume defaults
def _train(folder: Path, epochs: int, epoch_length: int = 3, keep: int = 1) -> None:
    trainer = Engine(lambda engine, batch: None)
    to_save = {"model": nn.Linear(2, 1), "trainer": trainer}
    ResumableCheckpoint(folder, to_save, keep=keep).attach(trainer)
    trainer.run(range(epoch_length), max_epochs=epochs)


def test_resume_checkpoint_says_what_a_rerun_will_do(tmp_path, caplog):
    assert resume_checkpoint(tmp_path / "none", 5) is None  # a fresh run
    _train(tmp_path, epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_6.pt"]  # one state, none of MONAI's extras
    with caplog.at_level(logging.INFO):
        assert resume_checkpoint(tmp_path, 5) == str(tmp_path / "checkpoint_6.pt")
    assert "resuming from checkpoint_6.pt: continuing with epoch 3 of 5" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(RunFinished) as finished:
        resume_checkpoint(tmp_path, 2)
    assert finished.value.code == 0  # the process ends with status 0: nothing failed
    assert (f"training already finished at epoch 2 (checkpoint {tmp_path / 'checkpoint_6.pt'}): nothing to do; to "
            "train longer, pass a larger --num_epochs (e.g. --num_epochs 4)") in caplog.text

    with pytest.raises(SettingsError, match=r"has trained 2 epochs \(checkpoint checkpoint_6\.pt\); --num_epochs 1 is "
                                            r"fewer: to train longer, pass --num_epochs 3 or more"):
        resume_checkpoint(tmp_path, 1)


def test_key_metric_state_has_no_placeholders_before_a_validation():
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1  # MONAI's "none yet"
    state = KeyMetricState(evaluator).state_dict()
    assert state["best_metric"] is None and state["best_metric_epoch"] is None
    KeyMetricState(evaluator).load_state_dict(state)
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (-1, -1)  # what MONAI compares with
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.75, 3
    assert KeyMetricState(evaluator).state_dict()["best_metric"] == 0.75
    evaluator.state.best_metric = float("nan")  # an undefined key metric is recorded as it is
    assert np.isnan(KeyMetricState(evaluator).state_dict()["best_metric"])


def test_run_summary_writes_null_not_minus_one():
    from muscle_ext.handlers.tracking.handler import final_metrics

    history = {"train_loss": [(1, 0.5)]}
    trainer = SimpleNamespace(state=SimpleNamespace(epoch=3, iteration=9, metrics={}, best_metric=-1,
                                                    best_metric_epoch=-1))
    summary = final_metrics(trainer, history)
    assert summary["best_metric"] is None and summary["best_metric_epoch"] is None and "best_metric_note" in summary
    validator = SimpleNamespace(state=SimpleNamespace(epoch=3, iteration=2, metrics={"val_auc": 0.8},
                                                      best_metric=0.8, best_metric_epoch=2))
    summary = final_metrics(validator, history)
    assert summary["last_logged"] == {"train_loss": 0.5}
    assert (summary["best_metric"], summary["best_metric_epoch"]) == (0.8, 2) and "best_metric_note" not in summary


# ------------------------------------------------------------------------------------------------- the configs
def test_task_configs_hold_only_what_differs():
    before = {"classification": 182, "regression": 185, "segmentation": 198, "detection": 185}  # issue #13
    now = {task: _lines(CONFIGS / f"{task}.yaml") for task in TASKS}
    assert sum(now.values()) <= sum(before.values()) / 2, now
    assert all(now[task] < 50 for task in ("classification", "regression", "segmentation")), now
    text = "\n".join((CONFIGS / f).read_text() for f in sorted(p.name for p in CONFIGS.glob("*.yaml")))
    assert "validate_datalist(" not in text and "load_datalist(@datalist" not in text  # datalist_section
    assert text.count("as_flag(") == 5  # each yes/no setting read once, in common.yaml's `flags`
    for task in TASKS:  # the skeleton lives in common.yaml only
        config = yaml.safe_load((CONFIGS / f"{task}.yaml").read_text())
        assert not {"train", "validate", "initialize", "run", "trackers"} & set(config), task


def test_every_config_a_file_names_exists():
    """Comments, docs and configs name only config files that exist (evaluate.yaml once named a missing
    evaluate_detection.yaml)."""
    texts = [p.read_text() for p in [*CONFIGS.glob("*.yaml"), DOWNSTREAM / "docs" / "README.md"]]
    named = {m for text in texts for m in re.findall(r"configs/([A-Za-z_]+\.(?:yaml|json|conf))", text)}
    assert named and all((CONFIGS / name).is_file() for name in named), sorted(named)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("extra", ["quick.yaml", "multi_gpu_train.yaml", "evaluate.yaml", "inference"])
def test_configs_parse_after_the_skeleton(task, extra, monkeypatch):
    from monai.bundle import ConfigParser

    if extra == "inference":
        extra = "inference_detection.yaml" if task == "detection" else "inference.yaml"
    if extra == "multi_gpu_train.yaml" and task == "detection":
        pytest.skip("detection's COCO metric is per rank: no DDP config for it")
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("common.yaml", f"{task}.yaml", extra)])
    parser["from_model"] = {}  # evaluate/inference read it from models/model.pt
    parser.parse()
    assert parser.get_parsed_content("task") == task and parser["initialize"][0].count("check_overrides(") == 1
    if extra == "quick.yaml":
        assert parser.get_parsed_content("image_size") == 96 and parser.get_parsed_content("num_epochs") == 3
    if extra == "multi_gpu_train.yaml":
        assert parser.get_parsed_content("rank") == 1 and "destroy_process_group" in parser["finalize"][0]


def test_flip_prob_is_refused_for_detection():
    from muscle_ext.bundle_checks import combination_problems

    assert combination_problems({"task": "classification", "flip_prob": 0.5}, ["flip_prob"]) == []
    (problem,) = combination_problems({"task": "detection", "flip_prob": 0.5}, ["flip_prob"])
    assert problem.startswith("--flip_prob is ignored with task detection")


# -------------------------------------------------------------------------------------------- model zoo checks
def _zoo_model(tmp_path: Path, task: str) -> Path:
    """models/model.pt as training writes it (BestModelSaver with the task's model_settings), untrained weights."""
    from monai.bundle import ConfigParser

    from tests.bundle_utils import save_best_model as _save_best_model

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("common.yaml", f"{task}.yaml")])
    parser.update({"image_size": 64, "device": "cpu"})
    (tmp_path / "models").mkdir(parents=True, exist_ok=True)
    return _save_best_model(tmp_path / "models", parser.get_parsed_content("network_def"),
                            parser.get_parsed_content("model_settings"))


def test_model_zoo_checks_offline(tmp_path):
    """What the model zoo's ci/verify_bundle.py runs: verify_metadata against the zoo schema (a copy in the
    repository: nothing is downloaded), verify_net_in_out on the inference config (network_def), ckpt_export of
    models/model.pt (its `model` entry) to TorchScript; and large_files.yml in the zoo's format."""
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(BUNDLES / "metadata_schema.json"))
    for task, outputs in (("classification", 2), ("regression", 1), ("segmentation", 2)):
        files = [str(CONFIGS / f) for f in ("common.yaml", f"{task}.yaml", "inference.yaml")]
        shape = {"_meta_#network_data_format#outputs#pred#num_channels": outputs,
                 "_meta_#network_data_format#inputs#image#spatial_shape": [64, 64]}
        # before a model exists: the config's defaults (`from_model` {} stands for the missing model.pt)
        verify_net_in_out("network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=files, device="cpu",
                          from_model={}, **shape)
        # with models/model.pt: the network is built from the settings it records
        model_dir = tmp_path / task
        _zoo_model(model_dir, task)
        verify_net_in_out("network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=files, device="cpu",
                          model_dir=str(model_dir / "models"), **shape)
        ts = model_dir / "model.ts"
        ckpt_export("network_def", filepath=str(ts), ckpt_file=str(model_dir / "models" / "model.pt"),
                    key_in_ckpt="model", meta_file=str(CONFIGS / "metadata.json"), config_file=files,
                    model_dir=str(model_dir / "models"))
        assert torch.jit.load(str(ts))(torch.rand(1, 1, 64, 64)).shape[1] == outputs

    # large_files.yml: the zoo downloads every entry (path + url, optional hash); ours names none, because weights
    # come from training (see the file) -- an entry with an empty url would make the zoo's download fail
    large = yaml.safe_load((DOWNSTREAM / "large_files.yml").read_text())
    assert isinstance(large["large_files"], list)
    for entry in large["large_files"]:
        assert entry.get("path") and str(entry.get("url", "")).startswith("https://"), entry


@pytest.mark.timeout(300)
def test_multi_gpu_train_runs_two_gloo_processes(tmp_path, xray_root):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29743", "-m"]
    overrides = {"dataset_dir": xray_root, "output_dir": tmp_path / "out", "image_size": 32, "batch_size": 4,
                 "num_epochs": 1, "max_items": 16, "num_workers": 0, "use_tracking": False, "amp": False}
    proc = run_bundle("downstream", ["common.yaml", "classification.yaml", "multi_gpu_train.yaml"], overrides,
                      launcher=launcher, timeout=280)
    # 16 images over 2 ranks of batch 4: 2 iterations per epoch; rank 0 alone logs and saves
    assert re.findall(r"Epoch: 1/1, Iter: (\d)/(\d)", proc.stdout) == [("1", "2"), ("2", "2")]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["checkpoint_2.pt"]
    state = torch.load(tmp_path / "out" / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])  # the DDP wrapper is not saved


@pytest.mark.slow  # ~4 minutes on 2 CPU cores: the README's quick start as it is typed, from the repository root
def test_quick_preset_learns_pneumonia(tmp_path, xray_root):
    out = tmp_path / "quick"
    proc = run_bundle("downstream", ["common.yaml", "classification.yaml", "quick.yaml"],
                      {"dataset_dir": xray_root, "output_dir": out, "use_tracking": False}, timeout=900)
    aucs = [float(v) for v in re.findall(r"Epoch\[\d\] Metrics -- val_auc: ([0-9.]+)", proc.stdout)]
    assert len(aucs) == 3 and max(aucs) > 0.7, aucs  # measured 0.81 after epoch 3 (from scratch)
    again = run_bundle("downstream", ["common.yaml", "classification.yaml", "quick.yaml"],
                       {"dataset_dir": xray_root, "output_dir": out, "use_tracking": False})
    assert "training already finished at epoch 3" in again.stdout + again.stderr
