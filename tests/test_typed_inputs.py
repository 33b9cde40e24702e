"""Data and settings of the wrong type (issue #21): float class labels, settings typed so that they arrive as text,
and a validation split holding one class. Unit tests plus runs of the downstream bundle on real pneumonia X-rays."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch

from muscle_ext.data import DatalistError, load_datalist, subset, validate_datalist
from muscle_ext.handlers import undefined_aware
from muscle_ext.networks import load_backbone_checkpoint
from muscle_ext.settings import SettingsError, check_setting, check_settings

from tests.bundle_utils import REPO, bundle_command, bundle_env, run_bundle

CLASSIFICATION = ["common.yaml", "classification.yaml"]


# ------------------------------------------------------------------------------------------------ datalist labels
@pytest.fixture(scope="module")
def pneumonia(xray_root) -> dict[str, list[dict]]:
    path = xray_root / "pneumonia_nih" / "datalist.json"
    return {section: load_datalist(path, section) for section in ("training", "validation")}


def test_integer_valued_float_labels_become_class_indices(pneumonia):
    items = [{**i, "label": float(i["label"])} for i in subset(pneumonia["training"], 6)]  # as pandas writes them
    checked = validate_datalist(items, classes=[0, 1], decode=False)
    assert [i["label"] for i in checked] == [int(i["label"]) for i in items]
    assert all(type(i["label"]) is int for i in checked)
    assert all(type(i["label"]) is float for i in items)  # the caller's items are left as they were


def test_labels_of_the_wrong_type_are_reported_with_entry_and_type(pneumonia):
    good = subset(pneumonia["training"], 7)
    bad = {1: 2.5, 2: "yes", 3: None, 4: math.nan, 5: True}
    items = [{**item, "label": bad.get(k, item["label"])} for k, item in enumerate(good)]
    with pytest.raises(DatalistError) as info:
        validate_datalist(items, classes=[0, 1], decode=False, source="training")
    assert info.value.report.bad_indices == [1, 2, 3, 4, 5]
    problems = {i.index: i.problem for i in info.value.report.issues}
    assert problems[1] == "label 2.5 (float) is not a whole number, so not a class index"
    assert problems[2] == "label 'yes' is str, not a class index (a whole number)"
    assert problems[3] == "label None is null, not a class index (a whole number)"
    assert problems[4] == "label is NaN (float): a missing value, not a class index"
    assert problems[5].startswith("label True is a bool, not a class index")
    message = str(info.value)
    assert message.startswith("training: 5 of 7 datalist entries are unusable")
    assert f"[2] {items[2]['image']}: label 'yes' is str" in message
    kept = validate_datalist(items, classes=[0, 1], decode=False, on_error="skip")
    assert [i["image"] for i in kept] == [items[0]["image"], items[6]["image"]]


def test_box_labels_are_normalised_and_checked_too(xray_root):
    items = [i for i in load_datalist(xray_root / "tb_detection_tbx11k" / "datalist.json", "training") if i["box"]][:2]
    floats = [{**i, "label": [float(v) for v in i["label"]]} for i in items]
    checked = validate_datalist(floats, classes=[0, 1])
    assert [i["label"] for i in checked] == [i["label"] for i in items]
    assert all(type(v) is int for i in checked for v in i["label"])
    with pytest.raises(DatalistError, match=r"box label 'ATB' is str, not a class index"):
        validate_datalist([{**items[0], "label": ["ATB"] * len(items[0]["box"])}], classes=[0, 1])


def test_regression_labels_stay_floats_and_must_be_numbers(xray_root):
    items = load_datalist(xray_root / "hand_boneage" / "datalist.json", "training")[:4]
    months = [{**items[0], "label": 120.5}, {**items[1], "label": 96}]
    checked = validate_datalist(months, numeric_labels=True, decode=False)
    assert [i["label"] for i in checked] == [120.5, 96] and type(checked[0]["label"]) is float
    bad = [{**items[0], "label": "ten years"}, {**items[1], "label": None}, {**items[2], "label": math.nan},
           {**items[3], "label": False}]
    with pytest.raises(DatalistError) as info:
        validate_datalist(bad, numeric_labels=True, decode=False)
    assert [i.problem for i in info.value.report.issues] == [
        "label 'ten years' is str, not a number", "label None is null, not a number",
        "label is nan (float): a missing value, not a number", "label False is bool, not a number"]


def test_a_split_without_some_class_is_named_with_its_counts(pneumonia, caplog):
    negatives = [i for i in pneumonia["validation"] if i["label"] == 0][:5]
    with caplog.at_level(logging.WARNING, logger="muscle_ext.data.datalist"):
        validate_datalist(negatives, classes=[0, 1], decode=False, source="validation")
    assert "validation: no entries of class 1 (class counts 0: 5, 1: 0)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="muscle_ext.data.datalist"):
        validate_datalist(subset(pneumonia["validation"], 6), classes=[0, 1], decode=False, source="validation")
    assert "no entries of class" not in caplog.text


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(("value", "kind", "problem"), [
    (32, "int >= 1", None),
    (0, "int >= 1", "batch_size must be a whole number >= 1, got 0"),
    (32.0, "int >= 1", "batch_size must be a whole number >= 1, got 32.0 (a float); type it as --batch_size 32"),
    ("32px", "int >= 1", "batch_size must be a whole number >= 1, got the string '32px'; type a plain number, "
                         "e.g. --batch_size 1"),
    (True, "int >= 1", "batch_size must be a whole number >= 1, got True (a yes/no value); type a plain number, "
                       "e.g. --batch_size 1"),
    (None, "int >= 1 or null", None),
    ("null", "int >= 1 or null", "batch_size must be a whole number >= 1 or null, got the string 'null'; to keep "
                                 "null, leave --batch_size out (on the command line None means 'no change' and null "
                                 "arrives as text)"),
    (3e-4, "number > 0", None),
    (1, "number > 0", None),
    (-0.1, "number > 0", "batch_size must be a number > 0, got -0.1"),
    (math.inf, "number > 0", "batch_size must be a number > 0, got inf (a float); type a plain number, e.g. "
                             "--batch_size 0.001"),
    ("'3e-4'", "number > 0", "batch_size must be a number > 0, got the string \"'3e-4'\"; type it as "
                             "--batch_size 0.0003"),
    (0.5, "fraction", None),
    (1.5, "fraction", "batch_size must be a number from 0 to 1, got 1.5; type it as e.g. --batch_size 0.5"),
])
def test_numbers_are_checked_with_how_to_type_them(value, kind, problem):
    assert check_setting("batch_size", value, kind) == problem


@pytest.mark.parametrize(("value", "kind", "problem"), [
    (["no_finding", "pneumonia"], "names", None),
    (("no-finding", "pneumonia"), "names", None),
    ("[no-finding,pneumonia]", "names", "class_names must be a list of distinct names, got the string "
                                        "'[no-finding,pneumonia]'; type it as --class_names "
                                        "\"['no-finding','pneumonia']\""),
    ("no-finding, pneumonia", "names", "class_names must be a list of distinct names, got the string "
                                       "'no-finding, pneumonia'; type it as --class_names "
                                       "\"['no-finding','pneumonia']\""),
    ([0, 1], "names", "class_names must be a list of distinct names, got [0, 1] (a list); type it as "
                      "--class_names \"['0','1']\""),
    (["a", "a"], "names", "class_names must be a list of distinct names, got ['a', 'a']: names repeat"),
    ([], "names", "class_names must be a list of distinct names, got [] (a list); type it as e.g. --class_names "
                  "\"['first','second']\""),
    ([2, 3, 4], "ints", None),
    ("[2,3,x]", "ints", "class_names must be a list of whole numbers, got the string '[2,3,x]'; type it as "
                        "--class_names \"[2,3,4]\""),
    ({"imagenet_stem": True}, "dict", None),
    ("false", "flag", None),
    ("maybe", "flag", "class_names must be true or false, got the string 'maybe'; type it as --class_names true or "
                      "--class_names false"),
    ("Memory", "one of none|memory|disk", "class_names must be one of none, memory, disk, got the string 'Memory'; "
                                          "did you mean --class_names memory?"),
    ("jiont", "one of cyclic|joint", "class_names must be one of cyclic, joint, got the string 'jiont'; did you mean "
                                     "--class_names joint?"),
    ("xyz", "one of cyclic|joint", "class_names must be one of cyclic, joint, got the string 'xyz'; type it as e.g. "
                                   "--class_names cyclic"),
])
def test_lists_and_other_kinds_are_checked(value, kind, problem):
    assert check_setting("class_names", value, kind) == problem


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as info:
        check_settings({"class_names": ("[a-b,c]", "names"), "learning_rate": (0.001, "number > 0"),
                        "num_epochs": ("ten", "int >= 1")}, source="downstream bundle")
    lines = str(info.value).splitlines()
    assert lines[0] == "downstream bundle: 2 setting(s) of the wrong type, nothing was run:"
    assert lines[1].startswith("  class_names must be") and lines[2].startswith("  num_epochs must be")
    with pytest.raises(ValueError, match="unknown kind 'list of str'"):
        check_settings({"x": (1, "list of str")})


def test_undefined_key_metric_rule():
    greater = undefined_aware(lambda current, best: current > best)
    nan = float("nan")
    assert greater(nan, nan) and greater(0.6, nan)  # undefined best: the latest epoch, or any defined one, wins
    assert not greater(nan, 0.6) and not greater(0.5, 0.6) and greater(0.7, 0.6)


# ------------------------------------------------------------------------------------------------ bundle runs
def _write(path: Path, sections: dict[str, list[dict]]) -> Path:
    path.write_text(json.dumps(sections, indent=1))
    return path


@pytest.fixture(scope="module")
def one_class_runs(tmp_path_factory, pneumonia) -> dict[str, Path]:
    """The same tiny classification run (2 epochs, 32 px) twice: labels written as floats (1.0/0.0, as pandas
    writes them) and as ints. Training holds both classes, validation only class 0 (no finding)."""
    training = subset(pneumonia["training"], 16)
    validation = [i for i in pneumonia["validation"] if i["label"] == 0][:8]
    assert {i["label"] for i in training} == {0, 1}
    roots = {}
    for kind, cast in (("float", float), ("int", int)):
        root = tmp_path_factory.mktemp(f"labels_{kind}")
        datalist = _write(root / "datalist.json", {
            section: [{"image": i["image"], "label": cast(i["label"])} for i in items]
            for section, items in (("training", training), ("validation", validation))})
        if kind == "float":
            assert '"label": 1.0' in datalist.read_text()
        proc = run_bundle("downstream", CLASSIFICATION, {
            "datalist": datalist, "output_dir": root / "out", "model_dir": root / "models", "image_size": 32,
            "batch_size": 8, "num_epochs": 2, "num_workers": 0, "use_tracking": "false", "log_models": "false",
            "keep_checkpoints": 2})  # both epochs' states, to compare models/model.pt with
        (root / "train.log").write_text(proc.stdout + proc.stderr)
        roots[kind] = root
    return roots


def _model(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def test_float_labels_train_exactly_like_int_labels(one_class_runs):
    by_float = _model(one_class_runs["float"] / "models" / "model.pt")
    by_int = _model(one_class_runs["int"] / "models" / "model.pt")
    assert by_float["head.fc.weight"].shape == (2, 512)  # two classes, as declared
    assert by_float.keys() == by_int.keys() and all(torch.equal(by_float[k], by_int[k]) for k in by_int)
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in (one_class_runs["float"] / "train.log").read_text()


def test_one_class_validation_warns_and_keeps_the_last_epoch(one_class_runs):
    root = one_class_runs["float"]
    log = (root / "train.log").read_text()
    assert "validation: no entries of class 1 (class counts 0: 8, 1: 0)" in log
    assert "val_auc is undefined (NaN) at epoch 1: model.pt holds the model of epoch 1" in log
    assert ("val_auc is undefined (NaN) at epoch 2: model.pt holds the model of epoch 2; no epoch so far had a "
            "defined val_auc, so the last epoch's model is kept") in log
    kept = _model(root / "models" / "model.pt")
    # 16 items, batch 8: 2 iterations per epoch (ResumableCheckpoint names states by iteration)
    epoch = {e: _model(root / "out" / "checkpoints" / f"checkpoint_{2 * e}.pt") for e in (1, 2)}
    assert all(torch.equal(kept[k], v) for k, v in epoch[2].items())
    assert not all(torch.equal(kept[k], v) for k, v in epoch[1].items())
    assert load_backbone_checkpoint(root / "models" / "backbone.pt")["source"]["epoch"] == 2


def test_mistyped_class_names_stop_the_bundle_before_anything_is_built(tmp_path, xray_root):
    overrides = {"dataset_dir": xray_root, "output_dir": tmp_path / "out", "model_dir": tmp_path / "models",
                 "class_names": "[no-finding,pneumonia]", "num_epochs": 1, "use_tracking": "false"}
    cmd = bundle_command("downstream", CLASSIFICATION, overrides)
    assert cmd[cmd.index("--class_names") + 1] == "[no-finding,pneumonia]"  # as the shell hands it over
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=bundle_env(), cwd=REPO)
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert ("class_names must be a list of distinct names, got the string '[no-finding,pneumonia]'; type it as "
            "--class_names \"['no-finding','pneumonia']\"") in output
    # the check is the first step of `initialize`: the next ones (folders) never ran, nor did data loading/training
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()
    assert "Epoch[" not in output and "Engine run" not in output
    assert seconds < 120, seconds
