"""Training engines: the MoCo trainer on a shared base, mixed precision on any device, learning-rate schedules."""

from .inferers import AutocastInferer
from .moco_trainer import ACC_TOP1, MoCoTrainer, PrepareTwoViews, unwrap_moco
from .precision import autocast_on, bf16_is_fast, needs_grad_scaler
from .schedules import cosine_with_warmup, cosine_with_warmup_factor
from .trainer import StepTrainer

__all__ = [
    "AutocastInferer",
    "ACC_TOP1",
    "MoCoTrainer",
    "PrepareTwoViews",
    "StepTrainer",
    "autocast_on",
    "bf16_is_fast",
    "cosine_with_warmup",
    "cosine_with_warmup_factor",
    "needs_grad_scaler",
    "unwrap_moco",
]
