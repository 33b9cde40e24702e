"""X-ray I/O, pre-processing transforms, datalists, dataset pooling and caching, inference output writers."""

from .backbone_inputs import backbone_input_loader
from .converters import CONVERTERS, convert_dataset, pool_datalists
from .datalist import (
    DatalistError,
    ValidationReport,
    datalist_from_class_folders,
    datalist_from_csv,
    datalist_from_dicom_tree,
    datalist_from_folder,
    datalist_section,
    is_dicomdir,
    load_datalist,
    screen_inputs,
    subset,
    validate_datalist,
    write_datalist,
)
from .datasets import cache_key, make_dataset, pool_datasets, split_by_key
from .label_fractions import k_shot_subset, label_fraction_subset
from .leakage import Leak, find_leaks
from .readers import LoadXRayd, XRayReader, XRayReadError, read_mask, read_xray, xray_format
from .sampling import DrawSeededDataset, PooledSampler, dataset_weights, pool_weights
from .transforms import (
    CLAHE,
    AddTagsd,
    CLAHEd,
    RobustIntensityScaled,
    SquarePixelResize,
    SquarePixelResized,
    xray_preprocessing,
)
from .writers import SaveMaskd, case_id, dicom_patient_fields, write_csv, write_mask

__all__ = [
    "CLAHE",
    "CONVERTERS",
    "AddTagsd",
    "RobustIntensityScaled",
    "CLAHEd",
    "DatalistError",
    "DrawSeededDataset",
    "Leak",
    "LoadXRayd",
    "PooledSampler",
    "SquarePixelResize",
    "SquarePixelResized",
    "SaveMaskd",
    "ValidationReport",
    "XRayReadError",
    "XRayReader",
    "backbone_input_loader",
    "find_leaks",
    "k_shot_subset",
    "label_fraction_subset",
    "case_id",
    "convert_dataset",
    "datalist_from_class_folders",
    "datalist_from_csv",
    "datalist_from_dicom_tree",
    "datalist_from_folder",
    "datalist_section",
    "dataset_weights",
    "dicom_patient_fields",
    "is_dicomdir",
    "load_datalist",
    "cache_key",
    "make_dataset",
    "pool_datalists",
    "pool_datasets",
    "pool_weights",
    "read_mask",
    "read_xray",
    "screen_inputs",
    "split_by_key",
    "subset",
    "validate_datalist",
    "write_csv",
    "write_datalist",
    "write_mask",
    "xray_format",
    "xray_preprocessing",
]
