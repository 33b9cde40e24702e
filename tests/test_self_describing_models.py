"""Self-describing models (issue #13): ``model.pt`` and ``backbone.pt`` carry the settings that evaluation and
inference need, evaluate/inference read them, a contradicting override is refused, and old files still work.

The bundle runs are tiny (16 images per split at 48 px, one epoch, no tracking); the segmentation, detection and
regression settings and the backbone files are checked through the configs without data."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch

from muscle_ext.data import load_datalist, subset
from muscle_ext.networks import (
    MODEL_FORMAT,
    ModelSettingsError,
    build_backbone,
    check_model_settings,
    load_backbone_checkpoint,
    load_model_file,
    read_backbone_settings,
    read_model_settings,
    save_backbone,
)
from muscle_ext.networks.model_settings import plain_settings

from tests.bundle_utils import BUNDLES, bundle_command, bundle_env, run_bundle
from tests.bundle_utils import save_best_model as _save_best_model

CONFIGS = BUNDLES / "downstream" / "configs"
PRETRAIN = BUNDLES / "muscle_pretrain" / "configs"
CLASSIFICATION = ["common.yaml", "classification.yaml"]
CLASS_NAMES = ["clear", "consolidation"]  # not the config's defaults (no_finding, pneumonia)
SIZE = 48  # not the default 224


def _quiet(root: Path, xray_root: Path, **extra) -> dict:
    """What every run here shares: small, no tracking; no image size, class names or init (those are trained)."""
    return {"dataset_dir": xray_root, "model_dir": root / "models", "max_items": 16, "batch_size": 8,
            "num_workers": 0, "n_bootstrap": 50, "use_tracking": False, "log_models": False, **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, xray_root) -> Path:
    """A classifier trained at a non-default image size with non-default class names (seconds)."""
    root = tmp_path_factory.mktemp("trained")
    proc = run_bundle("downstream", CLASSIFICATION,
                      _quiet(root, xray_root, output_dir=root / "out", image_size=SIZE, num_epochs=1,
                             class_names=repr(CLASS_NAMES)))
    (root / "train.log").write_text(proc.stdout + proc.stderr)
    return root


def _metrics(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {k: v for k, v in report.items() if k != "figures"}


# ------------------------------------------------------------------------------------------------ what is written
def test_model_and_backbone_files_record_the_training_settings(trained):
    raw = torch.load(trained / "models" / "model.pt", map_location="cpu", weights_only=True)  # plain types only
    assert set(raw) == {"model", "settings"} and any(k.startswith("backbone.") for k in raw["model"])
    settings = raw["settings"]
    assert settings["format"] == MODEL_FORMAT and settings["task"] == "classification"
    assert settings["image_size"] == SIZE and settings["class_names"] == CLASS_NAMES and settings["num_classes"] == 2
    assert settings["arch"] == "resnet18" and settings["backbone_kwargs"] == {"imagenet_stem": True}
    assert settings["init"] == "scratch" and settings["init_weights"] is None
    assert (settings["input_mean"], settings["input_std"]) == (0.0, 1.0)
    assert settings["preprocessing"] == {"lower_percentile": 0.5, "upper_percentile": 99.5, "clahe": False}
    backbone = load_backbone_checkpoint(trained / "models" / "backbone.pt")  # weights_only=True inside
    assert backbone["settings"]["image_size"] == SIZE and backbone["settings"]["class_names"] == CLASS_NAMES


def test_checkpoint_loader_reads_the_model_entry_of_new_and_old_files(tmp_path):
    """MONAI's CheckpointLoader(load_dict={'model': net}) (evaluate.yaml, inference.yaml) loads checkpoint['model']
    when the file also holds other keys, and the whole file when it is a bare state dict."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    source = torch.nn.Linear(3, 2)
    new, old = tmp_path / "new.pt", tmp_path / "old.pt"
    torch.save({"model": source.state_dict(), "settings": {"format": MODEL_FORMAT, "image_size": 96}}, new)
    torch.save(source.state_dict(), old)
    for path in (new, old):
        target = torch.nn.Linear(3, 2)
        CheckpointLoader(load_path=str(path), load_dict={"model": target})(Engine(lambda e, b: None))
        assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    assert load_model_file(new)[1]["image_size"] == 96 and load_model_file(old)[1] is None


def test_settings_hold_plain_values_only():
    assert plain_settings({"size": torch.tensor(3), "names": ("a", "b"), "path": Path("x")}) == \
        {"size": 3, "names": ["a", "b"], "path": "x"}
    with pytest.raises(TypeError, match="model_settings#head#fn"):
        plain_settings({"head": {"fn": object()}})


# ----------------------------------------------------------------------------------- evaluate and infer, no overrides
def test_evaluate_without_overrides_reproduces_the_trained_settings(trained, xray_root, tmp_path):
    """The documented evaluate command without --image_size/--class_names scores the model as trained: the same
    numbers as with the right overrides given explicitly (which agree with the file, so they are accepted), and as
    an old-format model.pt (a bare state dict, with a warning) evaluated with those overrides."""
    plain = _quiet(trained, xray_root, output_dir=tmp_path / "plain")
    run_bundle("downstream", [*CLASSIFICATION, "evaluate.yaml"], plain)
    explicit = {**plain, "output_dir": tmp_path / "explicit", "image_size": SIZE, "class_names": repr(CLASS_NAMES),
                "init": "scratch"}
    run_bundle("downstream", [*CLASSIFICATION, "evaluate.yaml"], explicit)

    old_models = tmp_path / "old_models"
    old_models.mkdir()
    torch.save(load_model_file(trained / "models" / "model.pt")[0], old_models / "model.pt")  # before the format
    proc = run_bundle("downstream", [*CLASSIFICATION, "evaluate.yaml"],
                      {**explicit, "output_dir": tmp_path / "old", "model_dir": old_models})
    assert "model.pt records no training settings" in proc.stdout + proc.stderr

    reports = {name: _metrics(tmp_path / name / "metrics.json") for name in ("plain", "explicit", "old")}
    assert reports["plain"]["class_names"] == CLASS_NAMES and reports["plain"]["n"] == 16
    assert reports["plain"] == reports["explicit"] == reports["old"]


def test_inference_without_overrides_names_the_trained_classes(trained, xray_root, tmp_path):
    items = subset(load_datalist(xray_root / "pneumonia_nih" / "datalist.json", "test"), 3)
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"test": [{"image": str(item["image"])} for item in items]}))
    run_bundle("downstream", [*CLASSIFICATION, "inference.yaml"],
               _quiet(trained, xray_root, output_dir=tmp_path / "out", input_datalist=inputs))
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["class_name"] for r in rows} <= set(CLASS_NAMES)
    assert all(r["class_name"] == CLASS_NAMES[int(r["label"])] for r in rows)


def test_a_contradicting_image_size_is_refused_before_any_data_is_read(trained, tmp_path):
    """No datalist exists under dataset_dir: the run must stop on the contradiction before it looks for one."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    cmd = bundle_command("downstream", [*CLASSIFICATION, "evaluate.yaml"],
                         _quiet(trained, empty, output_dir=tmp_path / "out", image_size=224))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=bundle_env())
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"model.pt was trained with image_size {SIZE}; --image_size 224 contradicts it: leave it out" in output
    assert "datalist.json" not in output and not (tmp_path / "out" / "metrics.json").exists()


# --------------------------------------------------------------------- other tasks: settings round-trip, no data
def _parser(files: list[str], **updates):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update({"device": "cpu", **updates})
    return parser


ROUND_TRIP = {  # task config, inference config, non-default training settings, one to contradict
    "segmentation": ("segmentation.yaml", "inference.yaml",
                     {"num_classes": 3, "output_stride": 8, "atrous_rates": [12, 24, 36]}, ("output_stride", 16)),
    "detection": ("detection.yaml", "inference_detection.yaml",
                  {"class_names": ["a", "b", "c"], "detector#returned_layers": [3, 4], "detector#fpn_channels": 32,
                   "detector#anchor_shapes_256": [[32, 32], [64, 64]]}, ("detector#fpn_channels", 64)),
    "regression": ("regression.yaml", "inference.yaml", {"label_mean": 100.0, "label_std": 30.0, "unit": "weeks"},
                   ("label_mean", 127.0)),
}


@pytest.mark.parametrize("task", sorted(ROUND_TRIP))
def test_task_settings_round_trip_through_model_pt(task, tmp_path):
    """Settings given for training come back in evaluate and inference without being given again: the network is
    rebuilt from them (strict load), and a contradicting value is refused with the override to leave out."""
    config, inference, settings, (name, wrong) = ROUND_TRIP[task]
    training = _parser(["common.yaml", config], image_size=40, init="scratch", model_dir=str(tmp_path), **settings)
    path = _save_best_model(tmp_path, training.get_parsed_content("network_def"),
                            training.get_parsed_content("model_settings"))
    recorded = torch.load(path, map_location="cpu", weights_only=True)["settings"]
    assert recorded["task"] == task and recorded["image_size"] == 40

    for extra in ("evaluate.yaml", inference):
        parser = _parser(["common.yaml", config, extra], model_dir=str(tmp_path))
        assert parser.get_parsed_content("image_size") == 40
        for key, value in settings.items():
            assert parser.get_parsed_content(key) == value, key
        parser.get_parsed_content("network_def").load_state_dict(load_model_file(path)[0])  # strict
        check_model_settings(parser.get_parsed_content("from_model"), parser.get_parsed_content("model_settings"))

        contradicting = _parser(["common.yaml", config, extra], model_dir=str(tmp_path), **{name: wrong})
        with pytest.raises(ModelSettingsError, match=f"trained with {name} .*; --{name} {wrong} contradicts it"):
            check_model_settings(contradicting.get_parsed_content("from_model"),
                                 contradicting.get_parsed_content("model_settings"))


def test_a_model_of_another_task_is_refused(tmp_path):
    training = _parser(["common.yaml", "regression.yaml"], image_size=40, init="scratch")
    _save_best_model(tmp_path, training.get_parsed_content("network_def"),
                     training.get_parsed_content("model_settings"))
    parser = _parser(["common.yaml", "segmentation.yaml", "evaluate.yaml"], model_dir=str(tmp_path))
    with pytest.raises(ModelSettingsError, match="holds a regression model.*merge configs/regression.yaml"):
        check_model_settings(parser.get_parsed_content("from_model"), parser.get_parsed_content("model_settings"))


def test_old_model_file_uses_the_config_with_a_warning(tmp_path, caplog):
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "model.pt")
    with caplog.at_level(logging.WARNING):
        parser = _parser(["common.yaml", "classification.yaml", "evaluate.yaml"], model_dir=str(tmp_path),
                         image_size=96)
        assert parser.get_parsed_content("image_size") == 96  # the override: nothing to contradict
        assert parser.get_parsed_content("class_names") == ["no_finding", "pneumonia"]  # the default
        check_model_settings(parser.get_parsed_content("from_model"), parser.get_parsed_content("model_settings"))
    assert "records no training settings" in caplog.text


def test_a_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.pt there"):
        read_model_settings(tmp_path / "model.pt")


# ------------------------------------------------------------------------------------ backbone.pt (muscle_pretrain)
def test_pretrain_evaluate_and_inference_read_the_backbone_settings(tmp_path):
    from monai.bundle import ConfigParser

    path = tmp_path / "backbone.pt"
    save_backbone(path, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True}, {"bundle": "test"},
                  settings={"image_size": 40, "input_mean": 0.0, "input_std": 1.0, "init": "scratch"})
    assert read_backbone_settings(path).get("image_size") == 40

    def parsed(config: str, **updates) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(PRETRAIN / config))
        parser.update({"backbone_path": str(path), "device": "cpu", **updates})
        return parser

    for config in ("evaluate.yaml", "inference.yaml"):
        parser = parsed(config)
        assert parser.get_parsed_content("image_size") == 40
        check_model_settings(parser.get_parsed_content("from_model"), parser.get_parsed_content("model_settings"))
        parser = parsed(config, image_size=224)
        with pytest.raises(ModelSettingsError, match="backbone.pt was trained with image_size 40; --image_size 224"):
            check_model_settings(parser.get_parsed_content("from_model"),
                                 parser.get_parsed_content("model_settings"))
    # a file written before backbones carried settings: arch and kwargs only, the config's image size
    old = tmp_path / "old.pt"
    save_backbone(old, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True})
    assert not read_backbone_settings(old).recorded and read_backbone_settings(old).get("image_size", 224) == 224


def test_pretrain_train_config_records_its_settings():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(PRETRAIN / "train.yaml"))
    parser.update({"image_size": 64, "device": "cpu"})
    settings = parser.get_parsed_content("model_settings")
    assert settings["image_size"] == 64 and settings["input_mean"] == 0.0
    assert settings["preprocessing"]["knee_oa_chen2018"]["lower_percentile"] == 1.0  # per dataset tag
    assert settings["preprocessing"]["rsna_boneage"]["clahe"]["clip_limit"] == 2.0
    exporter = next(h for h in parser["train#handlers"]
                    if isinstance(h, dict) and "BackboneExporter" in str(h.get("_target_")))
    assert exporter["settings"] == "@model_settings"



def test_continual_train_config_records_its_settings(tmp_path):
    from monai.bundle import ConfigParser

    start = tmp_path / "md_moco.pt"
    save_backbone(start, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True}, {"bundle": "muscle_pretrain"})
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "muscle_continual" / "configs" / "train.yaml"))
    parser.update({"init_weights": str(start), "image_size": 64, "device": "cpu"})
    settings = parser.get_parsed_content("model_settings")
    assert settings["image_size"] == 64 and settings["init"] == "checkpoint"
    assert settings["init_weights"]["file"] == "md_moco.pt" and settings["init_weights"]["source"]["bundle"] == \
        "muscle_pretrain"
    exporter = next(h for h in parser["train#handlers"]
                    if isinstance(h, dict) and "BackboneExporter" in str(h.get("_target_")))
    assert exporter["settings"] == "@model_settings"
