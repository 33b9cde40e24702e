"""The anatomy of a MONAI ``ResNet`` backbone: its stages, their channels and strides, dilation, and the one forward
pass through the stem and stages that every dense task head uses.

Stages are ``layer1..layer4`` (torchvision's names); the stem is ``conv1``, ``bn1``, ``act`` and, unless
``no_max_pool``, ``maxpool``. :class:`BackboneModel` is the base of the task models: it keeps the backbone as its
``backbone`` attribute and runs the stages in a TorchScript-compatible way; :func:`backbone_feature_maps` does the
same for a bare backbone.
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet
from torch import nn

__all__ = [
    "STAGES",
    "BackboneModel",
    "backbone_feature_dim",
    "backbone_feature_maps",
    "dilate_backbone",
    "stage_channels",
    "stage_strides",
]

STAGES = ("layer1", "layer2", "layer3", "layer4")


def stage_channels(backbone: ResNet) -> list[int]:
    """Output channels of ``layer1..layer4`` (64/128/256/512 for resnet18/34, 256/512/1024/2048 for resnet50/101)."""
    channels = []
    for name in STAGES:
        last = getattr(backbone, name)[-1]
        conv = last.conv3 if hasattr(last, "conv3") else last.conv2
        channels.append(int(conv.out_channels))
    return channels


def backbone_feature_dim(backbone: ResNet) -> int:
    """Width of the pooled feature vector (512 for resnet18/34, 2048 for resnet50/101)."""
    return stage_channels(backbone)[-1]


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

    The DeepLab recipe (output stride 16 or 8; Chen et al. 2017). Weights and state-dict keys are unchanged, only
    the conv hyper-parameters are, so the backbone stays loadable and savable in the checkpoint format. In place.
    Raises ``ValueError`` (backbone untouched) when ``output_stride`` is not reachable by dilation.
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


class BackboneModel(nn.Module):
    """Base of the task models: the ResNet as the ``backbone`` attribute, unchanged, and its stage outputs.

    ``model.backbone.state_dict()`` is exactly what ``save_backbone`` writes, so fine-tuned backbones stay
    interchangeable between tasks. Subclasses define ``forward``; :meth:`feature_maps` compiles with TorchScript.
    """

    def __init__(self, backbone: ResNet) -> None:
        super().__init__()
        self.backbone = backbone

    def feature_maps(self, x: torch.Tensor, last_stage: int = 4) -> list[torch.Tensor]:
        """Outputs of ``layer1..layer{last_stage}`` for ``x`` ``(B, C, H, W)``; later stages are not run.

        Strides 4, 8, 16, 32 with the ImageNet stem (less where :func:`dilate_backbone` dilated a stage).
        """
        b = self.backbone
        h = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            h = b.maxpool(h)
        h = b.layer1(h)  # explicit calls: TorchScript cannot index or iterate over differently-typed stages
        maps: list[torch.Tensor] = [h]
        if last_stage >= 2:
            h = b.layer2(h)
            maps.append(h)
        if last_stage >= 3:
            h = b.layer3(h)
            maps.append(h)
        if last_stage >= 4:
            h = b.layer4(h)
            maps.append(h)
        return maps


def backbone_feature_maps(backbone: ResNet, x: torch.Tensor, last_stage: int = 4) -> list[torch.Tensor]:
    """Feature maps after ``layer1..layer{last_stage}`` of a bare backbone (strides 4, 8, 16, 32 with the ImageNet
    stem); the same computation as :meth:`BackboneModel.feature_maps`."""
    if not 1 <= last_stage <= len(STAGES):
        raise ValueError(f"last_stage must be in 1..{len(STAGES)}, got {last_stage}")
    return BackboneModel(backbone).feature_maps(x, last_stage)
