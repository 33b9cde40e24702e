"""Adapting a trained binary classifier to a new site with a few labelled cases (issue #20).

A task model trained at one site (``models/model.pt``) meets a second site: other scanners, other patients (adults
vs children). Given ``k`` labelled patients per class of the new site (:func:`draw_shots`, a nested, stratified,
patient-grouped k-shot set that never touches the evaluation cases) and the new site's unlabelled images,
:func:`adapt_model` applies one method:

- ``none``: the source model as it is (the reference);
- ``recalibrate``: the weights stay; a temperature (Guo et al., "On Calibration of Modern Neural Networks", ICML
  2017) or Platt map (Platt 1999, "Probabilistic outputs for support vector machines") of the positive-class
  probability and an operating threshold (Youden's J) are fitted on the k shots. The ranking, hence ROC AUC, is
  unchanged; sensitivity and specificity at the threshold move;
- ``adabn``: every batch-norm layer's running statistics re-estimated on the new site's unlabelled images (AdaBN,
  Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", ICLR-W 2017); no label is used;
- ``head``: the linear head re-trained on the frozen backbone's features of the k shots, pulled towards the
  source head (L2-SP, below);
- ``finetune_l2sp``: every weight fine-tuned on the k shots with an L2-SP pull towards the source weights (Li,
  Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional Networks", ICML 2018; the
  penalty of our continual stage, :func:`muscle_ext.networks.regularizers.l2sp_penalty`);

and the combinations ``adabn+recalibrate``, ``adabn+head`` and ``adabn+finetune_l2sp`` (AdaBN first).
``finetune_l2sp`` stops early on a held-out part of the k shots (:func:`split_shots`: stratified, grouped by
patient), keeping the weights of the epoch with the lowest held-out cross-entropy (epoch 0: the unchanged model).

Images are tensors ``(N, C, H, W)`` pre-processed and normalised as the model expects (the bundle's
``preprocessing`` + ``normalize``); labels are 0/1, shape ``(N,)``; probabilities are of label 1 (softmax of the two
logits). :func:`save_adapted_model` writes a ``muscle-model/1`` file whose ``settings["adaptation"]`` records the
method, ``k``, the draw, the target datalist's name and the k-shot entries, the fitted map and the metrics.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from numpy.typing import ArrayLike
from scipy.special import expit, logit
from torch import nn

from ..data import k_shot_subset, label_fraction_subset
from ..metrics import binary_classification_report
from ..metrics.calibration import fit_recalibration, operating_threshold
from ..networks import adapt_batchnorm, describe_weights, find_backbone, load_backbone_checkpoint
from ..networks.model_settings import MODEL_FORMAT, plain_settings
from ..networks.regularizers import l2sp_penalty, named_trainable, snapshot
from ..settings import SettingsError

__all__ = [
    "ADAPTATION_METHODS",
    "AdaptationConfig",
    "AdaptationResult",
    "Recalibration",
    "adapt_model",
    "check_adaptation_paths",
    "datalist_name",
    "decode_batches",
    "draw_shots",
    "evaluate_adapted",
    "fit_operating_point",
    "load_images",
    "method_steps",
    "predict_probabilities",
    "replace_backbone",
    "save_adapted_model",
    "split_shots",
]

logger = logging.getLogger(__name__)

ADAPTATION_METHODS = ("none", "recalibrate", "adabn", "adabn+recalibrate", "head", "finetune_l2sp", "adabn+head",
                      "adabn+finetune_l2sp")
_EPS = 1e-6  # probabilities are clipped to [_EPS, 1 - _EPS] before the logit, as metrics.calibration does


def method_steps(method: str) -> tuple[str, ...]:
    """The steps of ``method`` in the order they run: ``"adabn+recalibrate"`` -> ``("adabn", "recalibrate")``,
    ``"none"`` -> ``()``.

    Raises:
        ValueError: ``method`` is not one of :data:`ADAPTATION_METHODS`.
    """
    if method not in ADAPTATION_METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; choose one of {', '.join(ADAPTATION_METHODS)}")
    return () if method == "none" else tuple(method.split("+"))


# ------------------------------------------------------------------------------------------------- the k shots
def draw_shots(pool: Sequence[Mapping[str, Any]], k: int, draw: int = 0,
               exclude: Sequence[Mapping[str, Any]] = (), label_key: str = "label",
               group_key: str | None = "patient_id") -> tuple[list[dict], list[int]]:
    """The k-shot slice of the new site: ``k`` patients of every class of ``pool`` (all their images), nested across
    ``k`` for one ``draw``, never an image or patient of ``exclude`` (:func:`muscle_ext.data.k_shot_subset`).

    Args:
        pool: the new site's labelled entries to draw from (its ``training`` section).
        k: patients per class.
        draw: the seed; draws 0, 1, ... are independent slices, and for one draw the 5-shot slice lies inside the
            10-shot one.
        exclude: the evaluation entries (the ``test`` section).

    Returns:
        ``(entries, indices)``: the drawn entries and their positions in ``pool``, in pool order.

    Raises:
        SettingsError: a class of the pool (after ``exclude``) has fewer than ``k`` patients, or ``k < 1``; the
            message names ``--k``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SettingsError(f"--k {k!r}: give a whole number of patients per class >= 1")
    tagged = [{**dict(e), "_entry": i} for i, e in enumerate(pool)]
    available = k_shot_subset(tagged, 10**9, seed=int(draw), label_key=label_key, group_key=group_key,
                              exclude=exclude)
    per_class: dict[Any, set] = {}
    for e in available:
        per_class.setdefault(e[label_key], set()).add(e.get(group_key) if group_key and e.get(group_key) is not None
                                                      else f"#{e['_entry']}")
    short = {c: len(p) for c, p in sorted(per_class.items(), key=lambda cp: str(cp[0])) if len(p) < k}
    if short or len(per_class) < 2:
        counts = ", ".join(f"class {c}: {len(p)}" for c, p in sorted(per_class.items(), key=lambda cp: str(cp[0])))
        raise SettingsError(f"--k {k}: the pool has fewer than {k} patients in a class outside the evaluation cases "
                            f"({counts or 'no entries'}); lower --k")
    drawn = k_shot_subset(tagged, int(k), seed=int(draw), label_key=label_key, group_key=group_key, exclude=exclude)
    indices = [int(e.pop("_entry")) for e in drawn]
    return drawn, indices


def split_shots(labels: Sequence[int], groups: Sequence[Any] | None = None, val_share: float = 0.2,
                seed: int = 0) -> tuple[list[int], list[int]]:
    """Positions of the k shots that train and that stop training early: ``val_share`` of each class's patients
    (at least one) held out, grouped by patient (:func:`muscle_ext.data.label_fraction_subset`).

    Returns:
        ``(train, held_out)``: sorted positions into ``labels``.

    Raises:
        ValueError: ``val_share`` outside (0, 1), or a class with fewer than two patients (nothing left to train).
    """
    if not 0 < float(val_share) < 1:
        raise ValueError(f"val_share must be in (0, 1), got {val_share}")
    records = [{"label": int(y), "patient_id": None if groups is None else groups[i], "position": i}
               for i, y in enumerate(labels)]
    held = {r["position"] for r in label_fraction_subset(records, float(val_share), seed, min_per_class=1)}
    train = [i for i in range(len(records)) if i not in held]
    if {int(labels[i]) for i in train} != {int(y) for y in labels}:
        raise ValueError("too few shots to hold some out for early stopping: every class needs at least two patients")
    return train, sorted(held)


def decode_batches(items: Sequence[Mapping[str, Any]], transform: Callable, batch_size: int = 32,
                   num_workers: int = 0, image_key: str = "image",
                   label_key: str = "label") -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Decode and pre-process ``items`` in their order, a batch at a time: ``(images (B, C, H, W) float32, labels
    (B,) int64 or None)``.

    ``transform`` is the dictionary chain the model was trained behind (the bundle's ``preprocessing`` +
    ``normalize``, optionally a ``target`` transform); labels are ``None`` when the batch has none (unlabelled
    images) and class indices when the transform made them one-hot ``(B, classes)``. Images are plain tensors (no
    MONAI meta data)."""
    loader = DataLoader(Dataset(list(items), transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    for batch in loader:
        # plain tensors: MetaTensors of images of different sizes cannot be sliced again (inconsistent meta data)
        images = torch.as_tensor(batch[image_key]).as_subclass(torch.Tensor).float()
        labels = None
        if label_key in batch:
            labels = torch.as_tensor(batch[label_key])
            one_hot = labels.ndim > 1 and labels.shape[1] > 1
            labels = (labels.argmax(dim=1) if one_hot else labels.view(-1)).long()
        yield images, labels


def load_images(items: Sequence[Mapping[str, Any]], transform: Callable, batch_size: int = 32,
                num_workers: int = 0, image_key: str = "image",
                label_key: str = "label") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode and pre-process ``items`` once (:func:`decode_batches`): ``(images (N, C, H, W) float32, labels (N,)
    int64 or None)``; labels are ``None`` when an item has none (unlabelled images).

    Raises:
        ValueError: no items."""
    images, labels = [], []
    for batch_images, batch_labels in decode_batches(items, transform, batch_size, num_workers, image_key, label_key):
        images.append(batch_images)
        if batch_labels is not None:
            labels.append(batch_labels)
    if not images:
        raise ValueError("no images to load")
    return torch.cat(images), (torch.cat(labels) if len(labels) == len(images) else None)


# ------------------------------------------------------------------------------------------------ recalibration
@dataclass(frozen=True)
class Recalibration:
    """``p' = sigmoid(scale * logit(p) + bias)`` and a threshold on ``p'`` (positive when ``p' >= threshold``).

    Temperature scaling is ``scale = 1 / T``, ``bias = 0``; Platt scaling fits both. ``scale > 0`` keeps the ranking
    (ROC AUC unchanged)."""

    method: str
    scale: float
    bias: float
    threshold: float

    def __call__(self, probabilities: ArrayLike) -> np.ndarray:
        """Recalibrated probabilities ``(N,)`` of ``(N,)`` (or ``(N, 2)``) positive-class probabilities."""
        p = np.clip(np.asarray(probabilities, dtype=float).reshape(len(probabilities), -1)[:, -1], _EPS, 1 - _EPS)
        return expit(self.scale * logit(p) + self.bias)

    def as_record(self) -> dict[str, Any]:
        return {"method": self.method, "scale": float(self.scale), "bias": float(self.bias),
                "threshold": float(self.threshold)}


def fit_operating_point(labels: ArrayLike, probabilities: ArrayLike, calibration: str = "temperature",
                        rule: str = "youden") -> Recalibration:
    """Fit the recalibration map on the k shots (:func:`muscle_ext.metrics.calibration.fit_recalibration`) and the
    threshold on the recalibrated probabilities of the same shots (:func:`operating_threshold`, ``rule``).

    Args:
        labels: ``(N,)`` 0/1 labels of the shots; both classes needed.
        probabilities: ``(N,)`` positive-class probabilities of the model being recalibrated.
        calibration: ``temperature`` or ``platt``.

    Raises:
        ValueError: one class only, an unknown ``calibration`` or ``rule``.
    """
    fitted = fit_recalibration(labels, probabilities, calibration)
    if hasattr(fitted, "temperature"):
        scale, bias = 1.0 / float(fitted.temperature), 0.0
    else:  # Platt: sigmoid(a * z + b); read a and b back from two points of the fitted map
        z = np.array([-0.5, 0.5])
        out = logit(np.clip(fitted(expit(z)), 1e-15, 1 - 1e-15))
        scale, bias = float((out[1] - out[0]) / (z[1] - z[0])), float(out.mean())
    draft = Recalibration(calibration, scale, bias, 0.5)
    threshold = operating_threshold(labels, draft(probabilities), rule)
    return Recalibration(calibration, scale, bias, float(threshold))


# ----------------------------------------------------------------------------------------------- the adaptation
@dataclass
class AdaptationConfig:
    """How ``head`` and ``finetune_l2sp`` train and how recalibration is fitted (ours, chosen for k <= 20).

    Attributes:
        calibration: ``temperature`` (one parameter: safe with 10 cases) or ``platt``.
        val_share: share of each class's shot patients held out for early stopping of ``finetune_l2sp`` (at
            least one patient).
        l2sp_weight: strength of the pull towards the source weights (``weight / 2 * ||w - w_source||^2``, every
            trained parameter; as the continual stage's default, 0.01).
        head_lr, head_epochs: AdamW on the cached features of every shot, one full batch per epoch.
        finetune_lr, finetune_epochs: AdamW on the whole network, batches of ``batch_size`` shots.
        patience: epochs without a lower held-out loss before stopping.
        batch_size: shots per step (fine-tuning) and images per forward pass (prediction, AdaBN).
        seed: the split of the shots and the order of the batches.
    """

    calibration: str = "temperature"
    val_share: float = 0.2
    l2sp_weight: float = 0.01
    head_lr: float = 1e-2
    head_epochs: int = 200
    finetune_lr: float = 3e-4
    finetune_epochs: int = 30
    patience: int = 5
    batch_size: int = 32
    seed: int = 0


@dataclass
class AdaptationResult:
    """The adapted model (the same module object, changed in place), its recalibration (``None``: probabilities as
    the model gives them, threshold 0.5) and how training went (``history``: ``epochs``; fine-tuning also
    ``best_epoch``, ``stopped_early``, ``held_out_loss`` per epoch; empty without training)."""

    model: nn.Module
    method: str
    recalibration: Recalibration | None = None
    history: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return 0.5 if self.recalibration is None else self.recalibration.threshold

    def probabilities(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """``(N,)`` positive-class probabilities of the adapted model, recalibrated when the method recalibrates."""
        p = predict_probabilities(self.model, images, batch_size)
        return p if self.recalibration is None else self.recalibration(p)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, batch_size: int = 64,
                          inferer: Callable | None = None, device: str | torch.device | None = None) -> np.ndarray:
    """``(N,)`` softmax probability of label 1 (float64) for ``images (N, C, H, W)``, in eval mode and without
    gradients (the model's mode is restored, also on an error).

    Args:
        model: a two-class model (two logits per image).
        images: pre-processed and normalised as the model expects.
        batch_size: images per forward pass.
        inferer: ``inferer(images, model)`` in place of ``model(images)``, e.g. an evaluator's
            :class:`~muscle_ext.engines.AutocastInferer` (``None``: ``model(images)``).
        device: where the images go (``None``: the device of the model's first parameter).
    """
    was_training = model.training
    model.eval()
    device = _device(model) if device is None else torch.device(device)
    out = []
    try:
        for i in range(0, len(images), batch_size):
            batch = images[i:i + batch_size].to(device)
            logits = model(batch) if inferer is None else inferer(batch, model)
            out.append(torch.softmax(torch.as_tensor(logits).float(), dim=1)[:, 1].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(float)


def _freeze_batchnorm_statistics(model: nn.Module) -> None:
    # a batch of a few shots gives noisy statistics; the source's (or AdaBN's) running statistics stay as they are
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _train_early_stopping(module: nn.Module, optimizer: torch.optim.Optimizer, epoch_step: Callable[[], None],
                          held_out_loss: Callable[[], float], epochs: int, patience: int) -> dict[str, Any]:
    """Run ``epoch_step`` up to ``epochs`` times; after each (and before the first) score ``held_out_loss``; stop
    after ``patience`` epochs without a lower one and restore ``module``'s state of the best epoch."""
    losses = [held_out_loss()]
    best, best_epoch, best_state = losses[0], 0, copy.deepcopy(module.state_dict())
    for epoch in range(1, int(epochs) + 1):
        epoch_step()
        losses.append(held_out_loss())
        if losses[-1] < best:
            best, best_epoch, best_state = losses[-1], epoch, copy.deepcopy(module.state_dict())
        elif epoch - best_epoch >= int(patience):
            break
    module.load_state_dict(best_state)
    epochs_run = len(losses) - 1
    return {"epochs": epochs_run, "best_epoch": best_epoch, "stopped_early": epochs_run < int(epochs),
            "held_out_loss": [float(v) for v in losses]}


def _retrain_head(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  config: AdaptationConfig) -> dict[str, Any]:
    """The head alone on the frozen backbone's pooled features of every shot (computed once, in eval mode), for
    ``head_epochs`` full-batch steps. No early stopping: a linear head on fixed features is a convex problem whose
    regulariser is the L2-SP pull, and holding shots out would leave 8 of 10 cases at k = 5 to fit it."""
    backbone, head = find_backbone(model), getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no `head` module: head re-training needs a BackboneClassifier")
    device = _device(model)
    with torch.no_grad():
        was_training = backbone.training
        backbone.eval()
        features = torch.cat([backbone(images[i:i + config.batch_size].to(device))
                              for i in range(0, len(images), config.batch_size)])
        backbone.train(was_training)
    labels = labels.to(device)
    params = named_trainable(head)
    anchor = snapshot(params)
    optimizer = torch.optim.AdamW(params.values(), lr=config.head_lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    losses = []
    for _ in range(int(config.head_epochs)):
        optimizer.zero_grad()
        loss = loss_fn(head(features), labels)
        (loss + config.l2sp_weight * l2sp_penalty(params, anchor)).backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    head.eval()
    return {"epochs": int(config.head_epochs), "train_loss": [losses[0], losses[-1]] if losses else []}


def _finetune_l2sp(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, train: list[int],
                   held: list[int], config: AdaptationConfig) -> dict[str, Any]:
    """Every weight on the training shots, cross-entropy + L2-SP towards the source weights; batch norm keeps its
    running statistics."""
    device = _device(model)
    params = named_trainable(model)
    anchor = snapshot(params)
    optimizer = torch.optim.AdamW(params.values(), lr=config.finetune_lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(int(config.seed))
    train_images, train_labels = images[train], labels[train]

    def step() -> None:
        model.train()
        _freeze_batchnorm_statistics(model)
        order = torch.randperm(len(train_images), generator=generator)
        for i in range(0, len(order), config.batch_size):
            batch = order[i:i + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(train_images[batch].to(device)), train_labels[batch].to(device))
            (loss + config.l2sp_weight * l2sp_penalty(params, anchor)).backward()
            optimizer.step()

    @torch.no_grad()
    def held_out() -> float:
        model.eval()
        return float(loss_fn(model(images[held].to(device)), labels[held].to(device)))

    history = _train_early_stopping(model, optimizer, step, held_out, config.finetune_epochs, config.patience)
    model.eval()
    return history


def adapt_model(model: nn.Module, method: str, shots: tuple[torch.Tensor, torch.Tensor],
                unlabelled: torch.Tensor | Iterable[Any] | None = None, groups: Sequence[Any] | None = None,
                config: AdaptationConfig | None = None) -> AdaptationResult:
    """Adapt a trained two-class model to a new site with ``method`` (:data:`ADAPTATION_METHODS`).

    Args:
        model: the source model (a :class:`~muscle_ext.networks.BackboneClassifier`: ``forward`` gives two logits),
            changed in place; pass a copy to keep the source.
        method: ``none``, ``recalibrate``, ``adabn``, ``adabn+recalibrate``, ``head``, ``finetune_l2sp``,
            ``adabn+head`` or ``adabn+finetune_l2sp``.
        shots: ``(images (N, C, H, W), labels (N,) 0/1)`` of the k-shot slice (both classes).
        unlabelled: the new site's unlabelled images for AdaBN: a ``(M, C, H, W)`` tensor (split into batches of
            ``config.batch_size``) or an iterable of batches; the shots' images when ``None``.
        groups: the shots' patient ids (``(N,)``), so that held-out shots never share a patient with training ones;
            ``None``: every shot its own patient.
        config: training and recalibration settings (:class:`AdaptationConfig`).

    Returns:
        :class:`AdaptationResult`; the model is left in eval mode.

    Raises:
        ValueError: an unknown method, shots of one class, too few shots to hold some out (``finetune_l2sp``: two
            patients per class at least), or a model without batch norm for AdaBN.
    """
    steps = method_steps(method)
    config = config or AdaptationConfig()
    images, labels = shots
    labels = torch.as_tensor(labels).long().view(-1)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} shot images for {len(labels)} labels")
    if set(labels.tolist()) != {0, 1}:
        raise ValueError(f"the shots must hold both classes (0 and 1), got {sorted(set(labels.tolist()))}")
    result = AdaptationResult(model=model, method=method)
    if "adabn" in steps:
        source = images if unlabelled is None else unlabelled
        batches = ([source[i:i + config.batch_size] for i in range(0, len(source), config.batch_size)]
                   if isinstance(source, torch.Tensor) else source)
        adapt_batchnorm(model, batches)
    if "head" in steps:
        result.history = _retrain_head(model, images, labels, config)
    if "finetune_l2sp" in steps:
        train, held = split_shots(labels.tolist(), groups, config.val_share, config.seed)
        result.history = _finetune_l2sp(model, images, labels, train, held, config)
    model.eval()
    if "recalibrate" in steps:
        result.recalibration = fit_operating_point(labels.numpy(), predict_probabilities(model, images,
                                                                                         config.batch_size),
                                                   config.calibration)
    return result


def replace_backbone(model: nn.Module, path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Load a backbone checkpoint (``muscle-backbone/1``, ``weights_only=True``) into ``model``'s backbone, the
    head kept: the continual pre-training path, where MD-MoCo continued on the new site's unlabelled images (the
    pretrain bundle with ``--init checkpoint``) gives the backbone and a head method then re-fits the head on the k
    shots. ``None`` leaves the model as it is.

    Returns:
        What the adapted model records of the file (:func:`muscle_ext.networks.describe_weights`), or ``None``.

    Raises:
        SettingsError: the file is not a backbone checkpoint, or its architecture does not fit the model's backbone
            (``--continued_backbone`` named, with the fix).
    """
    if not path:
        return None
    try:
        payload = load_backbone_checkpoint(path)
        find_backbone(model).load_state_dict(payload["state_dict"], strict=True)
    except (ValueError, RuntimeError, KeyError) as error:
        raise SettingsError(f"--continued_backbone {path}: {str(error).splitlines()[0]}; give the backbone.pt that "
                            "MD-MoCo continued from this model's own backbone (same architecture)") from None
    logger.info(f"backbone replaced by {Path(path).name} (continued pre-training); the head is the source model's")
    return describe_weights(path)


# ------------------------------------------------------------------------------------------- scoring and saving
def datalist_name(path: str | os.PathLike) -> str:
    """What a model file records of a datalist: its folder's name for ``<name>/datalist.json`` (the corpus layout),
    else the file's stem; never the path (it may name a hospital's folders)."""
    path = Path(path)
    return path.parent.name if path.stem == "datalist" and path.parent.name else path.stem


def check_adaptation_paths(model_path: str | os.PathLike, output_model: str | os.PathLike) -> None:
    """Refuse to write the adapted model over the model it adapts.

    Raises:
        SettingsError: both name the same file; the message names ``--output_dir``.
    """
    if os.path.realpath(model_path) == os.path.realpath(output_model):
        raise SettingsError(f"--output_dir: the adapted model would overwrite its source {model_path}; give another "
                            "--output_dir")


def evaluate_adapted(result: AdaptationResult, images: torch.Tensor, labels: ArrayLike, n_bootstrap: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity (at the result's threshold, on its recalibrated probabilities) and ROC AUC
    with 95 % stratified bootstrap CIs (:func:`muscle_ext.metrics.binary_classification_report`) on ``images``."""
    return binary_classification_report(np.asarray(labels), result.probabilities(images), result.threshold,
                                        n_resamples=int(n_bootstrap), seed=int(seed))


def save_adapted_model(path: str | os.PathLike, result: AdaptationResult, settings: Mapping[str, Any],
                       record: Mapping[str, Any]) -> Path:
    """Write the adapted model as ``{"model": state dict, "settings": {...}}`` (``muscle-model/1``, readable with
    ``torch.load(weights_only=True)``): the source's ``settings`` (image size, normalisation, classes, ...) plus
    ``settings["adaptation"]`` = ``record`` (e.g. ``target_datalist``, ``k``, ``draw``, ``shot_entries``,
    ``metrics``) with the method, the recalibration and the training history. Written atomically.

    Raises:
        TypeError: ``record`` or ``settings`` holds a value that is not plain (see
            :func:`muscle_ext.networks.model_settings.plain_settings`).
    """
    path = Path(path)
    adaptation = {**dict(record), "method": result.method,
                  "recalibration": None if result.recalibration is None else result.recalibration.as_record(),
                  "threshold": result.threshold, "history": result.history}
    payload = {"model": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
               "settings": {**plain_settings(dict(settings)), "format": MODEL_FORMAT,
                            "adaptation": plain_settings(adaptation, "adaptation")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)  # a reader never sees half a file
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    logger.info(f"adapted model ({result.method}) written to {path}")
    return path
