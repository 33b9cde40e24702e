"""Where the MLflow store is, and the three store operations a run needs: create it, find its artifacts, release it.

The default store is MLflow's own, ``sqlite:///mlflow.db`` in the working folder with artifacts in ``mlruns/`` beside
it: every bundle run from one folder shares one store, so a backbone's lineage is followed in one ``mlflow ui``.
``MLFLOW_TRACKING_URI`` wins, as in MONAI, so one export points every bundle at a shared server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from monai.utils import path_to_sqlite_uri, path_to_uri

__all__ = ["artifact_location", "create_run", "release_client", "resolve_tracking_uri"]

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def resolve_tracking_uri(uri: str | None = None, workdir: str | os.PathLike | None = None) -> str:
    """The MLflow store to use: ``MLFLOW_TRACKING_URI``, else ``uri``, else ``sqlite:///<workdir>/mlflow.db``.

    ``workdir`` defaults to the current directory. A path to a ``.db``/``.sqlite`` file becomes a SQLite URI and
    its folder is created (SQLite creates the file, not its folder).

    Raises:
        ValueError: a plain folder or a ``file:`` URI (MLflow 3.13+ refuses the file store).
    """
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if not chosen:
        db = Path(workdir if workdir is not None else os.getcwd()).absolute() / "mlflow.db"
    elif "://" not in str(chosen) and str(chosen).lower().endswith(_SQLITE_SUFFIXES):
        db = Path(chosen).absolute()
    elif str(chosen).startswith("file:") or "://" not in str(chosen):
        raise ValueError(
            f"unsupported MLflow tracking URI {chosen!r}: MLflow 3.13+ refuses the file store; use "
            "sqlite:///<path>/mlflow.db or http(s)://<server>."
        )
    else:
        return str(chosen)
    db.parent.mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(db)


def artifact_location(tracking_uri: str) -> str | None:
    """Artifact root of a new experiment: ``<db folder>/mlruns`` for a local SQLite store (as MONAI and MLflow's
    default do), ``None`` (the server decides) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return path_to_uri(Path(unquote(tracking_uri[len("sqlite:///"):])).parent / "mlruns")


def create_run(client: Any, experiment_name: str, run_name: str, parent_run_id: str | None = None) -> str:
    """Create a run in ``experiment_name`` (created if missing) through ``client`` (an ``MlflowClient``); returns its
    id. ``parent_run_id`` nests it (MLflow's ``mlflow.parentRunId`` tag).

    Raises:
        MlflowException: the experiment is deleted, or the store refused the request.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        try:
            client.create_experiment(experiment_name, artifact_location=artifact_location(client.tracking_uri))
        except MlflowException as exc:  # another process created it in between
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
        experiment = client.get_experiment_by_name(experiment_name)
    if experiment.lifecycle_stage != "active":
        raise MlflowException(f"experiment '{experiment_name}' is deleted", error_code=BAD_REQUEST)
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    return client.create_run(experiment.experiment_id, run_name=run_name, tags=tags).info.run_id


def release_client(client: Any) -> None:
    """Close the SQLite connections an ``MlflowClient`` holds (a no-op for a server). MLflow has no public close:
    the SQLAlchemy engine is reached defensively, as MONAI's ``MLFlowHandler`` does, and anything unexpected is
    left alone (the connections then close with the process)."""
    if not str(getattr(client, "tracking_uri", "")).startswith("sqlite:"):
        return
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    engine = getattr(store, "engine", None)
    if engine is not None and callable(getattr(engine, "dispose", None)):
        engine.dispose()
