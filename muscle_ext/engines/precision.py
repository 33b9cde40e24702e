"""Choosing the training precision for the machine at hand."""

from __future__ import annotations

import torch

__all__ = ["bf16_is_fast"]


def bf16_is_fast(device: torch.device | str) -> bool:
    """True where bf16 autocast speeds training up: CUDA GPUs with bf16 support, and CPUs whose oneDNN has native
    bf16 kernels (AVX512-BF16/AMX). Elsewhere bf16 on CPU is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False
