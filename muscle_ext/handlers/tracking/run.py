"""One MLflow run as an explicit object: the handlers of one bundle run share it by reference.

A bundle config declares the run once and hands it to every :class:`~muscle_ext.handlers.TrackingHandler` that logs
into it (the trainer's and the validators')::

    mlflow_run:
      _target_: muscle_ext.handlers.TrackingRun
      experiment_name: '@experiment_name'
    train#handlers: [..., {_target_: muscle_ext.handlers.TrackingHandler, run: '@mlflow_run'}]

Nothing is global: the run is opened by the first handler that starts, ended by the handler that owns its end
(or by the ``with`` block of a script), and a run nobody ended (a crash outside the engine) is ended ``FAILED``
when the object is collected or the interpreter exits (:class:`weakref.finalize`, owned by this object).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from .store import create_run, release_client, resolve_tracking_uri
from .writer import ResilientMlflowWriter

__all__ = ["PARENT_RUN_ENV", "STAGE_ENV", "TrackingRun", "global_rank"]

logger = logging.getLogger(__name__)

PARENT_RUN_ENV = "MUSCLE_PARENT_RUN_ID"
"""A run id in this environment variable nests every run that names no ``parent_run_id`` under that run: the main
job (``muscle reproduce``) sets it, so each stage's runs are children of the job's run."""
STAGE_ENV = "MUSCLE_STAGE"
"""The main job's stage name: a run started with it set is tagged ``muscle.stage`` (the report finds its curves)."""
_MAX_HISTORY_POINTS = 20_000


def global_rank() -> int:
    """This process's rank (0 without ``torch.distributed``; torchrun's ``RANK`` before the process group exists)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _end(writer: ResilientMlflowWriter, tmpdir: str, status: str | list[str]) -> dict[str, int]:
    try:
        return writer.close(status if isinstance(status, str) else status[0])
    finally:
        try:
            release_client(writer.client)
        except Exception:  # the connections close with the process anyway
            pass
        shutil.rmtree(tmpdir, ignore_errors=True)


class TrackingRun:
    """An MLflow run, opened lazily and fed through a :class:`~.writer.ResilientMlflowWriter` (an unreachable store
    costs a warning, never the training run). On ranks other than 0 it is disabled and every call is a no-op.

    Args:
        tracking_uri: MLflow store; ``MLFLOW_TRACKING_URI`` overrides it (:func:`~.store.resolve_tracking_uri`,
            resolved when the run starts).
        experiment_name: MLflow experiment (created if missing).
        run_name: default: the name given to :meth:`start` (``<bundle or workflow>_<YYYYmmdd_HHMMSS>``).
        parent_run_id: nest the run under this one; default ``MUSCLE_PARENT_RUN_ID`` (:data:`PARENT_RUN_ENV`).
        retry_interval: seconds between attempts to reach an unavailable store (doubling, up to 10 minutes).
        http_timeout_s, http_max_retries: per-request limits for a remote server (no HTTP retries by default: the
            writer buffers and retries on its own schedule).

    ``history`` holds every logged metric as ``{name: [(step, value), ...]}`` (for the summary plot).
    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "muscle", run_name: str | None = None,
                 parent_run_id: str | None = None, retry_interval: float = 30.0, http_timeout_s: int = 5,
                 http_max_retries: int = 0) -> None:
        self.enabled = global_rank() == 0
        self.requested_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
        self.retry_interval = retry_interval
        self.http = {"http_timeout_s": http_timeout_s, "http_max_retries": http_max_retries}
        self.tracking_uri = ""
        self.writer: ResilientMlflowWriter | None = None
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._exit_status = ["FAILED"]  # read by the finalizer: a list, so that it sees `completed` change
        self.last_summary: dict[str, int] | None = None  # what was not logged, once the run ended
        self._tmpdir: str | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def completed(self) -> bool:
        """Set by the owner once its engine completed: an unended run then ends ``FINISHED``, else ``FAILED``."""
        return self._exit_status[0] == "FINISHED"

    @completed.setter
    def completed(self, value: bool) -> None:
        self._exit_status[0] = "FINISHED" if value else "FAILED"

    @property
    def active(self) -> bool:
        """True between :meth:`start` and :meth:`end`."""
        return self.writer is not None and not self.writer.closed

    @property
    def run_id(self) -> str | None:
        """The id of the run (kept after it ended); ``None`` before it started or while the store is unreachable."""
        return self.writer.run_id if self.writer is not None else None

    def start(self, default_name: str) -> bool:
        """Open the run (a no-op while it is open); returns True when this call opened it."""
        if not self.enabled or self.active:
            return False
        import mlflow

        self.tracking_uri = resolve_tracking_uri(self.requested_uri)
        name = self.run_name or default_name
        uri, experiment, parent = self.tracking_uri, self.experiment_name, self.parent_run_id
        self.writer = ResilientMlflowWriter(
            client_factory=lambda: mlflow.MlflowClient(tracking_uri=uri),
            open_run=lambda client: create_run(client, experiment, name, parent),
            retry_interval=self.retry_interval, name=f"TrackingRun[{name}]", **self.http,
        )
        self.history, self.completed, self.last_summary = {}, False, None
        self._tmpdir = tempfile.mkdtemp(prefix="muscle-tracking-")
        self._finalizer = weakref.finalize(self, _end, self.writer, self._tmpdir, self._exit_status)
        self.writer.flush()  # create the run now: its id goes into the checkpoints written from here on
        if os.environ.get(STAGE_ENV):
            self.writer.set_tags({"muscle.stage": os.environ[STAGE_ENV]})
        return True

    def end(self, status: str | None = None) -> dict[str, int]:
        """Send what is left, end the run with ``status`` (default ``FINISHED`` if :attr:`completed`, else ``FAILED``)
        and return the counts of what could not be logged (also in :attr:`last_summary`)."""
        if not self.active:
            return self.last_summary or {}
        self._finalizer.detach()
        status = status or ("FINISHED" if self.completed else "FAILED")
        self.last_summary = _end(self.writer, self._tmpdir, status)
        return self.last_summary

    def __enter__(self) -> TrackingRun:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    # ------------------------------------------------------------------ logging
    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            self.writer.log_params(params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            self.writer.set_tags(tags)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` and keep them in :attr:`history` (its resolution halves beyond 20,000
        points a metric, for the plot only)."""
        if not self.active or not values:
            return
        for key, value in values.items():
            points = self.history.setdefault(key, [])
            points.append((int(step), float(value)))
            if len(points) > _MAX_HISTORY_POINTS:
                points[:] = points[::2]
        self.writer.log_metrics(values, step=step)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            self.writer.log_artifact(str(local_path), artifact_path)

    def log_json(self, obj: Any, filename: str, artifact_path: str) -> None:
        """Upload ``obj`` as ``<artifact_path>/<filename>`` (written to a private temporary folder first)."""
        if self.active:
            self.log_artifact(self.write_file(filename, artifact_path, json.dumps(obj, indent=2, default=str)),
                              artifact_path)

    def write_file(self, filename: str, artifact_path: str, text: str | None = None) -> Path:
        """A path in the run's temporary folder for an artifact about to be uploaded (``text`` is written to it)."""
        path = Path(self._tmpdir) / artifact_path / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is not None:
            path.write_text(text)
        return path

    def flush(self) -> None:
        if self.active:
            self.writer.flush()

    def count_dropped(self, kind: str, n: int = 1) -> None:
        """Count items that never reached the writer (a missing artifact) in the end summary."""
        if self.active:
            self.writer.dropped[kind] += n
