"""Learning-rate schedules, stepped once per iteration (``LrScheduleHandler(..., epoch_level=False)``)."""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["cosine_with_warmup", "cosine_with_warmup_factor"]


def cosine_with_warmup_factor(step: int, warmup_iters: int, total_iters: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate after ``step`` scheduler steps.

    Linear warm-up from ``1 / (warmup_iters + 1)`` to 1 over ``warmup_iters`` steps (never 0, so the first
    iteration trains), then half-cosine decay to ``min_lr_ratio`` at ``total_iters``; constant afterwards.
    """
    if step < warmup_iters:
        return (step + 1) / (warmup_iters + 1)
    decay_iters = max(1, total_iters - warmup_iters)
    progress = min(1.0, (step - warmup_iters) / decay_iters)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(
    optimizer: Optimizer, warmup_iters: int, total_iters: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """``LambdaLR`` with linear warm-up and cosine decay (see :func:`cosine_with_warmup_factor`)."""
    if warmup_iters < 0 or total_iters < 1 or warmup_iters > total_iters:
        raise ValueError(f"need 0 <= warmup_iters <= total_iters, total_iters >= 1; got {warmup_iters}, {total_iters}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    # A partial keeps its arguments out of ``__dict__``, the part of a callable that ``LambdaLR.state_dict`` saves:
    # a resumed run follows the schedule of its *current* config (a run extended to more epochs keeps training
    # instead of restoring the old total and sitting at the final learning rate). Picklable, unlike a lambda.
    return LambdaLR(optimizer, functools.partial(cosine_with_warmup_factor, warmup_iters=warmup_iters,
                                                 total_iters=total_iters, min_lr_ratio=min_lr_ratio))
