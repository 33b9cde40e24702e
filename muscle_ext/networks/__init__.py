"""Backbones (one checkpoint format for every bundle), MoCo v2, task models on the backbone and fine-tuning helpers.

Modules: ``backbone`` (build, save, load), ``resnet_utils`` (stages, channels, strides, dilation, feature maps),
``classifier``, ``deeplab``, ``retinanet`` (task models), ``finetune`` (freezing, linear probing, layer-wise LRs),
``moco``, ``init`` / ``pretrained`` (initial weights), ``model_settings`` (what a checkpoint records),
``regularizers``.
"""

from .adaptation import adapt_batchnorm
from .backbone import (
    BACKBONE_FORMAT,
    RESNET_LAYERS,
    build_backbone,
    file_sha256,
    load_backbone,
    load_backbone_checkpoint,
    save_backbone,
)
from .classifier import BackboneClassifier, BackboneRegressor, ClassificationHead, RegressionHead
from .deeplab import ASPP, BackboneSegmenter, DeepLabV3PlusHead, scaled_atrous_rates
from .finetune import find_backbone, freeze_backbone, layerwise_param_groups, linear_probe
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
from .resnet_utils import (
    STAGES,
    BackboneModel,
    backbone_feature_dim,
    backbone_feature_maps,
    dilate_backbone,
    stage_channels,
    stage_strides,
)
from .retinanet import ATSSRetinaNetDetector, ResNetFPN, build_retinanet_detector

__all__ = [
    "ASPP",
    "ATSSRetinaNetDetector",
    "BACKBONE_FORMAT",
    "BackboneClassifier",
    "BackboneModel",
    "BackboneRegressor",
    "BackboneSegmenter",
    "ClassificationHead",
    "DeepLabV3PlusHead",
    "INIT_KINDS",
    "MODEL_FORMAT",
    "ModelSettingsError",
    "MoCo",
    "RESNET_LAYERS",
    "RegressionHead",
    "ResNetFPN",
    "STAGES",
    "SplitBatchNorm2d",
    "TrainedSettings",
    "adapt_batchnorm",
    "backbone_feature_dim",
    "backbone_feature_maps",
    "build_backbone",
    "build_retinanet_detector",
    "check_model_settings",
    "concat_all_gather",
    "convert_to_split_batchnorm",
    "describe_preprocessing",
    "describe_weights",
    "dilate_backbone",
    "file_sha256",
    "find_backbone",
    "freeze_backbone",
    "initialize_backbone",
    "layerwise_param_groups",
    "linear_probe",
    "load_backbone",
    "load_backbone_checkpoint",
    "load_model_file",
    "random_permutation",
    "read_backbone_settings",
    "read_model_settings",
    "revert_split_batchnorm",
    "save_backbone",
    "scaled_atrous_rates",
    "stage_channels",
    "stage_strides",
]
