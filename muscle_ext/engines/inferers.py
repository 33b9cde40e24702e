"""Inferers that run the network under autocast on whatever device the inputs are on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from .precision import autocast_on

__all__ = ["AutocastInferer"]


class AutocastInferer(Inferer):
    """``SimpleInferer`` with mixed precision on the inputs' device type, CPU included.

    MONAI's trainers and evaluators autocast on ``"cuda"`` only (and create a float16 ``GradScaler``); bf16 needs no
    scaler, so running the forward pass here and leaving ``amp=False`` on the engine gives bf16 on CPUs with
    AVX512-BF16/AMX and on GPUs alike. Outputs are cast back to float32, so losses and metrics run in full precision.

    Args:
        enabled: autocast at all (``False``: a plain ``SimpleInferer``).
        dtype: autocast dtype, bfloat16 by default.
    """

    def __init__(self, enabled: bool = True, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.enabled = bool(enabled)
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with autocast_on(inputs.device, self.enabled, dtype=self.dtype):
            outputs = network(inputs, *args, **kwargs)
        if isinstance(outputs, torch.Tensor) and outputs.is_floating_point():
            return outputs.float()
        return outputs
