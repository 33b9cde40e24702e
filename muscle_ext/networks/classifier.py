"""Image-level heads on the pooled backbone features: classification (logits) and regression (real values).

The models have a single ``forward(x)`` (MONAI trainers, inferers, TorchScript) and keep the backbone as their
``backbone`` attribute (:class:`~muscle_ext.networks.resnet_utils.BackboneModel`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet
from torch import nn

from .resnet_utils import BackboneModel, backbone_feature_dim

__all__ = ["BackboneClassifier", "BackboneRegressor", "ClassificationHead", "RegressionHead"]


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


class BackboneClassifier(BackboneModel):
    """``backbone`` (pooled features) + ``ClassificationHead``; ``forward(x)`` returns logits ``(B, num_outputs)``."""

    def __init__(self, backbone: ResNet, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__(backbone)
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
