"""Every variant of a real radiograph that the reader must load right, or refuse by name (docs/READER.md).

Each case wraps real pixels from the shared corpus in the format at hand and asserts the value a viewer would show:
DICOM LUT combinations, padding, spacing, float and colour encodings; PNG/JPEG orientation, bit depth and colour;
mask encodings. Patient fields are fake; a marker checks that none reaches meta data.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from muscle_ext.data import LoadXRayd, SquarePixelResized, XRayReadError, read_mask, read_xray, xray_preprocessing
from muscle_ext.data.pixels import apply_exif_orientation

MARKER = "ZZVARIANT4417"
READER_TABLE = Path(__file__).resolve().parents[1] / "docs" / "READER.md"


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, float).ravel(), np.asarray(b, float).ravel())[0, 1])


@pytest.fixture(scope="module")
def radiograph(xray_root) -> np.ndarray:
    """Real 10-bit CR extremity pixels (bone bright), cropped non-square and scaled to 12 bits: 0..4092."""
    ds = pydicom.dcmread(xray_root / "dicom" / "derived" / "RG3_half_uncompressed_MONOCHROME2.dcm")
    raw = ds.pixel_array.astype(np.int64)[200:440, 280:600]  # 240 rows, 320 columns
    assert raw.std() > 20
    return raw * 4


@pytest.fixture(scope="module")
def chest(xray_root) -> np.ndarray:
    """A real 8-bit chest radiograph, 256 x 256."""
    import json

    item = json.loads((xray_root / "pneumonia_nih" / "datalist.json").read_text())["test"][0]
    return np.asarray(Image.open(xray_root / "pneumonia_nih" / item["image"]).convert("L"))


def dicom(path: Path, pixels: np.ndarray | None = None, photometric: str = "MONOCHROME2", bits_stored: int = 12,
          signed: bool = False, syntax=ExplicitVRLittleEndian, **attributes) -> Path:
    """A CR file around ``pixels`` (integers, or float32 for Float Pixel Data) with fake patient fields."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = attributes.pop("sop_class", "1.2.840.10008.5.1.4.1.1.1")
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName, ds.PatientID, ds.Modality = f"{MARKER}^Fake", MARKER, "CR"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        if pixels.dtype == np.float32:
            ds.BitsAllocated = 32
            ds.FloatPixelData = pixels.tobytes()
        else:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
            ds.PixelRepresentation = int(signed)
            ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_no_patient(meta: dict) -> None:
    assert MARKER not in repr(meta) and "PatientName" not in meta and "PatientID" not in meta


# --------------------------------------------------------------------------------------- DICOM grey pipeline
VOIS = ["none", "window", "windows", "lut"]


def _voi_attributes(voi: str) -> dict:
    if voi == "window":
        return {"WindowCenter": 2048, "WindowWidth": 4096}
    if voi == "windows":  # the first is the default view; the second would saturate almost every pixel
        return {"WindowCenter": [2048, 100], "WindowWidth": [4096, 50]}
    if voi == "lut":
        item = Dataset()
        item.add_new(0x00283002, "US", [4096, 0, 16])  # entries, first mapped modality value, bits
        item.add_new(0x00283006, "US", [int(round(65535 * (i / 4095) ** 0.9)) for i in range(4096)])
        return {"VOILUTSequence": pydicom.Sequence([item])}
    return {}


@pytest.mark.parametrize("voi", VOIS)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("slope", [1, -1])
@pytest.mark.parametrize("signed", [False, True])
def test_bone_is_bright_for_every_lut_combination(tmp_path, radiograph, voi, photometric, slope, signed):
    # modality values: v itself for MONOCHROME2, its mirror for MONOCHROME1 ("minimum is white")
    modality = radiograph if photometric == "MONOCHROME2" else 4095 - radiograph
    intercept = (2047 if signed else 4095) if slope < 0 else (2048 if signed else 0)
    stored = (modality - intercept) // slope
    assert stored.min() >= (-2048 if signed else 0) and stored.max() <= (2047 if signed else 4095)
    path = dicom(tmp_path / "x.dcm", stored, photometric, signed=signed, RescaleSlope=slope,
                 RescaleIntercept=intercept, **_voi_attributes(voi))
    image, meta = read_xray(path)
    assert image.shape == radiograph.shape
    assert corr(image, radiograph) > 0.99, (meta["voi"], meta["modality_lut"])
    assert meta["inverted"] == (photometric == "MONOCHROME1")
    expected = {"none": "none", "window": "window center 2048 width 4096 LINEAR", "lut": "VOI LUT Sequence",
                "windows": "(first of 2)"}[voi]
    assert expected in meta["voi"]
    assert_no_patient(meta)


def test_inverse_presentation_lut_and_sigmoid_window(tmp_path, radiograph):
    inverse = dicom(tmp_path / "inv.dcm", 4095 - radiograph, "MONOCHROME2", PresentationLUTShape="INVERSE")
    sigmoid = dicom(tmp_path / "sig.dcm", radiograph, WindowCenter=2048, WindowWidth=4096, VOILUTFunction="SIGMOID")
    broken = dicom(tmp_path / "bad.dcm", radiograph, WindowCenter=2048, WindowWidth=0)
    assert corr(read_xray(inverse)[0], radiograph) > 0.99
    assert corr(read_xray(sigmoid)[0], radiograph) > 0.98
    image, meta = read_xray(broken)
    assert corr(image, radiograph) > 0.999 and "invalid window" in meta["voi"] and not meta["voi_applied"]


def test_header_quirks_of_real_writers(tmp_path, radiograph):
    from pydicom.dataelem import DataElement

    # MONOCHROME1 with Presentation LUT Shape INVERSE (required by the DX module): one inversion, bone bright
    dx = dicom(tmp_path / "dx.dcm", 4095 - radiograph, "MONOCHROME1", PresentationLUTShape="INVERSE")
    image, meta = read_xray(dx)
    assert meta["inverted"] and corr(image, radiograph) > 0.99
    # a signed image whose padding value is written as US 0x8000 (for -32768)
    signed, border = _bordered(radiograph - 2048, -32768)
    padded = dicom(tmp_path / "pad.dcm", signed, bits_stored=16, signed=True)
    ds = pydicom.dcmread(padded)
    ds.add(DataElement(0x00280120, "US", 0x8000))
    ds.save_as(padded, enforce_file_format=True)
    assert read_xray(padded)[1]["padding_pixels"] == int(border.sum())
    # a VOI LUT whose first mapped value (-2048) is stored as US (63488), on a signed image
    item = Dataset()
    item.add(DataElement(0x00283002, "US", [4096, 65536 - 2048, 12]))
    item.add(DataElement(0x00283006, "US", list(range(4096))))
    lut = dicom(tmp_path / "lut.dcm", radiograph - 2048, signed=True, VOILUTSequence=pydicom.Sequence([item]))
    assert corr(read_xray(lut)[0], radiograph) > 0.999
    # an empty window (type 2 attributes written without a value): no window, no crash
    empty = dicom(tmp_path / "empty.dcm", radiograph, WindowCenter=None, WindowWidth=None)
    assert read_xray(empty)[1]["voi"] == "none"


# -------------------------------------------------------------------------------------------------- padding
def _bordered(radiograph: np.ndarray, border_value: int) -> tuple[np.ndarray, np.ndarray]:
    stored = radiograph.copy()
    border = np.zeros(stored.shape, dtype=bool)
    border[:20], border[-20:], border[:, :30], border[:, -30:] = True, True, True, True
    stored[border] = border_value
    return stored, border


def _preprocessed(path: Path, size: int) -> np.ndarray:
    return Compose(xray_preprocessing("image", size=size))({"image": str(path)})["image"][0].numpy()


def test_padding_is_background_and_out_of_the_scaling(tmp_path, radiograph):
    # MONOCHROME1, collimated border stored as 0 (white in MONOCHROME1) and marked as padding
    anatomy = np.clip(4095 - radiograph, 1, 4095)
    stored, border = _bordered(anatomy, 0)
    mono1 = dicom(tmp_path / "mono1.dcm", stored, "MONOCHROME1", PixelPaddingValue=0)
    image, meta = read_xray(mono1)
    assert meta["padding_pixels"] == int(border.sum())
    out = _preprocessed(mono1, 320)  # 240 x 320: rows 40..279 hold the image
    rows = slice(40, 280)
    assert float(out[rows][border].max()) <= 0.02
    assert corr(out[rows][~border], radiograph[~border]) > 0.99
    # signed 16-bit, padding -32768: the anatomy keeps the whole [0, 1] range instead of [0.91, 1]
    signed, border = _bordered(radiograph - 2048, -32768)
    mono2 = dicom(tmp_path / "signed.dcm", signed, bits_stored=16, signed=True, PixelPaddingValue=-32768)
    out = _preprocessed(mono2, 320)[rows]
    assert float(out[border].max()) <= 0.02
    inside = out[~border]
    assert np.percentile(inside, 1) < 0.1 and np.percentile(inside, 99) > 0.9
    # a padding range (Pixel Padding Range Limit): every value in it is background
    ranged, border = _bordered(anatomy, 0)
    ranged[border] = np.random.default_rng(0).integers(0, 11, int(border.sum()))
    ranged_path = dicom(tmp_path / "range.dcm", ranged, "MONOCHROME1", PixelPaddingValue=0,
                        PixelPaddingRangeLimit=10)
    assert read_xray(ranged_path)[1]["padding_pixels"] >= int(border.sum())
    assert float(_preprocessed(ranged_path, 320)[rows][border].max()) <= 0.02


# -------------------------------------------------------------------------------------------- pixel spacing
def test_non_square_pixels_are_resampled_square(tmp_path, chest):
    import itk
    import nibabel as nib

    squashed = chest[:, ::2].astype(np.uint16)  # 256 rows x 128 columns of 0.15 x 0.30 mm: square anatomy
    want = _preprocessed(_png(tmp_path / "square.png", chest), 64)
    files = {
        "imager": dicom(tmp_path / "dx.dcm", squashed * 16, ImagerPixelSpacing=[0.15, 0.30]),
        "pixel": dicom(tmp_path / "px.dcm", squashed * 16, PixelSpacing=[0.15, 0.30]),
        "ermf": dicom(tmp_path / "ermf.dcm", squashed * 16, ImagerPixelSpacing=[0.18, 0.36],
                      EstimatedRadiographicMagnificationFactor=1.2),
        "aspect": dicom(tmp_path / "ar.dcm", squashed * 16, PixelAspectRatio=[1, 2]),
    }
    image = itk.image_from_array(squashed.astype(np.float32))
    image.SetSpacing([0.30, 0.15])  # ITK order: x (columns), y (rows)
    for suffix in ("mha", "nrrd"):
        itk.imwrite(image, str(tmp_path / f"s.{suffix}"))
        files[suffix] = tmp_path / f"s.{suffix}"
    nifti = nib.Nifti1Image(squashed.T.astype(np.float32).copy(), np.diag([0.30, 0.15, 1.0, 1.0]))
    nib.save(nifti, tmp_path / "s.nii.gz")
    files["nifti"] = tmp_path / "s.nii.gz"
    for name, path in files.items():
        out = _preprocessed(path, 64)
        assert out.shape == (64, 64), name
        assert out[:, :3].std() > 0.01 and out[:, -3:].std() > 0.01, f"{name}: content must span the full width"
        assert corr(out, want) > 0.95, name
    assert read_xray(files["ermf"])[1]["spacing"] == pytest.approx((0.15, 0.30))
    assert read_xray(files["aspect"])[1]["spacing_source"] == "PixelAspectRatio"


def test_square_pixel_resize_inverts_to_the_input_geometry(tmp_path, chest):
    from monai.transforms import Invertd

    path = dicom(tmp_path / "dx.dcm", chest[:, ::2].astype(np.uint16), ImagerPixelSpacing=[0.15, 0.30])
    chain = Compose(xray_preprocessing("image", size=64))
    out = chain({"image": str(path)})
    assert isinstance(chain.transforms[-2], SquarePixelResized)
    out["pred"] = out["image"].clone()
    back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)(out)["pred"]
    assert tuple(back.shape) == (1, 256, 128)


# -------------------------------------------------------------------------------- float and colour DICOM
def test_float_pixel_data_loads_upright(tmp_path, radiograph):
    path = dicom(tmp_path / "float.dcm", (radiograph / 4092.0).astype(np.float32))
    image, meta = read_xray(path)
    assert image.shape == radiograph.shape and corr(image, radiograph) > 0.999
    assert_no_patient(meta)


def _colour_dicom(path: Path, rgb: np.ndarray, photometric: str = "RGB", syntax=ExplicitVRLittleEndian,
                  pixel_bytes: bytes | None = None, **attributes) -> Path:
    ds_path = dicom(path, None, sop_class="1.2.840.10008.5.1.4.1.1.7", syntax=syntax)  # Secondary Capture
    ds = pydicom.dcmread(ds_path)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3 if rgb.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.add_new(0x7FE00010, "OB", pixel_bytes if pixel_bytes is not None else rgb.astype(np.uint8).tobytes())
    for name, value in attributes.items():
        if name.endswith("LookupTableData") or name.endswith("LookupTableDescriptor"):
            vr = "OW" if name.endswith("Data") else "US"
            ds.add_new(pydicom.datadict.tag_for_keyword(name), vr, value)
        else:
            setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_grey_stored_in_colour_loads_as_grey_and_true_colour_is_refused(tmp_path, chest):
    from pydicom.encaps import encapsulate

    rgb = np.stack([chest] * 3, -1)
    exact = _colour_dicom(tmp_path / "rgb.dcm", rgb)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95, subsampling=1)  # 4:2:2
    ybr = _colour_dicom(tmp_path / "ybr.dcm", rgb, "YBR_FULL_422", JPEGBaseline8Bit,
                        pixel_bytes=encapsulate([buffer.getvalue()]))
    ramp = [int(i * 257) for i in range(256)]
    palette = _colour_dicom(tmp_path / "palette.dcm", chest, "PALETTE COLOR",
                            RedPaletteColorLookupTableDescriptor=[256, 0, 16],
                            GreenPaletteColorLookupTableDescriptor=[256, 0, 16],
                            BluePaletteColorLookupTableDescriptor=[256, 0, 16],
                            RedPaletteColorLookupTableData=struct.pack("<256H", *ramp),
                            GreenPaletteColorLookupTableData=struct.pack("<256H", *ramp),
                            BluePaletteColorLookupTableData=struct.pack("<256H", *ramp))
    np.testing.assert_array_equal(read_xray(exact)[0], chest.astype(np.float32))
    image, meta = read_xray(ybr)
    assert corr(image, chest) > 0.99 and np.abs(image - chest).mean() < 3
    np.testing.assert_array_equal(read_xray(palette)[0], chest.astype(np.float32) * 257)
    assert_no_patient(meta)
    annotated = rgb.copy()
    annotated[100:110, 50:200] = (255, 0, 0)  # a red measurement line burnt into a screenshot
    true_colour = _colour_dicom(tmp_path / "annotated.dcm", annotated)
    with pytest.raises(XRayReadError, match="colour image") as err:
        read_xray(true_colour)
    assert "annotated.dcm" in str(err.value) and MARKER not in str(err.value)


# ------------------------------------------------------------------------------------------- PNG and JPEG
def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _png16(path: Path, samples: np.ndarray, colour_type: int) -> Path:
    """A 16-bit PNG of any colour type (Pillow writes 16-bit grey only): IHDR, one IDAT, IEND."""
    rows = samples.reshape(samples.shape[0], -1).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", samples.shape[1], samples.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_16_bit_pngs_keep_every_level(tmp_path, radiograph):
    v = radiograph.astype(np.uint16)
    opaque = np.full_like(v, 65535)
    files = {
        "grey": _png16(tmp_path / "g.png", v, 0),
        "grey+alpha": _png16(tmp_path / "ga.png", np.stack([v, opaque], -1), 4),
        "rgb": _png16(tmp_path / "rgb.png", np.stack([v, v, v], -1), 2),
        "rgba": _png16(tmp_path / "rgba.png", np.stack([v, v, v, opaque], -1), 6),
    }
    for name, path in files.items():
        image, meta = read_xray(path)
        np.testing.assert_array_equal(image, v.astype(np.float32), err_msg=name)
        assert meta["bits_stored"] == 16, name
        assert len(np.unique(image)) == len(np.unique(v)) > 256, name
    different = np.stack([v, v, np.clip(v.astype(int) + 9000, 0, 65535).astype(np.uint16)], -1)
    with pytest.raises(XRayReadError, match="colour image"):
        read_xray(_png16(tmp_path / "colour.png", different, 2))


def test_8_bit_png_modes_agree(tmp_path, chest):
    want = chest.astype(np.float32)
    grey = Image.fromarray(chest)
    modes = {"L": grey, "LA": grey.convert("LA"), "RGB": grey.convert("RGB"), "RGBA": grey.convert("RGBA"),
             "P": grey.convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE)}
    for mode, img in modes.items():
        img.save(tmp_path / f"{mode}.png")
        image, _ = read_xray(tmp_path / f"{mode}.png")
        if mode == "P":  # a palette of at most 256 greys: the nearest palette grey
            assert corr(image, want) > 0.99
        else:
            np.testing.assert_array_equal(image, want, err_msg=mode)


INVERSE_ORIENTATION = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_shows_the_image_upright(tmp_path, xray_root, orientation):
    hand = np.asarray(Image.open(xray_root / "hand_boneage" / "images" / "1381.png").convert("L"))
    assert hand.shape[0] > hand.shape[1]  # portrait
    stored = apply_exif_orientation(hand, INVERSE_ORIENTATION[orientation])
    for suffix in ("png", "jpg"):
        img = Image.fromarray(stored)
        exif = img.getexif()
        exif[0x0112] = orientation
        path = tmp_path / f"hand.{suffix}"
        img.save(path, exif=exif.tobytes(), **({"quality": 98} if suffix == "jpg" else {}))
        image, meta = read_xray(path)
        assert image.shape == hand.shape, (suffix, orientation)
        assert meta["exif_orientation"] == orientation
        viewer = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("L"))  # Pillow, independently
        if suffix == "png":
            np.testing.assert_array_equal(image, hand.astype(np.float32))
            np.testing.assert_array_equal(image, viewer.astype(np.float32))
        else:
            assert corr(image, hand) > 0.99 and corr(image, viewer) > 0.999


# ------------------------------------------------------------------------------------- refusals stop there
def test_a_refused_file_stops_at_our_reader(tmp_path, radiograph):
    frames = dicom(tmp_path / "frames.dcm", radiograph, NumberOfFrames=1)  # then made two frames below
    ds = pydicom.dcmread(frames)
    ds.NumberOfFrames = 2
    ds.PixelData = np.concatenate([radiograph, radiograph]).astype(np.uint16).tobytes()
    ds.save_as(frames, enforce_file_format=True)
    no_pixels = dicom(tmp_path / "nopixels.dcm", None)
    odd = dicom(tmp_path / "odd.dcm", radiograph)
    ds = pydicom.dcmread(odd)
    ds.PhotometricInterpretation = "HSV"  # retired: nobody should guess
    ds.save_as(odd, enforce_file_format=True)
    for path, cause in ((frames, "multi-frame"), (no_pixels, "no pixel data"), (odd, "HSV")):
        with pytest.raises(XRayReadError, match=cause) as err:
            LoadXRayd("image")({"image": str(path)})
        assert path.name in str(err.value) and MARKER not in str(err.value)
        with pytest.raises(RuntimeError) as chained:  # through a MONAI Compose: the cause is kept
            Compose(xray_preprocessing("image", size=64))({"image": str(path)})
        cause_chain, exc = [], chained.value
        while exc is not None:
            cause_chain.append(exc)
            exc = exc.__cause__
        assert any(isinstance(e, XRayReadError) for e in cause_chain)


# ------------------------------------------------------------------------------------------- mask encodings
@pytest.fixture(scope="module")
def lung_mask(xray_root) -> np.ndarray:
    import json

    item = json.loads((xray_root / "lung_seg_cxr" / "datalist.json").read_text())["training"][0]
    mask = np.asarray(Image.open(xray_root / "lung_seg_cxr" / item["label"]).convert("L")) > 127
    assert 0.1 < mask.mean() < 0.5
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_every_mask_encoding_follows_the_above_zero_rule(tmp_path, lung_mask):
    import nibabel as nib

    m = lung_mask.astype(np.uint8)
    right = np.zeros_like(lung_mask)
    right[:, : m.shape[1] // 2] = True  # the image's left half shows the patient's right lung
    labels = np.where(lung_mask & right, 1, np.where(lung_mask, 2, 0)).astype(np.uint8)
    ys, xs = np.nonzero(lung_mask)
    labels[ys[:5], xs[:5]] = 3  # five stray pixels of another label
    coloured = np.zeros(m.shape + (3,), np.uint8)
    coloured[lung_mask & right] = (255, 0, 0)
    coloured[lung_mask & ~right] = (0, 255, 0)
    files = {"0/1": _png(tmp_path / "01.png", m), "0/255": _png(tmp_path / "0255.png", m * 255),
             "0/128": _png(tmp_path / "0128.png", m * 128), "labels": _png(tmp_path / "labels.png", labels),
             "rgb": _png(tmp_path / "rgb.png", coloured)}
    Image.fromarray(m * 255).save(tmp_path / "mask.jpg", quality=75)
    files["jpeg"] = tmp_path / "mask.jpg"
    nib.save(nib.Nifti1Image(m.T.copy(), np.eye(4)), tmp_path / "mask.nii.gz")
    files["nifti"] = tmp_path / "mask.nii.gz"
    for name, path in files.items():
        mask, meta = read_mask(path)
        assert set(np.unique(mask)) <= {0.0, 1.0}, name
        assert dice(mask > 0, lung_mask) > (0.98 if name == "jpeg" else 0.9999), name
    # through the loading chain the labelled mask keeps both lungs
    out = Compose(xray_preprocessing("image", mask_keys="label", size=m.shape[0]))(
        {"image": str(files["0/255"]), "label": str(files["labels"])})
    assert dice(out["label"][0].numpy() > 0, lung_mask) > 0.9999
    # what the rule cannot read is refused by name
    nib.save(nib.Nifti1Image((m * 0.7).T.astype(np.float32).copy(), np.eye(4)), tmp_path / "prob.nii.gz")
    with pytest.raises(XRayReadError, match="non-integer") as err:
        read_mask(tmp_path / "prob.nii.gz")
    assert "prob.nii.gz" in str(err.value)
    grey = _png(tmp_path / "grey.png", (np.arange(m.size) % 256).reshape(m.shape).astype(np.uint8))
    with pytest.raises(XRayReadError, match="distinct values"):
        read_mask(grey)


def test_masks_the_rule_cannot_read_or_that_do_not_fit_their_image(tmp_path, lung_mask, chest):
    m = lung_mask.astype(np.uint8)
    Image.fromarray(m).save(tmp_path / "01.jpg", quality=90)  # 0/1 labels lost in JPEG noise
    with pytest.raises(XRayReadError, match="store masks as PNG"):
        read_mask(tmp_path / "01.jpg")
    palette = Image.fromarray(m, mode="L").convert("P")
    palette.putpalette([200, 200, 200] + [255, 0, 0] * 255)  # index 0 drawn light grey: indices count, not colours
    palette.save(tmp_path / "palette.png")
    assert dice(read_mask(tmp_path / "palette.png")[0] > 0, lung_mask) > 0.9999
    frames = dicom(tmp_path / "seg.dcm", m.astype(np.uint16))
    ds = pydicom.dcmread(frames)
    ds.NumberOfFrames, ds.PixelData = 2, np.concatenate([m, m]).astype(np.uint16).tobytes()
    ds.save_as(frames, enforce_file_format=True)
    with pytest.raises(XRayReadError, match="multi-frame"):
        read_mask(frames)
    _png(tmp_path / "image.png", chest)
    _png(tmp_path / "turned.png", np.ascontiguousarray(m.T[:, :200] * 255))
    with pytest.raises(RuntimeError) as err:
        Compose(xray_preprocessing("image", mask_keys="label", size=64))(
            {"image": str(tmp_path / "image.png"), "label": str(tmp_path / "turned.png")})
    assert "own pixel grid" in repr(err.value.__cause__ or err.value)


def test_reader_table_lists_every_tested_variant():
    table = READER_TABLE.read_text()
    for variant in ("Rescale Slope", "Window", "VOI LUT Sequence", "MONOCHROME1", "Presentation LUT Shape",
                    "Pixel Padding Value", "Pixel Padding Range Limit", "Imager Pixel Spacing",
                    "Estimated Radiographic Magnification Factor", "Pixel Aspect Ratio", "Float Pixel Data",
                    "RGB", "YBR_FULL_422", "PALETTE COLOR", "multi-frame", "DICOMDIR", "EXIF Orientation",
                    "16-bit", "colour type", "mask", "JPEG", "NIfTI", "MHA"):
        assert variant in table, variant


def test_preprocessed_tensors_carry_no_patient_field(tmp_path, radiograph):
    path = dicom(tmp_path / "x.dcm", radiograph, WindowCenter=2048, WindowWidth=4096)
    out = Compose(xray_preprocessing("image", size=64))({"image": str(path)})
    assert isinstance(out["image"], torch.Tensor)
    assert MARKER not in repr(dict(out["image"].meta))
