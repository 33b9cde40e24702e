"""Mixed precision on whatever device an engine runs on, and choosing the precision for the machine at hand.

MONAI's engines autocast on ``"cuda"`` only and create a float16 ``GradScaler`` for any ``amp`` run. Our engines
autocast on their own device type instead (bf16 on CPUs with native bf16 kernels, fp16 or bf16 on GPUs) and use a
scaler only where it is needed: float16 on CUDA.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_on", "bf16_is_fast", "needs_grad_scaler"]


def bf16_is_fast(device: torch.device | str) -> bool:
    """True where bf16 autocast speeds training up: CUDA GPUs with bf16 support, and CPUs with AMX tiles.

    CPUs with AVX512-BF16 but no AMX run bf16 convolutions *slower* than fp32 (on our 2-core Xeon a MoCo step ran at
    0.78-0.90x of fp32: benchmarks/results/moco_step.md), and elsewhere bf16 is emulated.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_amx_tile_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast_on(device: torch.device | str | None, enabled: bool = True,
                **autocast_kwargs) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s own type (CPU when ``None``); a null context when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type if device is not None else "cpu", **autocast_kwargs)


def needs_grad_scaler(device: torch.device | str | None, enabled: bool, dtype: torch.dtype | None = None) -> bool:
    """A ``GradScaler`` is needed only for float16 autocast on CUDA (bf16 has fp32's exponent range)."""
    if not enabled or device is None or torch.device(device).type != "cuda":
        return False
    return (dtype or torch.float16) == torch.float16
