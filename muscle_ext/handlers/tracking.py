"""MLflow experiment tracking for MUSCLE bundles: one run per bundle run, safe to leave on.

:class:`TrackingHandler` is MONAI's :class:`~monai.handlers.MLFlowHandler` (its per-iteration and per-epoch
logging, ``attach`` and artifact walking are reused) with four changes:

- **what it logs**: the bundle's config (flattened, redacted, values cut to 500 characters) as params and as
  the artifact ``config/config.json``; versions of muscle_ext, MONAI, torch and friends; the seed; a SHA-256
  and item count per datalist (never the items); lineage tags of the checkpoint the run started from; and at
  the end ``summary/metrics.json``, ``summary/metrics.png`` and the files named in ``artifacts``.
- **privacy**: every config value passes :class:`~muscle_ext.handlers.privacy.PrivacyFilter` (the rule is in
  that module's docstring); datasets, batches and image meta data are never logged.
- **resilience**: all MLflow calls go through :class:`~muscle_ext.handlers.resilient_client.ResilientMlflowWriter`:
  a dead or vanishing server costs one warning and a few seconds, never the training run; the end of the run
  logs what could not be sent.
- **run ownership**: the handler that opens a run ends it. A handler attached to a validator joins the run
  its trainer opened in this process (instead of MONAI's search for any unfinished run on the server, which
  picks up other people's runs on a shared server).

Where the store is (:func:`resolve_tracking_uri`): ``MLFLOW_TRACKING_URI`` if set, else ``tracking_uri``, else
MLflow's own default ``sqlite:///mlflow.db`` in the current folder, with artifacts in ``mlruns/`` beside it: every
bundle run from one folder shares one store, so a backbone's lineage is followed in one ``mlflow ui``. The
environment variable wins, as in MONAI, so one export points every bundle at a shared server.

Lineage: a run started from a checkpoint (``parent_checkpoint``) gets the tags ``muscle.parent_checkpoint_sha256``
and, from the checkpoint's ``source`` dict, ``muscle.parent_run_id``, ``muscle.parent_bundle`` and
``muscle.parent_epoch``. ``parent_run_id`` (or the ``MUSCLE_PARENT_RUN_ID`` environment variable, which the main
job sets) nests the run under another one (MLflow's ``mlflow.parentRunId``).
While a run is open, :func:`current_run_id` returns its id (for the ``source`` dict of checkpoints the bundle
writes) and ``engine.state.mlflow_run_id`` holds it.

Config capture: with ``config=None`` the handler looks up the ``ConfigParser`` that is instantiating it (a
bundle run) and logs its content after CLI overrides; expressions are logged as their text, not evaluated.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from monai.utils import ensure_tuple, path_to_sqlite_uri, path_to_uri

from muscle_ext.flags import as_flag
from muscle_ext.handlers.privacy import PrivacyFilter, datalist_fingerprint, flatten_config, sanitize_key
from muscle_ext.handlers.resilient_client import ResilientMlflowWriter, set_short_http_retries

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

__all__ = [
    "PARENT_RUN_ENV",
    "TRACKING_SETTINGS_PATH",
    "TrackingHandler",
    "checkpoint_lineage",
    "current_run_id",
    "environment_versions",
    "loss_from_output",
    "resolve_tracking_uri",
    "track_report",
    "tracking_settings",
    "write_tracking_settings",
]

logger = logging.getLogger(__name__)

TRACKING_SETTINGS_PATH = Path(__file__).with_name("tracking_settings.json")
PARENT_RUN_ENV = "MUSCLE_PARENT_RUN_ID"
"""A run id in this environment variable nests every run that names no ``parent_run_id`` under that run: the main
job (``muscle reproduce``) sets it, so each stage's runs are children of the job's run."""
_SEED_KEYS = ("seed", "random_seed")
_MAX_PLOT_POINTS = 20_000
_PRIVACY_KEYS = PrivacyFilter()  # key rule only (no roots needed)
_META_TAGS = {"name": "muscle.bundle", "version": "muscle.bundle_version"}


# --------------------------------------------------------------------------- helpers
def resolve_tracking_uri(uri: str | None = None, workdir: str | os.PathLike | None = None) -> str:
    """The MLflow store to use: ``MLFLOW_TRACKING_URI``, else ``uri``, else ``sqlite:///<workdir>/mlflow.db``.

    The default is MLflow's own (``sqlite:///mlflow.db`` in the working folder, ``workdir`` defaulting to the
    current directory): every bundle run from one folder lands in one store, so the lineage pretrain -> continual
    -> downstream is one experiment view in ``mlflow ui`` started from that folder. A path to a
    ``.db``/``.sqlite`` file is turned into a SQLite URI.

    Raises:
        ValueError: a plain folder or a ``file:`` URI (MLflow 3.13+ refuses the file store).
    """
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or uri
    if not chosen:
        db = Path(workdir if workdir is not None else os.getcwd()).absolute() / "mlflow.db"
    elif "://" not in str(chosen) and str(chosen).lower().endswith((".db", ".sqlite", ".sqlite3")):
        db = Path(chosen).absolute()
    elif str(chosen).startswith("file:") or "://" not in str(chosen):
        raise ValueError(
            f"unsupported MLflow tracking URI {chosen!r}: MLflow 3.13+ refuses the file store; use "
            "sqlite:///<path>/mlflow.db or http(s)://<server>."
        )
    else:
        return str(chosen)
    db.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder
    return path_to_sqlite_uri(db)


def environment_versions() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced (logged as ``version.<name>`` params)."""
    import ignite
    import mlflow
    import monai
    import numpy

    import muscle_ext

    return {
        "muscle_ext": muscle_ext.__version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda or "none"),
        "ignite": ignite.__version__,
        "mlflow": mlflow.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def checkpoint_lineage(path: str | os.PathLike) -> dict[str, str]:
    """Lineage tags of a checkpoint: its SHA-256 and what its ``source`` dict says (run id, bundle, epoch)."""
    from muscle_ext.networks.backbone import file_sha256

    tags = {"muscle.parent_checkpoint_sha256": file_sha256(path)}
    try:
        try:  # mmap: read the small source dict without paging in every weight
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) checkpoints cannot be mmapped
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not loadable with weights_only: the hash still identifies it
        logger.warning(f"checkpoint_lineage: cannot read the checkpoint's source dict ({type(exc).__name__}); "
                       "only its SHA-256 is recorded.")
        payload = None
    source = payload.get("source") if isinstance(payload, Mapping) else None
    if isinstance(source, Mapping):
        for key, tag in (("mlflow_run_id", "muscle.parent_run_id"), ("bundle", "muscle.parent_bundle"),
                         ("epoch", "muscle.parent_epoch")):
            if source.get(key) is not None:
                tags[tag] = str(source[key])
    return tags


def loss_from_output(output: Any) -> float | None:
    """The scalar loss of an engine output: a dict with ``loss``, a decollated list of them, or a scalar."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get("loss")
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return float(output.detach().item())
    if isinstance(output, (int, float)) and not isinstance(output, bool):
        return float(output)
    return None


def _scalars(values: Mapping[str, Any], prefix: str = "", nested: bool = False) -> Iterator[tuple[str, float]]:
    """Scalar entries of a (nested) metrics dict; tensors, arrays, strings and meta data are skipped, and so are
    nested entries keyed by something path-like or sensitive (per-case results keyed by file name)."""
    for key, value in values.items():
        if nested and (PrivacyFilter.looks_like_path(str(key)) or _PRIVACY_KEYS.is_sensitive_key(str(key))):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _scalars(value, name + ".", nested=True)
        elif isinstance(value, (bool, int, float)):
            yield name, float(value)
        elif hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
            yield name, float(value.item())
        elif hasattr(value, "size") and hasattr(value, "item") and getattr(value, "size", 0) == 1:  # numpy
            yield name, float(value.item())


def _find_bundle_parser(max_depth: int = 200) -> ConfigParser | None:
    """The ``ConfigParser`` up the call stack (the bundle instantiating this handler), if any."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigParser):
                return owner
            if isinstance(owner, ConfigWorkflow):
                return owner.parser
            frame = frame.f_back
    finally:
        del frame  # frames reference their locals: do not keep the stack alive
    return None


def _never_raise(method: Callable) -> Callable:
    """Tracking must not stop training: an unexpected error in a handler event is logged (once) and swallowed."""

    @functools.wraps(method)
    def wrapper(self: TrackingHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            # type only: messages may quote config or data values
            msg = f"TrackingHandler.{method.__name__} failed ({type(exc).__name__}); training continues."
            if method.__name__ not in self._failed_events:
                self._failed_events.add(method.__name__)
                logger.warning(msg, exc_info=logger.isEnabledFor(logging.DEBUG))
            else:
                logger.debug(msg)
            return None

    return wrapper


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))  # torchrun sets it before the process group exists


# --------------------------------------------------------------------------- run sharing
@dataclass
class _Run:
    """One MLflow run opened in this process, shared by the handlers that log into it."""

    writer: ResilientMlflowWriter
    tmpdir: str
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    completed: bool = False
    closed: bool = False
    summary: dict[str, int] | None = None

    def close(self, status: str) -> dict[str, int]:
        if not self.closed:
            self.closed = True
            self.summary = self.writer.close(status)
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        return self.summary or {}


_OPEN_RUNS: dict[tuple[str, str], _Run] = {}  # (tracking uri, experiment) -> run opened in this process


def current_run_id(experiment_name: str | None = None) -> str | None:
    """Id of the MLflow run a :class:`TrackingHandler` has open in this process (the latest one), or None."""
    runs = [r for (_, exp), r in _OPEN_RUNS.items() if experiment_name in (None, exp) and not r.closed]
    return runs[-1].writer.run_id if runs else None


@atexit.register
def _close_open_runs() -> None:
    # a run whose engine never reached COMPLETED crashed (or was killed): say so instead of leaving it RUNNING
    for key, run in list(_OPEN_RUNS.items()):
        try:
            run.close("FINISHED" if run.completed else "FAILED")
        except Exception:
            pass
        _OPEN_RUNS.pop(key, None)


# --------------------------------------------------------------------------- the handler
class TrackingHandler(MLFlowHandler):
    """Track a bundle run in MLflow (see the module docstring); attach to a trainer, validator or evaluator.

    Args:
        output_dir: the run's output folder: a root whose paths may be logged.
        tracking_uri: MLflow store; ``MLFLOW_TRACKING_URI`` overrides it (see :func:`resolve_tracking_uri`).
        experiment_name: MLflow experiment.
        run_name: default ``<bundle name or workflow>_<YYYYmmdd_HHMMSS>``.
        config: what to log as the config: a dict, config file path(s), or ``None`` for the bundle config being
            run (found on the call stack; nothing is logged outside a bundle run).
        datalists: ``{name: datalist}`` to fingerprint (a path, a list, a decathlon dict or a dataset); default:
            the config items whose key contains ``datalist``.
        seed: logged as ``seed``; default: the config's ``seed``/``random_seed`` (``torch.initial_seed()`` is
            logged as ``torch_initial_seed`` either way).
        parent_checkpoint: checkpoint this run starts from, read for lineage tags.
        parent_run_id: nest this run under that MLflow run; default: the run named by ``MUSCLE_PARENT_RUN_ID``
            (:data:`PARENT_RUN_ENV`), if set.
        tags: more run tags (values pass the privacy filter).
        artifacts: files or directories logged when the engine completes (final model, backbone, plots ...).
        iteration_log, epoch_log, output_transform, global_epoch_transform, state_attributes, tag_name,
        optimizer_param_names: as in MONAI's ``MLFlowHandler``; ``output_transform`` defaults to
            :func:`loss_from_output`.
        metric_prefix: prepended to every metric name of this handler (e.g. ``"val/"``).
        close_on_complete: end the run when the engine completes (only the handler that opened it does).
            Use ``False`` for a validator, which runs (and completes) once per validation round.
        join_active_run: log into the run another ``TrackingHandler`` opened in this process for the same store
            and experiment (a validator joins its trainer's run) instead of opening a new one.
        allowed_roots: more directories whose paths may appear in logged config values.
        summary_artifacts: write ``summary/metrics.json`` and ``summary/metrics.png`` at completion.
        retry_interval: seconds between attempts to reach an unavailable store (doubling, up to 10 minutes).
        http_timeout_s, http_max_retries: per-request limits for a remote server, set through MLflow's
            ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` unless already set (no HTTP
            retries by default: the writer buffers and retries on its own schedule).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        tracking_uri: str | None = None,
        experiment_name: str = "muscle",
        run_name: str | None = None,
        config: Mapping[str, Any] | str | os.PathLike | Sequence[str] | None = None,
        datalists: Mapping[str, Any] | None = None,
        seed: int | None = None,
        parent_checkpoint: str | os.PathLike | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        artifacts: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        iteration_log: bool | Callable[[Engine, int], bool] = True,
        epoch_log: bool | Callable[[Engine, int], bool] = True,
        output_transform: Callable[[Any], Any] = loss_from_output,
        global_epoch_transform: Callable[[int], int] = lambda x: x,
        state_attributes: Sequence[str] | None = None,
        tag_name: str = "train_loss",
        optimizer_param_names: str | Sequence[str] = "lr",
        metric_prefix: str = "",
        close_on_complete: bool = True,
        join_active_run: bool = True,
        allowed_roots: Sequence[str | os.PathLike] = (),
        summary_artifacts: bool = True,
        retry_interval: float = 30.0,
        http_timeout_s: int = 5,
        http_max_retries: int = 0,
    ) -> None:
        # MLFlowHandler.__init__ is not called on purpose: it builds the MlflowClient right away (MLflow 3.14+
        # opens and migrates the store there), which raises for a broken store. The writer builds it lazily.
        self.iteration_log = iteration_log
        self.epoch_log = epoch_log
        self.epoch_logger = None
        self.iteration_logger = None
        self.dataset_logger = None
        self.dataset_dict = None
        self.experiment_param = None
        self.output_transform = output_transform
        self.global_epoch_transform = global_epoch_transform
        self.state_attributes = state_attributes
        self.tag_name = tag_name
        self.optimizer_param_names = ensure_tuple(optimizer_param_names)
        self.close_on_complete = close_on_complete
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.artifacts = tuple(str(a) for a in ensure_tuple(artifacts) if a)
        self.client = None
        self.cur_run = None
        self.experiment = None

        self.output_dir = str(Path(output_dir).absolute()) if output_dir is not None else None
        self.enabled = _global_rank() == 0  # under DDP only rank 0 talks to MLflow
        self.tracking_uri = resolve_tracking_uri(tracking_uri) if self.enabled else ""
        self.config = config
        self._parser = _find_bundle_parser() if config is None else None
        self.datalists = datalists
        self.seed = seed
        self.parent_checkpoint = parent_checkpoint
        self.parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
        self.tags = dict(tags or {})
        self.metric_prefix = metric_prefix
        self.join_active_run = join_active_run
        self.allowed_roots = tuple(allowed_roots)
        self.summary_artifacts = summary_artifacts
        self.retry_interval = retry_interval
        self._run: _Run | None = None
        self._owner = False
        self.last_summary: dict[str, int] | None = None  # what was not logged, once the run is closed
        self._failed_events: set[str] = set()
        if self.enabled:
            set_short_http_retries(timeout_s=http_timeout_s, max_retries=http_max_retries)

    @property
    def run_id(self) -> str | None:
        return self._run.writer.run_id if self._run is not None else None

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        super().attach(engine)
        # COMPLETED handlers run in the order they were added; the end-of-run upload must come after
        # handlers attached later (CheckpointSaver's final save, metric writers): re-added at STARTED.
        for handler in (self.complete, self.close):
            if engine.has_event_handler(handler, Events.COMPLETED):
                engine.remove_event_handler(handler, Events.COMPLETED)

    # ------------------------------------------------------------------ run lifecycle
    @_never_raise
    def start(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if not engine.has_event_handler(self.complete, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.complete)
        if self.close_on_complete and not engine.has_event_handler(self.close, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self.close)
        if self._run is None or self._run.closed:
            self._open(engine)
        engine.state.mlflow_run_id = self.run_id

    def _open(self, engine: Engine) -> None:
        key = (self.tracking_uri, self.experiment_name)
        shared = _OPEN_RUNS.get(key)
        if self.join_active_run and shared is not None and not shared.closed:
            self._run, self._owner = shared, False
            return
        config = self._load_config()
        run_name = self.run_name or self._default_run_name(engine, config)
        writer = ResilientMlflowWriter(
            client_factory=self._make_client,
            open_run=lambda client: self._open_run(client, run_name),
            retry_interval=self.retry_interval,
            name=f"TrackingHandler[{run_name}]",
        )
        self._run, self._owner = _Run(writer=writer, tmpdir=tempfile.mkdtemp(prefix="muscle-tracking-")), True
        _OPEN_RUNS[key] = self._run
        self._log_run_info(engine, config)

    def _make_client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def _open_run(self, client: Any, run_name: str) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST

        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                client.create_experiment(self.experiment_name, artifact_location=self._artifact_location())
            except MlflowException as exc:  # another process created it in between
                if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                    raise
            experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment.lifecycle_stage != "active":
            raise MlflowException(f"experiment '{self.experiment_name}' is deleted", error_code=BAD_REQUEST)
        run_tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        run = client.create_run(experiment.experiment_id, run_name=run_name, tags=run_tags)
        return run.info.run_id

    def _artifact_location(self) -> str | None:
        # as MONAI: a local SQLite store keeps artifacts in <db dir>/mlruns; a server decides for itself
        if self.tracking_uri.startswith("sqlite:///"):
            from urllib.parse import unquote

            db_path = Path(unquote(self.tracking_uri[len("sqlite:///"):]))
            return path_to_uri(db_path.parent / "mlruns")
        return None

    # ------------------------------------------------------------------ what is logged at the start
    def _load_config(self) -> dict[str, Any] | None:
        try:
            if self._parser is not None:
                return self._parser.get()
            if isinstance(self.config, Mapping):
                return dict(self.config)
            if self.config is not None:
                from monai.bundle import ConfigParser

                return ConfigParser.load_config_files(self.config)
        except Exception as exc:  # a config that cannot be read must not stop training
            logger.warning(f"TrackingHandler: could not read the config to log ({type(exc).__name__}).")
        return None

    def _resolve(self, id: str, value: Any) -> Any:
        """A config item's value, evaluated through the bundle parser for references/expressions."""
        if self._parser is not None and isinstance(value, str) and value.startswith(("$", "@")):
            return self._parser.get_parsed_content(id)
        return value

    def _privacy_filter(self, config: Mapping[str, Any] | None) -> PrivacyFilter:
        roots = [r for r in (self.output_dir, *self.allowed_roots) if r]
        if config and "bundle_root" in config:
            try:
                bundle_root = self._resolve("bundle_root", config["bundle_root"])
                if isinstance(bundle_root, (str, os.PathLike)):
                    roots.append(bundle_root)
            except Exception:
                pass
        if config and "output_dir" in config and self.output_dir is None:
            try:
                out = self._resolve("output_dir", config["output_dir"])
                if isinstance(out, (str, os.PathLike)):
                    roots.append(out)
            except Exception:
                pass
        return PrivacyFilter(allowed_roots=roots)

    def _default_run_name(self, engine: Engine, config: Mapping[str, Any] | None) -> str:
        meta = (config or {}).get("_meta_") or {}
        name = meta.get("name") if isinstance(meta, Mapping) else None
        return f"{name or _workflow_of(engine)}_{time.strftime('%Y%m%d_%H%M%S')}"

    def _log_run_info(self, engine: Engine, config: dict[str, Any] | None) -> None:
        writer, privacy = self._run.writer, self._privacy_filter(config)
        params: dict[str, Any] = {}
        tags: dict[str, Any] = {"muscle.workflow": _workflow_of(engine)}
        if config:
            meta = config.get("_meta_")
            if isinstance(meta, Mapping):  # metadata goes to tags (and the artifact), not to hundreds of params
                tags.update({tag: meta[k] for k, tag in _META_TAGS.items() if isinstance(meta.get(k), (str, int))})
            params.update(flatten_config({k: v for k, v in config.items() if k != "_meta_"}, privacy=privacy,
                                         prefix="config."))
            self._write_json(privacy.redact(config), "config.json", "config")
        params.update({f"version.{k}": v for k, v in environment_versions().items()})
        params["seed"] = self._find_seed(config)
        params["torch_initial_seed"] = torch.initial_seed()
        params.update({k: getattr(engine.state, k, None) for k in self.default_tracking_params})
        for name, fingerprint in self._datalist_fingerprints(config).items():
            params[f"datalist.{name}.sha256"] = fingerprint["sha256"]
            params[f"datalist.{name}.count"] = fingerprint["count"]
        if self.parent_checkpoint:
            try:
                tags.update(checkpoint_lineage(self.parent_checkpoint))
            except Exception as exc:
                logger.warning(f"TrackingHandler: could not read lineage from the parent checkpoint "
                               f"({type(exc).__name__}); no lineage tags.")
        tags.update(privacy.redact(self.tags))
        writer.set_tags({sanitize_key(k): str(v)[:5000] for k, v in tags.items()})
        writer.log_params({sanitize_key(k): str(v) for k, v in params.items()})

    def _find_seed(self, config: Mapping[str, Any] | None) -> Any:
        if self.seed is not None:
            return self.seed
        for key in _SEED_KEYS:
            if config and key in config:
                try:
                    value = self._resolve(key, config[key])
                    if isinstance(value, int) and not isinstance(value, bool):
                        return value
                except Exception:
                    pass
        return "unset"

    def _datalist_fingerprints(self, config: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
        sources: dict[str, Any] = dict(self.datalists or {})
        if self.datalists is None and config:
            for id, value in _walk_ids(config):
                if _PRIVACY_KEYS.is_sensitive_key(id.split("#")[-1]) and "list" in id.split("#")[-1].lower():
                    try:
                        sources[id.replace("#", ".")] = self._datalist_source(id, value)
                    except Exception as exc:
                        logger.warning(f"TrackingHandler: could not resolve datalist '{id}' ({type(exc).__name__}).")
        out = {}
        for name, source in sources.items():
            if source is None:
                continue
            try:
                out[sanitize_key(str(name))] = datalist_fingerprint(source)
            except Exception as exc:  # never the path in the message: it may name a patient
                logger.warning(f"TrackingHandler: could not fingerprint datalist '{name}' ({type(exc).__name__}).")
        return out

    def _datalist_source(self, id: str, value: Any) -> Any:
        value = self._resolve(id, value)
        if isinstance(value, (str, os.PathLike)):
            return value if os.path.isfile(value) else None
        return value if isinstance(value, (list, tuple, Mapping)) else None

    def _write_json(self, obj: Any, filename: str, artifact_path: str) -> None:
        path = Path(self._run.tmpdir) / artifact_path / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, default=str))
        self._run.writer.log_artifact(str(path), artifact_path)

    # ------------------------------------------------------------------ metrics (called by MLFlowHandler's loggers)
    def _log_params(self, params: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.writer.log_params({sanitize_key(k): str(v)[:500] for k, v in params.items()})

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._run is None:
            return
        values = {sanitize_key(k): v for k, v in _scalars(metrics, self.metric_prefix)}
        for key, value in values.items():
            points = self._run.history.setdefault(key, [])
            points.append((int(step or 0), value))
            if len(points) > _MAX_PLOT_POINTS:  # for the plot only: halve the resolution instead of growing
                points[:] = points[::2]
        if values:
            self._run.writer.log_metrics(values, step=step)

    @_never_raise
    def iteration_completed(self, engine: Engine) -> None:
        super().iteration_completed(engine)

    @_never_raise
    def epoch_completed(self, engine: Engine) -> None:
        super().epoch_completed(engine)
        if self._run is not None:
            self._run.writer.flush()  # iteration metrics are batched: send them at least once per epoch

    # ------------------------------------------------------------------ end of the run
    @_never_raise
    def complete(self, engine: Engine) -> None:
        if not self.enabled or self._run is None or not self._owner:
            return
        self._run.completed = True
        for path in self._artifact_files():
            self._run.writer.log_artifact(*path)
        if self.summary_artifacts:
            self._write_json(self._final_metrics(engine), "metrics.json", "summary")
            self._plot_history()

    def _artifact_files(self) -> Iterator[tuple[str, str | None]]:
        for item in self.artifacts:
            if os.path.isfile(item):
                yield item, None
            elif os.path.isdir(item):
                base = Path(item)
                for root, _, files in os.walk(item):
                    for f in sorted(files):
                        rel = Path(root).relative_to(base.parent)
                        yield os.path.join(root, f), rel.as_posix()
            else:
                self._run.writer.dropped["artifacts"] += 1
                logger.warning(f"TrackingHandler: artifact not found, not logged: {os.path.basename(item)}")

    def _final_metrics(self, engine: Engine) -> dict[str, Any]:
        state = engine.state
        summary: dict[str, Any] = {
            "epochs": state.epoch,
            "iterations": state.iteration,
            "final_metrics": dict(_scalars(state.metrics or {})),
            "last_logged": {k: v[-1][1] for k, v in self._run.history.items()},
        }
        # MONAI's engines hold best_metric = best_metric_epoch = -1 until a key metric improved (a trainer without
        # its own key metric, a run without validation): that is "none", not a score of -1
        epoch = getattr(state, "best_metric_epoch", None)
        best = getattr(state, "best_metric", None)
        recorded = isinstance(epoch, int) and epoch >= 0 and isinstance(best, (int, float))
        summary["best_metric"] = best if recorded and math.isfinite(best) else None
        summary["best_metric_epoch"] = epoch if recorded else None
        if not recorded:
            summary["best_metric_note"] = "no key metric on this engine (no validation, or validated by another)"
        return summary

    def _plot_history(self) -> None:
        history = {k: v for k, v in self._run.history.items() if v}
        if not history:
            return
        try:  # the object API, not pyplot: no global backend switch in the training process
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            return
        keys = sorted(history)[:16]
        cols = min(4, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig = Figure(figsize=(4 * cols, 3 * rows))
        FigureCanvasAgg(fig)
        for i, key in enumerate(keys):
            ax = fig.add_subplot(rows, cols, i + 1)
            steps, values = zip(*history[key], strict=True)
            ax.plot(steps, values, marker="." if len(steps) < 50 else None)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        path = Path(self._run.tmpdir) / "summary" / "metrics.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
        self._run.writer.log_artifact(str(path), "summary")

    @_never_raise
    def close(self) -> None:
        """End the run (only the handler that opened it does), and log what could not be sent."""
        if not self.enabled or self._run is None or not self._owner:
            return
        status = "FINISHED" if self._run.completed else "FAILED"
        self.last_summary = self._run.close(status)
        for key, run in list(_OPEN_RUNS.items()):
            if run is self._run:
                del _OPEN_RUNS[key]
        self.client = self._run.writer.client
        try:
            self._dispose_sqlite_store()  # MONAI's: releases the SQLite file handles
        except Exception:
            pass
        self.client = None


def _workflow_of(engine: Engine) -> str:
    from monai.engines import Evaluator, Trainer

    if isinstance(engine, Trainer):
        return "train"
    if isinstance(engine, Evaluator):
        return "evaluate"
    return type(engine).__name__


def _walk_ids(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(MONAI config id, value) of every item, e.g. ``("train#dataset#data", ...)``."""
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        id = f"{prefix}#{key}" if prefix else str(key)
        yield id, value
        if isinstance(value, (Mapping, list)):
            yield from _walk_ids(value, id)


# --------------------------------------------------------------------------- `--tracking <settings>` support
def tracking_settings(experiment_name: str = "muscle", output_dir: str = "$@bundle_root + '/eval'") -> dict[str, Any]:
    """Settings for ``python -m monai.bundle run ... --tracking <file>`` that attach :class:`TrackingHandler`.

    Same layout as MONAI's ``DEFAULT_MLFLOW_SETTINGS``: handlers go to ``train#handlers`` (trainer),
    ``validate#handlers`` (validator, joins the trainer's run) and ``handlers`` (evaluator/inference). Top-level
    items (``output_dir``, ``tracking_uri``, ``experiment_name``, ``run_name``, ``parent_checkpoint``) are only
    added when the bundle does not define them, so ``--tracking_uri http://host:5000`` overrides them.
    ``save_execute_config`` is off: MONAI would write the raw (unredacted) config next to the outputs; the
    handler logs a redacted copy instead.
    """
    target = f"{TrackingHandler.__module__.rsplit('.', 1)[0]}.{TrackingHandler.__name__}"
    common = {
        "_target_": target,
        "_disabled_": "@is_not_rank0",
        "output_dir": "@output_dir",
        "tracking_uri": "@tracking_uri",
        "experiment_name": "@experiment_name",
        "run_name": "@run_name",
    }
    return {
        "handlers_id": {
            "trainer": {"id": "train#trainer", "handlers": "train#handlers"},
            "validator": {"id": "validate#evaluator", "handlers": "validate#handlers"},
            "evaluator": {"id": "evaluator", "handlers": "handlers"},
        },
        "configs": {
            "output_dir": output_dir,
            "tracking_uri": None,
            "experiment_name": experiment_name,
            "run_name": None,
            "parent_checkpoint": None,
            "save_execute_config": False,
            "is_not_rank0": "$torch.distributed.is_available() and torch.distributed.is_initialized() "
            "and torch.distributed.get_rank() > 0",
            "trainer": {**common, "parent_checkpoint": "@parent_checkpoint", "tag_name": "train_loss",
                        "close_on_complete": True},
            "validator": {**common, "iteration_log": False, "close_on_complete": False},
            "evaluator": {**common, "parent_checkpoint": "@parent_checkpoint", "iteration_log": False,
                          "close_on_complete": True},
        },
    }


def write_tracking_settings(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write :func:`tracking_settings` as JSON (for ``--tracking <path>``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tracking_settings(**kwargs), indent=2) + "\n")
    return path


def track_report(report: Mapping[str, Any], output_dir: str | os.PathLike | None = None,
                 artifacts: Sequence[str | os.PathLike] = (), experiment_name: str = "muscle",
                 tracking_uri: str | None = None, parent_checkpoint: str | os.PathLike | None = None,
                 workflow: str = "evaluate", enabled: bool = True) -> str | None:
    """Track a bundle run that has no training loop (an evaluation or inference config) with the same
    :class:`TrackingHandler` as the engines: the scalars of ``report`` become metrics, ``artifacts`` are uploaded,
    the config, versions, datalist hashes and lineage of ``parent_checkpoint`` are logged under the same privacy
    rule, and an unreachable store only warns. Returns the run id (``None`` when disabled or not logged)."""
    if not as_flag(enabled, "use_tracking"):
        return None
    engine = Engine(lambda engine, batch: None)
    handler = TrackingHandler(output_dir=output_dir, tracking_uri=tracking_uri, experiment_name=experiment_name,
                              parent_checkpoint=parent_checkpoint, artifacts=[str(a) for a in artifacts],
                              iteration_log=False, output_transform=lambda output: None,
                              tags={"muscle.workflow": workflow}, summary_artifacts=False)
    # Metrics must be in place before the handler's epoch-end logging: register first.
    engine.add_event_handler(Events.STARTED, lambda e: e.state.metrics.update(dict(_scalars(report))))
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    return handler.run_id
