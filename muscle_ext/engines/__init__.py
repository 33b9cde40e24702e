"""Training engines: the MoCo trainer and the multi-task continual trainer on a shared base, mixed precision on any
device, learning-rate schedules."""

from .continual import MultiTaskTrainer, SupervisedTask, TaskEvents, TaskSchedule, task_loss
from .inferers import AutocastInferer
from .moco_trainer import ACC_TOP1, MoCoTrainer, PrepareTwoViews, unwrap_moco
from .precision import autocast_on, bf16_is_fast, needs_grad_scaler
from .schedules import cosine_with_warmup, cosine_with_warmup_factor
from .task_specs import (
    TaskSet,
    TaskSpec,
    TaskValidation,
    evaluate_tasks,
    load_task_networks,
    parse_task_specs,
    spec_table,
)
from .trainer import StepTrainer

__all__ = [
    "AutocastInferer",
    "ACC_TOP1",
    "MoCoTrainer",
    "MultiTaskTrainer",
    "PrepareTwoViews",
    "StepTrainer",
    "SupervisedTask",
    "TaskEvents",
    "TaskSchedule",
    "TaskSet",
    "TaskSpec",
    "TaskValidation",
    "autocast_on",
    "bf16_is_fast",
    "cosine_with_warmup",
    "cosine_with_warmup_factor",
    "needs_grad_scaler",
    "evaluate_tasks",
    "load_task_networks",
    "parse_task_specs",
    "spec_table",
    "task_loss",
    "unwrap_moco",
]
