"""Detection engines for MONAI's ``RetinaNetDetector``: trainer, evaluator, COCO metric, and writers.

The detector takes a *list* of images and a list of target dicts, and returns its losses (train mode) or one dict of
boxes per image (eval mode), so the supervised engines' ``_iteration`` is replaced here, following the model zoo's
``lung_nodule_ct_detection`` bundle. Batches are lists of item dicts (``DataLoader(collate_fn=no_collation)``),
because images carry different numbers of boxes.

Boxes inside the engines are MONAI ``StandardMode`` on the network's input grid: ``[row_min, col_min, row_max,
col_max]`` for our ``(C, H, W)`` images (see :mod:`muscle_ext.data.boxes`); :class:`DetectionBoxWriter` writes them
back as ``[x1, y1, x2, y2]`` in pixels of each input file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch, default_metric_cmp_fn
from monai.engines.workflow import Workflow
from monai.handlers import from_engine
from monai.inferers import Inferer
from monai.transforms import Transform
from monai.utils import ForwardMode, IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from ..data.boxes import as_box_tensor, boxes_to_original_grid, swap_box_axes
from ..data.datalist import load_datalist
from ..data.readers import xray_format
from ..metrics.detection import detection_report

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = [
    "DetectionBoxWriter",
    "DetectionCOCOMetric",
    "DetectionEvaluator",
    "DetectionLoss",
    "DetectionMetricsWriter",
    "DetectionPrepareBatch",
    "DetectionTrainer",
    "inference_items",
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


def _autocast(engine: Workflow) -> contextlib.AbstractContextManager:
    """Autocast on the engine's device type (MONAI's engines always use ``"cuda"``), e.g. bf16 on a CPU."""
    if not engine.amp:
        return contextlib.nullcontext()
    device = engine.state.device
    return torch.autocast(device.type if device is not None else "cpu", **engine.amp_kwargs)


# ----------------------------------------------------------------------------------------------------------------
# engines


class DetectionTrainer(SupervisedTrainer):
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

    @property
    def uses_grad_scaler(self) -> bool:
        """A ``GradScaler`` is needed only for float16 autocast on CUDA (bf16 has fp32's exponent range)."""
        if not self.amp or self.state.device is None or self.state.device.type != "cuda":
            return False
        return self.amp_kwargs.get("dtype", torch.float16) == torch.float16

    def run(self) -> None:  # type: ignore[override]
        # Trainer.run would create a CUDA GradScaler for any amp run, bf16 or CPU ones included.
        self.scaler = torch.amp.GradScaler("cuda") if self.uses_grad_scaler else None
        Workflow.run(self)

    def _accumulation_flags(self) -> tuple[bool, bool]:
        """(zero the gradients, step the optimiser) for this iteration, as ``SupervisedTrainer`` decides them."""
        acc = self.accumulation_steps
        if acc == 1:
            return True, True
        epoch_length = self.state.epoch_length
        local_iter = (self.state.iteration - 1) % epoch_length if epoch_length else self.state.iteration - 1
        last = epoch_length is not None and (local_iter + 1) == epoch_length
        return local_iter % acc == 0, (local_iter + 1) % acc == 0 or last

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

        with _autocast(engine):
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
        with engine.mode(engine.network), _autocast(engine):
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
    """COCO mAP (IoU 0.50:0.95) over the epoch's images, with :func:`~muscle_ext.metrics.detection_report`.

    Predictions and targets are kept (on CPU) for the whole epoch, then matched once. ``engine.state.metrics``
    gets ``<name>`` = mAP (a scalar, usable as the key metric for the best checkpoint), ``<name>_ap50``,
    ``<name>_ap75`` and ``<name>_ap_<class>``; the full report (per-class AP, counts, and the bootstrap interval
    of the mAP when ``n_bootstrap > 0``) is kept as :attr:`report` for :class:`DetectionMetricsWriter`.
    Single process: under DDP each rank scores its own shard.
    """

    def __init__(self, classes: Sequence[str], box_key: str = "box", label_key: str = "label",
                 score_key: str | None = None, max_detections: int = 100, n_bootstrap: int = 0, alpha: float = 0.05,
                 seed: int = 0, output_transform: Callable | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.classes = [str(c) for c in classes]
        self.box_key, self.label_key = box_key, label_key
        self.score_key = score_key or f"{label_key}_scores"  # RetinaNetDetector's naming
        self.max_detections = max_detections
        self.n_bootstrap, self.alpha, self.seed = n_bootstrap, alpha, seed
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
                                       label_key=self.label_key, score_key=self.score_key,
                                       n_bootstrap=self.n_bootstrap, alpha=self.alpha, seed=self.seed)
        return self.report["map"]

    def completed(self, engine: Engine, name: str) -> None:
        engine.state.metrics[name] = self.compute()
        report = self.report
        engine.state.metrics[f"{name}_ap50"] = report["ap50"]
        engine.state.metrics[f"{name}_ap75"] = report["ap75"]
        for cls, scores in report["per_class"].items():
            engine.state.metrics[f"{name}_ap_{cls}"] = scores["ap"]


def _json_safe(value: Any) -> Any:
    """NaN/inf -> ``None`` (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class DetectionMetricsWriter:
    """Write the report of a :class:`DetectionCOCOMetric` as JSON when the evaluator completes.

    Layout: ``{"task": "detection", "split", "classes", "iou_range", "map", "map_ci" (with bootstrap), "ap50",
    "ap75", "mar", "per_class": {name: {ap, ap50, ap75}}, "n_images", "n_gt", **extra}``; undefined values
    (a class without ground truth) are ``null``. Nothing per image, so no file names.
    """

    def __init__(self, path: str | os.PathLike, metric: DetectionCOCOMetric, split: str = "test",
                 extra: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.metric = metric
        self.split = split
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.metric.report is None:
            raise RuntimeError("DetectionMetricsWriter: the metric has not been computed; attach it to this engine")
        from ..metrics.detection import COCO_IOU_RANGE

        out = {"task": "detection", "split": self.split, "classes": self.metric.classes,
               "iou_range": list(COCO_IOU_RANGE), **self.metric.report, **self.extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(_json_safe(out), indent=2) + "\n")
        os.replace(tmp, self.path)
        logger.info(f"detection metrics ({self.split}, {out['n_images']} images): mAP {out['map']:.4f}, "
                    f"AP50 {out['ap50']:.4f} -> {self.path}")


class DetectionBoxWriter:
    """Write each image's detections as ``<stem>.json`` and ``<stem>.csv`` in ``output_dir``, in pixels of the input
    file: ``[x1, y1, x2, y2]`` = column/row order, as the datalists store boxes.

    Boxes are mapped back through the pre-processing (resize, pad) with
    :func:`~muscle_ext.data.boxes.boxes_to_original_grid`. Outputs hold the file's base name and size, the boxes,
    labels and scores: no path, no DICOM header field. Two inputs with the same base name get ``_1``, ``_2``...
    """

    CSV_FIELDS = ("x1", "y1", "x2", "y2", "label", "label_name", "score")

    def __init__(self, output_dir: str | os.PathLike, classes: Sequence[str], box_key: str = "box",
                 label_key: str = "label", score_key: str | None = None, score_threshold: float = 0.0,
                 decimals: int = 2) -> None:
        self.output_dir = Path(output_dir)
        self.classes = [str(c) for c in classes]
        self.box_key, self.label_key = box_key, label_key
        self.score_key = score_key or f"{label_key}_scores"
        self.score_threshold = float(score_threshold)
        self.decimals = decimals
        self.written: list[Path] = []
        self._stems: set[str] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.written, self._stems = [], set()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _stem(self, image: MetaTensor) -> str:
        name = os.path.basename(str(image.meta.get("filename_or_obj", "image")))
        stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else os.path.splitext(name)[0]
        stem, candidate, k = stem or "image", stem or "image", 0
        while candidate in self._stems:
            k += 1
            candidate = f"{stem}_{k}"
        self._stems.add(candidate)
        return candidate

    def __call__(self, engine: Engine) -> None:
        for item in engine.state.output:
            image, pred = item[Keys.IMAGE], item[Keys.PRED]
            scores = pred[self.score_key].detach().cpu()
            keep = scores >= self.score_threshold
            boxes = swap_box_axes(boxes_to_original_grid(pred[self.box_key].detach().cpu()[keep], image))
            labels = pred[self.label_key].detach().cpu()[keep].tolist()
            rows, cols = (int(s) for s in image.meta["spatial_shape"][:2])
            detections = [
                {"box": [round(float(v), self.decimals) for v in box], "label": int(label),
                 "label_name": self.classes[int(label)] if 0 <= int(label) < len(self.classes) else str(label),
                 "score": round(float(score), 4)}
                for box, label, score in zip(boxes.tolist(), labels, scores[keep].tolist(), strict=True)
            ]
            stem = self._stem(image)
            record = {"image": os.path.basename(str(image.meta.get("filename_or_obj", ""))), "width": cols,
                      "height": rows, "box_format": "xyxy (x = column, y = row, pixels of the input file)",
                      "classes": self.classes, "detections": detections}
            json_path = self.output_dir / f"{stem}.json"
            json_path.write_text(json.dumps(record, indent=1) + "\n")
            csv_path = self.output_dir / f"{stem}.csv"
            with open(csv_path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(self.CSV_FIELDS)
                for det in detections:
                    writer.writerow([*det["box"], det["label"], det["label_name"], det["score"]])
            self.written += [json_path, csv_path]


def inference_items(source: str | os.PathLike, section: str = "test") -> list[dict[str, str]]:
    """Items ``{"image": path}`` to run a detector on: every supported image under a folder (PNG, JPEG, DICOM with
    or without suffix, ...; sorted), the ``section`` of a decathlon datalist JSON (only its image paths are kept),
    or a single image file."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and xray_format(p) is not None)
        if not files:
            raise FileNotFoundError(f"{path}: no supported image file in this folder")
        return [{"image": str(p)} for p in files]
    if path.suffix.lower() == ".json":
        return [{"image": item["image"]} for item in load_datalist(path, section)]
    if path.is_file() and xray_format(path) is not None:
        return [{"image": str(path)}]
    raise FileNotFoundError(f"{path}: not an image folder, a datalist JSON or an image file")
