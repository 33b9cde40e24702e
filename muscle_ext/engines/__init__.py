"""Training engines: the MoCo trainer and per-iteration learning-rate schedules."""

from .inferers import AutocastInferer
from .moco_trainer import ACC_TOP1, MoCoTrainer, PrepareTwoViews, unwrap_moco
from .precision import bf16_is_fast
from .schedules import cosine_with_warmup, cosine_with_warmup_factor

__all__ = [
    "AutocastInferer",
    "ACC_TOP1",
    "MoCoTrainer",
    "PrepareTwoViews",
    "bf16_is_fast",
    "cosine_with_warmup",
    "cosine_with_warmup_factor",
    "unwrap_moco",
]
