"""MLflow experiment tracking for MUSCLE bundles: one run per bundle run, safe to leave on.

- :mod:`.store`: where the store is (``MLFLOW_TRACKING_URI``, else ``tracking_uri``, else ``mlflow.db`` in the
  working folder) and how a run is created in it.
- :mod:`.writer`: :class:`ResilientMlflowWriter`: a dead or vanishing server costs one warning and a few seconds,
  never the training run; the end of the run logs what could not be sent.
- :mod:`.describe`: pure functions: config + versions + datalist hashes + lineage -> params and tags, through the
  privacy rule of :mod:`muscle_ext.handlers.privacy`.
- :mod:`.run`: :class:`TrackingRun`, the explicit run object a bundle config declares once and shares.
- :mod:`.handler`: :class:`TrackingHandler`, the Ignite handler that logs an engine into a run.
- :mod:`.report`: :func:`track_report` for configs without an engine; :mod:`.settings`: ``--tracking`` support.

Lineage: a run started from a checkpoint (``parent_checkpoint``) gets the tags ``muscle.parent_checkpoint_sha256``
and, from the checkpoint's ``source`` dict, ``muscle.parent_run_id``, ``muscle.parent_bundle`` and
``muscle.parent_epoch``; ``engine.state.mlflow_run_id`` holds the open run's id (for the ``source`` dict of the
checkpoints the bundle writes). ``parent_run_id`` (or ``MUSCLE_PARENT_RUN_ID``, set by the main job) nests a run.
"""

from .describe import RunDescription, checkpoint_lineage, describe_run, environment_versions, loss_from_output
from .handler import TrackingHandler, engine_workflow, plot_history
from .report import track_report
from .run import PARENT_RUN_ENV, STAGE_ENV, TrackingRun, global_rank
from .settings import TRACKING_SETTINGS_PATH, tracking_settings, write_tracking_settings
from .store import resolve_tracking_uri
from .writer import ResilientMlflowWriter, http_limits

__all__ = [
    "PARENT_RUN_ENV",
    "STAGE_ENV",
    "TRACKING_SETTINGS_PATH",
    "ResilientMlflowWriter",
    "RunDescription",
    "TrackingHandler",
    "TrackingRun",
    "checkpoint_lineage",
    "describe_run",
    "engine_workflow",
    "environment_versions",
    "global_rank",
    "http_limits",
    "loss_from_output",
    "plot_history",
    "resolve_tracking_uri",
    "track_report",
    "tracking_settings",
    "write_tracking_settings",
]
