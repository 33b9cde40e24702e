"""DICOM radiographs to display values: the one place that decides which part of the DICOM grayscale pipeline
(PS3.3 C.7.6.3.1, C.11) is applied, in which order, and what ends up in the image's meta data.

Order (stored values -> what a viewer shows, bone bright):

1. Pixel padding (C.7.5.1.1.2): Pixel Padding Value, and Pixel Padding Range Limit when present, mark pixels in
   *stored* values that hold no anatomy (collimation border, detector edge). They are left out of every range and
   set to the darkest anatomy value at the end, so they become background and never stretch the intensity scaling.
2. Modality LUT (C.11.1): Rescale Slope/Intercept (a missing one defaults to 1/0) or the Modality LUT Sequence.
   The slope may be negative; nothing downstream assumes it is not.
3. VOI (C.11.2): the first item of the VOI LUT Sequence when there is one, else the first Window Center/Width pair
   (LINEAR, LINEAR_EXACT or SIGMOID, C.11.2.1.2-3). The VOI output is mapped to [0, 1] by our own code: pydicom's
   ``apply_windowing`` maps it to the rescaled stored range, which a negative slope turns upside down. A window
   that breaks the standard (width < 1 for LINEAR) is not applied, and the meta data says so.
4. Polarity: MONOCHROME1 means "minimum is white"; Presentation LUT Shape INVERSE says the same (the DX module
   requires it with MONOCHROME1: one inversion, not two) and inverts a MONOCHROME2 image. The image is mirrored
   within its value range so that bright always means dense.

Colour encodings (RGB, YBR_*, PALETTE COLOR) that hold a grey image load as grey; true colour is refused (see
:func:`muscle_ext.data.pixels.grey_from_colour`). Float and Double Float Pixel Data decode like integer data.

Pixel spacing (row, column) in millimetres, first found of: Pixel Spacing (0028,0030), Imager Pixel Spacing
(0018,1164) divided by the Estimated Radiographic Magnification Factor (0018,1114) when present (the patient
plane, PS3.3 C.8.11.7), Nominal Scanned Pixel Spacing (0018,2010); else Pixel Aspect Ratio (0028,0034) gives the
shape of a pixel without a size. Only the ratio matters for square-pixel resampling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .pixels import XRayReadError, grey_from_colour

__all__ = ["MEDIA_STORAGE_DIRECTORY", "read_dicom"]

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
_PIXEL_ELEMENTS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def _float(value: Any, default: float) -> float:
    return default if value is None or value == "" else float(value)


def _values(value: Any) -> list[float]:
    """A DS of any multiplicity as a list (several windows: the first is the default view)."""
    from pydicom.multival import MultiValue

    return [float(v) for v in value] if isinstance(value, (MultiValue, list, tuple)) else [float(value)]


def _as_stored(value: Any, ds: Any) -> float:
    """A value in stored-pixel units: US-encoded values of a signed image are read as two's complement (writers
    often encode 0x8000 for -32768)."""
    value = float(value)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0)) == 1 and value > 2 ** (bits - 1) - 1:
        value -= 2.0 ** (16 if value >= 2**bits else bits)
    return value


def _padding_mask(ds: Any, stored: np.ndarray) -> np.ndarray | None:
    if stored.dtype.kind == "f":  # Float Pixel Data has its own padding attributes
        value_tag, limit_tag = "FloatPixelPaddingValue", "FloatPixelPaddingRangeLimit"
    else:
        value_tag, limit_tag = "PixelPaddingValue", "PixelPaddingRangeLimit"
    if ds.get(value_tag) is None or ds.get(value_tag) == "":
        return None
    value = _as_stored(ds.get(value_tag), ds)
    limit = ds.get(limit_tag)
    if limit is None or limit == "":
        mask = stored == value
    else:
        low, high = sorted((value, _as_stored(limit, ds)))
        mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


def _lut(values: np.ndarray, item: Any, signed_input: bool) -> tuple[np.ndarray, int]:
    """Apply one LUT item (LUT Descriptor + LUT Data, PS3.3 C.11.1.1.1 / C.11.2.1.1) to ``values``: values below
    the first mapped one take the first entry, values past the end the last. Returns the output and its bit depth.

    Our own lookup because pydicom reads a first mapped value stored as US literally (64512 for -1024), which maps
    every pixel of a signed image to the first entry: a flat image, silently."""
    entries, first, depth = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    if signed_input and first >= 2**15:
        first -= 2**16
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        table = np.frombuffer(data, dtype="<u2" if depth > 8 or len(data) >= 2 * entries else "u1")[:entries]
    else:
        table = np.asarray(list(data) if not np.isscalar(data) else [data], dtype=np.float64)
    if len(table) < entries:
        raise ValueError(f"LUT Data holds {len(table)} entries, its descriptor says {entries}")
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, entries - 1)
    return np.asarray(table, dtype=np.float64)[index], depth


def _stored_range(ds: Any, stored: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    if stored.dtype.kind == "f":  # float pixel data has no nominal range: the data's own
        values = stored[keep]
        return float(values.min()), float(values.max())
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _modality(ds: Any, stored: np.ndarray, stored_range: tuple[float, float]) -> tuple[np.ndarray, tuple, str]:
    """Modality values and their (min, max) range; the description for the meta data."""
    if ds.get("ModalityLUTSequence"):
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        values, depth = _lut(stored, ds.ModalityLUTSequence[0], signed)
        return values, (0.0, 2.0**depth - 1), "Modality LUT Sequence"
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        return stored.astype(np.float64), stored_range, "none"
    slope, intercept = _float(ds.get("RescaleSlope"), 1.0), _float(ds.get("RescaleIntercept"), 0.0)
    if slope == 0:
        raise XRayReadError(ds.filename or "DICOM", "Rescale Slope is 0: every pixel would have the same value")
    ends = sorted(v * slope + intercept for v in stored_range)
    applied = f"rescale slope {slope:g} intercept {intercept:g}"
    return stored.astype(np.float64) * slope + intercept, (ends[0], ends[1]), applied


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID), output in [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    c, w = center - 0.5, width - 1.0
    if w == 0:  # width 1: a threshold
        return (x > c).astype(np.float64)
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def _voi(ds: Any, values: np.ndarray, value_range: tuple[float, float]) -> tuple[np.ndarray | None, str]:
    """The VOI output in [0, 1] (or ``None`` when no VOI applies) and what was applied, for the meta data."""
    if ds.get("VOILUTSequence"):
        lut, depth = _lut(values, ds.VOILUTSequence[0], signed_input=value_range[0] < 0)
        count = len(ds.VOILUTSequence)
        return lut / (2.0**depth - 1), f"VOI LUT Sequence item 1 of {count} ({depth}-bit)"
    if ds.get("WindowCenter") in (None, "") or ds.get("WindowWidth") in (None, ""):
        return None, "none"
    centers, widths = _values(ds.WindowCenter), _values(ds.WindowWidth)
    center, width, count = centers[0], widths[0], len(centers)
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or width < (1 if function == "LINEAR" else 1e-12):
        return None, f"none (invalid window center {center:g} width {width:g} {function} ignored)"
    which = f" (first of {count})" if count > 1 else ""
    return _window(values, center, width, function), f"window center {center:g} width {width:g} {function}{which}"


def _spacing(ds: Any) -> tuple[tuple[float, float] | None, str]:
    def pair(tag: str) -> tuple[float, float] | None:
        value = ds.get(tag)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])  # DICOM order: row spacing, column spacing
        return None

    if (found := pair("PixelSpacing")) is not None:
        return found, "PixelSpacing"
    if (found := pair("ImagerPixelSpacing")) is not None:
        magnification = _float(ds.get("EstimatedRadiographicMagnificationFactor"), 0.0)
        if magnification > 0:
            return (found[0] / magnification, found[1] / magnification), "ImagerPixelSpacing / ERMF"
        return found, "ImagerPixelSpacing"
    if (found := pair("NominalScannedPixelSpacing")) is not None:
        return found, "NominalScannedPixelSpacing"
    return None, "none"


def _aspect(ds: Any) -> tuple[float, float] | None:
    ratio = ds.get("PixelAspectRatio")  # vertical \ horizontal size of a pixel
    if ratio is not None and len(ratio) == 2 and all(int(v) > 0 for v in ratio):
        return float(ratio[0]), float(ratio[1])
    return None


def _decode(path: Path, ds: Any) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:  # pydicom and its plug-ins raise many types; the file and the syntax must be named
        syntax = ds.file_meta.get("TransferSyntaxUID")
        syntax_name = getattr(syntax, "name", str(syntax))
        raise XRayReadError(
            path,
            f"cannot decode transfer syntax '{syntax_name}' ({syntax}): no installed pixel-data handler "
            f"decodes it; install one (e.g. pylibjpeg-openjpeg, pylibjpeg-libjpeg or gdcm). Cause: {e}",
        ) from e


def _colour_to_grey(path: Path, ds: Any, pixels: np.ndarray, photometric: str) -> tuple[np.ndarray, float]:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(pixels, ds)
        # descriptors that say 16 bits over 8-bit entries are common: the range is what the output type holds
        max_value = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else float(rgb.max() or 1)
    else:
        rgb = pixels  # pydicom converts YBR to RGB when it decodes
        max_value = 2.0 ** int(ds.get("BitsStored", ds.get("BitsAllocated", 8))) - 1
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise XRayReadError(path, f"{photometric} image of shape {rgb.shape}: expected rows x columns x 3")
    return grey_from_colour(rgb, max_value, path).astype(np.float64), max_value


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read one DICOM radiograph as display values (bright = dense).

    Returns:
        ``(H, W)`` float32 array (rows top to bottom, columns left to right) and patient-free meta data: what was
        applied (``modality_lut``, ``voi``, ``inverted``, ``padding_pixels``), ``photometric_interpretation``,
        ``bits_stored``, ``spacing`` (row, column; mm when ``spacing_known``) and ``spacing_source``. Values are
        in modality units when no VOI applies, else in [0, 1].

    Raises:
        XRayReadError: not DICOM, a DICOMDIR, no pixel data, an undecodable transfer syntax, several frames, true
            colour, an unknown photometric interpretation, only padding pixels.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise XRayReadError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # pydicom raises many types for damaged files
        raise XRayReadError(path, f"unreadable DICOM ({type(e).__name__}: {e})") from e
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "")) if hasattr(ds, "file_meta") else ""
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise XRayReadError(path, "DICOMDIR: the index of a DICOM export, not an image (the images are beside it)")
    if not any(element in ds for element in _PIXEL_ELEMENTS):
        raise XRayReadError(path, "DICOM has no pixel data (no Pixel Data element): not an image")
    pixels = _decode(path, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 or (pixels.ndim == 3 and samples == 1) or pixels.ndim == 4:
        raise XRayReadError(path, f"multi-frame DICOM ({frames} frames): one radiograph per file expected")
    meta: dict[str, Any] = {"format": "dicom", "photometric_interpretation": photometric,
                            "bits_stored": int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0),
                            "modality": str(ds.get("Modality", "")),
                            "body_part_examined": str(ds.get("BodyPartExamined", "")),
                            "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", ""))}
    if photometric not in _COLOUR + _GREY:
        raise XRayReadError(path, f"photometric interpretation {photometric} is not a grayscale radiograph")
    try:
        if photometric in _COLOUR:
            image, _ = _colour_to_grey(path, ds, pixels, photometric)
            meta.update(modality_lut="none", voi="none (colour encoding, loaded as grey)", inverted=False,
                        padding_pixels=0)
        else:
            image, applied = _grey_display(path, ds, pixels, photometric)
            meta.update(applied)
    except XRayReadError:
        raise
    except Exception as e:  # a malformed LUT or palette: name the file and what broke
        raise XRayReadError(path, f"cannot apply its LUTs ({type(e).__name__}: {e})") from e
    meta["voi_applied"] = not meta["voi"].startswith("none")
    spacing, source = _spacing(ds)
    aspect = _aspect(ds) if spacing is None else None
    meta.update(spacing_known=spacing is not None, spacing=spacing or aspect or (1.0, 1.0),
                spacing_source=source if spacing is not None else ("PixelAspectRatio" if aspect else "none"))
    return image.astype(np.float32), meta


def _grey_display(path: Path, ds: Any, stored: np.ndarray, photometric: str) -> tuple[np.ndarray, dict]:
    padding = _padding_mask(ds, stored)
    keep = ~padding if padding is not None else np.ones(stored.shape, dtype=bool)
    if not keep.any():
        raise XRayReadError(path, "every pixel is padding (Pixel Padding Value): no anatomy in the image")
    values, value_range, modality_lut = _modality(ds, stored, _stored_range(ds, stored, keep))
    voi_output, voi = _voi(ds, values, value_range)
    if voi_output is not None:
        values, value_range = voi_output, (0.0, 1.0)
    # PS3.3 C.8.11.6.1: INVERSE "shall be used if Photometric Interpretation is MONOCHROME1": the two describe the
    # same single inversion (a double flip would show most DX files bone-dark); INVERSE on MONOCHROME2 inverts.
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    inverse = photometric == "MONOCHROME1" or shape == "INVERSE"
    if inverse:
        values = (value_range[0] + value_range[1]) - values
    if padding is not None:
        values = np.where(padding, values[keep].min(), values)
    return values, {"modality_lut": modality_lut, "voi": voi, "inverted": inverse,
                    "presentation_lut_shape": shape or "none",
                    "padding_pixels": int(padding.sum()) if padding is not None else 0}
