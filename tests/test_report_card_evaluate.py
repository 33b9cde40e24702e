"""The report card of configs/evaluate.yaml (issue #17): an operating point chosen on validation and carried to the
test split, a simulated site, and recalibration on a small labelled slice; each number checked against an independent
computation here (numpy / scikit-learn on synthetic arrays or on the run's per-case files), the simulated site's
transform against its documented bounds, and the settings' mistakes against their messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

from muscle_ext.data import datalist_section, load_datalist, xray_preprocessing
from muscle_ext.data.simulated_site import (
    SITE_LOOKS,
    SimulateSite,
    SimulateSited,
    describe_site,
    simulated_site_name,
    simulated_site_transforms,
)
from muscle_ext.handlers.report_card import (
    carry_operating_point,
    parse_operating_point,
    recalibration_section,
    report_card_problems,
)
from muscle_ext.metrics import read_case_scores
from muscle_ext.settings import SettingsError

from tests.bundle_utils import downstream_configs, run_bundle, save_best_model
from tests.test_calibration import _ece_by_hand

SIZE = 64
PNEUMONIA = "pneumonia_nih/datalist.json"


# ------------------------------------------------------------------------------------- independent computations
# _ece_by_hand: tests/test_calibration.py
def _youden_by_hand(y: np.ndarray, p: np.ndarray) -> float:
    """The highest candidate threshold maximising sensitivity + specificity - 1 (p >= t is positive)."""
    candidates = np.unique(p)[::-1]  # highest first: ties go to the highest threshold
    j = [np.mean(p[y == 1] >= t) + np.mean(p[y == 0] < t) - 1 for t in candidates]
    return float(candidates[int(np.argmax(j))])


def _counted(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, float]:
    called = p >= t
    return {"sensitivity": float(np.mean(called[y == 1])), "specificity": float(np.mean(~called[y == 0])),
            "accuracy": float(np.mean(called == (y == 1)))}


def _synthetic(n: int, seed: int, temperature: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z), scores sigmoid(temperature * z): over-confident by ``temperature``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, n)
    y = (rng.random(n) < expit(z)).astype(int)
    return y, expit(temperature * z)


def test_the_carried_threshold_and_the_recalibrated_ece_match_an_independent_computation():
    val, test, piece = _synthetic(300, 1), _synthetic(400, 2), _synthetic(120, 3)
    carried = carry_operating_point("youden", val, test)
    t = _youden_by_hand(*val)
    assert carried["threshold"] == pytest.approx(t) and carried["chosen_on"] == "validation"
    for split, (y, p) in (("validation", val), ("test", test)):
        for name, value in _counted(y, p, t).items():
            assert carried[split][name] == pytest.approx(value), (split, name)
    by_target = carry_operating_point("sensitivity@0.8", val, test)
    reach = [c for c in np.unique(val[1]) if np.mean(val[1][val[0] == 1] >= c) >= 0.8]
    assert by_target["threshold"] == pytest.approx(max(reach)) and by_target["target_sensitivity"] == 0.8
    assert by_target["validation"]["sensitivity"] >= 0.8
    same = carry_operating_point("youden", val, val, split="validation")  # evaluating the split it was chosen on
    assert same["validation (evaluated)"] == same["validation"]

    for method in ("temperature", "platt"):
        card = recalibration_section(method, piece, test, "youden", n_resamples=100, seed=0)
        after = expit(card["scale"] * logit(np.clip(test[1], 1e-6, 1 - 1e-6)) + card["bias"])
        assert card["ece_before"]["value"] == pytest.approx(_ece_by_hand(*test), abs=1e-12)
        assert card["ece_after"]["value"] == pytest.approx(_ece_by_hand(test[0], after), abs=1e-9)
        assert card["ece_after"]["value"] < 0.6 * card["ece_before"]["value"]  # the over-confidence is undone
        assert card["ece_before"]["ci_low"] <= card["ece_before"]["value"] <= card["ece_before"]["ci_high"]
        assert card["roc_auc_after"] == pytest.approx(card["roc_auc_before"])
        assert card["roc_auc_before"] == pytest.approx(roc_auc_score(*test))
        sliced = expit(card["scale"] * logit(np.clip(piece[1], 1e-6, 1 - 1e-6)) + card["bias"])
        assert card["threshold"] == pytest.approx(_youden_by_hand(piece[0], sliced), abs=1e-9)
        for name, value in _counted(test[0], after, card["threshold"]).items():
            assert card["test"][name] == pytest.approx(value), (method, name)
    assert card["slice"]["n"] == 120 and "temperature" not in card
    fitted = recalibration_section("temperature", piece, test)
    assert fitted["temperature"] == pytest.approx(2.5, rel=0.3)  # the slice's over-confidence, found on 120 cases
    assert "warning" not in fitted
    noise = (np.tile([0, 0, 1, 1], 30), np.tile([0.1, 0.9, 0.1, 0.9], 30))  # scores that say nothing of the labels
    assert "the temperature reached the end" in recalibration_section("temperature", noise, test)["warning"]


# ------------------------------------------------------------------------------------------------- simulated site
@pytest.fixture(scope="module")
def images(xray_root) -> list[MetaTensor]:
    """Three real test X-rays as the model's pre-processing gives them: (1, 64, 64) float32 in [0, 1]."""
    items = load_datalist(xray_root / PNEUMONIA, "test")[:3]
    chain = Compose(xray_preprocessing("image", size=SIZE))
    return [chain(dict(item))["image"] for item in items]


def test_the_simulated_site_is_deterministic_bounded_and_keeps_shape_and_dtype(images):
    first = SimulateSited("image", "default", seed=0)({"image": images[0], "label": 1})
    again = SimulateSited("image", "default", seed=0)({"image": images[0].clone(), "label": 1})  # a fresh transform
    out = first["image"]
    assert torch.equal(out, again["image"]) and first["label"] == 1
    assert isinstance(out, MetaTensor) and out.shape == images[0].shape and out.dtype == torch.float32
    assert out.meta.get("filename_or_obj") == images[0].meta.get("filename_or_obj")
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    array = SimulateSite("default")(images[0].numpy())  # numpy in, numpy out: the same pixels
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and np.array_equal(array, out.numpy())
    for name, look in SITE_LOOKS.items():
        simulate = SimulateSite(name, seed=0)
        for image in images:
            plain = image.as_tensor()
            noisy = simulate(plain)
            clean = simulate.noise_free(plain)
            assert float((noisy - clean).abs().max()) <= look.max_noise() + 1e-6, name  # the documented bound
            assert float((noisy - plain).abs().mean()) > 0.02, name  # a visibly different look
    assert SITE_LOOKS["default"].max_noise() == pytest.approx(3 * np.sqrt(0.01 ** 2 + 1 / 2000))
    # the noise differs between images and between seeds
    residual = [SimulateSite()(i.as_tensor()) - SimulateSite().noise_free(i.as_tensor()) for i in images[:2]]
    assert not torch.allclose(residual[0], residual[1])
    assert not torch.equal(SimulateSite(seed=1)(images[0].as_tensor()), out.as_tensor())
    # the tone curve and gamma by hand: a flat image stays flat through the crop and the resampling
    for value in (0.2, 0.5, 0.8):
        g, gamma = SITE_LOOKS["default"].lut_contrast, SITE_LOOKS["default"].gamma
        lut = (expit(g * (value - 0.5)) - expit(-g / 2)) / (expit(g / 2) - expit(-g / 2))
        flat = SimulateSite().noise_free(torch.full((1, 32, 40), value))
        assert torch.allclose(flat, torch.full_like(flat, lut ** gamma), atol=1e-6), value


def test_the_simulated_site_setting():
    assert simulated_site_transforms("image", False) == [] and simulated_site_transforms("image", "false") == []
    assert simulated_site_name("true") == "default" and simulated_site_name(True) == "default"
    assert simulated_site_name("portable") == "portable"
    [transform] = simulated_site_transforms("image", "portable", seed=3)
    assert transform.simulate.look == SITE_LOOKS["portable"] and transform.simulate.seed == 3
    assert describe_site(False) is None
    assert describe_site(True).startswith("simulated (default: border crop 4% per side, resolution x0.5")
    with pytest.raises(ValueError, match="simulated_site must be one of false, true, default, portable"):
        simulated_site_name("portabel")


# --------------------------------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize(("settings", "given", "expected"), [
    ({"task": "segmentation", "operating_point": "youden"}, ["operating_point"],
     "--operating_point youden applies to classification only"),
    ({"task": "classification", "operating_point": "sensitivity@1.5"}, ["operating_point"],
     "operating_point 'sensitivity@1.5': the target sensitivity must be above 0 and at most 1, got 1.5"),
    ({"task": "classification", "operating_point": "sensitivity"}, ["operating_point"],
     "operating_point 'sensitivity': the target sensitivity after '@' must be a number"),
    ({"task": "classification", "operating_point": "yuoden"}, ["operating_point"],
     "did you mean --operating_point youden?"),
    ({"task": "segmentation", "simulated_site": "true"}, ["simulated_site"],
     "--simulated_site true applies to classification and regression only"),
    ({"task": "regression", "recalibrate_on": __file__}, ["recalibrate_on"],
     "--recalibrate_on applies to classification only"),
    ({"task": "classification", "operating_point": "youden"}, ["operating_point", "threshold"],
     "--threshold is replaced by the threshold that --operating_point youden chooses"),
    ({"task": "classification"}, ["recalibration_k"], "--recalibration_k is read only with --recalibrate_on"),
    ({"task": "classification", "operating_point_datalist": __file__}, ["operating_point_datalist"],
     "with --operating_point fixed nothing is chosen"),
    ({"task": "classification", "simulated_site": "true", "recalibrate_on": __file__, "datalist": "/d/datalist.json"},
     ["simulated_site", "recalibrate_on"], "the slice must come from the simulated site"),
    ({"task": "classification", "recalibrate_on": __file__, "datalist": __file__, "split": "validation"},
     ["recalibrate_on"], "which is the evaluated split here"),
])
def test_each_mistake_names_its_setting_and_the_fix(settings, given, expected):
    problems = report_card_problems(**settings, given=given)
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_defaults_and_a_well_formed_card_pass():
    assert report_card_problems("detection") == [] and report_card_problems("segmentation", split="validation") == []
    assert report_card_problems("regression", simulated_site="portable", given=["simulated_site"]) == []
    assert report_card_problems("classification", "sensitivity@0.9", "true", __file__, __file__,
                                given=["operating_point", "simulated_site", "recalibrate_on"]) == []
    assert parse_operating_point(" sensitivity@0.95 ") == ("sensitivity", 0.95)
    with pytest.raises(SettingsError, match="operating_point"):
        parse_operating_point(0.5)


# ---------------------------------------------------------------------------------- the bundle on real images
def _model(directory: Path) -> Path:
    """A seeded random resnet18 classifier recorded as a 64 px, [0, 1]-input pneumonia model (no training: the card's
    numbers are checked against the run's own per-case scores, whatever the model's skill)."""
    from muscle_ext.networks import BackboneClassifier, build_backbone, describe_preprocessing

    torch.manual_seed(0)
    network = BackboneClassifier(build_backbone("resnet18", imagenet_stem=True), num_outputs=2).eval()
    settings = {"task": "classification", "arch": "resnet18", "backbone_kwargs": {"imagenet_stem": True},
                "init": "scratch", "init_weights": None, "image_size": SIZE,
                "preprocessing": describe_preprocessing(xray_preprocessing("image", size=SIZE)),
                "input_mean": 0.0, "input_std": 1.0, "class_names": ["no_finding", "pneumonia"], "num_classes": 2}
    return save_best_model(directory, network, settings)


def _settings(tmp: Path, xray_root: Path, **extra) -> dict:
    return {"dataset_dir": xray_root, "output_dir": tmp / "out", "model_dir": tmp / "models", "max_items": 16,
            "batch_size": 8, "num_workers": 0, "n_bootstrap": 200, "use_tracking": "false",
            "amp": "false", **extra}  # float32 (no bf16 on CPUs with AMX): scores that the test can recompute


def test_evaluate_carries_youden_to_a_simulated_test_split_and_recalibrates(tmp_path, xray_root):
    model = _model(tmp_path / "models")
    datalist = xray_root / PNEUMONIA
    proc = run_bundle("downstream", downstream_configs("pneumonia", "evaluate.yaml"),
                      _settings(tmp_path, xray_root, operating_point="youden", simulated_site="true",
                                recalibrate_on=datalist, recalibration_k=5))
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    test = read_case_scores(out / "per_case.csv")
    val = read_case_scores(out / metrics["operating_point"]["per_case"])
    y, p, yv, pv = test["label"], test["score"], val["label"], val["score"]
    assert metrics["site"] == describe_site(True, 0) and metrics["site"].startswith("simulated (default: ")
    assert "(site: simulated (default: " in proc.stderr + proc.stdout  # the log line names the site

    # the operating point: Youden's J on the validation scores, carried to the test scores, by hand
    card = metrics["operating_point"]
    assert card["rule"] == "youden" and card["chosen_on"] == "validation" and len(yv) == 16 == len(y)
    assert card["threshold"] == pytest.approx(_youden_by_hand(yv, pv)) == metrics["threshold"]
    for split, (labels, scores) in (("validation", (yv, pv)), ("test", (y, p))):
        for name, value in _counted(labels, scores, card["threshold"]).items():
            assert card[split][name] == pytest.approx(value), (split, name)
            if split == "test":  # the headline metrics are those at the carried threshold
                assert metrics[name]["value"] == pytest.approx(value), name
    assert "test_operating_threshold" in proc.stdout + proc.stderr
    assert metrics["ece"]["value"] == pytest.approx(_ece_by_hand(y, p), abs=1e-12)
    assert metrics["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, p))

    # recalibration on 5 patients per class of the simulated validation split, never a test patient
    recal = metrics["recalibration"]
    piece = read_case_scores(out / recal["per_case"])
    after = expit(recal["scale"] * logit(np.clip(p, 1e-6, 1 - 1e-6)) + recal["bias"])
    assert recal["method"] == "temperature" and recal["temperature"] == pytest.approx(1 / recal["scale"])
    assert recal["ece_before"]["value"] == pytest.approx(metrics["ece"]["value"])
    assert recal["ece_after"]["value"] == pytest.approx(_ece_by_hand(y, after), abs=1e-9)
    assert recal["roc_auc_after"] == pytest.approx(recal["roc_auc_before"]) == pytest.approx(roc_auc_score(y, p))
    sliced = expit(recal["scale"] * logit(np.clip(piece["score"], 1e-6, 1 - 1e-6)) + recal["bias"])
    assert recal["threshold"] == pytest.approx(_youden_by_hand(piece["label"], sliced), abs=1e-9)
    drawn = recal["slice"]
    assert drawn["source"].startswith("the simulated validation split") and drawn["site"] == metrics["site"]
    assert drawn["datalist"] == "pneumonia_nih" and drawn["k"] == 5 and drawn["patients"] == 10
    pool = load_datalist(datalist, "validation")
    entries = [pool[i] for i in drawn["entries"]]
    assert [int(e["label"]) for e in entries] == piece["label"].astype(int).tolist()
    test_patients = {e.get("patient_id") for e in load_datalist(datalist, "test")}
    assert not {e.get("patient_id") for e in entries} & test_patients
    # 5 patients drawn per class, all their images (a patient may have images of both classes)
    assert len({e["patient_id"] for e in entries}) == 10
    assert all(len({e["patient_id"] for e in entries if e["label"] == c}) >= 5 for c in (0, 1))

    # the evaluated images went through the simulated site, the validation images of the threshold did not
    from muscle_ext.networks import BackboneClassifier, build_backbone, load_model_file

    network = BackboneClassifier(build_backbone("resnet18", imagenet_stem=True), num_outputs=2).eval()
    network.load_state_dict(load_model_file(model)[0])
    home = xray_preprocessing("image", size=SIZE)

    def scores(section: str, chain: list) -> np.ndarray:
        items = datalist_section(datalist, section, 16)[:4]
        batch = torch.stack([Compose(chain)(dict(i))["image"].as_tensor() for i in items])
        with torch.no_grad():
            return torch.softmax(network(batch), dim=1)[:, 1].numpy()

    simulated = scores("test", home + simulated_site_transforms("image", True, seed=0))
    assert np.allclose(simulated, p[:4], atol=1e-5)
    assert not np.allclose(scores("test", home), p[:4], atol=1e-5)
    assert np.allclose(scores("validation", home), pv[:4], atol=1e-5)


def test_another_site_is_scored_at_the_threshold_chosen_at_home(tmp_path, xray_root):
    """--datalist another site, --operating_point_datalist the home one: the threshold comes from the home
    validation split and is carried, unchanged, to the other site's test split."""
    _model(tmp_path / "models")
    home = xray_root / PNEUMONIA
    run_bundle("downstream", downstream_configs("pneumonia", "evaluate.yaml"),
               _settings(tmp_path, xray_root, operating_point="youden", operating_point_datalist=home,
                         datalist=xray_root / "pneumonia_site2" / "datalist.json"))
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    card = metrics["operating_point"]
    val = read_case_scores(out / card["per_case"])
    expected = [int(e["label"]) for e in datalist_section(home, "validation", 16)]
    assert val["label"].astype(int).tolist() == expected  # the home site's validation split chose it
    assert card["chosen_on_datalist"] == "pneumonia_nih" and metrics["threshold"] == card["threshold"]
    assert card["threshold"] == pytest.approx(_youden_by_hand(val["label"], val["score"]))
    test = read_case_scores(out / "per_case.csv")
    for name, value in _counted(test["label"], test["score"], card["threshold"]).items():
        assert metrics[name]["value"] == pytest.approx(value), name


def test_a_malformed_operating_point_stops_the_run_naming_it(tmp_path, xray_root):
    """As users see it: a fresh ``python -m monai.bundle run`` prints our short block (every problem at once) and
    stops before any image is read."""
    import subprocess

    from tests.bundle_utils import REPO, bundle_command, bundle_env

    _model(tmp_path / "models")
    cmd = bundle_command("downstream", downstream_configs("pneumonia", "evaluate.yaml"),
                         _settings(tmp_path, xray_root, operating_point="sensitivity@1.5", recalibration="platt"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=bundle_env(), cwd=REPO)
    assert proc.returncode != 0
    assert "2 problem(s) with the report-card settings, nothing was run" in proc.stderr
    assert "operating_point 'sensitivity@1.5': the target sensitivity must be above 0 and at most 1" in proc.stderr
    assert "--recalibration is read only with --recalibrate_on" in proc.stderr
    assert "Traceback" not in proc.stderr and "Failed to evaluate" not in proc.stderr  # the short block only
    assert not (tmp_path / "out" / "metrics.json").exists()
