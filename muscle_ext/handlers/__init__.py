"""Ignite handlers with ``attach(engine)``: MLflow experiment tracking (privacy-filtered, outage-proof), lineage,
backbone export, the kNN health monitor, exact resume, test-set reports, inference outputs, and for continual
learning cross-task memorization and the per-round metric history."""

from muscle_ext.handlers.backbone_export import BackboneExporter
from muscle_ext.handlers.best_model import BestModelSaver, is_undefined, undefined_aware
from muscle_ext.handlers.checkpointing import (
    KeyMetricState,
    ResumableCheckpoint,
    ResumeDataPosition,
    RNGStates,
    RunFinished,
    checkpoint_file,
    latest_checkpoint,
    resume_checkpoint,
)
from muscle_ext.handlers.detection_report import DetectionReport
from muscle_ext.handlers.evaluation import ClassificationReport, EvaluationReport, RegressionReport, SegmentationReport
from muscle_ext.handlers.guardrails import Guardrails
from muscle_ext.handlers.knn_monitor import KNNMonitor
from muscle_ext.handlers.memorization import CrossTaskMemorization, EWCMemorization, FeatureDistillation
from muscle_ext.handlers.metric_history import MetricHistory
from muscle_ext.handlers.predictions import BoxColumns, MaskColumns, PredictionSaver, ProbabilityColumns, ValueColumns
from muscle_ext.handlers.privacy import (
    InputSummaryRedactor,
    PrivacyFilter,
    datalist_fingerprint,
    flatten_config,
    install_input_summary_redaction,
    short_hash,
)
from muscle_ext.handlers.replica_sync import ReplicaSync, handlers_for_rank
from muscle_ext.handlers.tracking import (
    PARENT_RUN_ENV,
    TRACKING_SETTINGS_PATH,
    ResilientMlflowWriter,
    TrackingHandler,
    TrackingRun,
    checkpoint_lineage,
    environment_versions,
    loss_from_output,
    resolve_tracking_uri,
    track_report,
    tracking_settings,
    write_tracking_settings,
)
from muscle_ext.handlers.visit_matrix import VisitMatrix

__all__ = [
    "BackboneExporter",
    "BestModelSaver",
    "BoxColumns",
    "Guardrails",
    "ClassificationReport",
    "DetectionReport",
    "CrossTaskMemorization",
    "EWCMemorization",
    "FeatureDistillation",
    "EvaluationReport",
    "KNNMonitor",
    "KeyMetricState",
    "MaskColumns",
    "MetricHistory",
    "PredictionSaver",
    "ProbabilityColumns",
    "RegressionReport",
    "ReplicaSync",
    "SegmentationReport",
    "ValueColumns",
    "VisitMatrix",
    "RNGStates",
    "ResumableCheckpoint",
    "ResumeDataPosition",
    "RunFinished",
    "checkpoint_file",
    "latest_checkpoint",
    "resume_checkpoint",
    "PARENT_RUN_ENV",
    "TRACKING_SETTINGS_PATH",
    "InputSummaryRedactor",
    "PrivacyFilter",
    "ResilientMlflowWriter",
    "TrackingHandler",
    "TrackingRun",
    "checkpoint_lineage",
    "datalist_fingerprint",
    "environment_versions",
    "flatten_config",
    "handlers_for_rank",
    "install_input_summary_redaction",
    "is_undefined",
    "loss_from_output",
    "resolve_tracking_uri",
    "track_report",
    "short_hash",
    "tracking_settings",
    "undefined_aware",
    "write_tracking_settings",
]
