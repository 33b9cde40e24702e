"""Site adaptation pieces (issue #20): AdaBN re-estimates batch-norm statistics on the new site's real images and
changes nothing else; recalibration keeps the ranking."""

from __future__ import annotations

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
