"""Site adaptation pieces (issue #20): AdaBN re-estimates batch-norm statistics on the new site's real images and
changes nothing else; recalibration keeps the ranking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose

from muscle_ext.data import load_datalist, xray_preprocessing
from muscle_ext.metrics import roc_auc
from muscle_ext.metrics.calibration import fit_recalibration
from muscle_ext.networks import BackboneClassifier, adapt_batchnorm, build_backbone


@pytest.fixture(scope="module")
def site2_batches(xray_root) -> list[dict]:
    items = load_datalist(xray_root / "pneumonia_site2" / "datalist.json", "training")[:24]
    loader = DataLoader(Dataset(items, Compose(xray_preprocessing("image", size=64))), batch_size=8)
    return list(loader)


def test_adabn_changes_only_batchnorm_running_statistics(site2_batches):
    torch.manual_seed(0)
    model = BackboneClassifier(build_backbone("resnet18", imagenet_stem=True), num_outputs=2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapt_batchnorm(model, site2_batches)
    assert not model.training  # the mode it was in
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    running = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed and changed <= running, sorted(changed - running)[:3]
    assert {k for k in running if k.endswith("running_mean")} <= changed
    # the statistics are those of the new site's images: the first layer's mean equals its batch mean by hand
    images = torch.cat([b["image"] for b in site2_batches])
    with torch.no_grad():
        first = model.backbone.conv1(images.as_tensor() if hasattr(images, "as_tensor") else images)
    assert torch.allclose(model.backbone.bn1.running_mean, first.mean(dim=(0, 2, 3)), atol=1e-4)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        adapt_batchnorm(torch.nn.Linear(2, 2), site2_batches)
    with pytest.raises(ValueError, match="at least one"):
        adapt_batchnorm(model, [])


def test_recalibration_keeps_the_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + 0.7 * rng.random(200), 0.001, 0.999)
    for method in ("temperature", "platt"):
        adapted = fit_recalibration(y[:100], p[:100], method)(p[100:])
        assert roc_auc(y[100:], adapted) == pytest.approx(roc_auc(y[100:], p[100:]))


# ------------------------------------------------------------------ muscle_ext.engines.adaptation and adapt.yaml
SIZE = 32  # tiny images: the behaviour under test does not depend on resolution


@pytest.fixture(scope="module")
def site2(xray_root) -> dict:
    """Real site-2 images at 32 px: a 6-shot slice of the training pool (draw 0), 24 unlabelled pool images and
    24 test images, each ``(N, 1, 32, 32)``."""
    from muscle_ext.engines import draw_shots, load_images

    datalist = xray_root / "pneumonia_site2" / "datalist.json"
    pool, test = load_datalist(datalist, "training"), load_datalist(datalist, "test")
    transform = Compose(xray_preprocessing("image", size=SIZE))
    entries, indices = draw_shots(pool, 6, draw=0, exclude=test)
    return {"datalist": datalist, "entries": entries, "indices": indices,
            "shots": load_images(entries, transform), "groups": [e["patient_id"] for e in entries],
            "unlabelled": load_images(pool[::15], transform)[0], "test": load_images(test[::3], transform)}


def _tiny_model(seed: int = 0) -> BackboneClassifier:
    torch.manual_seed(seed)
    return BackboneClassifier(build_backbone("resnet18", imagenet_stem=True), num_outputs=2).eval()


def test_the_report_cards_scorer_is_the_engines_decode_and_predict_a_batch_at_a_time():
    """SplitScorer (the evaluator's network and inferer) gives what load_images + predict_probabilities give;
    decode_batches keeps the entries' order and turns one-hot labels into class indices."""
    from monai.transforms import AsDiscreted, EnsureTyped

    from muscle_ext.engines import AutocastInferer, decode_batches, load_images, predict_probabilities
    from muscle_ext.handlers.report_card import SplitScorer

    rng = np.random.default_rng(0)
    items = [{"image": rng.normal(size=(1, SIZE, SIZE)).astype(np.float32), "label": int(v)}
             for v in [0, 1, 1, 0, 1, 0, 0, 1, 1, 0]]
    transform = Compose([EnsureTyped(keys="image")])  # MetaTensors, as the bundle's chains give them
    one_hot = Compose([EnsureTyped(keys="image"), AsDiscreted(keys="label", to_onehot=2)])
    batches = list(decode_batches(items, one_hot, batch_size=4))
    assert [len(images) for images, _ in batches] == [4, 4, 2]
    assert all(type(images) is torch.Tensor and images.dtype == torch.float32 for images, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [int(e["label"]) for e in items] and labels.dtype == torch.int64
    unlabelled = [{k: v for k, v in e.items() if k != "label"} for e in items]
    assert all(y is None for _, y in decode_batches(unlabelled, transform, batch_size=4))

    torch.manual_seed(0)  # a network whose outputs depend on its mode (batch norm, dropout)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(4, 2)).train()
    images, _ = load_images(items, transform)
    for inferer in (None, AutocastInferer()):
        scored_labels, probs = SplitScorer(model, "cpu", inferer, batch_size=4)(items, one_hot)
        assert model.training  # its mode restored
        assert scored_labels.dtype == np.int64 and probs.dtype == np.float64
        assert np.array_equal(scored_labels, labels.numpy())
        assert np.array_equal(probs, predict_probabilities(model, images, 4, inferer))
    with pytest.raises(ValueError, match="no 'label' to score against"):
        SplitScorer(model)(unlabelled, transform)


def test_recalibration_keeps_the_auc_and_moves_the_threshold_to_youdens_j(site2):
    from scipy.optimize import minimize_scalar
    from sklearn.metrics import roc_curve

    from muscle_ext.engines import AdaptationConfig, adapt_model, predict_probabilities

    model = _tiny_model()
    images, labels = site2["shots"]
    test_images, test_labels = site2["test"]
    raw_test = predict_probabilities(model, test_images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt_model(model, "recalibrate", site2["shots"], groups=site2["groups"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    assert roc_auc(test_labels.numpy(), result.probabilities(test_images)) == pytest.approx(
        roc_auc(test_labels.numpy(), raw_test))
    # independently: the temperature by NLL on the shots, then Youden's J by scikit-learn's ROC curve
    z = np.log(np.clip(predict_probabilities(model, images), 1e-6, 1 - 1e-6))
    z = z - np.log(np.clip(1 - predict_probabilities(model, images), 1e-6, 1 - 1e-6))
    y = labels.numpy()

    def nll(t):
        p = np.clip(1 / (1 + np.exp(-z / t)), 1e-6, 1 - 1e-6)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()

    temperature = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-8}).x
    calibrated = 1 / (1 + np.exp(-z / temperature))
    fpr, tpr, thresholds = roc_curve(y, calibrated)
    youden = min(float(thresholds[np.argmax(tpr - fpr)]), 1.0)
    assert result.recalibration.scale == pytest.approx(1 / temperature, rel=1e-3)
    assert result.threshold == pytest.approx(youden, abs=1e-3)
    assert result.threshold != pytest.approx(0.5, abs=1e-4)  # it moved from the default
    # Platt: the scale and bias read back from the fitted map are scikit-learn's own
    from sklearn.linear_model import LogisticRegression

    platt = adapt_model(model, "recalibrate", site2["shots"], config=AdaptationConfig(calibration="platt"))
    reference = LogisticRegression(C=np.inf).fit(z.reshape(-1, 1), y)
    assert platt.recalibration.scale == pytest.approx(float(reference.coef_[0, 0]), rel=1e-3)
    assert platt.recalibration.bias == pytest.approx(float(reference.intercept_[0]), rel=1e-3, abs=1e-4)


def test_the_k_shot_slice_is_nested_grouped_and_never_an_evaluation_case(site2):
    from muscle_ext.engines import draw_shots

    pool = load_datalist(site2["datalist"], "training")
    test = load_datalist(site2["datalist"], "test")
    slices = {k: draw_shots(pool, k, draw=3, exclude=test) for k in (5, 10, 20)}
    for k, (entries, indices) in slices.items():
        assert [pool[i]["image"] for i in indices] == [e["image"] for e in entries]
        for label in (0, 1):
            assert len({e["patient_id"] for e in entries if e["label"] == label}) == k
        patients = {e["patient_id"] for e in entries}
        assert all(p["patient_id"] not in patients for p in pool if p["image"] not in {e["image"] for e in entries})
        assert not patients & {t["patient_id"] for t in test}
    assert set(slices[5][1]) <= set(slices[10][1]) <= set(slices[20][1])
    assert set(draw_shots(pool, 5, draw=4, exclude=test)[1]) != set(slices[5][1])  # draws differ
    # a patient of the evaluation cases placed in the pool is never drawn
    leaked = [{**pool[i], "image": f"leaked_{i}.png", "patient_id": test[0]["patient_id"]} for i in range(3)]
    assert all(min(draw_shots(leaked + pool, 20, draw=d, exclude=test)[1]) >= 3 for d in range(5))
    from muscle_ext.settings import SettingsError

    with pytest.raises(SettingsError, match=r"--k 500: .*\(class 0: \d+, class 1: \d+\); lower --k"):
        draw_shots(pool, 500, draw=0, exclude=test)


def test_head_only_changes_only_the_head_and_finetune_l2sp_stops_early(site2):
    from muscle_ext.engines import AdaptationConfig, adapt_model

    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt_model(model, "head", site2["shots"], groups=site2["groups"],
                         config=AdaptationConfig(head_epochs=20))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= {"head.fc.weight", "head.fc.bias"}, sorted(changed)
    assert result.history["epochs"] == 20 and result.recalibration is None and result.threshold == 0.5

    # a learning rate so large that the held-out loss only rises after the first epochs: training stops at patience
    model = _tiny_model()
    result = adapt_model(model, "finetune_l2sp", site2["shots"], groups=site2["groups"],
                         config=AdaptationConfig(finetune_lr=0.5, finetune_epochs=30, patience=2))
    history = result.history
    assert history["stopped_early"] and history["epochs"] < 30
    assert history["epochs"] == history["best_epoch"] + 2
    assert len(history["held_out_loss"]) == history["epochs"] + 1
    # the kept weights are the best epoch's: the held-out loss of the returned model is the recorded minimum
    held = min(history["held_out_loss"])
    assert held == pytest.approx(history["held_out_loss"][history["best_epoch"]])
    with pytest.raises(ValueError, match="unknown adaptation method 'bn'"):
        adapt_model(model, "bn", site2["shots"])


def _model_file(directory, xray_root) -> Path:
    from muscle_ext.networks import describe_preprocessing

    from tests.bundle_utils import save_best_model

    settings = {"task": "classification", "arch": "resnet18", "backbone_kwargs": {"imagenet_stem": True},
                "init": "scratch", "init_weights": None, "image_size": SIZE,
                "preprocessing": describe_preprocessing(xray_preprocessing("image", size=SIZE)),
                "input_mean": 0.0, "input_std": 1.0, "class_names": ["no_finding", "pneumonia"], "num_classes": 2}
    return save_best_model(directory, _tiny_model(), settings)


def test_the_adapt_config_writes_a_model_that_records_its_slice_and_method(tmp_path, xray_root):
    from muscle_ext.networks import load_model_file

    from tests.bundle_utils import run_bundle

    source = _model_file(tmp_path / "source", xray_root)
    out = tmp_path / "adapted"
    run_bundle("downstream", ["common.yaml", "classification.yaml", "adapt.yaml"],
               {"dataset_dir": xray_root, "model_path": source, "output_dir": out,
                "target_datalist": xray_root / "pneumonia_site2" / "datalist.json", "k": 5, "draw": 1,
                "method": "adabn+recalibrate", "max_items": 12, "num_workers": 0, "n_bootstrap": 20,
                "batch_size": 5})  # several batches of images of different sizes, concatenated and sliced again
    payload = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    adaptation = payload["settings"]["adaptation"]
    assert payload["settings"]["image_size"] == SIZE and payload["settings"]["format"] == "muscle-model/1"
    assert adaptation["method"] == "adabn+recalibrate" and adaptation["k"] == 5 and adaptation["draw"] == 1
    assert adaptation["target_datalist"] == "pneumonia_site2" and adaptation["source_datalist"] == "pneumonia_nih"
    assert "/" not in json.dumps(adaptation["target_datalist"])  # a name, never a path
    pool = load_datalist(xray_root / "pneumonia_site2" / "datalist.json", "training")
    from muscle_ext.engines import draw_shots

    assert adaptation["shot_entries"] == draw_shots(pool, 5, 1, exclude=load_datalist(
        xray_root / "pneumonia_site2" / "datalist.json", "test"))[1]
    assert adaptation["recalibration"]["method"] == "temperature"
    assert adaptation["threshold"] == adaptation["recalibration"]["threshold"]
    for split in ("target_test", "source_test"):
        assert adaptation["metrics"][split]["n"] == 12 and 0 <= adaptation["metrics"][split]["roc_auc"]["value"] <= 1
    assert adaptation["source_model"]["file"] == "model.pt"
    # only batch-norm statistics differ from the source model, and the file loads into a fresh network
    state, _ = load_model_file(out / "models" / "model.pt")
    source_state, _ = load_model_file(source)
    changed = {k for k in state if not torch.equal(state[k], source_state[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    _tiny_model().load_state_dict(state)
    assert json.loads((out / "adaptation.json").read_text())["shot_entries"] == adaptation["shot_entries"]


@pytest.mark.parametrize(("override", "message"), [
    ({"method": "adabn+platt"}, "method must be one of none, recalibrate, adabn, adabn+recalibrate"),
    ({"k": 500}, "--k 500: the pool has fewer than 500 patients in a class"),
])
def test_a_bad_method_or_too_large_k_stops_with_a_short_error(tmp_path, xray_root, override, message):
    import subprocess

    from tests.bundle_utils import bundle_command, bundle_env

    source = _model_file(tmp_path / "source", xray_root)
    settings = {"dataset_dir": xray_root, "model_path": source, "output_dir": tmp_path / "out",
                "target_datalist": xray_root / "pneumonia_site2" / "datalist.json", "num_workers": 0,
                "method": "recalibrate", **override}
    proc = subprocess.run(bundle_command("downstream", ["common.yaml", "classification.yaml", "adapt.yaml"], settings),
                          capture_output=True, text=True, timeout=300, env=bundle_env())
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "models" / "model.pt").exists()


def test_the_mean_auc_over_draws_is_the_mean_of_each_draws_auc_with_an_interval_around_it():
    from sklearn.metrics import roc_auc_score

    from muscle_ext.metrics import runs_mean_ci

    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30), np.ones(20)].astype(int)
    scores = labels + rng.normal(0, 1.0, size=(4, 50))
    result = runs_mean_ci("roc_auc", scores, labels, n_resamples=200, seed=0)
    expected = [roc_auc_score(labels, s) for s in scores]
    assert np.allclose(result["per_run"], expected)
    assert result["value"] == pytest.approx(np.mean(expected))
    assert result["ci_low"] < result["value"] < result["ci_high"]


def test_adapt_curves_config_sweeps_methods_k_and_draws_and_writes_no_model(tmp_path, xray_root):
    from muscle_ext.networks import save_backbone

    from tests.bundle_utils import run_bundle

    source = _model_file(tmp_path / "source", xray_root)
    continued = tmp_path / "continued" / "backbone.pt"  # the continual pre-training path: another backbone
    continued.parent.mkdir()
    save_backbone(continued, _tiny_model(1).backbone, "resnet18", {"imagenet_stem": True})
    out = tmp_path / "curves"
    run_bundle("downstream", ["common.yaml", "classification.yaml", "adapt.yaml", "adapt_curves.yaml"],
               {"dataset_dir": xray_root, "model_path": source, "output_dir": out, "continued_backbone": continued,
                "target_datalist": xray_root / "pneumonia_site2" / "datalist.json",
                "methods": ["none", "recalibrate", "adabn", "head"], "ks": [2, 4], "draws": 2,
                "max_items": 16, "num_workers": 0, "n_bootstrap": 20})
    curves = json.loads((out / "adaptation_curves.json").read_text())
    assert curves["ks"] == [2, 4] and curves["draws"] == 2 and curves["target_datalist"] == "pneumonia_site2"
    assert curves["continued_backbone"]["file"] == "backbone.pt"  # recorded by name and SHA-256, never by path
    assert set(curves["methods"]) == {"none", "recalibrate", "adabn", "head"}
    for method, by_k in curves["methods"].items():
        for k in ("2", "4"):
            assert len(by_k[k]["target_auc"]["per_draw"]) == 2, method
            assert by_k[k]["target_auc"]["ci_low"] <= by_k[k]["target_auc"]["value"] <= by_k[k]["target_auc"][
                "ci_high"]
    # recalibration is monotone: the ranking, hence every draw's AUC, is that of the model as it came
    assert curves["methods"]["recalibrate"]["4"]["target_auc"]["per_draw"] == pytest.approx(
        curves["methods"]["none"]["4"]["target_auc"]["per_draw"])
    assert curves["n_target_test"] == 16 and curves["n_source_test"] == 16
    assert [row["k"] for row in curves["best"]] == [2, 4]
    assert (out / "figures" / "adaptation_curves.png").stat().st_size > 5000
    assert not (out / "models" / "model.pt").exists()


@pytest.mark.parametrize(("override", "message"), [
    ({"k": 5}, "--k is ignored with ks [5, 10, 20]"),
    ({"methods": ["none", "hed"]}, "did you mean head?"),
    ({"ks": [1, 5], "methods": ["finetune_l2sp"]}, "every k must be at least 2"),
])
def test_adapt_curves_refuses_a_single_model_setting_or_an_unknown_method(tmp_path, xray_root, override, message):
    import subprocess

    from tests.bundle_utils import bundle_command, bundle_env

    source = _model_file(tmp_path / "source", xray_root)
    settings = {"dataset_dir": xray_root, "model_path": source, "output_dir": tmp_path / "out",
                "target_datalist": xray_root / "pneumonia_site2" / "datalist.json", "num_workers": 0, **override}
    proc = subprocess.run(bundle_command("downstream", ["common.yaml", "classification.yaml", "adapt.yaml",
                                                        "adapt_curves.yaml"], settings),
                          capture_output=True, text=True, timeout=300, env=bundle_env())
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "adaptation_curves.json").exists()


def test_a_continued_backbone_replaces_the_backbone_and_keeps_the_head(tmp_path):
    from muscle_ext.engines import replace_backbone
    from muscle_ext.networks import save_backbone
    from muscle_ext.settings import SettingsError

    model, continued = _tiny_model(0), _tiny_model(1)
    path = tmp_path / "backbone.pt"
    save_backbone(path, continued.backbone, "resnet18", {"imagenet_stem": True})
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    record = replace_backbone(model, path)
    assert record["file"] == "backbone.pt" and replace_backbone(model, None) is None
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 continued.backbone.state_dict().values(), strict=True))
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items())
    other = tmp_path / "resnet34.pt"
    save_backbone(other, build_backbone("resnet34", imagenet_stem=True), "resnet34", {"imagenet_stem": True})
    with pytest.raises(SettingsError, match="--continued_backbone .*resnet34.pt: .*same architecture"):
        replace_backbone(model, other)
