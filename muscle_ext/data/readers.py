"""X-ray image readers that plug into MONAI's ``LoadImage``/``LoadImaged``.

Every format comes out the same way: a 2-D float32 array with rows = image height (top to bottom) and
columns = image width (left to right), bright = dense (bone bright, air dark). MONAI's own readers return
x-first arrays (``PILReader(reverse_indexing=True)``, ``PydicomReader(swap_ij=True)``); ours do not.
NIfTI follows ITK's convention: voxel axis 0 is x (columns), axis 1 is y (rows).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImaged
from monai.utils import MetaKeys, SpaceKeys

from .dicom import read_dicom
from .pixels import COLOUR_TOLERANCE, XRayReadError, apply_exif_orientation, grey_from_colour

__all__ = ["LoadXRayd", "XRayReadError", "XRayReader", "read_mask", "read_xray", "xray_format"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def xray_format(path: str | os.PathLike) -> str | None:
    """Return ``"dicom"``, ``"pil"``, ``"nifti"`` or ``"itk"`` for a supported file name, else ``None``."""
    name = str(path).lower()
    for fmt, suffixes in (
        ("dicom", DICOM_SUFFIXES),
        ("pil", PIL_SUFFIXES),
        ("nifti", NIFTI_SUFFIXES),
        ("itk", ITK_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return fmt
    # DICOM files from PACS exports often carry no suffix at all.
    if Path(path).suffix == "" and _has_dicom_preamble(Path(path)):
        return "dicom"
    return None


def _declared_bits(path: Path, img: Any) -> int:
    """Bits per sample the file says it stores (PNG IHDR, TIFF BitsPerSample); 8 when it does not say."""
    if img.format == "PNG":
        with open(path, "rb") as f:
            header = f.read(26)
        return int(header[24]) if len(header) == 26 and header[12:16] == b"IHDR" else 8
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, (8,))
        return int(max(bits if isinstance(bits, tuple) else (bits,)))
    return 8


def _read_vector_itk(path: Path) -> np.ndarray:
    """Every channel of a 16-bit colour/alpha PNG or TIFF at full precision (Pillow cuts them to 8 bits)."""
    import itk

    reader = itk.ImageFileReader[itk.VectorImage[itk.F, 2]].New(FileName=str(path))
    reader.Update()
    return np.asarray(itk.array_from_image(reader.GetOutput()), dtype=np.float32)  # (H, W, C); float32 is exact


def _pil_channels(path: Path, palette_as_index: bool = False) -> tuple[np.ndarray, dict]:
    """Decode a PNG/JPEG/TIFF/BMP at its stored precision, turned by its EXIF orientation.

    Returns ``(H, W)`` or ``(H, W, C)`` float32 samples and ``source_mode``, ``bits_stored``, ``max_value``,
    ``has_alpha``, ``exif_orientation``, ``lossy``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a worker
            mode, declared = img.mode, _declared_bits(path, img)
            orientation = int(img.getexif().get(0x0112, 1) or 1)
            lossy = img.format in ("JPEG", "MPO")
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                bits = 16 if mode.startswith("I;16") or declared == 16 else 32
                array = np.asarray(img).astype(np.float32)
            elif declared > 8:
                array, bits = _read_vector_itk(path), declared
            elif mode in ("L", "LA", "RGB", "RGBA"):
                array, bits = np.asarray(img).astype(np.float32), 8
            elif mode in ("P", "PA") and palette_as_index:  # a label map: its indices, not their colours
                array, bits = np.asarray(img.getchannel(0)).astype(np.float32), 8
            elif mode == "1":
                array, bits = np.asarray(img.convert("L")).astype(np.float32), 8
            else:  # palette, CMYK, YCbCr, ...: their colours, then the grey check
                has_transparency = "transparency" in img.info or mode in ("PA", "RGBa")
                array, bits = np.asarray(img.convert("RGBA" if has_transparency else "RGB")).astype(np.float32), 8
    except FileNotFoundError:
        raise
    except UnidentifiedImageError as e:
        raise XRayReadError(path, "not a readable image (unknown or damaged format)") from e
    except (OSError, SyntaxError, ValueError, RuntimeError) as e:
        raise XRayReadError(path, f"damaged image ({e})") from e
    channels = 1 if array.ndim == 2 else array.shape[-1]
    if array.ndim not in (2, 3) or channels > 4:
        raise XRayReadError(path, f"expected a 2-D image with at most 4 channels, got shape {array.shape}")
    info = {"source_mode": mode, "bits_stored": bits, "max_value": 2.0**bits - 1, "has_alpha": channels in (2, 4),
            "exif_orientation": orientation, "lossy": lossy}
    return apply_exif_orientation(array, orientation), info


def _read_pil(path: Path) -> tuple[np.ndarray, dict]:
    array, info = _pil_channels(path)
    if array.ndim == 3:
        array = grey_from_colour(array, info["max_value"], path, has_alpha=info["has_alpha"])
    meta = {"format": "pil", "source_mode": info["source_mode"], "bits_stored": info["bits_stored"],
            "exif_orientation": info["exif_orientation"], "spacing_known": False, "spacing": (1.0, 1.0)}
    return array, meta


def _squeeze_2d(path: Path, data: np.ndarray) -> np.ndarray:
    data = np.squeeze(data)
    if data.ndim != 2:
        raise XRayReadError(path, f"expected a 2-D image (singleton axes allowed), got shape {data.shape}")
    return data


def _read_nifti(path: Path) -> tuple[np.ndarray, dict]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise XRayReadError(path, f"unreadable NIfTI ({type(e).__name__}: {e})") from e
    raw_shape = tuple(int(s) for s in data.shape)
    image = _squeeze_2d(path, data).T.astype(np.float32)  # (x, y) -> (rows, cols)
    zooms = img.header.get_zooms()
    spacing = (float(zooms[1]), float(zooms[0])) if len(zooms) >= 2 else (1.0, 1.0)
    return image, {"format": "nifti", "nifti_affine": np.asarray(img.affine), "nifti_shape": raw_shape,
                   "spacing_known": True, "spacing": spacing}


def _read_itk(path: Path) -> tuple[np.ndarray, dict]:
    import itk

    try:
        img = itk.imread(str(path))
    except Exception as e:
        if not path.exists():
            raise FileNotFoundError(str(path)) from e
        raise XRayReadError(path, f"unreadable ITK image ({type(e).__name__}: {e})") from e
    image = _squeeze_2d(path, itk.array_from_image(img)).astype(np.float32)  # numpy order is (y, x)
    sx, sy = (float(s) for s in tuple(img.GetSpacing())[:2])
    return image, {"format": "itk", "spacing_known": True, "spacing": (sy, sx)}


_READERS = {"dicom": read_dicom, "pil": _read_pil, "nifti": _read_nifti, "itk": _read_itk}
MASK_MAX_LEVELS = 64  # more distinct values than this in a lossless file: a grey image, not a label map


def _checked_path(path: str | os.PathLike) -> tuple[Path, str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise XRayReadError(path, "is a folder, not an image file")
    fmt = xray_format(path)
    if fmt is None:
        raise XRayReadError(path, "unsupported file type (expected DICOM, PNG/JPEG/TIFF, NIfTI, MHA or NRRD)")
    return path, fmt


def read_xray(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read one X-ray file as a viewer shows it: ``(H, W)`` float32, rows top to bottom, bright = dense.

    What is applied per format and variant (DICOM LUTs, padding and polarity, EXIF orientation, 16-bit and colour
    files) is tabulated in ``docs/READER.md``. Meta data never holds DICOM patient fields.

    Raises:
        FileNotFoundError: no such file.
        XRayReadError: any file that cannot be read as a radiograph, with the file and the cause.
    """
    path, fmt = _checked_path(path)
    image, meta = _READERS[fmt](path)
    if image.size == 0:
        raise XRayReadError(path, "image has no pixels")
    if not np.isfinite(image).all():
        raise XRayReadError(path, "image holds NaN or infinite values")
    meta["original_shape"] = tuple(int(s) for s in image.shape)
    return image, meta


def _raw_dicom(path: Path) -> np.ndarray:
    """The stored values of a DICOM mask: one frame, one or three samples per pixel (no LUTs: labels are labels)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    except Exception as e:
        raise XRayReadError(path, f"unreadable DICOM mask ({type(e).__name__}: {e})") from e
    samples = int(ds.get("SamplesPerPixel", 1))
    if pixels.ndim == 4 or (pixels.ndim == 3 and samples == 1):
        raise XRayReadError(path, f"multi-frame DICOM mask ({pixels.shape[0]} frames, e.g. DICOM SEG): one 2-D "
                                  "mask per image expected")
    return pixels


def read_mask(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read a binary segmentation mask: ``(H, W)`` float32 of 0 (background) and 1 (foreground).

    One rule for every encoding: **foreground is any pixel whose value is above 0 in any channel** (0/1, 0/255,
    0/128, one label per structure, colour-coded structures; alpha is ignored), in the orientation the image
    readers use; palette PNGs by their indices. Lossy JPEG is the exception that its noise forces: foreground is
    brighter than half the brightest value (an all-zero JPEG is empty).

    Raises:
        XRayReadError: a lossless mask with non-integer values (a probability map: threshold it first) or more than
            ``MASK_MAX_LEVELS`` distinct values (a grey image, not a label map), a JPEG whose brightest value is
            below 6 % of the range (0/1 labels lost in compression noise), a multi-frame DICOM, or a file that
            cannot be read.
    """
    path, fmt = _checked_path(path)
    lossy = False
    if fmt == "pil":
        values, info = _pil_channels(path, palette_as_index=True)
        if values.ndim == 3 and info["has_alpha"]:
            values = values[..., :-1]
        lossy = info["lossy"]
    elif fmt == "dicom":
        values = _raw_dicom(path)
    else:
        values = _READERS[fmt](path)[0]
    if values.ndim == 3:
        values = values.max(axis=-1)  # any channel
    if values.size == 0:
        raise XRayReadError(path, "mask has no pixels")
    if lossy:
        brightest = float(values.max())
        if 0 < brightest <= COLOUR_TOLERANCE * 255:  # 0/1 labels saved as JPEG: indistinguishable from its noise
            raise XRayReadError(path, f"JPEG mask whose brightest value is {brightest:.0f}: labels this dark cannot "
                                      "be told from compression noise; store masks as PNG (lossless)")
        mask = values > brightest / 2  # an all-background JPEG decodes to exact zeros
        rule = "jpeg: > half the brightest value"
    else:
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise XRayReadError(path, "mask holds non-integer values (a probability map?): threshold it into a "
                                      "label image (0 = background) first")
        levels = np.unique(values)
        if len(levels) > MASK_MAX_LEVELS:
            raise XRayReadError(path, f"mask has {len(levels)} distinct values: a grey image, not a label map "
                                      "(0 = background, anything above 0 = foreground)")
        mask, rule = values > 0, "> 0"
    meta = {"format": fmt, "mask_rule": rule, "spacing_known": False, "spacing": (1.0, 1.0),
            "original_shape": tuple(int(s) for s in values.shape)}
    return mask.astype(np.float32), meta


class XRayReader(ImageReader):
    """MONAI ``ImageReader`` for radiographs (``read_xray``) or their masks (``as_mask=True``: ``read_mask``) in
    DICOM, PNG/JPEG/TIFF, NIfTI and MHA/NRRD.

    Load with :class:`LoadXRayd` (this reader only; MONAI's ``LoadImaged`` would fall back to its own readers
    when this one refuses a file); follow with ``EnsureChannelFirstd`` for ``(1, H, W)``. The affine maps (row,
    column) indices to millimetres when the file states a pixel spacing. Meta data never holds DICOM patient fields.
    """

    def __init__(self, as_mask: bool = False) -> None:
        super().__init__()
        self.as_mask = bool(as_mask)

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        names = filename if isinstance(filename, (list, tuple)) else [filename]
        return all(xray_format(n) is not None for n in names)

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> list:
        names = data if isinstance(data, (list, tuple)) else [data]
        return [(read_mask if self.as_mask else read_xray)(n) for n in names]

    def get_data(self, img: list) -> tuple[np.ndarray, dict]:
        arrays = [a for a, _ in img]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"cannot stack images of different shapes {[a.shape for a in arrays]}")
        array = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=0)
        meta = dict(img[0][1])
        row_spacing, col_spacing = meta["spacing"]
        meta[MetaKeys.AFFINE] = np.diag([row_spacing, col_spacing, 1.0, 1.0])
        meta[MetaKeys.ORIGINAL_AFFINE] = meta[MetaKeys.AFFINE].copy()
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(arrays[0].shape)
        meta[MetaKeys.SPACE] = SpaceKeys.LPS  # MONAI asks for a space; ours is the image plane itself
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel" if len(arrays) == 1 else 0
        meta.pop("nifti_affine", None) if len(arrays) > 1 else None
        return array, meta


class LoadXRayd(LoadImaged):
    """``LoadImaged`` that reads with :class:`XRayReader` only.

    MONAI's loader falls back to its other registered readers when the given one raises, so a file our reader
    refuses (and says why) would come back from ITK or pydicom with another orientation, no LUTs and the patient's
    name in its meta data. Here the reader is passed at call time, which MONAI's public ``__call__`` offers and
    which has no fallback: the :class:`XRayReadError` that names the file and the cause reaches the user.
    """

    def __init__(self, keys: KeysCollection, as_mask: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, reader=XRayReader, image_only=True, allow_missing_keys=allow_missing_keys)
        self.xray_reader = XRayReader(as_mask=as_mask)

    def __call__(self, data: Any, reader: ImageReader | None = None) -> dict:
        return super().__call__(data, reader or self.xray_reader)
