"""``TrackingHandler``: an Ignite handler that logs an engine into a :class:`~.run.TrackingRun`.

It logs what MONAI's ``MLFlowHandler`` logs (the loss per iteration, ``engine.state.metrics`` and optimiser
parameters per epoch, chosen state attributes) and, when it describes its run, the params and tags of
:func:`~.describe.describe_run`; at the end the files named in ``artifacts`` and a summary (``summary/metrics.json``,
``summary/metrics.png``). It is a plain handler rather than an ``MLFlowHandler`` subclass: MONAI's handler builds its
client when constructed (MLflow 3.14+ migrates the store there, which raises for a broken store), searches the
server for unfinished runs to join (other people's, on a shared server) and gives no hook for a privacy filter or an
outage-proof writer; reusing it would mean reusing its private methods.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.utils import ensure_tuple

from .describe import default_run_name, describe_run, loss_from_output, scalar_metrics
from .run import TrackingRun

__all__ = ["TrackingHandler", "engine_workflow", "final_metrics", "plot_history"]

logger = logging.getLogger(__name__)


def engine_workflow(engine: Engine) -> str:
    """``train`` for a MONAI trainer, ``evaluate`` for an evaluator, else the engine's class name."""
    from monai.engines import Evaluator, Trainer

    if isinstance(engine, Trainer):
        return "train"
    if isinstance(engine, Evaluator):
        return "evaluate"
    return type(engine).__name__


class TrackingHandler:
    """Track an engine (trainer, validator or evaluator) in MLflow; attach it after the handlers whose outputs it
    uploads (Ignite runs ``COMPLETED`` handlers in the order they were attached).

    Args:
        run: the :class:`TrackingRun` to log into, shared with the other handlers of the bundle run (a validator's
            handler logs into its trainer's run). Default: a run of its own from ``tracking_uri``,
            ``experiment_name``, ``run_name`` and ``parent_run_id``.
        output_dir: the run's output folder: paths inside it may be logged.
        config: the config to describe the run with: a dict, config file path(s), or ``None`` for the config that
            ``python -m monai.bundle run`` is running (:func:`~muscle_ext.bundle_args.command_line_config`).
        datalists, seed, parent_checkpoint, tags, allowed_roots, extra_sensitive_keys: see
            :func:`~.describe.describe_run`.
        artifacts: files or folders uploaded when the engine completes (final model, backbone, reports ...).
        iteration_log, epoch_log: log every iteration / epoch, or an Ignite event filter ``(engine, event) ->
            bool``, as in MONAI's ``MLFlowHandler``.
        output_transform: the iteration's loss from ``engine.state.output`` (``None``: nothing logged).
        global_epoch_transform, state_attributes, tag_name, optimizer_param_names: as in MONAI's ``MLFlowHandler``.
        metric_prefix: prepended to every metric name of this handler (e.g. ``"val/"``).
        close_on_complete: this handler owns the run's end: it describes the run when it starts, uploads the
            artifacts and the summary and ends the run when its engine completes, and ends it ``FAILED`` if its
            engine raises. ``False`` for a validator, which completes once per validation round.
        describe_run: log the config, versions, datalists and lineage at start (default: ``close_on_complete``).
        summary_artifacts: upload ``summary/metrics.json`` and ``summary/metrics.png`` at the end.
        tracking_uri, experiment_name, run_name, parent_run_id, retry_interval, http_timeout_s,
            http_max_retries: for the handler's own run when ``run`` is not given (:class:`TrackingRun`).

    A failure inside this handler (an ``output_transform`` that raises) does not stop training: it is logged once
    as a warning and recorded on the run as the tag ``muscle.tracking.handler_errors``.
    """

    rank_zero_only = True  # data-parallel runs log once (muscle_ext.handlers.handlers_for_rank)

    def __init__(
        self,
        run: TrackingRun | None = None,
        output_dir: str | os.PathLike | None = None,
        config: Mapping[str, Any] | str | os.PathLike | Sequence[str] | None = None,
        datalists: Mapping[str, Any] | None = None,
        seed: int | None = None,
        parent_checkpoint: str | os.PathLike | None = None,
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
        describe_run: bool | None = None,
        allowed_roots: Sequence[str | os.PathLike] = (),
        extra_sensitive_keys: Sequence[str] = (),
        summary_artifacts: bool = True,
        tracking_uri: str | None = None,
        experiment_name: str = "muscle",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        retry_interval: float = 30.0,
        http_timeout_s: int = 5,
        http_max_retries: int = 0,
    ) -> None:
        self.run = run if run is not None else TrackingRun(
            tracking_uri, experiment_name, run_name, parent_run_id, retry_interval, http_timeout_s, http_max_retries)
        self.output_dir = str(Path(output_dir).absolute()) if output_dir is not None else None
        self.config = config
        self.datalists = datalists
        self.seed = seed
        self.parent_checkpoint = parent_checkpoint
        self.tags = dict(tags or {})
        self.artifacts = tuple(str(a) for a in ensure_tuple(artifacts) if a)
        self.iteration_log = iteration_log
        self.epoch_log = epoch_log
        self.output_transform = output_transform
        self.global_epoch_transform = global_epoch_transform
        self.state_attributes = tuple(state_attributes or ())
        self.tag_name = tag_name
        self.optimizer_param_names = ensure_tuple(optimizer_param_names)
        self.metric_prefix = metric_prefix
        self.close_on_complete = close_on_complete
        self.describe = close_on_complete if describe_run is None else describe_run
        self.allowed_roots = tuple(allowed_roots)
        self.extra_sensitive_keys = tuple(extra_sensitive_keys)
        self.summary_artifacts = summary_artifacts
        self.errors: dict[str, str] = {}  # event -> exception type, reported once and tagged on the run

    @property
    def enabled(self) -> bool:
        """False on ranks other than 0 (under DDP only rank 0 talks to MLflow)."""
        return self.run.enabled

    @property
    def run_id(self) -> str | None:
        return self.run.run_id

    @property
    def tracking_uri(self) -> str:
        return self.run.tracking_uri

    @property
    def last_summary(self) -> dict[str, int] | None:
        """Counts of what was not logged, once the run ended."""
        return self.run.last_summary

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._guarded(self.started))
        if self.iteration_log:
            event = Events.ITERATION_COMPLETED
            engine.add_event_handler(event if self.iteration_log is True else event(event_filter=self.iteration_log),
                                     self._guarded(self.iteration_completed))
        if self.epoch_log:
            event = Events.EPOCH_COMPLETED
            engine.add_event_handler(event if self.epoch_log is True else event(event_filter=self.epoch_log),
                                     self._guarded(self.epoch_completed))
        engine.add_event_handler(Events.COMPLETED, self._guarded(self.completed))
        if self.close_on_complete:
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    # ------------------------------------------------------------------ events
    def started(self, engine: Engine) -> None:
        config = self._config() if self.describe or not self.run.active else None
        self.run.start(default_run_name(config, engine_workflow(engine)))
        engine.state.mlflow_run_id = self.run.run_id
        if self.describe:
            engine_params = {k: getattr(engine.state, k, None) for k in ("max_epochs", "epoch_length")}
            roots = [r for r in (self.output_dir, *self.allowed_roots) if r]
            description = describe_run(config, engine_workflow(engine), roots, self.extra_sensitive_keys,
                                       self.datalists, self.seed, self.parent_checkpoint, self.tags, engine_params)
            self.run.set_tags(description.tags)
            self.run.log_params(description.params)
            if description.config is not None:
                self.run.log_json(description.config, "config.json", "config")

    def iteration_completed(self, engine: Engine) -> None:
        loss = self.output_transform(engine.state.output)
        values = {} if loss is None else dict(scalar_metrics(
            loss if isinstance(loss, Mapping) else {self.tag_name: loss}, self.metric_prefix))
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            values.update({f"{self.metric_prefix}{name}_group_{i}": float(group[name])
                           for name in self.optimizer_param_names
                           for i, group in enumerate(optimizer.param_groups) if name in group})
        if values:  # one call per iteration: the writer timestamps and queues them together
            self.run.log_metrics(values, engine.state.iteration)

    def epoch_completed(self, engine: Engine) -> None:
        values = dict(engine.state.metrics or {})
        values.update({a: getattr(engine.state, a) for a in self.state_attributes if hasattr(engine.state, a)})
        self.run.log_metrics(dict(scalar_metrics(values, self.metric_prefix)),
                             self.global_epoch_transform(engine.state.epoch))
        self.run.flush()  # iteration metrics are batched: send them at least once per epoch

    def completed(self, engine: Engine) -> None:
        if not self.close_on_complete:
            return
        self.run.completed = True
        for path, artifact_path in self._artifact_files():
            self.run.log_artifact(path, artifact_path)
        if self.summary_artifacts:
            self.run.log_json(final_metrics(engine, self.run.history), "metrics.json", "summary")
            plot = plot_history(self.run.history, self.run.write_file("metrics.png", "summary"))
            if plot is not None:
                self.run.log_artifact(plot, "summary")
        self._end()

    def exception_raised(self, engine: Engine, exc: BaseException) -> None:
        """End the run ``FAILED`` and let the exception go on (Ignite stops at the first handler that raises)."""
        self._end("FAILED")
        raise exc

    def _end(self, status: str | None = None) -> None:
        if self.errors:
            self.run.set_tags({"muscle.tracking.handler_errors": ", ".join(f"{k}:{v}" for k, v in self.errors.items())})
        self.run.end(status)

    # ------------------------------------------------------------------ helpers
    def _guarded(self, method: Callable[[Engine], None]) -> Callable[[Engine], None]:
        """Tracking must not stop training: a failure is warned once per event and tagged on the run."""

        def handler(engine: Engine) -> None:
            try:
                method(engine)
            except Exception as exc:
                # the type only: messages may quote config or data values
                first = method.__name__ not in self.errors
                self.errors[method.__name__] = type(exc).__name__
                (logger.warning if first else logger.debug)(
                    f"TrackingHandler.{method.__name__} failed ({type(exc).__name__}); training continues.",
                    exc_info=logger.isEnabledFor(logging.DEBUG))

        handler.__name__ = method.__name__
        return handler

    def _config(self) -> dict[str, Any] | None:
        try:
            if isinstance(self.config, Mapping):
                return dict(self.config)
            if self.config is not None:
                from monai.bundle import ConfigParser

                return ConfigParser.load_config_files(self.config)
            from muscle_ext.bundle_args import command_line_config

            return command_line_config()
        except Exception as exc:  # a config that cannot be read must not stop training
            logger.warning(f"TrackingHandler: could not read the config to log ({type(exc).__name__}).")
            return None

    def _artifact_files(self) -> Iterator[tuple[str, str | None]]:
        for item in self.artifacts:
            if os.path.isfile(item):
                yield item, None
            elif os.path.isdir(item):
                base = Path(item)
                for root, _, files in os.walk(item):
                    for f in sorted(files):
                        yield os.path.join(root, f), Path(root).relative_to(base.parent).as_posix()
            else:
                self.run.count_dropped("artifacts")
                logger.warning(f"TrackingHandler: artifact not found, not logged: {os.path.basename(item)}")


def final_metrics(engine: Engine, history: Mapping[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """The ``summary/metrics.json`` of a run: epochs, iterations, the engine's final metrics, the last logged value
    of every metric and the best key metric (``None`` when the engine has none)."""
    state = engine.state
    summary: dict[str, Any] = {
        "epochs": state.epoch,
        "iterations": state.iteration,
        "final_metrics": dict(scalar_metrics(state.metrics or {})),
        "last_logged": {k: v[-1][1] for k, v in history.items() if v},
    }
    # MONAI's engines hold best_metric = best_metric_epoch = -1 until a key metric improved (a trainer without
    # its own key metric, a run without validation): that is "none", not a score of -1
    epoch, best = getattr(state, "best_metric_epoch", None), getattr(state, "best_metric", None)
    recorded = isinstance(epoch, int) and epoch >= 0 and isinstance(best, (int, float))
    summary["best_metric"] = best if recorded and math.isfinite(best) else None
    summary["best_metric_epoch"] = epoch if recorded else None
    if not recorded:
        summary["best_metric_note"] = "no key metric on this engine (no validation, or validated by another)"
    return summary


def plot_history(history: Mapping[str, list[tuple[int, float]]], path: str | os.PathLike,
                 max_panels: int = 16) -> Path | None:
    """One panel per metric (the first ``max_panels`` by name) against its step, saved as a PNG at ``path``;
    ``None`` (nothing written) without history. Matplotlib's object API: no global backend switch in the training
    process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = {k: v for k, v in history.items() if v}
    if not history:
        return None
    keys = sorted(history)[:max_panels]
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
    fig.savefig(path, dpi=80)
    return Path(path)
