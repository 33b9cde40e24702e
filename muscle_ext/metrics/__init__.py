"""The paper's metrics with bootstrap confidence intervals; figures in ``muscle_ext.metrics.plots`` (matplotlib,
imported on use); the validation mAP of detection runs as an Ignite metric (``DetectionCOCOMetric``)."""

from muscle_ext.metrics.bootstrap import (
    BootstrapCI,
    bootstrap_ci,
    bootstrap_indices,
    bootstrap_mean_ci,
    ci_dict,
    paired_difference_ci,
)
from muscle_ext.metrics.classification import (
    accuracy,
    average_ranks,
    binary_classification_report,
    confusion_matrix,
    mae,
    regression_report,
    rmse,
    roc_auc,
    roc_curve,
    sensitivity,
    specificity,
    to_positive_prob,
)
from muscle_ext.metrics.detection import COCO_IOU_RANGE, detection_report
from muscle_ext.metrics.detection_metric import DetectionCOCOMetric
from muscle_ext.metrics.segmentation import per_image_means, pooled_scores, segmentation_report, segmentation_scores

from .comparison import mean_over_runs, paired_difference, runs_mean_ci
from .embedding import (
    collapse_score,
    embedding_map_2d,
    extract_embeddings,
    frozen_backbone_report,
    knn_scores,
    linear_probe_scores,
)
from .report import json_safe, read_case_scores, write_case_scores, write_report

__all__ = [
    "COCO_IOU_RANGE",
    "BootstrapCI",
    "DetectionCOCOMetric",
    "accuracy",
    "average_ranks",
    "binary_classification_report",
    "bootstrap_ci",
    "bootstrap_indices",
    "bootstrap_mean_ci",
    "ci_dict",
    "mean_over_runs",
    "paired_difference",
    "paired_difference_ci",
    "runs_mean_ci",
    "confusion_matrix",
    "detection_report",
    "mae",
    "pooled_scores",
    "regression_report",
    "rmse",
    "roc_auc",
    "roc_curve",
    "per_image_means",
    "segmentation_report",
    "segmentation_scores",
    "sensitivity",
    "specificity",
    "to_positive_prob",
    "collapse_score",
    "extract_embeddings",
    "frozen_backbone_report",
    "embedding_map_2d",
    "knn_scores",
    "linear_probe_scores",
    "json_safe",
    "read_case_scores",
    "write_case_scores",
    "write_report",
]
