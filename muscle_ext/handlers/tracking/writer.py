"""An MLflow writer that never raises: training must outlive its tracking server.

:class:`ResilientMlflowWriter` queues params, tags, metrics and artifacts for one run and sends them in
batches. When the store cannot be reached it warns once, keeps what it can in a bounded buffer, retries at
growing intervals and, when asked for a :meth:`~ResilientMlflowWriter.summary`, reports what never arrived.
Requests the store rejects (an invalid or changed param) are dropped and counted, without their values.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["ResilientMlflowWriter", "http_limits"]

logger = logging.getLogger(__name__)

_BATCH_PARAMS_TAGS = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
_BATCH_METRICS = 1000  # MAX_METRICS_PER_BATCH (and MAX_ENTITIES_PER_BATCH)


@contextlib.contextmanager
def http_limits(timeout_s: int = 5, max_retries: int = 0, backoff_factor: int = 1) -> Iterator[None]:
    """Make a dead tracking server cost seconds, not minutes, for the requests made inside this block.

    MLflow's defaults (7 retries with backoff factor 2, 120 s timeout) stall a request for minutes. MLflow reads
    the limits per request from ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``_MAX_RETRIES`` / ``_BACKOFF_FACTOR``: they are
    set for the block only and removed after it, and a value the user set is left alone. No HTTP-level retry by
    default: :class:`ResilientMlflowWriter` buffers and retries on its own schedule.
    """
    limits = {"MLFLOW_HTTP_REQUEST_TIMEOUT": timeout_s, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": max_retries,
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": backoff_factor}
    added = [name for name in limits if name not in os.environ]
    for name in added:
        os.environ[name] = str(int(limits[name]))
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _is_rejection(exc: BaseException) -> bool:
    """True when the store answered and refused the request (4xx): retrying the same data cannot help."""
    status = getattr(exc, "get_http_status_code", None)
    if not callable(status):
        return False
    try:
        code = int(status())
    except Exception:
        return False
    return 400 <= code < 500 and code != 429


class ResilientMlflowWriter:
    """Sends one run's data to MLflow; on failure buffers, retries later, and counts what it had to drop.

    Args:
        client_factory: builds the ``MlflowClient`` (lazily: building one for a broken store can raise).
        open_run: given the client, creates (or finds) the run and returns its id; called again after an outage
            if the run could not be created at the start.
        retry_interval: seconds to wait after a failure before the next attempt; doubles after each failed
            attempt up to ``max_retry_interval``. Between attempts nothing is sent, so a dead server costs
            one failed request per interval, not one per iteration.
        max_buffered_metrics: metric values kept while the store is away; older ones are dropped beyond this.
        metrics_flush_interval: metric values are sent at most this often (seconds), in batches: one request
            per iteration costs tens of ms on a SQLite store. Params, tags and artifacts are sent at once.
        name: shown in log messages.
        http_timeout_s, http_max_retries: per-request limits for a remote server (:func:`http_limits`).
    """

    def __init__(
        self,
        client_factory: Callable[[], Any],
        open_run: Callable[[Any], str],
        retry_interval: float = 30.0,
        max_retry_interval: float = 600.0,
        max_buffered_metrics: int = 100_000,
        metrics_flush_interval: float = 2.0,
        name: str = "MLflow",
        http_timeout_s: int = 5,
        http_max_retries: int = 0,
    ) -> None:
        self.client_factory = client_factory
        self.open_run = open_run
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.max_buffered_metrics = max_buffered_metrics
        self.metrics_flush_interval = metrics_flush_interval
        self.name = name
        self.http_limits = {"timeout_s": http_timeout_s, "max_retries": http_max_retries}
        self.client: Any = None
        self.run_id: str | None = None
        self.closed = False
        self.available = True
        self.disabled = False  # the store refused to create the run: nothing can ever be logged
        self.warned = False
        self.dropped = {"params": 0, "tags": 0, "metrics": 0, "artifacts": 0}
        self.sent = {"params": 0, "tags": 0, "metrics": 0, "artifacts": 0}
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._metrics: deque = deque()
        self._artifacts: list[tuple[str, str | None]] = []
        self._next_attempt = 0.0
        self._next_metrics_flush = 0.0
        self._interval = retry_interval
        self._rejection_warned = False

    # ---------------------------------------------------------------- queueing
    def log_params(self, params: Mapping[str, Any]) -> None:
        for k, v in params.items():
            self._params[k] = str(v)
        self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._tags[k] = str(v)
        self.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)  # keep the time it happened, not the time it is finally sent
        for k, v in metrics.items():
            self._metrics.append(Metric(k, float(v), timestamp, int(step or 0)))
        overflow = len(self._metrics) - self.max_buffered_metrics
        for _ in range(max(overflow, 0)):
            self._metrics.popleft()
            self.dropped["metrics"] += 1
        if time.monotonic() >= self._next_metrics_flush:
            self.flush()

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._artifacts.append((str(local_path), artifact_path))
        self.flush()

    # ---------------------------------------------------------------- sending
    def flush(self, force: bool = False) -> bool:
        """Try to send everything queued; ``force`` ignores the retry interval. Returns True if nothing is left."""
        if self.disabled:
            self._drop_pending()
            return True
        if not self.available and not force and time.monotonic() < self._next_attempt:
            return False
        self._next_metrics_flush = time.monotonic() + self.metrics_flush_interval
        try:
            with http_limits(**self.http_limits):
                if self.client is None:
                    self.client = self.client_factory()
                if self.run_id is None:
                    self.run_id = self.open_run(self.client)
                self._send_batches()
        except Exception as exc:  # any failure of the store must not reach the training loop
            if _is_rejection(exc) and self.run_id is None:
                self._warn_once(f"{self.name}: the tracking store refused to create the run "
                                f"({type(exc).__name__}); this run will not be tracked.")
                self.disabled = True
                self._drop_pending()
                return True
            self._mark_unavailable(exc)
            return False
        if not self.available:
            logger.info(f"{self.name}: tracking store reachable again; buffered data sent.")
        self.available = True
        self._interval = self.retry_interval
        return True

    def _send_batches(self) -> None:
        from mlflow.entities import Param, RunTag

        while self._params:
            keys = list(self._params)[:_BATCH_PARAMS_TAGS]
            self._send("params", keys, lambda ks: dict(params=[Param(k, self._params[k]) for k in ks]))
            for k in keys:
                self._params.pop(k, None)
        while self._tags:
            keys = list(self._tags)[:_BATCH_PARAMS_TAGS]
            self._send("tags", keys, lambda ks: dict(tags=[RunTag(k, self._tags[k]) for k in ks]))
            for k in keys:
                self._tags.pop(k, None)
        while self._metrics:
            batch = [self._metrics[i] for i in range(min(_BATCH_METRICS, len(self._metrics)))]
            self._send("metrics", batch, lambda ms: dict(metrics=list(ms)))
            for _ in batch:
                self._metrics.popleft()
        while self._artifacts:
            local_path, artifact_path = self._artifacts[0]
            if not os.path.exists(local_path):
                self.dropped["artifacts"] += 1
                logger.warning(f"{self.name}: artifact missing at upload time, skipped: {os.path.basename(local_path)}")
            else:
                try:
                    self.client.log_artifact(self.run_id, local_path, artifact_path)
                    self.sent["artifacts"] += 1
                except Exception as exc:
                    if not _is_rejection(exc):
                        raise
                    self.dropped["artifacts"] += 1
                    self._warn_rejection(exc)
            self._artifacts.pop(0)

    def _send(self, kind: str, items: list, to_kwargs: Callable[[list], dict]) -> None:
        """Log one batch. If the store rejects params or tags (one changed value fails the whole batch), retry
        them one by one so that only the bad ones are dropped; a rejected metrics batch is dropped whole."""
        try:
            self.client.log_batch(self.run_id, **to_kwargs(items))
            self.sent[kind] += len(items)
            return
        except Exception as exc:
            if not _is_rejection(exc):
                raise  # unreachable store: the caller keeps the batch queued
            if len(items) == 1 or kind == "metrics":
                self.dropped[kind] += len(items)
                self._warn_rejection(exc)
                return
        for item in items:
            self._send(kind, [item], to_kwargs)

    # ---------------------------------------------------------------- failure handling
    def _mark_unavailable(self, exc: BaseException) -> None:
        self._warn_once(
            f"{self.name}: tracking store unavailable ({type(exc).__name__}: {str(exc)[:200]}). Training "
            f"continues; tracking data is buffered (up to {self.max_buffered_metrics} metric values) and retried "
            f"every {self.retry_interval:g}s or more; what cannot be sent is reported when the run completes."
        )
        if self.available:
            self._interval = self.retry_interval
        else:
            self._interval = min(self._interval * 2, self.max_retry_interval)
        self.available = False
        self._next_attempt = time.monotonic() + self._interval

    def _warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            logger.warning(message)
        else:
            logger.debug(message)

    def _warn_rejection(self, exc: BaseException) -> None:
        # no exception text: MLflow's message echoes the rejected values
        msg = f"{self.name}: the tracking store rejected an item ({getattr(exc, 'error_code', type(exc).__name__)})"
        if not self._rejection_warned:
            self._rejection_warned = True
            logger.warning(msg + "; it is dropped and counted in the end summary.")
        else:
            logger.debug(msg)

    def _drop_pending(self) -> None:
        self.dropped["params"] += len(self._params)
        self.dropped["tags"] += len(self._tags)
        self.dropped["metrics"] += len(self._metrics)
        self.dropped["artifacts"] += len(self._artifacts)
        self._params.clear()
        self._tags.clear()
        self._metrics.clear()
        self._artifacts.clear()

    # ---------------------------------------------------------------- ending
    def summary(self) -> dict[str, int]:
        """Counts of what was not logged (dropped plus still queued)."""
        return {
            "params": self.dropped["params"] + len(self._params),
            "tags": self.dropped["tags"] + len(self._tags),
            "metrics": self.dropped["metrics"] + len(self._metrics),
            "artifacts": self.dropped["artifacts"] + len(self._artifacts),
        }

    def close(self, status: str = "FINISHED") -> dict[str, int]:
        """Last attempt to send everything, end the run with ``status``, log the summary and return it."""
        self.closed = True
        self.flush(force=True)
        missing = self.summary()
        if self.available and self.run_id is not None and not self.disabled:
            try:
                with http_limits(**self.http_limits):
                    if any(missing.values()):  # tell the run itself that it is incomplete
                        from mlflow.entities import RunTag

                        tags = [RunTag(f"muscle.tracking.not_logged_{k}", str(v)) for k, v in missing.items()]
                        self.client.log_batch(self.run_id, tags=tags)
                    self.client.set_terminated(self.run_id, status)
            except Exception as exc:
                self._mark_unavailable(exc)
        if any(missing.values()):
            logger.warning(
                f"{self.name}: tracking incomplete for run {self.run_id or '(never created)'}: not logged "
                + ", ".join(f"{v} {k}" for k, v in missing.items())
                + ("" if self.available else " (the store was still unreachable at the end)")
                + "."
            )
        else:
            logger.info(f"{self.name}: run {self.run_id} complete; everything was logged.")
        self._drop_pending()
        return missing
