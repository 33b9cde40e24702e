"""Where a downstream backbone starts: scratch, ImageNet weights, or an MD-MoCo / MUSCLE checkpoint."""

from __future__ import annotations

import os
from typing import Any

from monai.networks.nets import ResNet

from .backbone import build_backbone, load_backbone_checkpoint
from .pretrained import load_imagenet_backbone

__all__ = ["INIT_KINDS", "initialize_backbone"]

INIT_KINDS = ("scratch", "imagenet", "checkpoint")


def initialize_backbone(arch: str = "resnet18", init: str = "scratch", weights: str | os.PathLike | None = None,
                        **backbone_kwargs: Any) -> ResNet:
    """A backbone for fine-tuning.

    Args:
        arch: ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``.
        init: ``scratch`` (MONAI's Kaiming initialisation), ``imagenet`` (``weights`` is a local torchvision or timm
            ResNet state-dict file, converted to one input channel; nothing is downloaded) or ``checkpoint``
            (``weights`` is a ``muscle-backbone/1`` file written by ``muscle_pretrain`` or ``muscle_continual``).
        weights: the file for ``imagenet`` and ``checkpoint``.
        backbone_kwargs: passed to :func:`build_backbone` for ``scratch``/``imagenet``; a checkpoint brings its own
            and must agree with ``arch``.
    """
    if init not in INIT_KINDS:
        raise ValueError(f"init must be one of {INIT_KINDS}, got {init!r}")
    if init == "scratch":
        return build_backbone(arch, **backbone_kwargs)
    if weights is None or not os.path.isfile(weights):
        raise FileNotFoundError(f"init={init!r} needs a weights file; got {weights!r}")
    if init == "imagenet":
        return load_imagenet_backbone(weights, arch=arch)
    payload = load_backbone_checkpoint(weights)
    if payload["arch"] != arch:
        raise ValueError(f"{weights}: checkpoint holds a {payload['arch']}, the config asks for {arch}")
    net = build_backbone(payload["arch"], **payload["backbone_kwargs"])
    net.load_state_dict(payload["state_dict"], strict=True)
    return net
