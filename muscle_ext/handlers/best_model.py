"""The best model of a training run, with a stated rule for epochs whose key metric is undefined (NaN)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

from ..networks.model_settings import SettingsRecord

__all__ = ["BestModelSaver", "is_undefined", "undefined_aware"]

logger = logging.getLogger(__name__)


def is_undefined(value: Any) -> bool:
    """True for a metric value that is NaN (e.g. ROC AUC of a split holding one class); non-numbers are not."""
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def undefined_aware(metric_cmp_fn: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """``metric_cmp_fn(current, best)`` (``True``: current is the new best) with the rule for undefined values.

    NaN compares false with everything, so MONAI's plain ``current > best`` keeps a NaN first epoch as the best
    forever. Here a defined value always beats an undefined best, an undefined value never beats a defined best,
    and an undefined value replaces an undefined best (while no epoch had a defined value, the latest one wins).
    """
    def compare(current: Any, best: Any) -> bool:
        if is_undefined(current):
            return is_undefined(best)
        if is_undefined(best):
            return True
        return bool(metric_cmp_fn(current, best))

    compare.__wrapped__ = metric_cmp_fn  # type: ignore[attr-defined]
    return compare


class BestModelSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver(save_key_metric=True, key_metric_filename=...)`` for a validator, e.g.
    ``models/model.pt``, keeping the model of the evaluator's best epoch under a rule for undefined key metrics.

    Rule (the key metric is undefined when it is NaN, e.g. ROC AUC on a validation split holding one class):

    - an epoch with a defined key metric replaces the kept model when it is better (the evaluator's
      ``metric_cmp_fn``: ``>`` by default, ``operator.lt`` for an error such as MAE);
    - an epoch with an undefined key metric never replaces a model kept for a defined one;
    - while no epoch has had a defined key metric, every epoch replaces the previous one: the last epoch's model
      is kept.

    Each validation with an undefined key metric logs a warning that names the epoch whose model is kept. The
    saver writes exactly when the evaluator records a new best epoch (``state.best_metric_epoch``), so the saved
    model, ``BackboneExporter(on_best_metric=True)`` and the best metric in the logs always name the same epoch.
    Plain MONAI instead keeps a NaN first epoch for the whole run (NaN compares false with everything).

    Takes CheckpointSaver's arguments; ``save_key_metric`` must be true. ``settings`` (the bundle's
    ``model_settings``: image size, input normalisation, class names, task, arch, head settings, ...) makes the file
    self-describing: it is then ``{"model": <state dict>, "settings": {"format": "muscle-model/1", ...}}`` (plain
    values, ``torch.load(weights_only=True)``), which ``CheckpointLoader(load_dict={"model": network})`` still loads;
    without ``settings`` it is the bare state dict, as before (see :mod:`muscle_ext.networks.model_settings`).

    Raises:
        ValueError: without ``save_key_metric=True``, or when attached to an engine that is not a MONAI workflow
            with a key metric (no ``metric_cmp_fn``).
    """

    def __init__(self, save_dir: str, save_dict: dict, *args: Any, settings: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.settings: dict[str, Any] | None = None
        if settings is not None:  # converted to plain values now: a bad entry stops the run before training
            record = SettingsRecord(settings)
            save_dict = {**save_dict, "settings": record}
            self.settings = record.settings
        super().__init__(save_dir, save_dict, *args, **kwargs)
        if self._key_metric_checkpoint is None:
            raise ValueError("BestModelSaver saves the best model: set save_key_metric=True")

    @property
    def filename(self) -> str:
        return getattr(self._key_metric_checkpoint.save_handler, "filename", None) or "the best model"

    def attach(self, engine: Engine) -> None:
        if not hasattr(engine, "metric_cmp_fn"):
            raise ValueError("BestModelSaver attaches to a MONAI evaluator with a key metric")
        if not hasattr(engine.metric_cmp_fn, "__wrapped__"):
            # MONAI's _compare_metrics looks metric_cmp_fn up at each epoch end: wrapping it here is enough
            engine.metric_cmp_fn = undefined_aware(engine.metric_cmp_fn)
        # ignite's own comparison (priority > saved priority) would keep a NaN first epoch; follow the evaluator,
        # whose key-metric comparison ran earlier in the same EPOCH_COMPLETED (registered at its construction)
        self._key_metric_checkpoint._compare_fn = lambda _priority: engine.state.best_metric_epoch == engine.state.epoch
        super().attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report_undefined)

    def _report_undefined(self, engine: Engine) -> None:
        name = engine.state.key_metric_name
        if name is None or not is_undefined(engine.state.metrics.get(name)):
            return
        kept = engine.state.best_metric_epoch
        if kept == engine.state.epoch:
            why = f"no epoch so far had a defined {name}, so the last epoch's model is kept"
        else:
            why = f"an undefined {name} never replaces a defined one ({name} = {engine.state.best_metric:.4f})"
        logger.warning(f"{name} is undefined (NaN) at epoch {engine.state.epoch}: {self.filename} holds the model "
                       f"of epoch {kept}; {why}")
