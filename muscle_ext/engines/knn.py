"""kNN on a frozen backbone's embeddings as a classifier module, so that the downstream bundle's evaluator, report
handler (metrics with CIs, ``per_case.csv``, subgroups) and MLflow tracking score it like a fine-tuned model.

The protocol is the weighted kNN of Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (CVPR 2018), used by MoCo to judge representations: cosine similarity to every labelled training
embedding, the ``k`` nearest vote with weight ``exp(similarity / T)``
(:func:`muscle_ext.metrics.embedding.knn_scores`). Nothing is trained; the backbone stays in eval mode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..metrics.embedding import extract_embeddings, knn_scores
from ..settings import SettingsError

__all__ = ["KNNClassifier", "check_knn_task"]

logger = logging.getLogger(__name__)


class KNNClassifier(nn.Module):
    """``forward(images (N, C, H, W)) -> (N, num_classes)`` log vote shares: a softmax of them gives back the kNN
    class scores (rows summing to 1), so the bundle's softmax post-processing and reports apply unchanged.

    Args:
        backbone: the frozen feature extractor (``(N, C, H, W) -> (N, D)`` pooled features).
        num_classes: classes of the task; labels are ``0 .. num_classes - 1``.
        k: neighbours that vote (at most the number of reference embeddings).
        temperature: ``T`` of the vote weights ``exp(similarity / T)``.

    Raises:
        RuntimeError: ``forward`` before :meth:`fit`.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, k: int = 20, temperature: float = 0.07) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self.num_classes, self.k, self.temperature = int(num_classes), int(k), float(temperature)
        self.register_buffer("reference_features", torch.empty(0), persistent=False)
        self.register_buffer("reference_labels", torch.empty(0, dtype=torch.long), persistent=False)

    def train(self, mode: bool = True) -> KNNClassifier:  # the backbone's batch norm never leaves eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def fit(self, loader: Iterable, image_key: str = "image", label_key: str = "label") -> KNNClassifier:
        """Embed every labelled image of ``loader`` (batches of ``{"image": (B, C, H, W), "label": (B,)}``, without
        augmentation) as the references the queries vote from.

        Raises:
            ValueError: a label outside ``0 .. num_classes - 1``, or no images.
        """
        device = next(self.backbone.parameters()).device
        features, labels = extract_embeddings(self.backbone, loader, device, image_key, label_key)
        labels = labels.long()
        if len(labels) == 0:
            raise ValueError("kNN needs labelled reference images; the training split is empty")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"kNN reference labels must lie in 0..{self.num_classes - 1}, got "
                             f"{sorted(set(labels.tolist()))}")
        self.reference_features, self.reference_labels = features.to(device), labels.to(device)
        logger.info(f"kNN: {len(labels)} reference embeddings of dimension {features.shape[1]}, k = {self.k}")
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.reference_labels.numel() == 0:
            raise RuntimeError("KNNClassifier.fit(loader) must run before the classifier scores images")
        query = self.backbone(images).float()
        scores = knn_scores(self.reference_features, self.reference_labels, query, self.num_classes, self.k,
                            self.temperature)
        return scores.clamp_min(1e-12).log()


def check_knn_task(task: str) -> None:
    """Refuse a task that kNN votes cannot score.

    Raises:
        SettingsError: ``task`` is not ``classification``; the message names the configs to use instead.
    """
    if task != "classification":
        raise SettingsError(f"knn.yaml scores classification tasks (class votes); this run's task is {task}: merge "
                            "it after classification.yaml, or judge a frozen backbone on this task with the task's "
                            "training config and --freeze_backbone true")
