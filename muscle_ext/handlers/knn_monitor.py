"""Health monitor for self-supervised training: kNN accuracy/AUC of the frozen backbone on a small labelled set,
and an embedding-collapse score, written to ``engine.state.metrics`` like any metric."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..metrics.classification import roc_auc
from ..metrics.embedding import collapse_score, extract_embeddings, knn_scores

__all__ = ["KNNMonitor"]


class KNNMonitor:
    """Every ``interval`` epochs, embed a labelled reference set and a labelled query set with the backbone and
    record ``knn_accuracy``, ``knn_auc`` (binary tasks) and ``embedding_spread`` (about 1 when healthy, 0 on
    collapse) in ``engine.state.metrics``; a falling spread warns of collapse long before the loss does.

    Attach it before ``StatsHandler``/tracking handlers so that they see the new values in the same epoch.
    """

    def __init__(self, backbone: nn.Module | Callable[[], nn.Module], reference_loader: Iterable,
                 query_loader: Iterable, num_classes: int = 2, interval: int = 1, k: int = 20,
                 temperature: float = 0.07, prefix: str = "knn_", device: torch.device | str | None = None) -> None:
        self.backbone = backbone
        self.reference_loader = reference_loader
        self.query_loader = query_loader
        self.num_classes = num_classes
        self.interval = max(1, int(interval))
        self.k, self.temperature, self.prefix, self.device = k, temperature, prefix, device
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        module = self.backbone() if callable(self.backbone) and not isinstance(self.backbone, nn.Module) \
            else self.backbone
        device = self.device or next(module.parameters()).device
        # Iterating a DataLoader draws its base seed from the global torch RNG, which training also draws from
        # (shuffle-BN permutations): restore it, so that how often the monitor runs does not change the training.
        with torch.random.fork_rng(devices=[]):
            ref_x, ref_y = extract_embeddings(module, self.reference_loader, device)
            query_x, query_y = extract_embeddings(module, self.query_loader, device)
        scores = knn_scores(ref_x, ref_y, query_x, self.num_classes, self.k, self.temperature)
        metrics = {
            f"{self.prefix}accuracy": float((scores.argmax(1) == query_y.long()).float().mean()),
            "embedding_spread": collapse_score(query_x),
        }
        if self.num_classes == 2:
            metrics[f"{self.prefix}auc"] = roc_auc(query_y.numpy(), scores[:, 1].numpy())
        engine.state.metrics.update(metrics)
        self.logger.info("epoch %d monitor: %s", engine.state.epoch,
                         ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
