"""Model outputs (tensors on any device, in any precision, or array-likes) as NumPy arrays or CPU tensors: the one
conversion of the metrics, reports and prediction tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import DTypeLike

__all__ = ["cpu_tensors", "to_numpy"]


def to_numpy(x: Any, dtype: DTypeLike = None) -> np.ndarray:
    """``x`` as an array of ``dtype`` (its own when ``None``); tensors are detached and copied to the CPU first,
    half-precision ones as float32 (NumPy has no bfloat16)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    return np.asarray(x, dtype=dtype)


def cpu_tensors(d: Mapping[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{key: d[key]}`` for ``keys`` as plain (no meta data) detached CPU tensors: what a metric keeps of an output
    for the epoch."""
    return {k: torch.as_tensor(d[k]).detach().cpu().as_subclass(torch.Tensor) for k in keys}
