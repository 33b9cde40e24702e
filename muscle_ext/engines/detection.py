"""Detection engines for MONAI's ``RetinaNetDetector``: batch preparation, loss, trainer and evaluator.

The detector takes a *list* of images and a list of target dicts, and returns its losses (train mode) or one dict of
boxes per image (eval mode), so the supervised engines' ``_iteration`` is replaced here, following the model zoo's
``lung_nodule_ct_detection`` bundle. Batches are lists of item dicts (``DataLoader(collate_fn=no_collation)``),
because images carry different numbers of boxes.

Boxes inside the engines are MONAI ``StandardMode`` on the network's input grid: ``[row_min, col_min, row_max,
col_max]`` for our ``(C, H, W)`` images (see :mod:`muscle_ext.data.boxes`);
:class:`~muscle_ext.data.boxes.SaveBoxesd` writes them back as ``[x1, y1, x2, y2]`` in pixels of each input file.
The validation metric is :class:`muscle_ext.metrics.DetectionCOCOMetric`, the test report
:class:`muscle_ext.handlers.DetectionReport`, the inference table's columns :class:`muscle_ext.handlers.BoxColumns`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from ..data.boxes import as_box_tensor
from .precision import autocast_on
from .trainer import StepTrainer

__all__ = [
    "DetectionEvaluator",
    "DetectionLoss",
    "DetectionPrepareBatch",
    "DetectionTrainer",
    "plain_images",
    "unwrap_detector",
    "with_target_keys",
]

logger = logging.getLogger(__name__)

LOSS_CLS = "loss_cls"
LOSS_BOX = "loss_box"


# ----------------------------------------------------------------------------------------------------------------
# batches, losses, precision


class DetectionPrepareBatch(PrepareBatch):
    """``prepare_batch`` for detectors: a list of item dicts -> ``(images, targets)``.

    ``images`` is a list of ``(C, H, W)`` tensors on ``device``; ``targets`` a list of ``{box_key: (N, 4) float32,
    label_key: (N,) int64}`` on ``device``, or ``None`` when the items have no boxes (inference).
    """

    def __init__(self, image_key: str = "image", box_key: str = "box", label_key: str = "label") -> None:
        self.image_key, self.box_key, self.label_key = image_key, box_key, label_key

    def __call__(self, batchdata: Sequence[Mapping[str, Any]], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[list[torch.Tensor], list[dict] | None]:
        if isinstance(batchdata, Mapping):
            raise TypeError("detection batches are lists of items: build the DataLoader with "
                            "collate_fn=monai.data.utils.no_collation")
        images = [item[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs) for item in batchdata]
        if not all(self.box_key in item for item in batchdata):
            return images, None
        targets = []
        for item in batchdata:
            boxes = as_box_tensor(item[self.box_key])
            labels = torch.as_tensor(item[self.label_key]).reshape(-1).to(torch.int64)
            if len(labels) != len(boxes):
                raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels in one item")
            targets.append({self.box_key: boxes.to(device=device, non_blocking=non_blocking),
                            self.label_key: labels.to(device=device, non_blocking=non_blocking)})
        return images, targets


class DetectionLoss:
    """Weighted sum of the detector's classification and box-regression losses (the detector computes both)."""

    def __init__(self, cls_weight: float = 1.0, box_weight: float = 1.0, cls_key: str = "classification",
                 box_key: str = "box_regression") -> None:
        self.cls_weight, self.box_weight = float(cls_weight), float(box_weight)
        self.cls_key, self.box_key = cls_key, box_key

    def __call__(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.cls_weight * losses[self.cls_key] + self.box_weight * losses[self.box_key]


def unwrap_detector(network: nn.Module) -> nn.Module:
    """The detector inside ``DistributedDataParallel``/``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if hasattr(network, "module"):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def _with_target_keys(network: nn.Module, box_key: str, label_key: str) -> nn.Module:
    # datalist items, targets and predictions then use the same names
    unwrap_detector(network).set_target_keys(box_key=box_key, label_key=label_key)
    return network


def _plain(x: torch.Tensor) -> torch.Tensor:
    # the detector pads, stacks and indexes its inputs: meta data only slows that down
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def plain_images(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The images of a detection batch as plain tensors (the detector pads, stacks and indexes them: MONAI's meta
    data would only slow that down)."""
    return [_plain(i) for i in images]


def with_target_keys(network: nn.Module, box_key: str = "box", label_key: str = "label") -> nn.Module:
    """``network`` (a MONAI ``RetinaNetDetector``, possibly wrapped) with its target keys set to the datalist's,
    so that items, targets and predictions use the same names. Returns the same object."""
    return _with_target_keys(network, box_key, label_key)


# ----------------------------------------------------------------------------------------------------------------
# engines


class DetectionTrainer(StepTrainer):
    """One iteration = one detector step: ``network(images, targets)`` in train mode returns the classification and
    box-regression losses; their weighted sum (``loss_function``) is back-propagated.

    ``engine.state.output`` is ``{"loss", "loss_cls", "loss_box"}`` (detached tensors), so MONAI's handlers work
    as with ``SupervisedTrainer`` (``StatsHandler(output_transform=from_engine(["loss"], first=True))``). A
    ``LOSS_COMPLETED`` handler may replace ``engine.state.output["loss"]`` (regularisers).

    Arguments not named here are ``SupervisedTrainer``'s, passed on to it. Args that differ:
        prepare_batch: :class:`DetectionPrepareBatch` with ``image_key``/``box_key``/``label_key`` by default.
        decollate: off by default (the outputs are per-batch losses).
        inferer: called as ``inferer(images, network, targets)`` (``SimpleInferer`` by default).
        network: a MONAI ``RetinaNetDetector`` (or a wrapper of one); its target keys are set to ``box_key`` and
            ``label_key`` so that datalist items, targets and predictions use the same names.
        loss_function: maps the detector's loss dict to the loss; :class:`DetectionLoss` when ``None``.
        amp / amp_kwargs: autocast on the trainer's device type (``amp_kwargs={"dtype": torch.bfloat16}`` on CPU); a
            ``GradScaler`` is used only for float16 on CUDA.
        max_grad_norm: clip the gradient norm before each optimiser step (``None``: no clipping).
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Iterable | DataLoader,
                 network: nn.Module, optimizer: Optimizer,
                 loss_function: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                 prepare_batch: Callable | None = None, image_key: str = "image", box_key: str = "box",
                 label_key: str = "label", decollate: bool = False, max_grad_norm: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader,
                         network=_with_target_keys(network, box_key, label_key), optimizer=optimizer,
                         loss_function=DetectionLoss() if loss_function is None else loss_function,
                         prepare_batch=DetectionPrepareBatch(image_key, box_key, label_key) if prepare_batch is None
                         else prepare_batch,
                         decollate=decollate, **kwargs)
        self.max_grad_norm = max_grad_norm

    def _iteration(self, engine: DetectionTrainer, batchdata: Sequence[dict]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                               **engine.to_kwargs)[:2]
        if targets is None:
            raise ValueError("training items need boxes and labels")
        images = [_plain(i) for i in images]
        should_zero_grad, should_step = engine._accumulation_flags()
        detector = unwrap_detector(engine.network)
        engine.state.output = {}
        engine.network.train()
        if should_zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        with engine.autocast():
            losses = engine.inferer(images, engine.network, targets)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[LOSS_CLS] = losses[detector.cls_key].float()
            engine.state.output[LOSS_BOX] = losses[detector.box_reg_key].float()
            engine.state.output[Keys.LOSS] = engine.loss_function(losses).float()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        # a LOSS_COMPLETED handler may have replaced the loss
        engine.backward_and_step(engine.state.output[Keys.LOSS], step=should_step, max_grad_norm=engine.max_grad_norm)

        output = engine.state.output
        for key in (Keys.LOSS, LOSS_CLS, LOSS_BOX):
            output[key] = output[key].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output


class DetectionEvaluator(SupervisedEvaluator):
    """Runs the detector in eval mode; ``engine.state.output`` is one dict per image:
    ``{"image": input (MetaTensor, for writers), "pred": {box, label, label_scores}, "label": {box, label} or None}``,
    so ``from_engine(["pred", "label"])`` feeds :class:`~muscle_ext.metrics.DetectionCOCOMetric`. Boxes are on the
    input grid.

    Arguments not named here are ``SupervisedEvaluator``'s, passed on to it; ``prepare_batch`` and
    ``image_key``/``box_key``/``label_key`` as in :class:`DetectionTrainer`, ``decollate`` off by default (the
    outputs are already per image); ``amp`` autocasts on the evaluator's device type. Items without boxes
    (inference) get ``"label": None``.
    """

    def __init__(self, device: str | torch.device, val_data_loader: Iterable | DataLoader, network: nn.Module,
                 prepare_batch: Callable | None = None, image_key: str = "image", box_key: str = "box",
                 label_key: str = "label", decollate: bool = False, **kwargs: Any) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader,
                         network=_with_target_keys(network, box_key, label_key),
                         prepare_batch=DetectionPrepareBatch(image_key, box_key, label_key) if prepare_batch is None
                         else prepare_batch,
                         decollate=decollate, **kwargs)

    def _iteration(self, engine: DetectionEvaluator, batchdata: Sequence[dict]) -> list[dict]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                               **engine.to_kwargs)[:2]
        with engine.mode(engine.network), autocast_on(engine.state.device, engine.amp, **engine.amp_kwargs):
            predictions = engine.inferer([_plain(i) for i in images], engine.network)
        # boxes and scores in float32 whatever the autocast dtype: metrics and writers need exact coordinates
        predictions = [{k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in p.items()}
                       for p in predictions]
        engine.state.output = [
            {Keys.IMAGE: image, Keys.PRED: pred, Keys.LABEL: None if targets is None else targets[i]}
            for i, (image, pred) in enumerate(zip(images, predictions, strict=True))
        ]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
