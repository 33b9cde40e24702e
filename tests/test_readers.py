"""X-ray readers: one orientation for every format, DICOM polarity on real files, clear errors on bad files."""

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from muscle_ext.data import XRayReader, XRayReadError, read_xray
from muscle_ext.data.transforms import xray_preprocessing

from tests.bundle_utils import write_dicom as _write_dicom


@pytest.fixture(scope="module")
def reference(xray_root) -> np.ndarray:
    """A real chest X-ray cropped to a non-square shape, so a transposed load cannot go unnoticed."""
    item = json.loads((xray_root / "pneumonia_nih" / "datalist.json").read_text())["training"][0]
    image = np.asarray(Image.open(xray_root / "pneumonia_nih" / item["image"]).convert("L"))
    return image[:200, :256].copy()  # 200 rows, 256 columns


def test_every_format_loads_rows_first(tmp_path, reference):
    import itk
    import nibabel as nib

    ref = reference.astype(np.float32)
    Image.fromarray(reference).save(tmp_path / "gray8.png")
    Image.fromarray(reference.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    Image.fromarray(np.stack([reference] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(reference).save(tmp_path / "gray.jpg", quality=100)
    # NIfTI voxel axis 0 is x (columns), as ITK writes it; check both writers agree with our reading.
    nib.save(nib.Nifti1Image(ref.T.copy(), np.eye(4)), tmp_path / "nibabel.nii.gz")
    itk.imwrite(itk.image_from_array(ref), str(tmp_path / "itk.nii.gz"))
    itk.imwrite(itk.image_from_array(ref), str(tmp_path / "itk.mha"))
    itk.imwrite(itk.image_from_array(ref), str(tmp_path / "itk.nrrd"))
    _write_dicom(tmp_path / "mono2.dcm", reference.astype(np.uint16) * 16)
    _write_dicom(tmp_path / "mono1.dcm", 4095 - reference.astype(np.uint16) * 16, photometric="MONOCHROME1")

    expected = {"gray8.png": ref, "gray16.png": ref * 257, "rgb.png": ref, "nibabel.nii.gz": ref, "itk.nii.gz": ref,
                "itk.mha": ref, "itk.nrrd": ref, "mono2.dcm": ref * 16, "mono1.dcm": ref * 16}
    for name, want in expected.items():
        got, meta = read_xray(tmp_path / name)
        assert got.shape == (200, 256), name
        np.testing.assert_allclose(got, want, atol=1e-3, err_msg=name)
        assert "PatientName" not in meta and "Anon^Test" not in repr(meta)
    jpeg, _ = read_xray(tmp_path / "gray.jpg")
    assert np.corrcoef(jpeg.ravel(), ref.ravel())[0, 1] > 0.99
    assert read_xray(tmp_path / "mono2.dcm")[1]["spacing"] == (0.2, 0.1)


def test_monai_loader_gives_channel_first_rows_first(tmp_path, reference):
    from monai.transforms import Compose

    Image.fromarray(reference).save(tmp_path / "a.png")
    out = Compose(xray_preprocessing("image", size=128))({"image": str(tmp_path / "a.png")})
    assert tuple(out["image"].shape) == (1, 128, 128)
    # 200x256 becomes 100x128 and is padded top and bottom by 14 rows: those rows are the pad value.
    assert float(out["image"][0, :13].abs().max()) == 0.0 and float(out["image"][0, 14:114].std()) > 0.05
    assert XRayReader().verify_suffix("x.dcm") and not XRayReader().verify_suffix("x.txt")


# (row, column) fractions of a bright (bone) and a dark (air or lung) region in each real DICOM file.
POLARITY = {
    "RG1_J2KI.dcm": ((0.25, 0.50), (0.35, 0.28)),  # spine above the heart vs right lung field
    "derived/RG1_half_uncompressed_MONOCHROME1.dcm": ((0.25, 0.50), (0.35, 0.28)),
    "RG3_J2KI.dcm": ((0.30, 0.50), (0.50, 0.31)),  # tibial shaft vs air beside the leg
    "RG3_J2KR.dcm": ((0.30, 0.50), (0.50, 0.31)),
    "derived/RG3_half_uncompressed_MONOCHROME1.dcm": ((0.30, 0.50), (0.50, 0.31)),
    "derived/RG3_half_uncompressed_MONOCHROME2.dcm": ((0.30, 0.50), (0.50, 0.31)),
}


def _patch_mean(image: np.ndarray, where: tuple[float, float], half: float = 0.03) -> float:
    h, w = image.shape
    r, c, dr, dc = int(where[0] * h), int(where[1] * w), max(1, int(half * h)), max(1, int(half * w))
    return float(image[r - dr : r + dr, c - dc : c + dc].mean())


@pytest.mark.parametrize("name", sorted(POLARITY))
def test_real_dicom_bone_is_brighter_than_air(xray_root, name):
    image, meta = read_xray(xray_root / "dicom" / name)
    bone, air = POLARITY[name]
    assert _patch_mean(image, bone) > _patch_mean(image, air) + 0.2 * (image.max() - image.min()), name
    assert meta["inverted"] == (meta["photometric_interpretation"] == "MONOCHROME1")


def test_monochrome1_and_inverted_monochrome2_copies_load_alike(xray_root):
    from monai.transforms import ScaleIntensityRangePercentiles

    scale = ScaleIntensityRangePercentiles(1, 99, 0, 1, clip=True)
    mono1 = scale(read_xray(xray_root / "dicom/derived/RG3_half_uncompressed_MONOCHROME1.dcm")[0])
    mono2 = scale(read_xray(xray_root / "dicom/derived/RG3_half_uncompressed_MONOCHROME2.dcm")[0])
    assert np.corrcoef(np.ravel(mono1), np.ravel(mono2))[0, 1] > 0.99


def test_truncated_png_names_file_and_cause(tmp_path, reference):
    Image.fromarray(reference).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(XRayReadError, match=r"cut\.png: damaged image .*truncated"):
        read_xray(tmp_path / "cut.png")


def test_text_file_named_dcm(tmp_path):
    (tmp_path / "notes.dcm").write_text("this is a radiology report, not an image\n" * 20)
    with pytest.raises(XRayReadError, match=r"notes\.dcm: not a DICOM file"):
        read_xray(tmp_path / "notes.dcm")


def test_dicom_without_pixel_data(tmp_path):
    _write_dicom(tmp_path / "header_only.dcm", np.zeros((4, 4)), with_pixels=False)
    with pytest.raises(XRayReadError, match=r"header_only\.dcm: DICOM has no pixel data"):
        read_xray(tmp_path / "header_only.dcm")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.png: no such file"):
        read_xray(tmp_path / "absent.png")


def test_undecodable_transfer_syntax_names_the_decoder(tmp_path, monkeypatch, xray_root):
    """A compressed file with no decoder for its syntax says which syntax and what to install."""
    from pydicom.dataset import Dataset

    def no_decoder(self):
        raise NotImplementedError("Unable to decode pixel data with a transfer syntax UID of '1.2.840.10008.1.2.4.91'")

    monkeypatch.setattr(Dataset, "pixel_array", property(no_decoder))
    with pytest.raises(XRayReadError, match=r"RG1_J2KI\.dcm: cannot decode transfer syntax 'JPEG 2000"):
        read_xray(xray_root / "dicom" / "RG1_J2KI.dcm")


def test_dicom_patient_fields_never_reach_meta(tmp_path):
    _write_dicom(tmp_path / "p.dcm", np.full((8, 8), 100), patient="MARKER^SECRET")
    _, meta = read_xray(tmp_path / "p.dcm")
    assert "MARKER" not in repr(meta)
    assert pydicom.dcmread(tmp_path / "p.dcm").PatientName == "MARKER^SECRET"
