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
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

__all__ = ["XRayReadError", "XRayReader", "read_xray", "xray_format"]

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


class XRayReadError(ValueError):
    """A file could not be read as an X-ray; the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str) -> None:
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


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


def _nominal_range(ds: Any) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _dicom_spacing(ds: Any) -> tuple[float, float] | None:
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])  # DICOM order: row spacing, column spacing
    return None


def _read_dicom(path: Path) -> tuple[np.ndarray, dict]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise XRayReadError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # pydicom raises many types for damaged files
        raise XRayReadError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from e
    if "PixelData" not in ds:
        raise XRayReadError(path, "DICOM has no pixel data (no PixelData element): not an image")
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError) as e:
        syntax = ds.file_meta.get("TransferSyntaxUID")
        syntax_name = getattr(syntax, "name", str(syntax))
        raise XRayReadError(
            path,
            f"cannot decode transfer syntax '{syntax_name}' ({syntax}): no installed pixel-data handler "
            f"decodes it; install one (e.g. pylibjpeg-openjpeg, pylibjpeg-libjpeg or gdcm). Cause: {e}",
        ) from e
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
        raise XRayReadError(path, f"multi-frame DICOM ({pixels.shape[0]} frames): one radiograph per file expected")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise XRayReadError(path, f"photometric interpretation {photometric} is not a grayscale radiograph")

    image = apply_modality_lut(pixels, ds).astype(np.float32)
    lo, hi = (float(v) for v in apply_modality_lut(np.array(_nominal_range(ds)), ds))
    voi_applied = "VOILUTSequence" in ds or "WindowCenter" in ds
    if voi_applied:
        image = apply_voi_lut(image, ds, prefer_lut=True).astype(np.float32)
        lo, hi = _nominal_range(ds)  # pydicom windows into the stored bit range
    # MONOCHROME1 means "minimum is white"; an INVERSE presentation LUT flips once more.
    inverse = (photometric == "MONOCHROME1") != (str(ds.get("PresentationLUTShape", "IDENTITY")) == "INVERSE")
    if inverse:
        image = (lo + hi) - image
    spacing = _dicom_spacing(ds)
    meta = {
        "format": "dicom",
        "photometric_interpretation": photometric,
        "inverted": inverse,
        "voi_applied": voi_applied,
        "bits_stored": int(ds.get("BitsStored", 0)),
        "modality": str(ds.get("Modality", "")),
        "body_part_examined": str(ds.get("BodyPartExamined", "")),
        "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
        "spacing_known": spacing is not None,
        "spacing": spacing or (1.0, 1.0),
    }
    return image, meta


def _read_pil(path: Path) -> tuple[np.ndarray, dict]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a worker
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                image = np.asarray(img).astype(np.float32)
                bits = 16 if mode.startswith("I;16") else 32
            else:
                # ITU-R 601 luma for colour, palette and alpha images (alpha dropped).
                image = np.asarray(img.convert("L")).astype(np.float32)
                bits = 8
    except FileNotFoundError:
        raise
    except UnidentifiedImageError as e:
        raise XRayReadError(path, "not a readable image (unknown or damaged format)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise XRayReadError(path, f"damaged image ({e})") from e
    if image.ndim != 2:
        raise XRayReadError(path, f"expected a 2-D gray image, got shape {image.shape}")
    return image, {"format": "pil", "source_mode": mode, "bits_stored": bits, "spacing_known": False,
                   "spacing": (1.0, 1.0)}


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


_READERS = {"dicom": _read_dicom, "pil": _read_pil, "nifti": _read_nifti, "itk": _read_itk}


def read_xray(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read one X-ray file into a rows-first float32 array and its (patient-free) meta data."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise XRayReadError(path, "is a folder, not an image file")
    fmt = xray_format(path)
    if fmt is None:
        raise XRayReadError(path, "unsupported file type (expected DICOM, PNG/JPEG/TIFF, NIfTI, MHA or NRRD)")
    image, meta = _READERS[fmt](path)
    if image.size == 0:
        raise XRayReadError(path, "image has no pixels")
    if not np.isfinite(image).all():
        raise XRayReadError(path, "image holds NaN or infinite values")
    meta["original_shape"] = tuple(int(s) for s in image.shape)
    return image, meta


class XRayReader(ImageReader):
    """MONAI ``ImageReader`` for radiographs in DICOM, PNG/JPEG/TIFF, NIfTI and MHA/NRRD.

    Use as ``LoadImaged(keys, reader=XRayReader)``; follow with ``EnsureChannelFirstd`` for ``(1, H, W)``.
    The affine maps (row, column) indices to millimetres when the file states a pixel spacing.
    Meta data never holds DICOM patient fields.
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        names = filename if isinstance(filename, (list, tuple)) else [filename]
        return all(xray_format(n) is not None for n in names)

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> list:
        names = data if isinstance(data, (list, tuple)) else [data]
        return [read_xray(n) for n in names]

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
