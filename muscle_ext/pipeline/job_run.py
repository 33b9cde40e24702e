"""The main job's own MLflow run: the parent of every stage's runs, and the place of the report.

``muscle reproduce`` opens it in the job's store before the first stage and passes its id to the bundles as
``MUSCLE_PARENT_RUN_ID`` (:data:`muscle_ext.handlers.PARENT_RUN_ENV`), so each stage's training and evaluation runs
are its children in one experiment: the comparison is one row in the MLflow UI, opened into its stages. A resumed or
repeated job reopens the same run (its id is kept in ``<out>/job_run.json``). At the end the run gets each stage's
status and wall time, and ``report.md`` with ``report.html``. Tracking never stops the job: an unreachable store
costs a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["JobRun"]

logger = logging.getLogger(__name__)


class JobRun:
    """Open (or reopen) the job's parent run; :meth:`finish` logs the outcome.

    Args:
        out: the job's folder (``job_run.json`` keeps the run id there).
        tracking_uri: the MLflow store (the stages use the same one).
        experiment_name: the experiment of the job and of all its stages.
        run_name: e.g. ``reproduce_quick``.
    """

    def __init__(self, out: str | os.PathLike, tracking_uri: str, experiment_name: str, run_name: str) -> None:
        self.record = Path(out) / "job_run.json"
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.run_id: str | None = None

    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def open(self) -> str | None:
        """The parent run's id (reopened when the folder has one), or ``None`` when the store cannot be reached."""
        try:
            client = self._client()
            previous = json.loads(self.record.read_text()).get("run_id") if self.record.is_file() else None
            if previous:
                try:
                    client.update_run(previous, status="RUNNING")
                    self.run_id = previous
                    return previous
                except Exception:  # deleted, or another store: open a new one
                    logger.warning("the job's previous MLflow run %s is gone: opening a new one", previous)
            experiment = client.get_experiment_by_name(self.experiment_name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment_name)
            self.run_id = client.create_run(experiment_id, run_name=self.run_name,
                                            tags={"muscle.workflow": "reproduce"}).info.run_id
            self.record.parent.mkdir(parents=True, exist_ok=True)
            self.record.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}) + "\n")
        except Exception as exc:  # tracking never stops the job
            logger.warning("MLflow store %s unavailable (%s): the stages run without a parent run", self.tracking_uri,
                           exc)
            self.run_id = None
        return self.run_id

    def finish(self, states: Mapping[str, Mapping[str, Any]], report: str | os.PathLike | None,
               status: str = "FINISHED") -> None:
        """Log each stage's status (tag ``stage.<name>``) and wall time (metric ``<name>_wall_s``), the report as an
        artifact, and end the run with ``status`` (``FINISHED`` or ``FAILED``)."""
        if self.run_id is None:
            return
        try:
            client = self._client()
            for name, state in states.items():
                client.set_tag(self.run_id, f"stage.{name}", state.get("status", "not started"))
                if "wall_s" in state:
                    client.log_metric(self.run_id, f"{name}_wall_s", float(state["wall_s"]))
            if report is not None and Path(report).is_file():
                client.log_artifact(self.run_id, str(report))
                page = Path(report).with_suffix(".html")  # the same report as a page (figures stay in the folder)
                if page.is_file():
                    client.log_artifact(self.run_id, str(page))
            client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            logger.warning("could not log the job's outcome to MLflow (%s)", exc)
