"""X-ray I/O, pre-processing transforms, datalists, dataset pooling and caching."""

from .datalist import (
    DatalistError,
    ValidationReport,
    datalist_from_class_folders,
    datalist_from_csv,
    datalist_from_dicom_tree,
    load_datalist,
    validate_datalist,
    write_datalist,
)
from .datasets import make_dataset, pool_datasets, split_by_key
from .readers import XRayReader, XRayReadError, read_xray, xray_format
from .sampling import DrawSeededDataset, PooledSampler, dataset_weights
from .transforms import CLAHE, AddTagsd, CLAHEd, xray_preprocessing

__all__ = [
    "CLAHE",
    "AddTagsd",
    "CLAHEd",
    "DatalistError",
    "DrawSeededDataset",
    "PooledSampler",
    "ValidationReport",
    "XRayReadError",
    "XRayReader",
    "datalist_from_class_folders",
    "datalist_from_csv",
    "datalist_from_dicom_tree",
    "dataset_weights",
    "load_datalist",
    "make_dataset",
    "pool_datasets",
    "read_xray",
    "split_by_key",
    "validate_datalist",
    "write_datalist",
    "xray_format",
    "xray_preprocessing",
]
