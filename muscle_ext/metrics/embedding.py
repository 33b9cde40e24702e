"""Judging a frozen backbone by its embeddings: weighted kNN and a linear probe (logistic regression)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

__all__ = ["collapse_score", "embedding_map_2d", "extract_embeddings", "knn_scores", "linear_probe_scores"]


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
    """Class probabilities ``(M, C)`` of an L2-regularised logistic regression on standardised features (the usual
    linear evaluation, without augmentation): scikit-learn's ``StandardScaler`` (training mean and population std) and
    ``LogisticRegression`` (L-BFGS; multinomial for ``C > 2`` classes, one logit for two). Deterministic, and
    it leaves the caller's RNGs alone.

    ``weight_decay`` keeps its meaning of the objective ``mean cross-entropy + weight_decay * ||W||^2`` of a softmax
    layer with one weight row per class (the bias is not penalised): scikit-learn minimises
    ``sum cross-entropy + ||W||^2 / (2 C_reg)``, so ``C_reg = 1 / (2 n weight_decay)``; with two classes its single
    weight row is the difference of the two softmax rows, whose optimum ``w_1 = -w_0`` halves the penalty:
    ``C_reg = 1 / (n weight_decay)``. Columns of classes absent from the training labels are 0.
    """
    x = train_features.detach().cpu().double().numpy()
    y = train_labels.detach().cpu().long().numpy()
    query = query_features.detach().cpu().double().numpy()
    classes = np.unique(y)
    probs = np.zeros((len(query), num_classes))
    if len(classes) == 1:  # nothing to separate: LogisticRegression refuses one class
        probs[:, classes[0]] = 1.0
        return torch.from_numpy(probs).float()
    c_reg = 1.0 / (len(y) * weight_decay * (1 if len(classes) == 2 else 2))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c_reg, max_iter=max_iter, tol=1e-6))
    probe.fit(x, y)
    probs[:, classes] = probe.predict_proba(query)
    return torch.from_numpy(probs).float()


def collapse_score(features: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised embeddings times sqrt(D): about 1 for well-spread embeddings,
    0 when every image maps to the same point (collapse)."""
    z = F.normalize(features.float(), dim=1)
    return float(z.std(dim=0).mean() * np.sqrt(z.shape[1]))


def frozen_backbone_report(backbone: nn.Module, reference_loader: Iterable, query_loader: Iterable,
                           device: torch.device | str = "cpu", k: int = 20, n_resamples: int = 1000,
                           seed: int = 0, scores_path: str | os.PathLike | None = None) -> dict:
    """Judge a frozen backbone on a labelled binary task: kNN and linear-probe ROC AUC (with 95% bootstrap CI) on
    the query set, fitted on the reference set; plus the embedding spread (collapse check).

    ``scores_path``: also write each query case's label and positive-class scores as CSV (``index`` = position in
    the query loader, no file names), so that two backbones can be compared case by case
    (``muscle_ext.metrics.paired_difference_ci``).
    """
    from .bootstrap import bootstrap_ci, ci_dict
    from .classification import roc_auc
    from .report import write_case_scores

    ref_x, ref_y = extract_embeddings(backbone, reference_loader, device)
    query_x, query_y = extract_embeddings(backbone, query_loader, device)
    num_classes = int(max(ref_y.max(), query_y.max())) + 1
    scores = {
        "knn": knn_scores(ref_x, ref_y, query_x, num_classes, k=k),
        "linear_probe": linear_probe_scores(ref_x, ref_y, query_x, num_classes),
    }
    y = query_y.numpy()
    report: dict = {"n_reference": len(ref_y), "n_query": len(query_y), "feature_dim": int(ref_x.shape[1]),
                    "embedding_spread": collapse_score(query_x)}
    for name, probs in scores.items():
        p = probs.numpy()
        report[f"{name}_accuracy"] = float((p.argmax(1) == y).mean())
        if num_classes == 2:
            report[f"{name}_auc"] = ci_dict(bootstrap_ci(roc_auc, y, p[:, 1], n_resamples=n_resamples, seed=seed))
    if scores_path is not None and num_classes != 2:
        Path(scores_path).unlink(missing_ok=True)  # never leave an earlier run's scores next to this report
    elif scores_path is not None:
        write_case_scores(scores_path, {"label": y, **{name: p[:, 1].numpy() for name, p in scores.items()}})
    return report


def embedding_map_2d(features: np.ndarray | torch.Tensor, seed: int = 0) -> np.ndarray:
    """A 2-D map ``(N, 2)`` of embeddings ``(N, D)`` for a figure: scikit-learn's t-SNE (van der Maaten & Hinton
    2008) on the standardised features, PCA initialisation, perplexity ``min(30, (N - 1) / 3)``, fixed ``seed``.

    Raises:
        ValueError: fewer than 4 embeddings (t-SNE needs a neighbourhood).
    """
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 4:
        raise ValueError(f"embedding_map_2d needs (N >= 4, D) features, got shape {x.shape}")
    x = StandardScaler().fit_transform(x)
    perplexity = float(min(30.0, (len(x) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)

