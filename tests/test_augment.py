"""Two-view MoCo augmentation: independent views, crop geometry, X-ray flips, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandAffined, RandFlipd
from monai.utils import set_determinism

from muscle_ext.data.augment import RandResizedCropd, TwoViewd, moco_two_view_transforms, moco_view_augmentations


def sample() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": MetaTensor(torch.rand(1, 48, 40, generator=g)), "label": 1}


def test_two_viewd_copies_and_drops_the_source():
    out = TwoViewd("image")(sample())
    assert set(out) == {"image_q", "image_k", "label"}
    assert torch.equal(out["image_q"], out["image_k"]) and out["image_q"] is not out["image_k"]
    out["image_q"][0, 0, 0] = -5.0
    assert out["image_k"][0, 0, 0] != -5.0
    kept = TwoViewd("image", views=("a", "b"), keep_source=True)(sample())
    assert set(kept) == {"image", "a", "b", "label"}
    with pytest.raises(ValueError):
        TwoViewd(("image", "mask"))


def test_rand_resized_crop_box_respects_scale_and_ratio():
    crop = RandResizedCropd("image", 16, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3))
    crop.set_random_state(0)
    for _ in range(50):
        crop.randomize((48, 40))
        top, left, h, w = crop._box
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 40
        assert 0.3 * 48 * 40 * 0.85 <= h * w <= 48 * 40  # rounding to pixels
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    out = crop(sample())
    assert out["image"].shape == (1, 16, 16)
    # fallback: impossible aspect ratios give a centre crop clamped to the range
    thin = RandResizedCropd("image", 8, scale=(0.99, 1.0), ratio=(3.0, 4.0))
    thin.set_random_state(0)
    thin.randomize((40, 40))
    top, left, h, w = thin._box
    assert (w, h) == (40, 13) and top == 13 and left == 0


def test_rand_resized_crop_content_matches_the_box():
    img = torch.arange(20 * 30, dtype=torch.float32).reshape(1, 20, 30)  # rows 0..19, columns 0..29
    crop = RandResizedCropd("image", (20, 30), scale=(0.3, 0.5), anti_aliasing=False)
    crop.set_random_state(1)
    crop.randomize((20, 30))
    box = crop._box
    crop.set_random_state(1)
    out = crop({"image": img})["image"]
    top, left, h, w = box
    region = img[:, top:top + h, left:left + w]
    # bilinear resize keeps the corner pixels' order: the crop is rows top.., columns left..
    assert float(out.min()) == pytest.approx(float(region.min()), abs=1e-3)
    assert float(out.max()) == pytest.approx(float(region.max()), abs=1e-3)


def test_view_chain_options():
    chest = moco_view_augmentations("image_q", 32, flip_lr=False)
    assert not any(isinstance(t, RandFlipd) for t in chest)  # no left-right flip for chest X-rays
    limbs = moco_view_augmentations("image_q", 32, flip_lr=True, flip_ud=True)
    flips = [t.flipper.spatial_axis for t in limbs if isinstance(t, RandFlipd)]
    assert flips == [1, 0]  # width axis (left-right), then height axis (up-down) of (C, H, W)
    affine = next(t for t in chest if isinstance(t, RandAffined))
    assert affine.rand_affine.rand_affine_grid.rotate_range[0] == pytest.approx(math.radians(10))
    # separate instances for each call: independent randomness per view
    other = moco_view_augmentations("image_q", 32, flip_lr=False)
    assert all(a is not b for a, b in zip(chest, other, strict=True))


def test_two_views_are_independent_and_reproducible():
    chain = moco_two_view_transforms(32, flip_lr=True)
    set_determinism(seed=7)
    try:
        out1 = Compose(chain)(sample())
        set_determinism(seed=7)
        out2 = Compose(moco_two_view_transforms(32, flip_lr=True))(sample())
    finally:
        set_determinism(seed=None)
    assert out1["image_q"].shape == out1["image_k"].shape == (1, 32, 32)
    assert not torch.allclose(out1["image_q"], out1["image_k"])  # the views differ
    assert torch.equal(out1["image_q"], out2["image_q"]) and torch.equal(out1["image_k"], out2["image_k"])
    assert out1["label"] == 1 and "image" not in out1

    pipeline = Compose(moco_two_view_transforms(32, flip_lr=False)).set_random_state(seed=3)
    a = pipeline(sample())
    pipeline.set_random_state(seed=3)
    b = pipeline(sample())
    c = pipeline(sample())
    assert torch.equal(a["image_q"], b["image_q"]) and not torch.equal(b["image_q"], c["image_q"])
    assert np.isfinite(a["image_q"].numpy()).all()
