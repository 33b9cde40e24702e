"""Two-view augmentation for MoCo on X-rays, as MONAI dictionary transforms.

:class:`TwoViewd` copies the pre-processed image into two keys; :func:`moco_view_augmentations` builds one
view's random chain (MoCo v2's recipe without colour jitter, with X-ray-safe geometry). Build the whole
pipeline with :func:`moco_two_view_transforms` and wrap it in one ``Compose``: ``Compose`` gives each random
transform its own seed (from ``set_determinism``'s seed, or ``Compose.set_random_state``), so the two views
are independent and a run is reproducible. Two separate ``Compose`` objects created after the same
``set_determinism`` call would draw the *same* seeds, and the two views would be identical.

Intensities are expected in [0, 1] (``xray_preprocessing``'s output); images are ``(C, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    CopyItemsd,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resize,
    SpatialCrop,
    Transform,
)
from monai.utils import ensure_tuple, ensure_tuple_rep

__all__ = ["MetaFreeCompose", "RandResizedCropd", "TwoViewd", "mild_augmentation", "moco_two_view_transforms",
           "moco_view_augmentations"]


class TwoViewd(CopyItemsd):
    """Copy one image (``keys``) into the two view keys, then drop the source so that it is not collated."""

    def __init__(self, keys: KeysCollection = "image", views: Sequence[str] = ("image_q", "image_k"),
                 keep_source: bool = False, allow_missing_keys: bool = False) -> None:
        if len(ensure_tuple(keys)) != 1 or len(views) != 2:
            raise ValueError(f"TwoViewd copies one key into two views, got keys={keys}, views={views}")
        super().__init__(keys, times=2, names=tuple(views), allow_missing_keys=allow_missing_keys)
        self.keep_source = keep_source

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = super().__call__(data)
        if not self.keep_source:
            for key in self.key_iterator(d):
                del d[key]
        return d


class MetaFreeCompose(Compose):
    """A ``Compose`` whose transforms run with MONAI's meta-data tracking off: they take and return plain
    tensors, without the per-operation ``MetaTensor`` bookkeeping (affine, applied operations). For chains whose
    output needs no meta data, such as MoCo's views: the two-view chain runs 2.3x faster per image.

    Tracking is a process-wide MONAI setting, switched off for the duration of the call and restored after it,
    so do not run transforms that need meta data in other threads of the same process meanwhile (DataLoader
    worker processes, or the main process between training steps, are fine).
    """

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, *args, **kwargs)
        finally:
            set_track_meta(tracking)


class RandResizedCropd(Randomizable, MapTransform):
    """Random crop of a random area fraction (``scale``) and aspect ratio (``ratio`` = width / height), resized
    to ``spatial_size``: the ``RandomResizedCrop`` of the SimCLR/MoCo recipes, built on MONAI's ``SpatialCrop``
    and ``Resize`` (so ``MetaTensor`` meta data track both). All ``keys`` get the same box.

    The box is drawn as torchvision does: up to 10 tries of (area, log-uniform aspect) that fit the image,
    else a centre crop with the aspect clamped to ``ratio``.
    """

    def __init__(self, keys: KeysCollection, spatial_size: int | Sequence[int], scale: Sequence[float] = (0.3, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), mode: str | Sequence[str] = "bilinear",
                 anti_aliasing: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.spatial_size = ensure_tuple_rep(spatial_size, 2)
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.anti_aliasing = anti_aliasing
        self._box: tuple[int, int, int, int] = (0, 0, 0, 0)  # (top, left, height, width)

    def randomize(self, data: Sequence[int]) -> None:
        height, width = int(data[0]), int(data[1])
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                self._box = (int(self.R.randint(0, height - h + 1)), int(self.R.randint(0, width - w + 1)), h, w)
                return
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        self._box = ((height - h) // 2, (width - w) // 2, h, w)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        shape = d[first].shape[1:]
        if len(shape) != 2:
            raise ValueError(f"RandResizedCropd expects (C, H, W) images, got shape {tuple(d[first].shape)}")
        self.randomize(shape)
        top, left, h, w = self._box
        crop = SpatialCrop(roi_start=(top, left), roi_end=(top + h, left + w))
        for key, mode in self.key_iterator(d, self.mode):
            if tuple(d[key].shape[1:]) != tuple(shape):
                raise ValueError(f"'{key}' has spatial shape {tuple(d[key].shape[1:])}, '{first}' has {tuple(shape)}")
            resize = Resize(self.spatial_size, mode=mode, anti_aliasing=self.anti_aliasing and mode != "nearest")
            d[key] = resize(crop(d[key]))
        return d


def moco_view_augmentations(
    key: str,
    size: int | Sequence[int],
    flip_lr: bool,
    flip_ud: bool = False,
    crop_scale: Sequence[float] = (0.3, 1.0),
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    rotate_degrees: float = 10.0,
    scale_delta: float = 0.1,
    affine_prob: float = 0.5,
    padding_mode: str = "zeros",
    flip_prob: float = 0.5,
    gamma: Sequence[float] = (0.7, 1.5),
    gamma_prob: float = 0.5,
    intensity_scale: float = 0.2,
    intensity_shift: float = 0.1,
    intensity_prob: float = 0.8,
    blur_sigma: Sequence[float] | None = None,
    blur_prob: float = 0.5,
    noise_std: float = 0.02,
    noise_prob: float = 0.2,
) -> list[Transform]:
    """One view's random chain (new transform instances on every call, so each view has its own randomness).

    Args:
        key: the view's key (e.g. ``"image_q"``).
        size: output spatial size ``(H, W)`` (an int means square).
        flip_lr: random left-right flips; off for chest X-rays (heart on the patient's left), a per-body-part
            setting.
        flip_ud: random up-down flips (off by default: radiographs have a canonical up).
        crop_scale, crop_ratio: area fraction and width/height ratio of the random resized crop.
        rotate_degrees, scale_delta, affine_prob: the small affine (rotation within ±degrees, scale within
            1 ± delta per axis) and its probability; ``padding_mode`` fills the corners it uncovers.
        gamma, gamma_prob: gamma range of ``RandAdjustContrastd``.
        intensity_scale, intensity_shift, intensity_prob: contrast (``v * (1 + f)``, ``|f| <= scale``) and
            brightness (``v + o``, ``|o| <= shift``), the grey-level analogue of colour jitter.
        blur_sigma, blur_prob: Gaussian blur sigma range in pixels; ``None`` scales MoCo v2's (0.1, 2.0) at
            224 px to ``size``.
        noise_std, noise_prob: additive Gaussian noise (std drawn in [0, noise_std]).

    These defaults are ours (MUSCLE published no augmentation details).
    """
    spatial = ensure_tuple_rep(size, 2)
    if blur_sigma is None:
        factor = max(spatial) / 224.0
        blur_sigma = (0.1 * factor, 2.0 * factor)
    chain: list[Transform] = [
        RandResizedCropd(key, spatial, scale=crop_scale, ratio=crop_ratio),
        RandAffined(key, prob=affine_prob, rotate_range=(math.radians(rotate_degrees),),
                    scale_range=(scale_delta, scale_delta), mode="bilinear", padding_mode=padding_mode,
                    spatial_size=spatial, cache_grid=True),
    ]
    if flip_lr:
        chain.append(RandFlipd(key, prob=flip_prob, spatial_axis=1))  # (C, H, W): axis 1 of H, W is the width
    if flip_ud:
        chain.append(RandFlipd(key, prob=flip_prob, spatial_axis=0))
    chain += [
        RandAdjustContrastd(key, prob=gamma_prob, gamma=tuple(gamma)),
        RandScaleIntensityd(key, factors=intensity_scale, prob=intensity_prob),
        RandShiftIntensityd(key, offsets=intensity_shift, prob=intensity_prob),
        RandGaussianSmoothd(key, sigma_x=tuple(blur_sigma), sigma_y=tuple(blur_sigma), prob=blur_prob),
        RandGaussianNoised(key, prob=noise_prob, std=noise_std),
    ]
    return chain


def moco_two_view_transforms(
    size: int | Sequence[int],
    flip_lr: bool,
    source_key: str = "image",
    views: Sequence[str] = ("image_q", "image_k"),
    track_meta: bool = False,
    **augment_kwargs: Any,
) -> list[Transform]:
    """``TwoViewd`` followed by an independent :func:`moco_view_augmentations` chain per view.

    Append the result to the pre-processing chain and wrap everything in a single ``Compose``. Without
    ``track_meta`` the chain comes wrapped in a :class:`MetaFreeCompose` (the views are plain tensors).
    """
    chain: list[Transform] = [TwoViewd(source_key, views=views)]
    for view in views:
        chain += moco_view_augmentations(view, size, flip_lr, **augment_kwargs)
    return chain if track_meta else [MetaFreeCompose(chain)]


def mild_augmentation(image_key: str = "image", mask_keys: KeysCollection = (), size: float = 224,
                      flip_prob: float = 0.0) -> list:
    """The downstream fine-tuning augmentation (ours): mild geometry and contrast changes of a pre-processed
    ``(C, H, W)`` image in [0, 1], with its masks following the geometry.

    - ``RandAffined`` (p 0.5): rotation up to 0.1 rad, scale +-10 %, translation up to 5 % of ``size`` pixels, zero
      padding; bilinear for the image, nearest for ``mask_keys``;
    - ``RandFlipd`` (p ``flip_prob``) left-right (columns); 0 by default: chest X-rays keep their laterality;
    - ``RandAdjustContrastd`` (p 0.3, gamma 0.8-1.25) of the image only.

    Put the list in one ``Compose`` after the pre-processing: it gives each random transform its own seed.
    """
    masks = list(ensure_tuple(mask_keys)) if mask_keys else []
    keys = [image_key, *masks]
    geometry: dict[str, Any] = {"mode": ["bilinear"] + ["nearest"] * len(masks)} if masks else {}
    return [
        RandAffined(keys=keys, prob=0.5, rotate_range=0.1, scale_range=0.1, translate_range=0.05 * size,
                    padding_mode="zeros", **geometry),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1),
        RandAdjustContrastd(keys=image_key, prob=0.3, gamma=[0.8, 1.25]),
    ]
