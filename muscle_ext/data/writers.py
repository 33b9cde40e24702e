"""Writers for inference outputs: masks in the input's own geometry, prediction tables, privacy-safe case ids.

Output names never come from the input's file name or DICOM header (both may name the patient): they use
:func:`case_id`, a hash of the input path. DICOM patient fields are read only when asked for explicitly
(:func:`dicom_patient_fields`).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .readers import xray_format

__all__ = ["PATIENT_FIELDS", "SaveMaskd", "case_id", "dicom_patient_fields", "source_path", "write_csv", "write_mask"]

# DICOM attributes that identify a patient or a study; written to tables only on explicit request
PATIENT_FIELDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate",
                  "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def case_id(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """12 hex digits of the SHA-256 of ``path``, relative to ``root`` when given (ids then survive moving the
    folder), else absolute. Stable across runs and machines for the same layout; reveals nothing of the name."""
    path = Path(path)
    name = path.absolute().as_posix()
    if root is not None:
        try:
            name = path.absolute().relative_to(Path(root).absolute()).as_posix()
        except ValueError:
            pass  # outside root: the absolute path still identifies it
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]


def source_path(item: Mapping, image_key: str = "image") -> str | None:
    """The input file of a (decollated) item: the image's ``filename_or_obj`` meta data."""
    image = item.get(image_key)
    meta = getattr(image, "meta", None) or item.get(f"{image_key}_meta_dict") or {}
    name = meta.get("filename_or_obj")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name) if name else None


def dicom_patient_fields(path: str | os.PathLike | None, fields: Sequence[str] = PATIENT_FIELDS) -> dict[str, str]:
    """``{field: value}`` of a DICOM file's patient and study identifiers (empty strings for other formats)."""
    values = dict.fromkeys(fields, "")
    if path is None or xray_format(path) != "dicom":
        return values
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(fields))
    for name in fields:
        value = header.get(name)
        values[name] = "" if value is None else str(value)
    return values


def _to_numpy(mask: Any) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D label map (H, W) or (1, H, W), got shape {np.shape(mask)}")
    return np.rint(array).astype(np.uint8)


def _write_nifti(mask: np.ndarray, source: Path, out: Path) -> Path:
    import nibabel as nib

    src = nib.load(str(source))
    # our arrays are (rows, cols); NIfTI voxel axis 0 is x = columns (see readers.py): transpose back, and restore
    # the singleton axes the reader squeezed away
    data = mask.T.reshape(src.shape)
    # a fresh header keeps the geometry only: text fields of the source (descrip, aux_file) stay behind
    img = nib.Nifti1Image(data, src.affine)
    img.set_qform(src.get_qform(), code=int(src.header["qform_code"]))
    img.set_sform(src.get_sform(), code=int(src.header["sform_code"]))
    img.header.set_xyzt_units(*src.header.get_xyzt_units())
    img.set_data_dtype(np.uint8)
    path = out.with_name(out.name + ".nii.gz")
    nib.save(img, str(path))
    return path


def _write_itk(mask: np.ndarray, source: Path, out: Path) -> Path:
    import itk

    src = itk.imread(str(source))
    array = mask.reshape(itk.array_from_image(src).shape)  # numpy order (.., y, x) = ours, singleton axes back
    img = itk.image_from_array(np.ascontiguousarray(array))
    img.SetSpacing(src.GetSpacing())
    img.SetOrigin(src.GetOrigin())
    img.SetDirection(src.GetDirection())
    path = out.with_name(out.name + ".mha")
    itk.imwrite(img, str(path), compression=True)
    return path


def _write_png(mask: np.ndarray, out: Path, foreground_value: int) -> Path:
    from PIL import Image

    if mask.max() <= 1:  # binary masks as 0/255, the convention of our datasets
        mask = mask * np.uint8(foreground_value)
    path = out.with_name(out.name + ".png")
    Image.fromarray(mask).save(path)  # uint8 (H, W): 8-bit grey, no text chunks
    return path


def write_mask(mask: Any, source: str | os.PathLike, out_stem: str | os.PathLike,
               png_foreground_value: int = 255) -> Path:
    """Write a label map ``(H, W)`` (rows, columns: the input's own geometry) next to ``out_stem``, in a format that
    matches the input: NIfTI inputs get a ``.nii.gz`` with their affine and voxel axis order (labels 0/1...), ITK
    formats an ``.mha`` with their spacing/origin/direction, DICOM and 2-D picture formats a ``.png`` (binary masks
    0/255, multi-class masks as class indices). Returns the written path."""
    array = _to_numpy(mask)
    source, out = Path(source), Path(out_stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = xray_format(source)
    if fmt == "nifti":
        return _write_nifti(array, source, out)
    if fmt == "itk":
        return _write_itk(array, source, out)
    return _write_png(array, out, png_foreground_value)


class SaveMaskd(MapTransform):
    """Post-processing transform: write each key's label map with :func:`write_mask` as
    ``<case_id>_<suffix>.<ext>`` (``<case_id>_<key>.<ext>`` for several keys) and store the file name under
    ``<key>_file``.

    Use after ``Invertd`` so that the map has the input's own size and orientation. The case id is the item's
    ``case_key`` entry (set by :func:`muscle_ext.data.datalist_from_folder`) or, when absent, the hash of the input
    path (:func:`case_id`).
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, image_key: str = "image",
                 case_key: str = "case_id", suffix: str = "mask", png_foreground_value: int = 255,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.suffix = suffix
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.case_key = case_key
        self.png_foreground_value = png_foreground_value

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = source_path(d, self.image_key)
        if source is None:
            raise ValueError(f"SaveMaskd: '{self.image_key}' carries no file name (filename_or_obj) in its meta data")
        name = str(d.get(self.case_key) or case_id(source))
        for key in self.key_iterator(d):
            stem = f"{name}_{self.suffix}" if len(self.keys) == 1 else f"{name}_{key}"
            path = write_mask(d[key], source, self.output_dir / stem, self.png_foreground_value)
            d[f"{key}_file"] = path.name
        return d


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write rows as CSV atomically (a temporary file renamed into place); columns default to the union of the rows'
    keys in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
