"""DeepLabV3+ segmentation on the ResNet backbone (Chen et al. 2018, "Encoder-Decoder with Atrous Separable
Convolution"): ASPP on a dilated late stage, a decoder fused with the stride-4 map, logits at input size.

The model has a single ``forward(x)`` (MONAI trainers, sliding-window inferers, TorchScript) and keeps the backbone
as its ``backbone`` attribute (:class:`~muscle_ext.networks.resnet_utils.BackboneModel`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import ResNet
from torch import nn

from .resnet_utils import STAGES, BackboneModel, dilate_backbone, stage_channels

__all__ = ["ASPP", "BackboneSegmenter", "DeepLabV3PlusHead", "scaled_atrous_rates"]


def scaled_atrous_rates(rates: Sequence[int], output_stride: int) -> tuple[int, ...]:
    """ASPP rates are quoted for output stride 16 (DeepLabV3); scale them to the stride actually used."""
    return tuple(max(1, round(r * 16 / output_stride)) for r in rates)


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


class BackboneSegmenter(BackboneModel):
    """``backbone`` + ``DeepLabV3PlusHead``; ``forward(x)`` returns logits ``(B, num_classes, H, W)`` at input size.

    ``output_stride`` 16 (DeepLabV3+ default) dilates layer4 of the given backbone in place (8 also dilates layer3;
    32 leaves it as is, the cheapest). Dilation changes conv hyper-parameters only: ``save_backbone`` still writes
    the same weights. ``aspp_source="layer3"`` runs ASPP on layer3 and skips layer4 (its parameters get no
    gradient: use ``find_unused_parameters=True`` under DDP). ``atrous_rates`` are the rates for output stride 16
    and are scaled to ``output_stride``. Raises ``ValueError`` for another ``aspp_source`` or an unreachable
    ``output_stride``.
    """

    def __init__(self, backbone: ResNet, num_classes: int, output_stride: int = 16, aspp_source: str = "layer4",
                 atrous_rates: Sequence[int] = (6, 12, 18), aspp_channels: int = 256, dropout: float = 0.1) -> None:
        if aspp_source not in ("layer3", "layer4"):
            raise ValueError(f"aspp_source must be 'layer3' or 'layer4', got '{aspp_source}'")
        source = STAGES.index(aspp_source) + 1
        super().__init__(dilate_backbone(backbone, output_stride, last_stage=source))
        self.aspp_stage = source
        channels = stage_channels(backbone)
        self.head = DeepLabV3PlusHead(channels[source - 1], channels[0], num_classes, aspp_channels,
                                      atrous_rates=scaled_atrous_rates(atrous_rates, output_stride), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.feature_maps(x, self.aspp_stage)
        return self.head(maps[0], maps[-1], [x.shape[-2], x.shape[-1]])
