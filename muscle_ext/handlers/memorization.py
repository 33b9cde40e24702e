"""Cross-task memorization for multi-task continual learning: an explicit pull of the shared backbone towards the
weights it had when the current task visit began (L2-SP, Li et al., ICML 2018), as MUSCLE does against forgetting."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from torch import nn

from ..engines.continual import TaskEvents

__all__ = ["CrossTaskMemorization"]


class CrossTaskMemorization:
    """Add ``weight * (w - w_start)`` to the gradient of every backbone weight ``w`` after each backward pass: the
    gradient of ``weight / 2 * ||w - w_start||^2``, where ``w_start`` are the backbone's weights at the start of the
    current task visit (the state the earlier tasks left). Task heads are not pulled.

    Attach to a :class:`~muscle_ext.engines.MultiTaskTrainer` (it needs ``TaskEvents.TASK_STARTED``). With a
    ``GradScaler`` (float16 on CUDA) the pull is scaled like the gradients it joins. The pull is a gradient term, so
    an adaptive optimiser (AdamW) rescales it with the rest of the gradient: ``weight`` is the penalty's strength
    relative to the task loss, not a fixed step. Batch-norm running statistics are buffers and are not pulled.

    Args:
        backbone: the shared backbone, or a zero-argument callable returning it.
        weight: strength of the pull (0 disables it: plain sequential training).
    """

    def __init__(self, backbone: nn.Module | Callable[[], nn.Module], weight: float = 0.01) -> None:
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.backbone = backbone
        self.weight = float(weight)
        self.anchor: list[torch.Tensor] = []
        self.logger = logging.getLogger(__name__)

    def _parameters(self) -> list[nn.Parameter]:
        module = self.backbone() if callable(self.backbone) and not isinstance(self.backbone, nn.Module) \
            else self.backbone
        return [p for p in module.parameters() if p.requires_grad]

    def attach(self, engine: Engine) -> None:
        if self.weight == 0:
            return
        engine.add_event_handler(TaskEvents.TASK_STARTED, self.remember)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.pull)

    def remember(self, engine: Engine | None = None) -> None:
        """Take the current backbone weights as the anchor."""
        self.anchor = [p.detach().clone() for p in self._parameters()]

    def pull(self, engine: Engine) -> None:
        params = self._parameters()
        if len(params) != len(self.anchor):
            raise RuntimeError("no anchor for the backbone: remember() must run at the start of each task visit")
        scaler = getattr(engine, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0
        with torch.no_grad():
            for p, start in zip(params, self.anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - start, alpha=self.weight * scale)
