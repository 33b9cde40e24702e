"""A simulated second site: the evaluated X-rays as another detector and another vendor's processing would show them.

A model that ranks well at home can fail at a new hospital because the pictures look different (other detectors,
tone curves, doses, collimation), not because the patients differ. Before a real second site is at hand, the same
test images passed through a fixed, documented change of look tell how much a model's threshold and calibration
depend on the look alone. The idea follows the cross-site evaluation of torchxrayvision (Cohen et al., "TorchXRayVision:
A library of chest X-ray datasets and models", MIDL 2022; Cohen et al., "On the limits of cross-domain
generalization in automated X-ray prediction", MIDL 2020), where models trained on one dataset are scored on the
others, and the simulated domain shifts of robustness benchmarks (Hendrycks & Dietterich, "Benchmarking Neural
Network Robustness to Common Corruptions and Perturbations", ICLR 2019: noise, blur, contrast), here restricted to
what differs between X-ray acquisition chains.

:class:`SimulateSite` (array) and :class:`SimulateSited` (dictionary) apply, in this order, to an image
``(C, H, W)`` with intensities in [0, 1] (the output of :func:`muscle_ext.data.xray_preprocessing`, before the model's
normalisation):

1. **border crop**: ``border_crop`` of the height and of the width is cut from each side (other collimation / field
   of view), and the rest is resized back to ``(H, W)`` (bilinear);
2. **lower resolution**: down-sampled to ``round(resolution * H) x round(resolution * W)`` (area averaging) and back
   to ``(H, W)`` (bilinear): a detector with larger pixels or a softer MTF;
3. **tone curve (LUT)**: a sigmoid contrast curve ``lut(x) = (s(g (x - 0.5)) - s(-g / 2)) / (s(g / 2) - s(-g / 2))``
   with ``s`` the logistic function and ``g = lut_contrast``; maps [0, 1] onto [0, 1], fixes 0, 0.5 and 1,
   steeper in the mid-tones (another vendor's look-up table);
4. **gamma**: ``x ** gamma``;
5. **noise**: Gaussian with a signal-dependent variance, ``sigma(x)^2 = noise_sigma^2 + x / noise_photons`` (read
   noise plus the Gaussian approximation of Poisson quantum noise of ``noise_photons`` quanta at full intensity),
   truncated at ``noise_clip`` standard deviations;
6. clipping to [0, 1].

Bounds (what the tests check): shape and dtype are kept; the output lies in [0, 1]; it differs from the noise-free
image of steps 1-4 by at most ``noise_clip * sqrt(noise_sigma^2 + 1 / noise_photons)`` per pixel
(:meth:`SiteLook.max_noise`; 0.0735 for ``default``). The noise is deterministic per image: its generator is seeded
with the SHA-256 of ``seed`` and the input's pixel bytes, so an image gives the same output in every run, worker
and order, and two different images get different noise.

Presets (:data:`SITE_LOOKS`; the bundles' ``simulated_site`` setting: ``false``, ``true`` = ``default``, or a
preset's name):

- ``default``: crop 4 %, resolution 0.5, LUT contrast 5, gamma 1.3, read noise 0.01, 2000 quanta: a fixed-room
  detector with a harder tone curve;
- ``portable``: crop 8 %, resolution 0.35, LUT contrast 3, gamma 0.8, read noise 0.02, 500 quanta: a bedside unit
  at low dose, softer and noisier.

The parameters are ours, chosen to change the look clearly while leaving the anatomy readable; they model no
particular vendor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type

from ..flags import as_flag

__all__ = ["SITE_LOOKS", "SiteLook", "SimulateSite", "SimulateSited", "describe_site", "simulated_site_cache_suffix",
           "simulated_site_name", "simulated_site_transforms", "site_look_record"]


@dataclass(frozen=True)
class SiteLook:
    """The fixed parameters of one simulated site (see the module docstring for the formulas).

    Attributes:
        border_crop: share of the height and of the width cut from each side, in [0, 0.25).
        resolution: down-sampling factor, in (0, 1] (1: no change).
        lut_contrast: gain ``g`` of the sigmoid tone curve, > 0 (near 0: the identity; larger: steeper mid-tones).
        gamma: exponent applied after the tone curve, > 0.
        noise_sigma: read-noise standard deviation, in intensity units ([0, 1] scale), >= 0.
        noise_photons: quanta at full intensity (Poisson-like variance ``x / noise_photons``); ``0``: no quantum
            noise.
        noise_clip: the noise is truncated at this many standard deviations, > 0.
    """

    border_crop: float = 0.04
    resolution: float = 0.5
    lut_contrast: float = 5.0
    gamma: float = 1.3
    noise_sigma: float = 0.01
    noise_photons: float = 2000.0
    noise_clip: float = 3.0

    def __post_init__(self) -> None:
        checks = {"border_crop": 0 <= self.border_crop < 0.25, "resolution": 0 < self.resolution <= 1,
                  "lut_contrast": self.lut_contrast > 0, "gamma": self.gamma > 0, "noise_sigma": self.noise_sigma >= 0,
                  "noise_photons": self.noise_photons >= 0, "noise_clip": self.noise_clip > 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SiteLook: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of range "
                             "(see the SiteLook docstring)")

    def max_noise(self) -> float:
        """The largest change the noise step can make to one pixel: ``noise_clip * sigma(1)``."""
        quantum = 1.0 / self.noise_photons if self.noise_photons > 0 else 0.0
        return float(self.noise_clip * math.sqrt(self.noise_sigma ** 2 + quantum))

    def describe(self) -> str:
        """One line for reports and logs: every parameter with its unit."""
        quanta = f"{self.noise_photons:g} quanta at full intensity" if self.noise_photons else "no quantum noise"
        return (f"border crop {self.border_crop:.0%} per side, resolution x{self.resolution:g} (area down, bilinear "
                f"up), sigmoid LUT contrast {self.lut_contrast:g}, gamma {self.gamma:g}, noise sigma "
                f"{self.noise_sigma:g} + {quanta}, truncated at {self.noise_clip:g} sigma")


SITE_LOOKS: dict[str, SiteLook] = {
    "default": SiteLook(),
    "portable": SiteLook(border_crop=0.08, resolution=0.35, lut_contrast=3.0, gamma=0.8, noise_sigma=0.02,
                         noise_photons=500.0),
}
"""The named presets of the ``simulated_site`` setting (``true`` means ``default``)."""


def simulated_site_name(setting: Any) -> str | None:
    """The preset a ``simulated_site`` setting names: ``None`` for no simulation (``false``, ``no``, ``off``, as
    :func:`muscle_ext.flags.as_flag` reads them), ``"default"`` for ``true``, else the preset's name.

    Raises:
        ValueError: a value that is neither a yes/no value nor a key of :data:`SITE_LOOKS`; the message names
            ``--simulated_site`` and the choices.
    """
    if isinstance(setting, str) and setting.strip() in SITE_LOOKS:
        return setting.strip()
    try:
        return "default" if as_flag(setting, "simulated_site") else None
    except ValueError:
        choices = ", ".join(["false", "true", *SITE_LOOKS])
        raise ValueError(f"simulated_site must be one of {choices}, got {setting!r}; type it as e.g. "
                         "--simulated_site true") from None


def describe_site(setting: Any, seed: int = 0) -> str | None:
    """``"simulated (<preset>: <parameters>, seed <seed>)"`` for reports and logs, ``None`` without simulation."""
    name = simulated_site_name(setting)
    if name is None:
        return None
    return f"simulated ({name}: {SITE_LOOKS[name].describe()}; noise seed {int(seed)} per image)"


def simulated_site_cache_suffix(setting: Any) -> str:
    """A suffix for cache folders: ``""`` without simulation, ``"_simulated_<preset>"`` with it, so that a disk
    cache of as-acquired images is never read back for simulated ones (MONAI's PersistentDataset keys its files
    by the datalist entry, not by the transforms)."""
    name = simulated_site_name(setting)
    return "" if name is None else f"_simulated_{name}"


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(image[None], size=size, mode=mode, **kwargs)[0]


class SimulateSite(Transform):
    """Give one image ``(C, H, W)`` with intensities in [0, 1] the look of a simulated site (module docstring).

    Args:
        look: a :class:`SiteLook`, or the name of a preset in :data:`SITE_LOOKS`.
        seed: mixed into every image's noise seed (a different ``seed``: other noise, same look).

    Returns a tensor (or array) of the input's type, shape and dtype (a ``MetaTensor`` keeps its meta data), values in
    [0, 1]. Inputs outside [0, 1] are clipped first.

    Raises:
        ValueError: an unknown preset name, or an input that is not ``(C, H, W)``.
    """

    def __init__(self, look: SiteLook | str = "default", seed: int = 0) -> None:
        if isinstance(look, str):
            if look not in SITE_LOOKS:
                raise ValueError(f"unknown simulated site {look!r}; presets: {', '.join(SITE_LOOKS)}")
            look = SITE_LOOKS[look]
        self.look = look
        self.seed = int(seed)

    def noise_free(self, image: torch.Tensor) -> torch.Tensor:
        """Steps 1-4 (crop, resolution, tone curve, gamma) on a float tensor ``(C, H, W)`` in [0, 1]."""
        look = self.look
        _, height, width = image.shape
        dy, dx = int(round(look.border_crop * height)), int(round(look.border_crop * width))
        x = image
        if dy or dx:  # collimation: the field of view shrinks, the remaining anatomy fills the frame
            x = _resize(x[:, dy:height - dy, dx:width - dx], (height, width), "bilinear")
        if look.resolution < 1:
            low = (max(1, int(round(look.resolution * height))), max(1, int(round(look.resolution * width))))
            x = _resize(_resize(x, low, "area"), (height, width), "bilinear")
        x = x.clamp(0.0, 1.0)  # bilinear resizing may overshoot by rounding only; the LUT is defined on [0, 1]
        g = look.lut_contrast
        low_end, high_end = torch.sigmoid(torch.tensor(-g / 2)), torch.sigmoid(torch.tensor(g / 2))
        x = (torch.sigmoid(g * (x - 0.5)) - low_end) / (high_end - low_end)
        return x.clamp(0.0, 1.0) ** look.gamma

    def noise_seed(self, image: torch.Tensor) -> int:
        """The noise generator's seed of one image: SHA-256 of ``seed`` and the image's float32 bytes."""
        digest = hashlib.sha256(str(self.seed).encode() + b"\0")
        digest.update(np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32).tobytes())
        return int.from_bytes(digest.digest()[:8], "little")

    def __call__(self, img: Any) -> Any:
        x = torch.as_tensor(img.as_tensor() if hasattr(img, "as_tensor") else img).detach().float().cpu()
        if x.ndim != 3:
            raise ValueError(f"SimulateSite expects one image (C, H, W), got shape {tuple(x.shape)}")
        x = x.clamp(0.0, 1.0)
        rng = np.random.default_rng(self.noise_seed(x))  # from the input: the same image, the same noise
        clean = self.noise_free(x)
        look = self.look
        variance = look.noise_sigma ** 2 + (clean / look.noise_photons if look.noise_photons > 0 else 0.0)
        normal = np.clip(rng.standard_normal(tuple(clean.shape)), -look.noise_clip, look.noise_clip)
        out = (clean + torch.as_tensor(normal, dtype=torch.float32) * torch.sqrt(torch.as_tensor(variance)))
        out = out.clamp(0.0, 1.0)
        dtype = img.dtype if isinstance(img, (torch.Tensor, np.ndarray)) else None
        return convert_to_dst_type(out, img, dtype=dtype)[0]


class SimulateSited(MapTransform):
    """Dictionary version of :class:`SimulateSite`: ``keys`` (the image; never masks or labels) get the look.

    Args:
        keys: the image keys.
        look, seed: as :class:`SimulateSite`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection = "image", look: SiteLook | str = "default", seed: int = 0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.simulate = SimulateSite(look, seed)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.simulate(d[key])
        return d


def simulated_site_transforms(keys: KeysCollection, setting: Any, seed: int = 0) -> list[Transform]:
    """The transforms a ``simulated_site`` setting asks for, to insert after ``xray_preprocessing`` and before the
    model's normalisation: ``[]`` without simulation, else ``[SimulateSited(keys, <preset>, seed)]``.

    Raises:
        ValueError: an unknown setting (:func:`simulated_site_name`).
    """
    name = simulated_site_name(setting)
    return [] if name is None else [SimulateSited(keys, name, seed)]


def site_look_record(setting: Any, seed: int = 0) -> dict[str, Any] | None:
    """The preset's name, parameters and seed as plain values (for JSON records), ``None`` without simulation."""
    name = simulated_site_name(setting)
    return None if name is None else {"preset": name, **asdict(SITE_LOOKS[name]), "seed": int(seed)}
