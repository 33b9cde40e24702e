"""Fine-tuning helpers for any task model built on the ResNet backbone: find it, freeze it, linear probing, and
layer-wise learning rates (lower for earlier stages, higher for the new head)."""

from __future__ import annotations

from monai.networks.nets import ResNet
from torch import nn

from .resnet_utils import STAGES

__all__ = ["find_backbone", "freeze_backbone", "layerwise_param_groups", "linear_probe"]


def find_backbone(model: nn.Module) -> ResNet:
    """The ResNet backbone inside ``model`` (the model itself, ``model.backbone``, or the detector's).

    Raises ``ValueError`` when ``model`` holds no MONAI ``ResNet``.
    """
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
