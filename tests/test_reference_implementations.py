"""Our own code checked against independent implementations of the same method.

* CLAHE (``muscle_ext.data.CLAHE``) against scikit-image's ``equalize_adapthist`` on a real chest radiograph.
* The unstratified percentile bootstrap (``muscle_ext.metrics.bootstrap``) against ``scipy.stats.bootstrap``.
* The linear probe (scikit-learn's logistic regression) against a direct minimisation of the objective its
  ``weight_decay`` is documented to mean.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from muscle_ext.data import CLAHE
from muscle_ext.metrics.bootstrap import bootstrap_ci, bootstrap_mean_ci
from muscle_ext.metrics.embedding import linear_probe_scores

# ----------------------------------------------------------------------------------------------------- CLAHE


@pytest.fixture(scope="module")
def chest(xray_root) -> np.ndarray:
    """The first test image of ``pneumonia_nih`` (256 x 256, NIH ChestX-ray14), scaled to [0, 1] by its min and max
    (as ``equalize_adapthist`` does first, so that both see the same values)."""
    first = json.loads((xray_root / "pneumonia_nih" / "datalist.json").read_text())["test"][0]["image"]
    image = np.asarray(Image.open(xray_root / "pneumonia_nih" / first), dtype=np.float64)
    return (image - image.min()) / (image.max() - image.min())


def _agreement(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    return float(np.corrcoef(ours.ravel(), reference.ravel())[0, 1]), float(np.abs(ours - reference).mean())


def _skimage_clahe(image: np.ndarray, tiles: int, clip_limit: float | None, num_bins: int = 256) -> np.ndarray:
    """``equalize_adapthist`` with our parameters: ``kernel_size`` = image size / tiles (the same tile grid);
    its ``clip_limit`` is a fraction of a tile's pixels, ours a multiple of the mean bin count (pixels / bins), so
    ours / num_bins is the same count; ``None``: no clipping (1.0, a bin may hold the whole tile)."""
    from skimage.exposure import equalize_adapthist  # the test extra (setup.cfg)

    h, w = image.shape
    limit = 1.0 if clip_limit is None else clip_limit / num_bins
    return equalize_adapthist(image, kernel_size=(h // tiles, w // tiles), clip_limit=limit, nbins=num_bins)


def test_adaptive_equalisation_without_clipping_matches_scikit_image(chest):
    """No clipping (AHE): what remains is the tile grid, the per-tile equalisation and the bilinear interpolation
    between tile centres, which the two implement alike. Residual differences: scikit-image maps a bin to
    ``cdf / n`` (ours ``(cdf - cdf[0]) / (n - cdf[0])``, as OpenCV), quantises to 253 bins (16384 // 65), puts
    tile centres half a pixel apart from ours and stretches its output to [0, 1]. Measured on this image:
    correlation 0.9945, mean |difference| 0.011 (median over 40 test images 0.998 / 0.008); a tile grid of 4 or
    16 instead of 8 gives 0.83 / 0.10 against the same reference."""
    ours = CLAHE(tiles=8, clip_limit=256, num_bins=256)(chest[None].astype(np.float32))[0]
    corr, mad = _agreement(ours, _skimage_clahe(chest, tiles=8, clip_limit=None))
    assert corr > 0.99 and mad < 0.02, (corr, mad)


def test_clahe_at_the_bundle_setting_matches_scikit_image(chest):
    """8 x 8 tiles, clip limit 2 (OpenCV's defaults and the pre-training bundle's setting). The clip limit is the
    same count of pixels per bin in both, but the excess is redistributed differently: ours (as OpenCV) adds it
    evenly to every bin in one pass, so clipped bins end above the limit; scikit-image (Zuiderveld's iteration)
    fills only the bins below it, and over-fills nearly uniform tiles (its vectorised second pass raises the bins
    it has just topped up once more). Ours therefore enhances a little more at the same setting (ours at 1.25-1.5
    is closest to scikit-image at 2). Measured on this image: correlation 0.995, mean |difference| 0.025 (over 40
    test images: correlation >= 0.989, mean |difference| <= 0.039); a clip limit of 4 instead of 2 gives 0.959 /
    0.065, 16 x 16 tiles 0.984 / 0.046: both fail here."""
    ours = CLAHE(tiles=8, clip_limit=2.0, num_bins=256)(chest[None].astype(np.float32))[0]
    corr, mad = _agreement(ours, _skimage_clahe(chest, tiles=8, clip_limit=2.0))
    assert corr > 0.99 and mad < 0.035, (corr, mad)


# ------------------------------------------------------------------------------------------------- bootstrap


def _scipy_bootstrap(x: np.ndarray, n_resamples: int, seed: int):
    rng = np.random.default_rng(seed)
    # scipy >= 1.15 names the generator `rng`, older releases `random_state`
    key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    return stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                           **{key: rng})


def test_unstratified_bootstrap_agrees_with_scipy_within_monte_carlo_error():
    """Independent draws (different seeds): the interval ends may differ by Monte Carlo error only. The standard
    deviation of a bootstrap quantile ``q`` from ``B`` resamples is about ``sqrt(q (1 - q) / B) / phi(z_q) * SE``
    (asymptotic variance of a sample quantile); the difference of two runs has sqrt(2) times that; allowed: 4 of
    them (~0.026 here, a tenth of the interval's half-width). A one-sided 90% interval (5th/95th percentiles)
    would move the ends by ~0.04."""
    x = np.random.default_rng(42).normal(1.0, 2.0, 200)
    n_resamples = 5000
    reference = _scipy_bootstrap(x, n_resamples, seed=1)
    q = 0.025
    tolerance = 4 * np.sqrt(2 * q * (1 - q) / n_resamples) / stats.norm.pdf(stats.norm.ppf(q)) \
        * reference.standard_error
    for ci in (bootstrap_ci(lambda _, v: v.mean(), x, x, n_resamples=n_resamples, seed=7, stratified=False),
               bootstrap_mean_ci(x, n_resamples=n_resamples, seed=7)):
        assert ci.point == pytest.approx(x.mean())
        assert abs(ci.low - reference.confidence_interval.low) < tolerance, (ci, reference, tolerance)
        assert abs(ci.high - reference.confidence_interval.high) < tolerance, (ci, reference, tolerance)


def test_unstratified_bootstrap_draws_the_resamples_scipy_draws():
    """Same seed: scipy draws ``rng.integers(0, n, (B, n))`` in one call, we draw ``rng.integers(0, n, n)`` B
    times; with an even n (whole 64-bit words per row) these are the same numbers, so the intervals are equal.
    A failure here with the Monte Carlo test above passing means that scipy changed how it draws, not a bug."""
    x = np.random.default_rng(42).normal(1.0, 2.0, 200)
    reference = _scipy_bootstrap(x, 2000, seed=7).confidence_interval
    ours = bootstrap_ci(lambda _, v: v.mean(), x, x, n_resamples=2000, seed=7, stratified=False)
    np.testing.assert_allclose([ours.low, ours.high], [reference.low, reference.high], rtol=1e-12)


# ---------------------------------------------------------------------------------------------- linear probe


def _direct_probe(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, num_classes: int,
                  weight_decay: float) -> torch.Tensor:
    """The documented objective minimised directly: a softmax layer with one weight row per class on features
    standardised with the training mean and (population) std, ``mean CE + weight_decay * ||W||^2``, bias free."""
    mean, std = train_x.double().mean(0), train_x.double().std(0, correction=0)
    x = (train_x.double() - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, train_y.long()) \
            + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (((query_x.double() - mean) / std) @ weight.T + bias).softmax(1)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_linear_probe_minimises_its_documented_objective(num_classes):
    """scikit-learn's ``C`` is mapped from ``weight_decay`` differently for two classes (one weight row) and more
    (one per class): both must give the probabilities of the objective minimised directly. Getting the mapping
    wrong by a factor of 2 moves probabilities by 0.02-0.13 on this data; ours stay within 5e-5."""
    gen = torch.Generator().manual_seed(num_classes)
    centres = torch.randn(num_classes, 32, generator=gen) * 0.2
    train_y, query_y = torch.arange(150) % num_classes, torch.arange(90) % num_classes
    scale = torch.rand(32, generator=gen) * 5 + 0.1  # features on different scales: standardisation matters
    train_x = (centres[train_y] + torch.randn(150, 32, generator=gen)) * scale + 3
    query_x = (centres[query_y] + torch.randn(90, 32, generator=gen)) * scale + 3
    for weight_decay in (1e-3, 1e-1):
        ours = linear_probe_scores(train_x, train_y, query_x, num_classes, weight_decay=weight_decay)
        direct = _direct_probe(train_x, train_y, query_x, num_classes, weight_decay).float()
        torch.testing.assert_close(ours, direct, atol=2e-4, rtol=0)


def test_linear_probe_keeps_a_column_for_every_class():
    """Classes absent from the training labels get probability 0; one training class: that class, certainly."""
    gen = torch.Generator().manual_seed(0)
    x, query = torch.randn(40, 8, generator=gen), torch.randn(10, 8, generator=gen)
    two_of_three = linear_probe_scores(x, torch.arange(40) % 2 * 2, query, 3)  # labels 0 and 2 only
    assert two_of_three.shape == (10, 3) and torch.all(two_of_three[:, 1] == 0)
    torch.testing.assert_close(two_of_three.sum(1), torch.ones(10))
    torch.testing.assert_close(linear_probe_scores(x, torch.ones(40, dtype=torch.long), query, 2),
                               torch.tensor([[0.0, 1.0]]).expand(10, 2))


@pytest.mark.parametrize("shape", [(1, 256, 256), (1, 1100, 1000), (2, 64, 64)])
def test_robust_scaling_gives_monais_values(chest, shape):
    """RobustIntensityScaled is MONAI's ScaleIntensityRangePercentilesd with percentiles found by selection: the same
    values on real pixels (a sub-1e6-pixel image takes MONAI's torch.quantile path, a larger one its numpy path),
    meta data kept, and per-channel scaling too."""
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRangePercentilesd

    from muscle_ext.data import RobustIntensityScaled

    pixels = torch.as_tensor(np.resize(chest, shape[1:]), dtype=torch.float32)
    image = MetaTensor(torch.stack([pixels * (c + 1) for c in range(shape[0])]), meta={"spatial_shape": shape[1:]})
    for kwargs in ({"clip": True}, {"clip": False, "relative": True}, {"clip": True, "channel_wise": True}):
        theirs = ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, **kwargs)({"image": image.clone()})
        ours = RobustIntensityScaled("image", 0.5, 99.5, 0.0, 1.0, **kwargs)({"image": image.clone()})
        assert torch.allclose(ours["image"], theirs["image"], atol=1e-6), kwargs
        assert isinstance(ours["image"], MetaTensor) and ours["image"].meta["spatial_shape"] == shape[1:]
        assert ours["image"].dtype == torch.float32
