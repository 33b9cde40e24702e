"""Penalties that hold a shared backbone near what earlier tasks taught it (cross-task memorization).

Pure tensor functions keyed by parameter *name* (never by position: a change in parameter order must not pair the
wrong tensors); the Ignite handlers in :mod:`muscle_ext.handlers.memorization` add them to the loss before
backward. Sources: L2-SP (Li, Grandvalet, Davoine, ICML 2018), EWC (Kirkpatrick et al., PNAS 2017) in its online
form (Schwarz et al., ICML 2018), feature distillation as in LwF (Li & Hoiem, 2016) / DELTA (Li et al., ICLR 2019).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["diagonal_fisher", "ewc_penalty", "feature_distillation", "l2sp_penalty", "named_trainable",
           "snapshot"]


def named_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the parameters that train (``requires_grad``); buffers (batch-norm statistics) are
    not parameters and are never pulled."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def snapshot(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of ``params``: an anchor."""
    return {name: p.detach().clone().as_subclass(torch.Tensor) for name, p in params.items()}


def _matched(params: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str) -> None:
    if params.keys() != reference.keys():
        missing = sorted(set(reference) - set(params))[:3]
        extra = sorted(set(params) - set(reference))[:3]
        raise ValueError(f"{what} does not match the parameters by name (missing {missing}, unexpected {extra}): "
                         "was it taken from another network?")


def l2sp_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``1/2 * sum ||w - w_anchor||^2`` over every named parameter (L2-SP): a scalar, 0 at the anchor.

    Raises:
        ValueError: the names of ``params`` and ``anchor`` differ.
    """
    _matched(params, anchor, "the anchor")
    terms = [((p - anchor[name]) ** 2).sum() for name, p in params.items()]
    return 0.5 * torch.stack(terms).sum() if terms else torch.zeros(())


def ewc_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``1/2 * sum F * (w - w_anchor)^2`` with the diagonal Fisher ``F`` (EWC): a scalar, 0 at the anchor.

    Raises:
        ValueError: the names of ``params``, ``anchor`` and ``fisher`` differ.
    """
    _matched(params, anchor, "the anchor")
    _matched(params, fisher, "the Fisher information")
    terms = [(fisher[name] * (p - anchor[name]) ** 2).sum() for name, p in params.items()]
    return 0.5 * torch.stack(terms).sum() if terms else torch.zeros(())


def diagonal_fisher(params: Mapping[str, nn.Parameter], loss_of_batch: Callable[[object], torch.Tensor],
                    batches: Iterable) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher information: the mean over ``batches`` of each parameter's squared gradient of
    the task loss (as Avalanche's ``EWCPlugin`` computes it). Non-negative, shaped like each parameter.

    Args:
        params: the parameters, by name.
        loss_of_batch: ``batch -> scalar loss`` (the task's forward and loss, in training mode or not as the
            caller decides).
        batches: a few batches of the task's own data.

    Raises:
        ValueError: ``batches`` is empty.
    """
    fisher = {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name, p in params.items()}
    count = 0
    for batch in batches:
        grads = torch.autograd.grad(loss_of_batch(batch), list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:  # a plain tensor: MONAI's MetaTensor inputs make MetaTensor gradients
                fisher[name] += grad.detach().as_subclass(torch.Tensor) ** 2
        count += 1
    if count == 0:
        raise ValueError("no batches to estimate the Fisher information from")
    return {name: f / count for name, f in fisher.items()}


def feature_distillation(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the backbone's features ``(N, C, H, W)`` and a frozen earlier backbone's on
    the same inputs: 0 when the features have not moved.

    Raises:
        ValueError: the shapes differ.
    """
    if features.shape != reference.shape:
        raise ValueError(f"features {tuple(features.shape)} and reference {tuple(reference.shape)} differ in shape")
    return ((features.float() - reference.float()) ** 2).mean()
