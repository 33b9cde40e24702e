"""ImageNet ResNet weights (torchvision or timm layout) -> our one-channel MONAI backbone.

Nothing is downloaded: the weights file must already be on disk (e.g. torchvision's ``resnet18-f37072fd.pth``).
``build_backbone(imagenet_stem=True)`` uses torchvision's module names, so the conversion is: unwrap the
checkpoint, drop ``fc``, sum ``conv1`` over RGB, fill the BatchNorm counters old checkpoints lack, check.
Summing RGB filters means a grey image ``g`` is seen as ``(g, g, g)``; normalise inputs with the grey mean/std of
ImageNet (about 0.449 / 0.226) to match what the filters were trained on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from monai.networks.nets import ResNet

from muscle_ext.networks.backbone import build_backbone

__all__ = ["IMAGENET_GREY_MEAN", "IMAGENET_GREY_STD", "convert_torchvision_resnet", "load_imagenet_backbone"]

# mean of torchvision's per-channel ImageNet statistics (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN = 0.449
IMAGENET_GREY_STD = 0.226

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "model.", "backbone.")


def _unwrap(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under a usual key, with DataParallel/Lightning-style prefixes."""
    for key in _WRAPPER_KEYS:
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    out = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def convert_torchvision_resnet(state_dict: Mapping, arch: str = "resnet18",
                               in_channels: int = 1) -> dict[str, torch.Tensor]:
    """Convert an ImageNet ResNet state dict to the keys and shapes of ``build_backbone(arch, in_channels)``.

    The first conv is summed over its RGB input (``in_channels=1``) or left as is (``in_channels=3``); ``fc.*``
    is dropped. Raises ``ValueError`` listing missing/unexpected/mis-shaped keys, e.g. for timm's deep-stem
    ``resnet*d`` variants, which have a different layout.
    """
    source = _unwrap(state_dict)
    converted: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key.startswith("fc."):
            continue
        if key == "conv1.weight" and in_channels != value.shape[1]:
            if in_channels != 1:
                raise ValueError(f"cannot map conv1 with {value.shape[1]} input channels to {in_channels}")
            value = value.sum(dim=1, keepdim=True)
        converted[key] = value.detach().clone().float() if value.is_floating_point() else value.detach().clone()

    expected = build_backbone(arch, in_channels=in_channels, imagenet_stem=True).state_dict()
    for key, value in expected.items():
        # checkpoints saved before PyTorch 0.4.1 (torchvision's original ResNet weights) have no BN counters
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros_like(value)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mis_shaped = sorted(k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    if missing or unexpected or mis_shaped:
        raise ValueError(f"not a torchvision-layout {arch} state dict: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)}), mis-shaped {mis_shaped[:5]}")
    return converted


def load_imagenet_backbone(path: str | os.PathLike, arch: str = "resnet18", in_channels: int = 1) -> ResNet:
    """Build ``build_backbone(arch, in_channels, imagenet_stem=True)`` and load a local ImageNet weights file.

    The file is read with ``weights_only=True`` (no pickled code runs); nothing is ever downloaded.
    """
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    net = build_backbone(arch, in_channels=in_channels, imagenet_stem=True)
    net.load_state_dict(convert_torchvision_resnet(state_dict, arch, in_channels), strict=True)
    return net
