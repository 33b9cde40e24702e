"""Detection engines for MONAI's ``RetinaNetDetector``: trainer, evaluator, validation metric, test report.

The detector takes a *list* of images and a list of target dicts, and returns its losses (train mode) or one dict of
boxes per image (eval mode), so the supervised engines' ``_iteration`` is replaced here, following the model zoo's
``lung_nodule_ct_detection`` bundle. Batches are lists of item dicts (``DataLoader(collate_fn=no_collation)``),
because images carry different numbers of boxes.

Boxes inside the engines are MONAI ``StandardMode`` on the network's input grid: ``[row_min, col_min, row_max,
col_max]`` for our ``(C, H, W)`` images (see :mod:`muscle_ext.data.boxes`);
:class:`~muscle_ext.data.boxes.SaveBoxesd` writes them back as ``[x1, y1, x2, y2]`` in pixels of each input file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents, PrepareBatch, default_metric_cmp_fn
from monai.handlers import from_engine
from monai.inferers import Inferer
from monai.transforms import Transform
from monai.utils import ForwardMode, IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from ..data.boxes import as_box_tensor
from ..handlers.evaluation import EvaluationReport
from ..metrics.detection import BOOTSTRAPPED, COCO_IOU_RANGE, detection_report
from .precision import autocast_on
from .trainer import StepTrainer

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = [
    "BoxColumns",
    "DetectionCOCOMetric",
    "DetectionEvaluator",
    "DetectionLoss",
    "DetectionPrepareBatch",
    "DetectionReport",
    "DetectionTrainer",
    "unwrap_detector",
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


def _plain(x: torch.Tensor) -> torch.Tensor:
    # the detector pads, stacks and indexes its inputs: meta data only slows that down
    return x.as_tensor() if isinstance(x, MetaTensor) else x


# ----------------------------------------------------------------------------------------------------------------
# engines


class DetectionTrainer(StepTrainer):
    """One iteration = one detector step: ``network(images, targets)`` in train mode returns the classification and
    box-regression losses; their weighted sum (``loss_function``) is back-propagated.

    ``engine.state.output`` is ``{"loss", "loss_cls", "loss_box"}`` (detached tensors), so MONAI's handlers work
    as with ``SupervisedTrainer`` (``StatsHandler(output_transform=from_engine(["loss"], first=True))``). A
    ``LOSS_COMPLETED`` handler may replace ``engine.state.output["loss"]`` (regularisers).

    Args beyond ``SupervisedTrainer``'s:
        inferer: called as ``inferer(images, network, targets)`` (``SimpleInferer`` by default).
        network: a MONAI ``RetinaNetDetector`` (or a wrapper of one); its target keys are set to ``box_key`` and
            ``label_key`` so that datalist items, targets and predictions use the same names.
        loss_function: maps the detector's loss dict to the loss; :class:`DetectionLoss` when ``None``.
        amp / amp_kwargs: autocast on the trainer's device type (``amp_kwargs={"dtype": torch.bfloat16}`` on CPU); a
            ``GradScaler`` is used only for float16 on CUDA.
        max_grad_norm: clip the gradient norm before each optimiser step (``None``: no clipping).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable[[Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        image_key: str = "image",
        box_key: str = "box",
        label_key: str = "label",
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
    ) -> None:
        unwrap_detector(network).set_target_keys(box_key=box_key, label_key=label_key)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=DetectionLoss() if loss_function is None else loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=DetectionPrepareBatch(image_key, box_key, label_key) if prepare_batch is None
            else prepare_batch,
            iteration_update=iteration_update,
            inferer=inferer,
            postprocessing=postprocessing,
            key_train_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            train_handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            optim_set_to_none=optim_set_to_none,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            accumulation_steps=accumulation_steps,
        )
        self.max_grad_norm = max_grad_norm

    def _step(self, engine: DetectionTrainer) -> None:
        if engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)  # clip true gradients, not scaled ones
        if engine.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), engine.max_grad_norm)
        if engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()

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
        loss = engine.state.output[Keys.LOSS]  # a LOSS_COMPLETED handler may have replaced it
        acc = engine.accumulation_steps
        loss = loss / acc if acc > 1 else loss
        (engine.scaler.scale(loss) if engine.scaler is not None else loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if should_step:
            engine._step(engine)

        output = engine.state.output
        for key in (Keys.LOSS, LOSS_CLS, LOSS_BOX):
            output[key] = output[key].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output


class DetectionEvaluator(SupervisedEvaluator):
    """Runs the detector in eval mode; ``engine.state.output`` is one dict per image:
    ``{"image": input (MetaTensor, for writers), "pred": {box, label, label_scores}, "label": {box, label} or None}``,
    so ``from_engine(["pred", "label"])`` feeds :class:`DetectionCOCOMetric`. Boxes are on the input grid.

    Args beyond ``SupervisedEvaluator``'s: ``image_key``/``box_key``/``label_key`` (see :class:`DetectionTrainer`);
    ``amp`` autocasts on the evaluator's device type. Items without boxes (inference) get ``"label": None``.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable | DataLoader,
        network: nn.Module,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        image_key: str = "image",
        box_key: str = "box",
        label_key: str = "label",
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        mode: ForwardMode | str = ForwardMode.EVAL,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        unwrap_detector(network).set_target_keys(box_key=box_key, label_key=label_key)
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=DetectionPrepareBatch(image_key, box_key, label_key) if prepare_batch is None
            else prepare_batch,
            iteration_update=iteration_update,
            inferer=inferer,
            postprocessing=postprocessing,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=val_handlers,
            amp=amp,
            mode=mode,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )

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


# ----------------------------------------------------------------------------------------------------------------
# metric and writers


class DetectionCOCOMetric(Metric):
    """COCO mAP (IoU 0.50:0.95) over the epoch's images, with :func:`~muscle_ext.metrics.detection_report`: the key
    metric of a detection validator (the best validation mAP picks ``models/model.pt``).

    Predictions and targets are kept (on CPU) for the whole epoch, then matched once. ``engine.state.metrics``
    gets ``<name>`` = mAP and ``<name>_ap50``, ``<name>_ap75``, ``<name>_ap_<class>``; the full report is kept as
    :attr:`report`. Single process: under DDP each rank scores its own shard. Test-set reports with confidence
    intervals: :class:`DetectionReport`.
    """

    def __init__(self, classes: Sequence[str], box_key: str = "box", label_key: str = "label",
                 score_key: str | None = None, max_detections: int = 100, output_transform: Callable | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.classes = [str(c) for c in classes]
        self.box_key, self.label_key = box_key, label_key
        self.score_key = score_key or f"{label_key}_scores"  # RetinaNetDetector's naming
        self.max_detections = max_detections
        self.report: dict[str, Any] | None = None
        if output_transform is None:  # (predictions, targets) from the evaluator's per-image outputs
            output_transform = from_engine([Keys.PRED, Keys.LABEL])
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._predictions: list[dict] = []
        self._targets: list[dict] = []

    def update(self, output: tuple[Sequence[Mapping], Sequence[Mapping]]) -> None:
        predictions, targets = output
        if any(t is None for t in targets):
            raise ValueError("DetectionCOCOMetric needs ground-truth boxes for every image")
        for p, t in zip(predictions, targets, strict=True):
            self._predictions.append({k: p[k].detach().cpu() for k in (self.box_key, self.label_key, self.score_key)})
            self._targets.append({k: t[k].detach().cpu() for k in (self.box_key, self.label_key)})

    def compute(self) -> float:
        self.report = detection_report(self._predictions, self._targets, self.classes,
                                       max_detections=self.max_detections, box_key=self.box_key,
                                       label_key=self.label_key, score_key=self.score_key)
        return self.report["map"]

    def completed(self, engine: Engine, name: str) -> None:
        engine.state.metrics[name] = self.compute()
        report = self.report
        engine.state.metrics[f"{name}_ap50"] = report["ap50"]
        engine.state.metrics[f"{name}_ap75"] = report["ap75"]
        for cls, scores in report["per_class"].items():
            engine.state.metrics[f"{name}_ap_{cls}"] = scores["ap"]


def _cpu(d: Mapping[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(d[k]).detach().cpu() for k in keys}


class DetectionReport(EvaluationReport):
    """Test-set detection report (``metrics.json`` + ``figures/``), attached to a :class:`DetectionEvaluator` like
    the other tasks' reports (``configs/evaluate.yaml``).

    ``map`` (COCO AP@[.50:.95]), ``ap50`` and ``ap75`` with percentile bootstrap intervals over images (matching
    runs once; each resample re-ranks: ~10 ms), ``mar``, ``per_class`` AP / AP50 / AP75 (``null`` for a class
    without ground truth), ``n_gt`` per class; figures ``detections_<k>.png`` of the first ``num_overlays`` images
    (ground truth in green, the ``overlay_top_k`` highest-scoring detections in red). Scalars ``test_map``,
    ``test_map_ci_low``, ... go to ``engine.state.metrics``.

    Args beyond :class:`~muscle_ext.handlers.evaluation.EvaluationReport`'s: ``class_names`` (index = label),
    ``max_detections`` per image, ``box_key``/``class_key``/``score_key`` inside the prediction and target dicts.
    """

    task = "detection"
    summary_metrics = BOOTSTRAPPED

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str], max_detections: int = 100,
                 num_overlays: int = 4, overlay_top_k: int = 5, image_key: str = "image", box_key: str = "box",
                 class_key: str = "label", score_key: str | None = None, **kwargs: Any) -> None:
        self.class_names = [str(c) for c in class_names]
        self.max_detections = int(max_detections)
        self.num_overlays, self.overlay_top_k = int(num_overlays), int(overlay_top_k)
        self.image_key, self.box_key, self.class_key = image_key, box_key, class_key
        self.score_key = score_key or f"{class_key}_scores"
        super().__init__(output_dir, **kwargs)

    def reset(self, engine: Engine | None = None) -> None:
        super().reset(engine)
        self.images: list[Any] = []

    def add(self, item: Mapping) -> None:
        target = item[self.label_key]
        if target is None:
            raise ValueError("DetectionReport needs ground-truth boxes for every image")
        self.preds.append(_cpu(item[self.pred_key], (self.box_key, self.class_key, self.score_key)))
        self.labels.append(_cpu(target, (self.box_key, self.class_key)))
        if len(self.images) < self.num_overlays and self.image_key in item:
            self.images.append(torch.as_tensor(item[self.image_key]).detach().float().cpu()[0].numpy())

    def compute(self) -> dict[str, Any]:
        r = detection_report(self.preds, self.labels, self.class_names, max_detections=self.max_detections,
                             box_key=self.box_key, label_key=self.class_key, score_key=self.score_key,
                             n_bootstrap=self.n_resamples, alpha=self.alpha, seed=self.seed)
        no_ci = {"ci_low": float("nan"), "ci_high": float("nan")}
        report: dict[str, Any] = {"n": r["n_images"]}
        report.update({k: r["ci"][k] if "ci" in r else {"value": r[k], **no_ci} for k in BOOTSTRAPPED})
        report.update(mar=r["mar"], per_class=r["per_class"], n_gt=r["n_gt"], class_names=self.class_names,
                      iou_range=list(COCO_IOU_RANGE), max_detections=self.max_detections)
        return report

    def figures(self, report: Mapping[str, Any], folder: Path) -> list[Path]:
        return [self._overlay(k, image, folder / f"detections_{k}.png") for k, image in enumerate(self.images)]

    def _overlay(self, k: int, image: Any, path: Path) -> Path:
        # the object API, not pyplot: no global backend switch in the process that trains
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        fig = Figure(figsize=(5, 5 * image.shape[0] / max(image.shape[1], 1)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(image, cmap="gray", origin="upper")
        pred, target = self.preds[k], self.labels[k]
        top = torch.argsort(pred[self.score_key], descending=True)[: self.overlay_top_k]
        drawn = [(target[self.box_key], target[self.class_key], None, "lime"),
                 (pred[self.box_key][top], pred[self.class_key][top], pred[self.score_key][top], "red")]
        for boxes, labels, scores, colour in drawn:
            for i, (r0, c0, r1, c1) in enumerate(boxes.reshape(-1, 4).tolist()):  # MONAI order: rows first
                ax.add_patch(Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, edgecolor=colour, linewidth=1))
                if scores is not None:
                    name = self.class_names[int(labels[i])] if int(labels[i]) < len(self.class_names) else labels[i]
                    ax.text(c0, r0, f"{name} {float(scores[i]):.2f}", color=colour, fontsize=6, va="bottom")
        ax.set_axis_off()
        ax.set_title(f"{self.split} image {k}: ground truth (green), top {self.overlay_top_k} detections (red)",
                     fontsize=8)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        return path


class BoxColumns:
    """``predictions.csv`` columns for detection (``muscle_ext.handlers.PredictionSaver``): the files
    :class:`~muscle_ext.data.boxes.SaveBoxesd` wrote for the image, its size and the number and best score of its
    boxes at or above ``score_threshold``."""

    def __init__(self, pred_key: str = "pred", label_key: str = "label", score_key: str | None = None,
                 score_threshold: float = 0.0, digits: int = 4) -> None:
        self.pred_key = pred_key
        self.score_key = score_key or f"{label_key}_scores"
        self.score_threshold = float(score_threshold)
        self.digits = digits

    def __call__(self, item: Mapping) -> dict[str, Any]:
        scores = torch.as_tensor(item[self.pred_key][self.score_key]).float().reshape(-1)
        scores = scores[scores >= self.score_threshold]
        shape = item["image"].meta["spatial_shape"]
        return {"boxes_file": item.get(f"{self.pred_key}_file", ""),
                "boxes_csv_file": item.get(f"{self.pred_key}_csv_file", ""),
                "rows": int(shape[0]), "columns": int(shape[1]), "n_boxes": len(scores),
                "max_score": round(float(scores.max()), self.digits) if len(scores) else ""}
