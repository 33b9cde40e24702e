"""Backbones (one checkpoint format for every bundle) and MoCo v2."""

from .backbone import (
    BACKBONE_FORMAT,
    RESNET_LAYERS,
    backbone_feature_dim,
    backbone_feature_maps,
    build_backbone,
    file_sha256,
    load_backbone,
    load_backbone_checkpoint,
    save_backbone,
)
from .init import INIT_KINDS, initialize_backbone
from .moco import (
    MoCo,
    SplitBatchNorm2d,
    concat_all_gather,
    convert_to_split_batchnorm,
    random_permutation,
    revert_split_batchnorm,
)
from .model_settings import (
    MODEL_FORMAT,
    ModelSettingsError,
    TrainedSettings,
    check_model_settings,
    describe_preprocessing,
    describe_weights,
    load_model_file,
    read_backbone_settings,
    read_model_settings,
)

__all__ = [
    "INIT_KINDS",
    "initialize_backbone",
    "MODEL_FORMAT",
    "ModelSettingsError",
    "TrainedSettings",
    "check_model_settings",
    "describe_preprocessing",
    "describe_weights",
    "load_model_file",
    "read_backbone_settings",
    "read_model_settings",
    "BACKBONE_FORMAT",
    "RESNET_LAYERS",
    "MoCo",
    "SplitBatchNorm2d",
    "backbone_feature_dim",
    "backbone_feature_maps",
    "build_backbone",
    "concat_all_gather",
    "convert_to_split_batchnorm",
    "file_sha256",
    "load_backbone",
    "load_backbone_checkpoint",
    "random_permutation",
    "revert_split_batchnorm",
    "save_backbone",
]
