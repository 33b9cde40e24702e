"""Adapting a trained model to a new site without labels: batch-norm statistics re-estimated on the new site's
images (AdaBN, Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation", ICLR-W 2017).

The weights stay as trained; every batch-norm layer's running mean and variance are replaced by the cumulative
statistics of the new site's images (PyTorch's ``torch.optim.swa_utils.update_bn``, which resets them and averages
over all batches with ``momentum=None``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

__all__ = ["adapt_batchnorm"]


def adapt_batchnorm(model: nn.Module, batches: Iterable[Any], image_key: str = "image",
                    device: str | torch.device | None = None) -> nn.Module:
    """Re-estimate every batch-norm layer's running statistics of ``model`` on ``batches`` (AdaBN).

    Args:
        model: the trained model (any module with batch-norm layers); returned in the mode it was in.
        batches: the new site's unlabelled batches: ``(B, C, H, W)`` tensors, or dicts holding them under
            ``image_key`` (a MONAI ``DataLoader``'s batches).
        device: where the batches go (the model's own device when ``None``).

    Returns:
        ``model``, its batch-norm running statistics replaced; its parameters untouched.

    Raises:
        ValueError: ``model`` has no batch-norm layer (nothing to adapt), or ``batches`` yields nothing.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("the model has no batch-norm layer: AdaBN has nothing to re-estimate")
    if device is None:
        device = next(model.parameters()).device
    seen = [0]

    def images() -> Iterable[torch.Tensor]:
        for batch in batches:
            seen[0] += 1
            yield batch[image_key] if isinstance(batch, Mapping) else batch

    was_training = model.training
    update_bn(images(), model, device=device)
    model.train(was_training)
    if not seen[0]:
        raise ValueError("no batch of the new site's images: AdaBN needs at least one")
    return model
