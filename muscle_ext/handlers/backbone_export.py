"""Write the backbone in the one documented checkpoint format when training ends (and every N epochs)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from torch import nn

from ..networks.backbone import save_backbone
from ..networks.model_settings import plain_settings

__all__ = ["BackboneExporter"]


class BackboneExporter:
    """Save ``backbone_fn()`` (e.g. the MoCo query backbone) to ``path`` with :func:`save_backbone`.

    Args:
        path: output file, e.g. ``models/backbone.pt``; written atomically, so a kill never leaves half a file.
        backbone: the backbone module, or a zero-argument callable returning it (for wrapped networks).
        arch, backbone_kwargs: how to rebuild it (``build_backbone(arch, **backbone_kwargs)``).
        source: provenance stored in the file (bundle name); the epoch, iteration and the MLflow run id (when an
            active run exists) are added at save time.
        settings: what evaluation and inference need to know about the training (the bundle's ``model_settings``:
            image size, input normalisation, pre-processing, ...), stored under ``settings`` as plain values.
        interval: also save every ``interval`` epochs (0: only at the end).
        on_best_metric: attach to a validator instead, and save after each validation round that improved its key
            metric (the round in which ``CheckpointSaver(save_key_metric=True)`` writes the best model), so that the
            exported backbone is the best model's.
    """

    rank_zero_only = True  # data-parallel runs export once (muscle_ext.handlers.handlers_for_rank)

    def __init__(self, path: str | Path, backbone: nn.Module | Callable[[], nn.Module], arch: str,
                 backbone_kwargs: dict | None = None, source: dict | None = None, interval: int = 0,
                 on_best_metric: bool = False, settings: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.backbone = backbone
        self.arch = arch
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.source = dict(source or {})
        # plain values now: a setting that a file cannot hold stops the run before training, not at its end
        self.settings = None if settings is None else plain_settings(dict(settings), "model_settings")
        self.interval = int(interval)
        self.on_best_metric = bool(on_best_metric)
        self.sha256: str | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if self.on_best_metric:
            engine.add_event_handler(Events.COMPLETED, self._if_best)
            return
        engine.add_event_handler(Events.COMPLETED, self)
        if self.interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _if_best(self, engine: Engine) -> None:
        # a validator run for trainer epoch e ends at epoch e; MONAI sets best_metric_epoch when the metric improved
        if getattr(engine.state, "best_metric_epoch", -1) == engine.state.epoch:
            self(engine)

    def __call__(self, engine: Engine) -> None:
        module = self.backbone() if callable(self.backbone) and not isinstance(self.backbone, nn.Module) \
            else self.backbone
        source: dict[str, Any] = {**self.source, "epoch": engine.state.epoch, "iteration": engine.state.iteration}
        run_id = getattr(engine.state, "mlflow_run_id", None)  # set by TrackingHandler when its run started
        if run_id:
            source["mlflow_run_id"] = run_id
        self.sha256 = save_backbone(self.path, module, self.arch, self.backbone_kwargs, source, self.settings)
        engine.state.backbone_sha256 = self.sha256
        self.logger.info(f"backbone saved: {self.path.name} (sha256 {self.sha256[:12]}, epoch {engine.state.epoch})")
