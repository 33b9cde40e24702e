"""Data-parallel training of a multi-task network whose tasks share one backbone.

``DistributedDataParallel`` synchronises the gradients of the parameters used by *its* ``forward``; the continual
trainer calls one task model at a time (each a head on the shared backbone), so no single module's forward covers a
step. :class:`ReplicaSync` does DDP's two jobs around any forward instead, with Ignite's distributed helpers:

- after each step, the module's buffers (batch-norm running statistics) are broadcast from rank 0 (DDP does it
  before each forward with ``broadcast_buffers=True``; after the step, a validation between steps and the saved model
  see rank 0's statistics too, and the next step starts from them: one broadcast per step serves all three);
- after backward (``IterationEvents.BACKWARD_COMPLETED``, before the optimiser step), every parameter's gradient is
  averaged over the processes. Every rank trains the same task at the same step (the schedule is seeded alike), so
  the same parameters have gradients everywhere; a loss term added before backward (cross-task memorization) is
  part of the averaged gradient.

At the start the parameters and buffers are broadcast from rank 0 (as DDP's constructor does), and at the end
(``verify=True``) every rank's parameters and buffers are compared with rank 0's: a replica that drifted raises
instead of saving a model that only one rank had. Without an initialised process group the handler does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

__all__ = ["ReplicaSync", "handlers_for_rank"]

logger = logging.getLogger(__name__)


class ReplicaSync:
    """Keep the replicas of ``module`` identical across processes (see the module docstring).

    Args:
        module: the network every rank trains (e.g. the ``nn.ModuleDict`` of task models on one backbone).
        verify: compare every rank's parameters with rank 0's when training completes.
        atol: the largest parameter difference ``verify`` accepts (float summation order may differ by rank).

    Raises:
        RuntimeError: at completion, when ``verify`` finds a parameter that differs from rank 0's by more than
            ``atol``.
    """

    def __init__(self, module: nn.Module, verify: bool = True, atol: float = 1e-5) -> None:
        self.module = module
        self.verify = verify
        self.atol = atol

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (a trainer that fires ``IterationEvents.BACKWARD_COMPLETED``); nothing happens
        without an initialised process group of two or more processes."""
        if idist.get_world_size() < 2:
            return
        engine.add_event_handler(Events.STARTED, self._broadcast, True)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._broadcast, False)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._average_gradients)
        if self.verify:
            engine.add_event_handler(Events.COMPLETED, self.check_in_sync)

    def _broadcast(self, engine: Engine, parameters: bool) -> None:
        tensors = list(self.module.buffers()) + (list(self.module.parameters()) if parameters else [])
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        with torch.no_grad():
            for group in by_dtype.values():  # one collective per dtype, not one per tensor
                _copy_flat(idist.broadcast(torch.cat([t.detach().reshape(-1) for t in group]), src=0), group)

    def _average_gradients(self, engine: Engine) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per step, not one per tensor
        _copy_flat(idist.all_reduce(flat) / idist.get_world_size(), grads)

    def check_in_sync(self, engine: Engine | None = None) -> float:
        """The largest difference of any parameter or buffer from rank 0's (the same on every rank); raises above
        ``atol``."""
        with torch.no_grad():
            tensors = [*self.module.parameters(), *(b for b in self.module.buffers() if b.is_floating_point())]
            flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
            reference = idist.broadcast(flat.clone(), src=0)
            worst = idist.all_reduce((flat - reference).abs().max(), op="MAX")
        worst = float(worst)
        if worst > self.atol:
            raise RuntimeError(f"replicas drifted apart: rank {idist.get_rank()} parameters differ from rank 0's by up "
                               f"to {worst:.3g}")
        logger.info(f"replicas in sync on {idist.get_world_size()} processes (largest parameter difference "
                    f"{worst:.3g})")
        return worst


def _copy_flat(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy the consecutive slices of ``flat`` back into ``tensors`` (the inverse of ``cat`` of their views)."""
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def handlers_for_rank(handlers: Sequence[Any], rank: int) -> list[Any]:
    """The handlers a data-parallel process attaches: all of them on rank 0; on the others, those that take part in
    training or validation (schedules, validation runs, loss terms), without the ones that only log or write, which
    rank 0 does for all: MONAI's and Ignite's loggers (``StatsHandler``, ``MLFlowHandler``, ``ProgressBar``) and any
    handler whose class says ``rank_zero_only = True`` (MLflow tracking, backbone export). ``None`` entries
    (disabled handlers) are dropped."""
    from ignite.handlers import ProgressBar
    from monai.handlers import MLFlowHandler, StatsHandler

    reporters = (StatsHandler, ProgressBar, MLFlowHandler)
    return [h for h in handlers if h is not None and (
        rank == 0 or not (isinstance(h, reporters) or getattr(h, "rank_zero_only", False)))]
