"""Training engines: the MoCo trainer, the multi-task continual trainer and the detection trainer and evaluator on a
shared base, mixed precision on any device, learning-rate schedules, adaptation to a new site (`adaptation`)."""

from .adaptation import (
    ADAPTATION_METHODS,
    AdaptationConfig,
    AdaptationResult,
    Recalibration,
    adapt_model,
    check_adaptation_paths,
    datalist_name,
    decode_batches,
    draw_shots,
    evaluate_adapted,
    fit_operating_point,
    load_images,
    predict_probabilities,
    replace_backbone,
    save_adapted_model,
    split_shots,
)
from .adaptation_curves import (
    LabelledImages,
    adaptation_curves,
    best_methods,
    check_curve_settings,
    write_adaptation_curves,
)
from .continual import (
    JOINT,
    DetectionTask,
    JointSchedule,
    MultiTaskTrainer,
    SupervisedTask,
    TaskSchedule,
    task_loss,
    task_schedule,
)
from .detection import DetectionEvaluator, DetectionLoss, DetectionPrepareBatch, DetectionTrainer, unwrap_detector
from .events import TaskEvents
from .inferers import AutocastInferer
from .knn import KNNClassifier, check_knn_task
from .moco_trainer import ACC_TOP1, MoCoTrainer, PrepareTwoViews, unwrap_moco
from .precision import autocast_on, bf16_is_fast, needs_grad_scaler
from .schedules import cosine_with_warmup, cosine_with_warmup_factor
from .task_set import TaskSet, TaskValidation, checkpoint_tasks, evaluate_tasks, load_task_heads, load_task_networks
from .task_specs import TaskSpec, parse_task_specs, spec_table
from .trainer import StepTrainer

__all__ = [
    "ADAPTATION_METHODS",
    "AdaptationConfig",
    "AdaptationResult",
    "Recalibration",
    "adapt_model",
    "check_adaptation_paths",
    "datalist_name",
    "decode_batches",
    "draw_shots",
    "evaluate_adapted",
    "fit_operating_point",
    "load_images",
    "predict_probabilities",
    "replace_backbone",
    "save_adapted_model",
    "split_shots",
    "LabelledImages",
    "adaptation_curves",
    "best_methods",
    "check_curve_settings",
    "write_adaptation_curves",
    "AutocastInferer",
    "KNNClassifier",
    "check_knn_task",
    "ACC_TOP1",
    "DetectionEvaluator",
    "DetectionTask",
    "DetectionLoss",
    "DetectionPrepareBatch",
    "DetectionTrainer",
    "JOINT",
    "JointSchedule",
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
    "checkpoint_tasks",
    "evaluate_tasks",
    "load_task_heads",
    "load_task_networks",
    "parse_task_specs",
    "spec_table",
    "task_loss",
    "task_schedule",
    "unwrap_detector",
    "unwrap_moco",
]
