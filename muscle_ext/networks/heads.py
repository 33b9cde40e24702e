"""Task heads on the shared ResNet backbone: classification/regression, DeepLabV3+ segmentation, RetinaNet detection.

Every model keeps the backbone as its ``backbone`` attribute, unchanged, so that ``model.backbone.state_dict()`` is
exactly what ``save_backbone`` writes, and fine-tuned backbones stay interchangeable between tasks.
Classifier and segmenter have a single ``forward(x)`` (MONAI trainers, inferers, TorchScript); the detector is
MONAI's ``RetinaNetDetector``, which takes lists of images and targets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.networks.blocks import Convolution
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets import ResNet
from torch import nn

from muscle_ext.networks.backbone import backbone_feature_dim

__all__ = [
    "ASPP",
    "ATSSRetinaNetDetector",
    "BackboneClassifier",
    "BackboneRegressor",
    "BackboneSegmenter",
    "ClassificationHead",
    "DeepLabV3PlusHead",
    "RegressionHead",
    "ResNetFPN",
    "build_retinanet_detector",
    "dilate_backbone",
    "find_backbone",
    "freeze_backbone",
    "layerwise_param_groups",
    "linear_probe",
    "scaled_atrous_rates",
    "stage_channels",
    "stage_strides",
]

STAGES = ("layer1", "layer2", "layer3", "layer4")


# ----------------------------------------------------------------------------------------------------------------
# backbone introspection


def stage_channels(backbone: ResNet) -> list[int]:
    """Output channels of ``layer1..layer4`` (64/128/256/512 for resnet18/34, 256/512/1024/2048 for resnet50/101)."""
    channels = []
    for name in STAGES:
        last = getattr(backbone, name)[-1]
        conv = last.conv3 if hasattr(last, "conv3") else last.conv2
        channels.append(int(conv.out_channels))
    return channels


def _stem_stride(backbone: ResNet) -> int:
    return int(backbone.conv1.stride[0]) * (1 if backbone.no_max_pool else 2)


def _stage_has_stride(layer: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.stride[0] > 1 for m in layer.modules())


def stage_strides(backbone: ResNet) -> list[int]:
    """Current output stride of ``layer1..layer4`` (4/8/16/32 for the ImageNet stem; dilated stages keep theirs)."""
    stride, strides = _stem_stride(backbone), []
    for name in STAGES:
        if _stage_has_stride(getattr(backbone, name)):
            stride *= 2
        strides.append(stride)
    return strides


def dilate_backbone(backbone: ResNet, output_stride: int, last_stage: int = 4) -> ResNet:
    """Replace strides by dilation in the late stages so that ``layer{last_stage}`` has ``output_stride``.

    The DeepLab recipe (output stride 16 or 8). Weights and state-dict keys are unchanged, only the conv
    hyper-parameters are, so the backbone stays loadable and savable in the checkpoint format. In place.
    """
    stride, dilation, plan = _stem_stride(backbone), 1, []
    for name in STAGES[:last_stage]:
        layer = getattr(backbone, name)
        if _stage_has_stride(layer):
            if stride * 2 <= output_stride:
                stride *= 2
            else:
                dilation *= 2
        if dilation > 1:
            plan.append((layer, dilation))
    if stride != output_stride:
        raise ValueError(f"layer{last_stage} cannot have output stride {output_stride}; possible values are powers "
                         f"of two between {stage_strides(backbone)[0]} and {stage_strides(backbone)[last_stage - 1]}")
    for layer, d in plan:  # checked first, changed after: a bad output_stride leaves the backbone untouched
        for m in layer.modules():
            if isinstance(m, nn.Conv2d):
                m.stride = (1, 1)
                if m.kernel_size[0] > 1:
                    m.dilation = (d, d)
                    m.padding = (d * (m.kernel_size[0] // 2), d * (m.kernel_size[1] // 2))
    return backbone


def scaled_atrous_rates(rates: Sequence[int], output_stride: int) -> tuple[int, ...]:
    """ASPP rates are quoted for output stride 16 (DeepLabV3); scale them to the stride actually used."""
    return tuple(max(1, round(r * 16 / output_stride)) for r in rates)


# ----------------------------------------------------------------------------------------------------------------
# classification / regression


class ClassificationHead(nn.Sequential):
    """Dropout + linear layer on pooled features ``(B, in_features)`` -> logits ``(B, num_outputs)``."""

    def __init__(self, in_features: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.add_module("dropout", nn.Dropout(dropout))
        self.add_module("fc", nn.Linear(in_features, num_outputs))


class RegressionHead(ClassificationHead):
    """Same layers as ``ClassificationHead``; outputs are real values (e.g. bone age), one by default."""

    def __init__(self, in_features: int, num_outputs: int = 1, dropout: float = 0.0) -> None:
        super().__init__(in_features, num_outputs, dropout)


class BackboneClassifier(nn.Module):
    """``backbone`` (pooled features) + ``ClassificationHead``; ``forward(x)`` returns logits ``(B, num_outputs)``."""

    def __init__(self, backbone: ResNet, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = self._make_head(backbone_feature_dim(backbone), num_outputs, dropout)

    @staticmethod
    def _make_head(in_features: int, num_outputs: int, dropout: float) -> nn.Module:
        return ClassificationHead(in_features, num_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class BackboneRegressor(BackboneClassifier):
    """``backbone`` + ``RegressionHead``; ``forward(x)`` returns ``(B, num_outputs)`` real values."""

    def __init__(self, backbone: ResNet, num_outputs: int = 1, dropout: float = 0.0) -> None:
        super().__init__(backbone, num_outputs, dropout)

    @staticmethod
    def _make_head(in_features: int, num_outputs: int, dropout: float) -> nn.Module:
        return RegressionHead(in_features, num_outputs, dropout)


# ----------------------------------------------------------------------------------------------------------------
# segmentation (DeepLabV3+)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> Convolution:
    return Convolution(2, in_channels, out_channels, kernel_size=kernel_size, dilation=dilation, act="RELU",
                       norm="BATCH", bias=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1x1 conv, one 3x3 conv per rate and an image-pooling branch,
    concatenated and projected to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int = 256, atrous_rates: Sequence[int] = (6, 12, 18),
                 dropout: float = 0.1) -> None:
        super().__init__()
        branches = [_conv_bn_relu(in_channels, out_channels, 1)]
        branches += [_conv_bn_relu(in_channels, out_channels, 3, dilation=int(r)) for r in atrous_rates]
        self.branches = nn.ModuleList(branches)
        # No BatchNorm after pooling: one value per channel and image would make BN fail at batch size 1.
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1),
                                        nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(out_channels * (len(branches) + 1), out_channels, 1),
                                     nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for branch in self.branches:  # a loop, not a comprehension: TorchScript unrolls loops over ModuleList
            outputs.append(branch(x))
        outputs.append(self.image_pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outputs, dim=1))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ decoder: ASPP on the high-level map, upsampled and fused with a 48-channel projection of the
    low-level (stride-4) map, two 3x3 convs, a 1x1 classifier; logits are resized to ``output_size``."""

    def __init__(self, high_channels: int, low_channels: int, num_classes: int, aspp_channels: int = 256,
                 low_level_channels: int = 48, atrous_rates: Sequence[int] = (6, 12, 18),
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.aspp = ASPP(high_channels, aspp_channels, atrous_rates, dropout)
        self.low_level = _conv_bn_relu(low_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(aspp_channels + low_level_channels, aspp_channels, 3),
                                  _conv_bn_relu(aspp_channels, aspp_channels, 3))
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor, output_size: list[int]) -> torch.Tensor:
        low = self.low_level(low)
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(torch.cat([high, low], dim=1)))
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)


class BackboneSegmenter(nn.Module):
    """``backbone`` + ``DeepLabV3PlusHead``; ``forward(x)`` returns logits ``(B, num_classes, H, W)`` at input size.

    ``output_stride`` 16 (DeepLabV3+ default) dilates layer4 of the given backbone in place (8 also dilates layer3;
    32 leaves it as is, the cheapest). Dilation changes conv hyper-parameters only: ``save_backbone`` still writes
    the same weights. ``aspp_source="layer3"`` runs ASPP on layer3 and skips layer4 (its parameters get no
    gradient: use ``find_unused_parameters=True`` under DDP). ``atrous_rates`` are the rates for output stride 16
    and are scaled to ``output_stride``.
    """

    def __init__(self, backbone: ResNet, num_classes: int, output_stride: int = 16, aspp_source: str = "layer4",
                 atrous_rates: Sequence[int] = (6, 12, 18), aspp_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if aspp_source not in ("layer3", "layer4"):
            raise ValueError(f"aspp_source must be 'layer3' or 'layer4', got '{aspp_source}'")
        source = STAGES.index(aspp_source) + 1
        self.backbone = dilate_backbone(backbone, output_stride, last_stage=source)
        self.use_layer4 = source == 4
        channels = stage_channels(backbone)
        self.head = DeepLabV3PlusHead(channels[source - 1], channels[0], num_classes, aspp_channels,
                                      atrous_rates=scaled_atrous_rates(atrous_rates, output_stride), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        h = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            h = b.maxpool(h)
        low = b.layer1(h)
        high = b.layer3(b.layer2(low))
        if self.use_layer4:
            high = b.layer4(high)
        return self.head(low, high, [x.shape[-2], x.shape[-1]])


# ----------------------------------------------------------------------------------------------------------------
# detection (RetinaNet)


class ResNetFPN(nn.Module):
    """Backbone + feature pyramid (MONAI's ``FeaturePyramidNetwork`` with an extra max-pooled level).

    MONAI's ``BackboneWithFPN`` extracts stages with torchvision's ``IntermediateLayerGetter``, which we cannot
    install next to the CPU torch; this module runs the stages itself. ``forward`` returns the FPN maps as a
    ``dict`` (finest first): ``len(returned_layers) + 1`` maps of ``out_channels`` each.
    """

    def __init__(self, backbone: ResNet, returned_layers: Sequence[int] = (1, 2, 3), out_channels: int = 256) -> None:
        super().__init__()
        returned_layers = sorted(int(k) for k in returned_layers)
        if not returned_layers or returned_layers[0] < 1 or returned_layers[-1] > 4:
            raise ValueError(f"returned_layers must be in 1..4, got {returned_layers}")
        self.backbone = backbone
        self.returned_layers = returned_layers
        self.last_layer = returned_layers[-1]
        channels = stage_channels(backbone)
        self.fpn = FeaturePyramidNetwork(spatial_dims=2, in_channels_list=[channels[k - 1] for k in returned_layers],
                                         out_channels=out_channels, extra_blocks=LastLevelMaxPool(2))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.backbone
        h = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            h = b.maxpool(h)
        maps: list[torch.Tensor] = []
        h = b.layer1(h)
        maps.append(h)
        if self.last_layer >= 2:
            h = b.layer2(h)
            maps.append(h)
        if self.last_layer >= 3:
            h = b.layer3(h)
            maps.append(h)
        if self.last_layer >= 4:
            h = b.layer4(h)
            maps.append(h)
        features: dict[str, torch.Tensor] = {}
        for k in self.returned_layers:
            features[str(k)] = maps[k - 1]
        return self.fpn(features)


class ATSSRetinaNetDetector(RetinaNetDetector):
    """``RetinaNetDetector`` that matches anchors with MONAI's ATSS matcher only.

    The parent's matching step tests ``isinstance(matcher, torchvision Matcher)`` first, which raises without
    torchvision (not installable next to the CPU torch); this override skips that test. Same outputs otherwise.
    """

    def compute_anchor_matched_idxs(self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                                    num_anchor_locs_per_level: Sequence[int]) -> list[torch.Tensor]:
        if not isinstance(self.proposal_matcher, ATSSMatcher):
            raise NotImplementedError("only the ATSS matcher (set_atss_matcher) is supported without torchvision")
        matched_idxs = []
        for anchors_per_image, targets_per_image in zip(anchors, targets, strict=True):
            boxes = targets_per_image[self.target_box_key].to(anchors_per_image.device)
            if boxes.numel() == 0:  # no ground truth: every anchor is background
                matched_idxs.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                               device=anchors_per_image.device))
                continue
            _, matched = self.proposal_matcher(boxes, anchors_per_image, num_anchor_locs_per_level,
                                               self.num_anchors_per_loc)
            if int(matched.max()) < 0:
                warnings.warn(f"no anchor matches the ground-truth boxes {boxes.tolist()}: check anchor shapes",
                              stacklevel=2)
            matched_idxs.append(matched)
        return matched_idxs


def build_retinanet_detector(
    backbone: ResNet,
    num_classes: int,
    returned_layers: Sequence[int] = (1, 2, 3),
    base_anchor_shapes: Sequence[Sequence[float]] = ((32, 32), (48, 24), (24, 48)),
    fpn_channels: int = 256,
    atss_num_candidates: int = 4,
    hard_negative_batch_size: int = 64,
    positive_fraction: float = 0.3,
    score_thresh: float = 0.05,
    topk_candidates_per_level: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> ATSSRetinaNetDetector:
    """MONAI ``RetinaNetDetector`` (2-D) on ``backbone`` + FPN, ready to train and to infer.

    Anchors: ``base_anchor_shapes`` on the finest FPN level, doubled on each coarser level. Training uses MONAI's
    ATSS matcher and hard-negative sampler (torchvision's ``Matcher``/balanced sampler are unavailable here).

    Boxes follow MONAI's ``StandardMode`` over array axes: ``[a0_min, a1_min, a0_max, a1_max]`` where axis 0 is the
    first spatial axis of the tensor. For our ``(C, H, W)`` arrays that is ``[row_min, col_min, row_max, col_max]``;
    annotations given as image ``(x=column, y=row)`` must be swapped to that order.
    Train mode: ``detector(images, targets)`` -> ``{"classification": loss, "box_regression": loss}`` with targets
    ``[{"boxes": (N, 4) float, "labels": (N,) long}]``; eval mode: ``detector(images)`` ->
    ``[{"boxes", "labels", "labels_scores"}]`` per image.
    """
    feature_extractor = ResNetFPN(backbone, returned_layers, fpn_channels)
    num_levels = len(feature_extractor.returned_layers) + 1
    # inputs are padded so that the coarsest (extra pooled) level has an integer size
    coarsest_stride = stage_strides(backbone)[feature_extractor.last_layer - 1] * 2
    anchor_generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**i for i in range(num_levels)],
        base_anchor_shapes=[tuple(float(s) for s in shape) for shape in base_anchor_shapes],
    )
    network = RetinaNet(spatial_dims=2, num_classes=num_classes,
                        num_anchors=anchor_generator.num_anchors_per_location()[0],
                        feature_extractor=feature_extractor, size_divisible=coarsest_stride)
    detector = ATSSRetinaNetDetector(network, anchor_generator)
    detector.set_atss_matcher(num_candidates=atss_num_candidates, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=hard_negative_batch_size,
                                       positive_fraction=positive_fraction)
    detector.set_box_selector_parameters(score_thresh=score_thresh, topk_candidates_per_level=topk_candidates_per_level,
                                         nms_thresh=nms_thresh, detections_per_img=detections_per_img)
    return detector


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning utilities


def find_backbone(model: nn.Module) -> ResNet:
    """The ResNet backbone inside ``model`` (the model itself, ``model.backbone``, or the detector's)."""
    for module in model.modules():
        if isinstance(module, ResNet):
            return module
    raise ValueError(f"no MONAI ResNet backbone found in {type(model).__name__}")


def freeze_backbone(model: nn.Module, freeze: bool = True) -> ResNet:
    """Stop (or restart) gradients through the backbone, for linear probing or a head warm-up.

    BatchNorm running statistics still update in ``train()`` mode; call ``find_backbone(model).eval()`` after
    ``model.train()`` to keep them fixed as well.
    """
    backbone = find_backbone(model)
    for p in backbone.parameters():
        p.requires_grad_(not freeze)
    return backbone


def _keep_eval(module: nn.Module, args: tuple) -> None:
    module.eval()


def linear_probe(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Linear probing when ``enabled``: freeze the backbone and keep it in eval mode, so that BatchNorm uses (and
    keeps) the pre-trained statistics while only the head trains. Returns ``model`` (unchanged when not enabled).

    Trainers call ``model.train()`` every iteration; a forward pre-hook puts the backbone back in eval mode before
    each forward pass. The hook is not part of the state dict: checkpoints and TorchScript exports are unaffected.
    """
    if enabled:
        backbone = freeze_backbone(model, True)
        backbone.register_forward_pre_hook(_keep_eval)
    return model


def _backbone_stage(name: str) -> int:
    """0 for the stem (conv1, bn1), k for ``layer{k}``."""
    head = name.split(".", 1)[0]
    return STAGES.index(head) + 1 if head in STAGES else 0


def layerwise_param_groups(model: nn.Module, base_lr: float, head_lr_mult: float = 10.0,
                           decay: float = 0.5) -> list[dict]:
    """Optimizer parameter groups with layer-wise learning rates.

    layer4 gets ``base_lr``, layer3 ``base_lr * decay``, ..., the stem ``base_lr * decay**4``; every parameter
    outside the backbone (head, FPN, ...) gets ``base_lr * head_lr_mult``. Frozen parameters and empty groups are
    left out. Each group has a ``name`` ("stem", "layer1".., "head") for logging.
    """
    backbone = find_backbone(model)
    backbone_ids = set()
    stage_params: list[list[nn.Parameter]] = [[] for _ in range(5)]
    for name, p in backbone.named_parameters():
        backbone_ids.add(id(p))
        if p.requires_grad:
            stage_params[_backbone_stage(name)].append(p)
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
    groups = [{"params": params, "lr": base_lr * decay ** (4 - k), "name": ("stem", *STAGES)[k]}
              for k, params in enumerate(stage_params)]
    groups.append({"params": head_params, "lr": base_lr * head_lr_mult, "name": "head"})
    return [g for g in groups if g["params"]]
