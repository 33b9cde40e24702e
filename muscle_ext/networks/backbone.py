"""ResNet backbones (MONAI ``ResNet``, 2-D, one input channel) and the one backbone checkpoint format.

A backbone maps ``(B, 1, H, W)`` to pooled features ``(B, feature_dim)``. Its stages (channels, strides, dilation,
per-stage feature maps) are :mod:`muscle_ext.networks.resnet_utils`'s; ``backbone_feature_dim`` and
``backbone_feature_maps`` are re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from .resnet_utils import backbone_feature_dim, backbone_feature_maps

__all__ = [
    "BACKBONE_FORMAT",
    "RESNET_LAYERS",
    "backbone_feature_dim",
    "backbone_feature_maps",
    "build_backbone",
    "file_sha256",
    "load_backbone",
    "load_backbone_checkpoint",
    "save_backbone",
]

BACKBONE_FORMAT = "muscle-backbone/1"
RESNET_LAYERS = {
    "resnet18": (ResNetBlock, (2, 2, 2, 2)),
    "resnet34": (ResNetBlock, (3, 4, 6, 3)),
    "resnet50": (ResNetBottleneck, (3, 4, 6, 3)),
    "resnet101": (ResNetBottleneck, (3, 4, 23, 3)),
}


def build_backbone(arch: str = "resnet18", in_channels: int = 1, imagenet_stem: bool = True, **kwargs: Any) -> ResNet:
    """A 2-D MONAI ResNet whose ``fc`` is the identity, so that ``forward`` returns pooled features.

    ``imagenet_stem=True`` gives the standard layout (stride-2 first conv, bias-free downsampling): 4x fewer
    FLOPs than MONAI's default stem at the same input size, and the same keys as torchvision's ResNet.
    """
    if arch not in RESNET_LAYERS:
        raise ValueError(f"unknown backbone arch '{arch}', expected one of {sorted(RESNET_LAYERS)}")
    block, layers = RESNET_LAYERS[arch]
    options: dict[str, Any] = {"conv1_t_size": 7, "conv1_t_stride": 2 if imagenet_stem else 1,
                               "bias_downsample": not imagenet_stem}
    options.update(kwargs)
    net = ResNet(block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=2,
                 n_input_channels=in_channels, num_classes=1, **options)
    net.fc = nn.Identity()
    return net


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_backbone(path: str | os.PathLike, backbone: nn.Module, arch: str, backbone_kwargs: dict | None = None,
                  source: dict | None = None, settings: dict | None = None) -> str:
    """Write a backbone checkpoint in the documented format; returns its SHA-256 (for lineage).

    ``settings``: what evaluation and inference need to know about its training (image size, input normalisation,
    pre-processing, ...; see :mod:`muscle_ext.networks.model_settings`), stored as plain values under ``settings``.
    """
    from .model_settings import plain_settings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    payload = {"format": BACKBONE_FORMAT, "arch": arch, "backbone_kwargs": dict(backbone_kwargs or {}),
               "state_dict": state, "source": dict(source or {})}
    if settings is not None:
        payload["settings"] = plain_settings(dict(settings), "settings")
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as "iostream error" / "unexpected pos"
        tmp.unlink(missing_ok=True)
        free_mb = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(f"{path}: could not write the backbone checkpoint ({free_mb:.0f} MB free on that disk): {exc}") \
            from exc
    os.replace(tmp, path)  # never leave a half-written checkpoint behind
    return file_sha256(path)


def load_backbone_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check a backbone checkpoint (``weights_only=True``)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != BACKBONE_FORMAT:
        raise ValueError(f"{path}: not a {BACKBONE_FORMAT} backbone checkpoint")
    return payload


def load_backbone(path: str | os.PathLike, **override_kwargs: Any) -> ResNet:
    """Build the backbone a checkpoint describes and load its weights (strict)."""
    payload = load_backbone_checkpoint(path)
    kwargs = {**payload["backbone_kwargs"], **override_kwargs}
    net = build_backbone(payload["arch"], **kwargs)
    net.load_state_dict(payload["state_dict"], strict=True)
    return net
