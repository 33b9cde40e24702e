"""Dictionary transforms for X-ray pre-processing against data heterogeneity.

Per-dataset pre-processing is a chain built by :func:`xray_preprocessing` from a few settings (intensity
percentiles, optional CLAHE, target size); everything else is stock MONAI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    EnsureChannelFirstd,
    EnsureTyped,
    InvertibleTransform,
    MapTransform,
    Resize,
    ScaleIntensityRangePercentiles,
    ScaleIntensityRangePercentilesd,
    SpatialPadd,
    Transform,
)
from monai.transforms.lazy.functional import apply_pending
from monai.transforms.spatial.functional import resize
from monai.utils import convert_to_dst_type

from .readers import LoadXRayd

__all__ = ["CLAHE", "CLAHEd", "AddTagsd", "RobustIntensityScaled", "SquarePixelResize", "SquarePixelResized",
           "xray_preprocessing"]


def _clip_histogram(hist: np.ndarray, clip: float) -> np.ndarray:
    """Clip each tile histogram at ``clip`` counts and spread the excess evenly (one pass, as OpenCV)."""
    excess = np.clip(hist - clip, 0, None).sum(axis=-1, keepdims=True)
    return np.minimum(hist, clip) + excess / hist.shape[-1]


class CLAHE(Transform):
    """Contrast-limited adaptive histogram equalisation of a ``(C, H, W)`` image with values in [0, 1].

    Tile histograms are clipped at ``clip_limit`` times their mean bin count and their CDFs are bilinearly
    interpolated between tile centres (Zuiderveld 1994). MONAI has no CLAHE; ITK's adaptive equalisation is
    far slower on 2-D radiographs. The clip limit and the one-pass redistribution of the excess are OpenCV's
    (``cv2.createCLAHE``); scikit-image's ``equalize_adapthist`` with ``kernel_size`` = size / ``tiles`` and
    ``clip_limit`` = ``clip_limit / num_bins`` is the same method but for details, mainly that redistribution (it
    keeps clipped bins at the limit: a little less contrast at the same setting); checked in
    ``tests/test_reference_implementations.py``.
    """

    def __init__(self, tiles: int | Sequence[int] = 8, clip_limit: float = 2.0, num_bins: int = 256) -> None:
        self.tiles = (tiles, tiles) if isinstance(tiles, int) else tuple(tiles)
        if clip_limit < 1:
            raise ValueError(f"clip_limit must be >= 1 (a multiple of the mean bin count), got {clip_limit}")
        self.clip_limit = float(clip_limit)
        self.num_bins = int(num_bins)

    def _equalise(self, plane: np.ndarray) -> np.ndarray:
        h, w = plane.shape
        ty, tx = self.tiles
        # Pad by reflection so that the tiles divide the image.
        ph, pw = -h % ty, -w % tx
        padded = np.pad(plane, ((0, ph), (0, pw)), mode="reflect") if ph or pw else plane
        th, tw = padded.shape[0] // ty, padded.shape[1] // tx
        bins = np.clip((padded * (self.num_bins - 1)).round().astype(np.int64), 0, self.num_bins - 1)
        tiles = bins.reshape(ty, th, tx, tw).transpose(0, 2, 1, 3).reshape(ty, tx, th * tw)
        offsets = (np.arange(ty * tx) * self.num_bins).reshape(ty, tx, 1)
        hist = np.bincount((tiles + offsets).ravel(), minlength=ty * tx * self.num_bins)
        hist = hist.reshape(ty, tx, self.num_bins).astype(np.float64)
        hist = _clip_histogram(hist, self.clip_limit * th * tw / self.num_bins)
        cdf = np.cumsum(hist, axis=-1)
        cdf = (cdf - cdf[..., :1]) / np.maximum(cdf[..., -1:] - cdf[..., :1], 1e-12)
        # Bilinear interpolation of the tile mappings at each pixel (tile centres as nodes).
        yc = (np.arange(h) + 0.5) / th - 0.5
        xc = (np.arange(w) + 0.5) / tw - 0.5
        y0 = np.clip(np.floor(yc).astype(int), 0, ty - 1)
        x0 = np.clip(np.floor(xc).astype(int), 0, tx - 1)
        y1, x1 = np.minimum(y0 + 1, ty - 1), np.minimum(x0 + 1, tx - 1)
        wy = np.clip(yc - y0, 0, 1)[:, None]
        wx = np.clip(xc - x0, 0, 1)[None, :]
        b = bins[:h, :w]
        top = cdf[y0[:, None], x0[None, :], b] * (1 - wx) + cdf[y0[:, None], x1[None, :], b] * wx
        bottom = cdf[y1[:, None], x0[None, :], b] * (1 - wx) + cdf[y1[:, None], x1[None, :], b] * wx
        return (top * (1 - wy) + bottom * wy).astype(np.float32)

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if array.ndim != 3:
            raise ValueError(f"CLAHE expects a channel-first 2-D image (C, H, W), got shape {array.shape}")
        out = np.stack([self._equalise(np.clip(c, 0.0, 1.0)) for c in array])
        return convert_to_dst_type(out, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


class CLAHEd(MapTransform):
    """Dictionary wrapper of :class:`CLAHE`."""

    def __init__(self, keys: KeysCollection, tiles: int | Sequence[int] = 8, clip_limit: float = 2.0,
                 num_bins: int = 256, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.clahe = CLAHE(tiles, clip_limit, num_bins)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.clahe(d[key])
        return d


class SquarePixelResize(Resize):
    """Resize a ``(C, H, W)`` image so that its longest side *in millimetres* spans ``spatial_size`` pixels and
    its pixels are square.

    MONAI's ``Resize(size_mode="longest")`` keeps the pixel grid's aspect ratio, so an image with non-square pixels
    (DICOM Pixel/Imager Pixel Spacing, NIfTI/MHA/NRRD spacing) stays squashed. Here the output shape is
    ``round(extent_i / max(extent) * spatial_size)`` with ``extent_i = shape_i * spacing_i``; with square pixels
    this equals ``Resize(size_mode="longest")``. The pixel spacing is the image's (``MetaTensor.pixdim``, set from
    the file by :class:`~muscle_ext.data.XRayReader`) unless given at call time (a mask follows its image).
    Invertible like ``Resize`` (``Invertd`` maps predictions back to the input's geometry).
    """

    def __init__(self, spatial_size: int, mode: str = "area", align_corners: bool | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(spatial_size, size_mode="longest", mode=mode, align_corners=align_corners, dtype=dtype)

    def output_shape(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, ...]:
        extent = [float(n) * float(s) for n, s in zip(shape, spacing, strict=True)]
        return tuple(max(1, int(round(e / max(extent) * self.spatial_size))) for e in extent)

    def __call__(self, img: torch.Tensor, spacing: Sequence[float] | None = None, mode: str | None = None,
                 **kwargs: Any) -> torch.Tensor:
        # always eager: the output shape depends on the spacing, so pending (lazy) operations are applied first
        if isinstance(img, MetaTensor) and img.has_pending_operations:
            img, _ = apply_pending(img)
        shape = img.peek_pending_shape() if isinstance(img, MetaTensor) else img.shape[1:]
        if spacing is None:
            spacing = img.pixdim if isinstance(img, MetaTensor) else (1.0,) * len(shape)
        dtype = self.dtype or img.dtype
        return resize(img, self.output_shape(shape, [float(s) for s in spacing]), mode or self.mode,
                      self.align_corners, dtype, len(shape), False, None, False, self.get_transform_info())


class SquarePixelResized(MapTransform, InvertibleTransform):
    """Dictionary :class:`SquarePixelResize`: every key follows the pixel spacing of ``spacing_key`` (masks and
    label maps carry no spacing of their own)."""

    def __init__(self, keys: KeysCollection, spatial_size: int, mode: str | Sequence[str] = "area",
                 spacing_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        self.resizer = SquarePixelResize(spatial_size)
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference = d.get(self.spacing_key)
        spacing = reference.pixdim if isinstance(reference, MetaTensor) else None
        if reference is not None:
            self._check_same_grid(d, reference)
        for key, mode in self.key_iterator(d, self.modes):
            d[key] = self.resizer(d[key], spacing=spacing, mode=mode)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer.inverse(d[key])
        return d

    def _check_same_grid(self, d: Mapping[Hashable, Any], reference: Any) -> None:
        """A mask on another pixel grid than its image (e.g. a JPEG shown rotated by EXIF and a mask drawn on the
        stored pixels) would be resized into the same square and silently misaligned: stop instead."""
        def shape(x: Any) -> tuple[int, ...]:
            return tuple(int(s) for s in (x.peek_pending_shape() if isinstance(x, MetaTensor) else x.shape[1:]))

        def name(x: Any) -> str:
            return str(getattr(x, "meta", {}).get("filename_or_obj", "?"))

        for key in self.key_iterator(d):
            if shape(d[key]) != shape(reference):
                raise ValueError(f"{key} {name(d[key])} is {shape(d[key])} pixels (rows, columns) but "
                                 f"{self.spacing_key} {name(reference)} is {shape(reference)}: a mask must be drawn "
                                 "on the image's own pixel grid (same size and orientation as a viewer shows it)")


class _SelectedPercentiles(ScaleIntensityRangePercentiles):
    # MONAI's `percentile` sorts a CPU tensor of under 1e6 elements (torch.quantile, O(n log n), multi-threaded) but
    # selects in an array (np.percentile, O(n)); both interpolate linearly, so give it the array
    def _normalize(self, img):
        if isinstance(img, torch.Tensor) and img.device.type == "cpu":
            img = img.numpy()
        return super()._normalize(img)


class RobustIntensityScaled(ScaleIntensityRangePercentilesd):
    """MONAI's :class:`~monai.transforms.ScaleIntensityRangePercentilesd` (map the ``lower``..``upper`` intensity
    percentiles to ``b_min``..``b_max``), the same values (within float32 rounding), with CPU percentiles found by
    selection (``numpy.percentile``) rather than a full sort (``torch.quantile``): the whole loading chain of a
    256 x 256 PNG took 5.3 instead of 11.7 ms here (``benchmarks/results/data_path.md``). Arguments as MONAI's;
    integer or float16 CPU images, which ``torch.quantile`` refuses, are scaled too."""

    def __init__(self, keys: KeysCollection, lower: float, upper: float, b_min: float | None, b_max: float | None,
                 clip: bool = False, relative: bool = False, channel_wise: bool = False,
                 dtype: Any = np.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, lower, upper, b_min, b_max, clip, relative, channel_wise, dtype, allow_missing_keys)
        self.scaler = _SelectedPercentiles(lower, upper, b_min, b_max, clip, relative, channel_wise, dtype)


class AddTagsd(MapTransform):
    """Set tags such as ``dataset`` and ``body_part`` on every item that does not already carry them."""

    def __init__(self, **tags: Any) -> None:
        super().__init__(list(tags), allow_missing_keys=True)
        self.tags = tags

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, value in self.tags.items():
            d.setdefault(key, value)
        return d


def xray_preprocessing(
    keys: KeysCollection = "image",
    mask_keys: KeysCollection = (),
    size: int | Sequence[int] = 256,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    clahe: bool | Mapping[str, Any] = False,
    pad_value: float = 0.0,
    tags: Mapping[str, Any] | None = None,
) -> list[Transform]:
    """The deterministic loading chain for one dataset: load (:class:`~muscle_ext.data.LoadXRayd`: images as a
    viewer shows them, masks as {0, 1}), one float32 channel, robust intensity scaling to [0, 1], optional CLAHE,
    resampling to square pixels with the longest side (in millimetres) at ``size`` pixels, and padding to a
    square ``(1, size, size)`` (masks follow the image with nearest-neighbour interpolation).

    Returns a list so that configs can append augmentations and caching can stop before the first random one.
    """
    image_keys = [keys] if isinstance(keys, str) else list(keys)
    masks = [mask_keys] if isinstance(mask_keys, str) else list(mask_keys)
    side = size if isinstance(size, int) else max(size)
    all_keys = image_keys + masks
    chain: list[Transform] = [LoadXRayd(image_keys)]
    if masks:  # binary {0, 1} by the mask rule of muscle_ext.data.read_mask (anything above 0 is foreground)
        chain.append(LoadXRayd(masks, as_mask=True))
    chain += [
        EnsureChannelFirstd(all_keys),
        EnsureTyped(all_keys, dtype=torch.float32, track_meta=True),
        RobustIntensityScaled(
            image_keys, lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True
        ),
    ]
    if clahe:
        chain.append(CLAHEd(image_keys, **(dict(clahe) if isinstance(clahe, Mapping) else {})))
    chain += [
        SquarePixelResized(all_keys, spatial_size=side, mode=["area"] * len(image_keys) + ["nearest"] * len(masks),
                           spacing_key=image_keys[0]),
        SpatialPadd(all_keys, spatial_size=(side, side), mode="constant", value=pad_value),
    ]
    if tags:
        chain.append(AddTagsd(**dict(tags)))
    return chain
