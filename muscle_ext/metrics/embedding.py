"""Judging a frozen backbone by its embeddings: weighted kNN and a linear probe (logistic regression)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["collapse_score", "extract_embeddings", "knn_scores", "linear_probe_scores"]


@torch.no_grad()
def extract_embeddings(backbone: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                       image_key: str = "image", label_key: str = "label",
                       autocast: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features ``(N, D)`` (float32, on CPU) and labels ``(N,)`` of a labelled loader, backbone in eval mode
    (restored afterwards)."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for batch in loader:
            images = torch.as_tensor(batch[image_key]).to(device)
            with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                out = backbone(images)
            features.append(out.float().cpu())
            labels.append(torch.as_tensor(batch[label_key]).view(-1).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class scores ``(M, C)`` of a cosine-similarity kNN with ``exp(sim / T)`` vote weights (Wu et al. 2018,
    the monitor used by MoCo and InstDisc). Rows sum to 1, so column 1 serves as a binary score for ROC AUC."""
    train = F.normalize(train_features.float(), dim=1)
    query = F.normalize(query_features.float(), dim=1)
    k = min(k, train.shape[0])
    similarity, neighbour = (query @ train.T).topk(k, dim=1)
    weights = (similarity / temperature).exp()
    votes = F.one_hot(train_labels.long()[neighbour], num_classes).float() * weights.unsqueeze(-1)
    scores = votes.sum(dim=1)
    return scores / scores.sum(dim=1, keepdim=True)


def linear_probe_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                        num_classes: int, weight_decay: float = 1e-3, max_iter: int = 200) -> torch.Tensor:
    """Softmax probabilities ``(M, C)`` of an L2-regularised logistic regression fitted with L-BFGS on
    standardised features (the usual linear evaluation, without augmentation)."""
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    x = ((train_features - mean) / std).double()
    y = train_labels.long()
    torch.manual_seed(0)
    probe = nn.Linear(x.shape[1], num_classes).double()
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return probe(((query_features - mean) / std).double()).softmax(dim=1).float()


def collapse_score(features: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised embeddings times sqrt(D): about 1 for well-spread embeddings,
    0 when every image maps to the same point (collapse)."""
    z = F.normalize(features.float(), dim=1)
    return float(z.std(dim=0).mean() * np.sqrt(z.shape[1]))
