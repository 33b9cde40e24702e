"""Mistakes on the command line stop a bundle run at once, with the fix (issue 13): unknown ids (did you mean),
renamed ids (one name per concept), settings that the combination ignores, and our errors printed as a short block
with the full traceback in a log file. Bundle runs here stop in `initialize` (or run a trivial `run_id`), so each
takes seconds: the check fires before any data is read."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muscle_ext.bundle_checks import (
    OverrideError,
    check_override_ids,
    check_overrides,
    check_run,
    combination_problems,
    command_line,
    install_error_hook,
    short_block,
)
from muscle_ext.data import DatalistError
from muscle_ext.networks import build_backbone, save_backbone
from muscle_ext.settings import SettingsError

from tests.bundle_utils import REPO, bundle_command, bundle_env

CLASSIFICATION = ["common.yaml", "classification.yaml"]
MAIN = str(Path("/venv/lib/monai/bundle/__main__.py"))


def _run(bundle: str, configs: list[str], overrides: dict,
         run_id: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    cmd = bundle_command(bundle, configs, overrides, run_id)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=bundle_env(), cwd=REPO)
    return proc, time.monotonic() - start


def _downstream(tmp: Path, xray_root: Path, **extra) -> dict:
    return {"dataset_dir": xray_root, "output_dir": tmp / "out", "model_dir": tmp / "models", "num_workers": 0,
            **extra}


def _refused(proc: subprocess.CompletedProcess, *expected: str) -> str:
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr[-3000:])
        assert (proc.stdout + proc.stderr).count(text) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # said once
    assert "Failed to evaluate" not in proc.stderr and "Traceback" not in proc.stderr  # the short block only
    assert len(proc.stderr.strip().splitlines()) < 15, proc.stderr
    return proc.stderr


# ------------------------------------------------------------------------------------ real command-line runs
def test_unknown_setting_stops_at_once_with_did_you_mean(tmp_path, xray_root):
    proc, seconds = _run("downstream", CLASSIFICATION, _downstream(tmp_path, xray_root, epochs=1))
    _refused(proc, "unknown setting 'epochs' - did you mean 'num_epochs'?", "--allow_unknown_settings true")
    assert "Epoch[" not in proc.stdout and not (tmp_path / "out").exists()  # nothing ran, no folder was made
    assert seconds < 120, seconds


def test_opt_out_lets_an_unknown_id_through(tmp_path, xray_root):
    # run_id `seed`: `initialize` (with the check) runs, then a trivial expression instead of training
    proc, _ = _run("downstream", CLASSIFICATION, _downstream(tmp_path, xray_root, my_note="'site A'",
                                                              allow_unknown_settings="true"), run_id="seed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "passing settings that no config file has" in proc.stdout and "unknown setting 'my_note'" in proc.stdout


def test_use_tracking_is_the_one_name_and_the_old_ones_are_refused(tmp_path, xray_root):
    # pre-training used `track`: the new name runs (one short epoch, no MLflow store), the old one is refused
    tiny = {"dataset_dir": xray_root, "output_dir": tmp_path / "out", "model_dir": tmp_path / "models",
            "image_size": 32, "batch_size": 8, "num_epochs": 1, "warmup_epochs": 0, "queue_size": 16, "bn_splits": 2,
            "train#sampler#num_samples": 16, "cache": "none", "num_workers": 0, "knn_monitor": "false",
            "amp": "false", "channels_last": "false"}
    proc, _ = _run("muscle_pretrain", ["train.yaml"], {**tiny, "use_tracking": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "models" / "backbone.pt").is_file() and not (tmp_path / "out" / "mlruns.db").exists()

    proc, _ = _run("muscle_pretrain", ["train.yaml"], {**tiny, "output_dir": tmp_path / "old", "track": "false"})
    _refused(proc, "'track' was renamed: use --use_tracking false")
    # a monitor datalist the user typed must exist (a missing default only switches the monitor off)
    proc, _ = _run("muscle_pretrain", ["train.yaml"], {**tiny, "output_dir": tmp_path / "typo", "knn_monitor": "true",
                                                        "monitor_datalist": tmp_path / "monitr.json"})
    _refused(proc, "monitr.json' does not exist; give an existing file or folder")
    # downstream had the id `tracking` (which `--tracking` on the command line can never reach: monai.bundle run
    # owns it); a config file that still sets it is refused by the new name
    old = tmp_path / "old_tracking.yaml"
    old.write_text("tracking: false\n")
    proc, _ = _run("downstream", [*CLASSIFICATION, str(old)], _downstream(tmp_path, xray_root))
    _refused(proc, "'tracking' (set in a config file) was renamed: set use_tracking instead")


def test_monai_own_tracking_option_still_stops(tmp_path, xray_root):
    """`--tracking false` is read by monai.bundle run before any bundle code runs: it cannot be given our message,
    but it must not train (documented: use --use_tracking false)."""
    proc, _ = _run("downstream", CLASSIFICATION, _downstream(tmp_path, xray_root, tracking="false"))
    assert proc.returncode != 0 and not (tmp_path / "out").exists()


def test_init_weights_without_init_checkpoint_is_refused(tmp_path, xray_root):
    weights = tmp_path / "backbone.pt"
    save_backbone(weights, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True}, {"bundle": "test"})
    proc, _ = _run("downstream", CLASSIFICATION, _downstream(tmp_path, xray_root, init_weights=weights))
    _refused(proc, "--init_weights is ignored with init scratch: it is read only with --init checkpoint")
    proc, _ = _run("downstream", CLASSIFICATION, _downstream(tmp_path, xray_root, init="checkpoint",
                                                              init_weights=tmp_path / "missing.pt"))
    _refused(proc, "init checkpoint reads its weights from --init_weights, got", "missing.pt', which does not exist")
    assert not (tmp_path / "out").exists()
    # a datalist the user typed must exist: stopped up front, naming the setting, before any folder is made
    proc, _ = _run("downstream", CLASSIFICATION, _downstream(tmp_path, xray_root, datalist=tmp_path / "nope.json"))
    _refused(proc, "--datalist '", "nope.json' does not exist; give an existing file or folder")
    assert not (tmp_path / "out").exists()


def test_missing_paths_only_for_what_was_given(tmp_path):
    from muscle_ext.bundle_checks import missing_paths

    there = tmp_path / "datalist.json"
    there.write_text("{}")
    typed = {"monitor_datalist": [str(tmp_path / "none.json"), "path"], "datalist": [str(there), "path"],
             "pretrain_datalist": [str(tmp_path / "gone.json"), "path"], "seed": [1, "int"]}
    # the default monitor datalist may be missing (the monitor is then off); the given pretrain datalist may not
    assert missing_paths(typed, ["datalist", "pretrain_datalist", "seed"]) == [
        f"--pretrain_datalist '{tmp_path / 'gone.json'}' does not exist; give an existing file or folder"]
    assert missing_paths(typed, ["pretrain_datalist"], skip=("pretrain_datalist",)) == []



def test_the_knn_monitor_is_switched_off_by_name_not_by_a_missing_file():
    from muscle_ext.bundle_checks import combination_problems

    off = {"knn_monitor": "false", "monitor_datalist": "/data/monitor.json"}
    assert combination_problems(off, ["knn_monitor", "monitor_datalist"]) == [
        "--monitor_datalist is ignored with knn_monitor false: it is read only with --knn_monitor true; leave "
        "--monitor_datalist out, or switch to that"]
    assert combination_problems({**off, "knn_monitor": True}, ["monitor_datalist"]) == []


def test_bad_data_prints_a_short_block_and_logs_the_traceback(tmp_path, xray_root):
    items = json.loads((xray_root / "pneumonia_nih" / "datalist.json").read_text())
    root = xray_root / "pneumonia_nih"
    good = [{**i, "image": str(root / i["image"])} for i in items["training"][:6]]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [*good, {"image": str(broken), "label": 0}],
                                    "validation": good}))
    proc, seconds = _run("downstream", CLASSIFICATION, _downstream(tmp_path, xray_root, datalist=datalist,
                                                                    image_size=32, use_tracking="false"))
    text = _refused(proc, "DatalistError: training: 1 of 7 datalist entries are unusable", str(broken),
                    "--on_bad_data skip")
    log = tmp_path / "out" / "error.log"
    assert f"(full traceback: {log})" in text
    full = log.read_text()
    assert "Traceback (most recent call last)" in full and "Failed to evaluate" in full and str(broken) in full
    assert seconds < 180, seconds


# ------------------------------------------------------------------------------------------ the parts, in-process
def test_command_line_is_read_as_monai_bundle_reads_it(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"num_epochs": 3, "config_file": "a.yaml"}))
    argv = [MAIN, "run", "training", "--config_file", "['a.yaml','b.yaml']", "--epochs=2", "--noamp",
            "--class_names", "[no-finding,pneumonia]", "--detector#fpn-channels", "32", "--args_file", str(args_file),
            "--lr", "-0.5", "--", "--help"]
    given = command_line(argv)
    assert given == {"config_file": ["a.yaml", "b.yaml"], "epochs": 2, "amp": False, "num_epochs": 3,
                     "class_names": "[no-finding,pneumonia]", "detector#fpn_channels": 32, "args_file": str(args_file),
                     "lr": -0.5}
    assert command_line(["pytest", "-k", "x"]) is None  # not a bundle run: nothing to check


def test_override_ids_nested_additions_and_components():
    config = {"num_epochs": 3, "warmup_epochs": 1, "typed_settings": {"a": 1}, "use_tracking": True,
              "train": {"dataset": {"cache": "none"},
                        "dataloader": {"_target_": "torch.utils.data.DataLoader", "batch_size": 2}},
              "detector": {"fpn_channels": 64}}
    ok = {"train#dataset#cache": "memory", "detector#fpn_channels": 32, "+typed_settings": {"b": 2},
          "train#dataloader#pin_memory": True}  # a new argument the component's callable takes
    assert check_override_ids(ok, config) == []
    problems = check_override_ids({"epochs": 1, "fpn_channel": 3, "train#dataloader#batchsize": 4,
                                   "train#datasett#cache": 1, "track": False}, config)
    assert "unknown setting 'epochs' - did you mean 'num_epochs'?" in problems
    assert "unknown setting 'fpn_channel' - did you mean 'detector#fpn_channels'?" in problems
    assert "unknown setting 'train#dataloader#batchsize' - did you mean 'train#dataloader#batch_size'?" in problems
    assert ("unknown setting 'train#datasett#cache': the config has no 'train#datasett' - did you mean "
            "'train#dataset'?") in problems
    assert "'track' was renamed: use --use_tracking false" in problems
    # the opt-out passes unknown ids (logged), never renamed ones
    assert check_override_ids({"epochs": 1, "track": "no"}, config, allow_unknown=True) == [
        "'track' was renamed: use --use_tracking no"]


def test_a_warm_up_longer_than_the_training_is_refused():
    assert combination_problems({"warmup_epochs": 5, "num_epochs": 1}, []) == [
        "--warmup_epochs 5 is more than --num_epochs 1: the warm-up would outlast the training; lower --warmup_epochs "
        "(e.g. --warmup_epochs 0) or raise --num_epochs"]
    assert combination_problems({"warmup_rounds": 1, "rounds": 1}, []) == []
    assert combination_problems({"warmup_epochs": 5, "num_epochs": 1}, [], workflow="evaluate") == []


def test_combinations_that_ignore_a_setting():
    assert combination_problems({"init": "scratch"}, ["init_weights"]) == [
        "--init_weights is ignored with init scratch: it is read only with --init checkpoint (a muscle-backbone/1 "
        "file) or --init imagenet (a torchvision/timm ResNet state dict); leave --init_weights out, or switch to that"]
    assert combination_problems({"init": "checkpoint", "init_weights": __file__}, ["init_weights"]) == []
    assert combination_problems({"init": "checkpoint", "init_weights": None}, [])[0].startswith(
        "init checkpoint reads its weights from --init_weights, got no file")
    assert combination_problems({"init": "checkpoint", "init_weights": None}, [], workflow="evaluate") == []
    assert "--backbone_kwargs is ignored with init checkpoint" in combination_problems(
        {"init": "checkpoint", "init_weights": __file__}, ["backbone_kwargs"])[0]
    assert "--layer_decay is ignored with freeze_backbone true" in combination_problems(
        {"freeze_backbone": "true"}, ["layer_decay"])[0]
    assert combination_problems({"freeze_backbone": "false"}, ["layer_decay"]) == []
    assert "--cache_dir is ignored with cache memory" in combination_problems({"cache": "memory"}, ["cache_dir"])[0]
    assert "--input_dir is ignored with input_datalist" in combination_problems(
        {"input_datalist": "/d.json"}, ["input_dir"], workflow="inference")[0]


def test_checks_report_every_problem_of_their_kind_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # check_overrides installs its hook: put the old one back
    configs = REPO / "bundles" / "downstream" / "configs"
    argv = [MAIN, "run", "--config_file", repr([str(configs / "common.yaml"), str(configs / "classification.yaml")]),
            "--epochs", "1", "--init_weights", "/w.pt", "--batch_size", "8.5", "--logging_file", "x.conf",
            "--max_epoch", "2"]
    with pytest.raises(OverrideError) as info:
        check_overrides("downstream bundle", tmp_path, argv=argv)
    lines = str(info.value).splitlines()
    assert lines[0] == "downstream bundle: 2 problem(s) with the settings, nothing was run:"
    assert isinstance(info.value, SettingsError) and len(lines) == 4 and "--allow_unknown_settings true" in lines[-1]
    typed = {"init": ["scratch", "one of scratch|imagenet|checkpoint"], "batch_size": [8.5, "int >= 1"]}
    with pytest.raises(OverrideError) as info:
        check_run("downstream bundle", typed, "train", argv=argv)
    lines = str(info.value).splitlines()
    assert lines[0] == "downstream bundle: 2 problem(s) with the settings, nothing was run:" and len(lines) == 3
    assert "batch_size must be a whole number >= 1, got 8.5 (a float)" in lines[1]
    assert "--init_weights is ignored with init scratch" in lines[2]
    check_run("downstream bundle", typed | {"batch_size": [8, "int >= 1"]}, "train", argv=argv[:4])  # all good


def test_short_block_finds_our_error_in_the_chain(tmp_path):
    from muscle_ext.data.datalist import DatalistIssue, ValidationReport

    report = ValidationReport(40, [DatalistIssue(i, f"/data/{i}.png", "cannot decode") for i in range(30)])
    try:
        try:
            raise DatalistError(report, "training")
        except DatalistError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from inner
    except RuntimeError as outer:
        error = outer
    from muscle_ext.bundle_errors import _user_error

    found = _user_error(error)
    assert isinstance(found, DatalistError)
    block = short_block(found, tmp_path / "error.log").splitlines()
    assert block[0] == "DatalistError: training: 30 of 40 datalist entries are unusable:"
    assert len(block) <= 12 and "more lines (all in the log file)" in block[-3]
    assert "--on_bad_data skip" in block[-2] and block[-1] == f"(full traceback: {tmp_path / 'error.log'})"
    assert _user_error(RuntimeError("x")) is None


def test_an_error_raised_in_a_dataloader_worker_keeps_its_name_and_file(tmp_path, xray_root):
    """torch re-raises a worker's error as the outermost type (MONAI's transform wrapper: RuntimeError) with the
    worker's traceback as text: the short block still names our error, the file and the fix."""
    import shutil

    from monai.data import DataLoader, Dataset

    from muscle_ext.bundle_errors import _user_error
    from muscle_ext.data import LoadXRayd

    good = next((xray_root / "pneumonia_nih").rglob("*.png"))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 3])  # a truncated transfer
    shutil.copy(good, tmp_path / "good.png")
    loader = DataLoader(Dataset([{"image": str(tmp_path / "good.png")}, {"image": str(cut)}], LoadXRayd("image")),
                        batch_size=1, num_workers=1)
    with pytest.raises(Exception) as caught:
        list(loader)
    assert "XRayReadError" not in type(caught.value).__name__  # what torch re-raises is not ours ...
    found = _user_error(caught.value)  # ... but the hook finds it in the worker's text
    assert found is not None and found.kind == "XRayReadError" and str(found).startswith(f"{cut}: ")
    block = short_block(found, tmp_path / "error.log").splitlines()
    assert block[0].startswith(f"XRayReadError: {cut}: ") and "Traceback" not in "\n".join(block)
    assert block[-2].startswith("Fix: ") and "--on_bad_data skip" in block[-2]


def test_error_hook_in_a_process(tmp_path):
    """The hook prints the short block for our errors, keeps Python's traceback for others, exits 1 either way."""
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
              "from muscle_ext.bundle_checks import install_error_hook\n"
              "from muscle_ext.settings import SettingsError\n"
              f"install_error_hook({str(tmp_path)!r}, 'test')\n"
              "kind = sys.argv[1]\n"
              "try:\n"
              "    raise SettingsError('test: 1 setting(s) of the wrong type, nothing was run:\\n  x must be y')\n"
              "except SettingsError as e:\n"
              "    if kind == 'ours': raise RuntimeError('Failed to evaluate') from e\n"
              "raise KeyError('other')\n")
    ours = subprocess.run([sys.executable, "-c", script, "ours"], capture_output=True, text=True, timeout=60)
    assert ours.returncode == 1 and ours.stderr.splitlines()[0].startswith("SettingsError: test: 1 setting")
    assert "Traceback" not in ours.stderr and "Traceback" in (tmp_path / "error.log").read_text()
    other = subprocess.run([sys.executable, "-c", script, "other"], capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "Traceback" in other.stderr and "KeyError: 'other'" in other.stderr
    before = sys.excepthook
    try:
        sys.excepthook = sys.__excepthook__
        install_error_hook(tmp_path)  # installing twice in one process keeps one hook
        install_error_hook(tmp_path)
        assert sys.excepthook._previous is sys.__excepthook__
    finally:
        sys.excepthook = before


ENTRY_CONFIGS = [  # every config a user starts a run with: (bundle, config files, workflow-specific settings)
    *[("downstream", ["common.yaml", f"{task}.yaml"], {}) for task in
      ("classification", "regression", "segmentation", "detection")],
    ("downstream", ["common.yaml", "classification.yaml", "evaluate.yaml"], {}),
    ("downstream", ["common.yaml", "segmentation.yaml", "inference.yaml"], {}),
    ("downstream", ["common.yaml", "detection.yaml", "inference_detection.yaml"], {}),
    ("downstream", ["common.yaml", "classification.yaml", "quick.yaml"], {}),
    ("downstream", ["common.yaml", "segmentation.yaml", "multi_gpu_train.yaml"], {}),
    ("muscle_pretrain", ["train.yaml"], {}),
    ("muscle_pretrain", ["train.yaml", "quick.yaml"], {}),
    ("muscle_pretrain", ["train.yaml", "multi_gpu_train.yaml"], {}),
    ("muscle_pretrain", ["evaluate.yaml"], {"backbone_path": __file__}),
    ("muscle_pretrain", ["inference.yaml"], {"backbone_path": __file__}),
    ("muscle_continual", ["train.yaml"], {"init_weights": __file__}),
]


@pytest.mark.parametrize(("bundle", "configs", "extra"), ENTRY_CONFIGS,
                         ids=["+".join(c[1]).replace(".yaml", "") for c in ENTRY_CONFIGS])
def test_every_entry_config_checks_first(bundle, configs, extra, tmp_path, monkeypatch, xray_root):
    """`initialize` starts with both checks in every entry config: `--epochs 1` stops the first; the defaults pass
    the second (training configs: evaluation and inference read a trained model first). In-process, with the command
    line as monai.bundle's CLI has it: a second or so per config."""
    from monai.bundle import ConfigWorkflow

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():  # torchrun's, for multi_gpu
        monkeypatch.setenv(name, value)
    files = [str(REPO / "bundles" / bundle / "configs" / c) for c in configs]
    settings = {"bundle_root": str(tmp_path), "dataset_dir": str(xray_root), "output_dir": str(tmp_path / "out"),
                **extra}

    def workflow(**overrides) -> ConfigWorkflow:
        argv = [MAIN, "run", "--config_file", repr(files)]
        monkeypatch.setattr(sys, "argv", argv + [a for k, v in overrides.items() for a in (f"--{k}", str(v))])
        flow = ConfigWorkflow(config_file=files, logging_file=False, workflow_type=None, **overrides)
        flow.parser.parse()
        return flow

    steps = workflow(**settings, epochs=1).parser["initialize"]
    assert "check_overrides(" in steps[0] and "check_run(" in steps[1], steps[:2]
    with pytest.raises(RuntimeError) as info:
        workflow(**settings, epochs=1).parser.get_parsed_content("initialize#0")
    assert isinstance(info.value.__cause__, OverrideError), info.value
    meant = {"muscle_continual": "rounds"}.get(bundle, "num_epochs")  # the schedule's length in each bundle
    meant = "" if configs[0] in ("evaluate.yaml", "inference.yaml") else f" - did you mean '{meant}'?"  # none there
    assert str(info.value.__cause__).splitlines()[:2] == [
        f"{bundle} bundle: 1 problem(s) with the settings, nothing was run:", f"  unknown setting 'epochs'{meant}"]
    if not any(c.startswith(("evaluate", "inference")) for c in configs):
        flow = workflow(**settings)
        flow.parser.get_parsed_content("initialize#0")
        flow.parser.get_parsed_content("initialize#1")
    assert not (tmp_path / "out").exists()
