"""The factory of a multi-task continual run: :class:`TaskSet` builds, from the checked task specs
(:mod:`.task_specs`), the task networks on one shared backbone, their data loaders, the
:class:`~muscle_ext.engines.SupervisedTask` objects and the validation evaluators; :class:`TaskValidation` runs every
task's evaluator after each round; :func:`load_task_networks` and :func:`evaluate_tasks` serve the evaluation config.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.transforms.dictionary import RandFlipBoxd
from monai.data import DataLoader, DistributedSampler
from monai.data.utils import no_collation
from monai.engines import SupervisedEvaluator
from monai.handlers import ROCAUC, MeanAbsoluteError, MeanDice, ValidationHandler, from_engine
from monai.losses import DiceCELoss
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    ScaleIntensityRanged,
    SelectItemsd,
)
from torch import nn
from torch.utils.data.distributed import DistributedSampler as TorchDistributedSampler

from ..data import load_datalist, make_dataset, subset, validate_datalist, xray_preprocessing
from ..data.boxes import detection_augmentation, detection_preprocessing
from ..metrics.detection_metric import DetectionCOCOMetric
from ..networks import BackboneClassifier, BackboneRegressor, BackboneSegmenter, build_retinanet_detector
from ..settings import SettingsError
from .continual import DetectionTask, SupervisedTask
from .detection import DetectionEvaluator, DetectionLoss, with_target_keys
from .task_specs import SPLITS, parse_task_specs

__all__ = ["TaskSet", "TaskValidation", "checkpoint_tasks", "evaluate_tasks", "load_task_heads", "load_task_networks"]

logger = logging.getLogger(__name__)

class TaskSet:
    """Everything the tasks of a continual run need, built from their specs.

    Construction only checks (:func:`parse_task_specs`); data is read when a loader or evaluator is first built, and
    each validated datalist once. Networks are built in the order of the tasks on the one ``backbone``.

    Args:
        task_specs: ``{name: spec}`` (see the module docstring).
        tasks: the names to run, in their order; ``None``: every spec, in the order of ``task_specs``.
        steps_per_visit: the ``steps`` of a spec that sets none.
        image_size, batch_size, num_workers: as the bundle's settings.
        max_items: at most this many (evenly spaced) items per split of each task.
        on_bad_data: ``raise`` or ``skip`` (:func:`~muscle_ext.data.validate_datalist`).
        cache, cache_dir: :func:`~muscle_ext.data.make_dataset` (training caches in ``<cache_dir>/<task>``,
            validation in ``<cache_dir>/<task>_val``).
        normalize: a transform after augmentation (e.g. ``NormalizeIntensityd`` with ImageNet statistics).
        source: named in errors.
        distributed: one process of a data-parallel run (``configs/multi_gpu_train.yaml``): each process trains
            and validates on its shard of every split (needs an initialised process group).
    """

    def __init__(self, task_specs: Mapping[str, Any], tasks: Sequence[str] | None = None, steps_per_visit: int = 1,
                 image_size: int = 224, batch_size: int = 32, max_items: int | None = None,
                 on_bad_data: str = "raise", cache: str = "none", cache_dir: str | os.PathLike | None = None,
                 num_workers: int = 0, normalize: Callable | None = None, source: str = "muscle_continual",
                 distributed: bool = False) -> None:
        self.specs = {s.name: s for s in parse_task_specs(task_specs, tasks, steps_per_visit, source)}
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.max_items = max_items
        self.on_bad_data = on_bad_data
        self.cache = cache
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.num_workers = int(num_workers)
        self.normalize = normalize
        self.distributed = bool(distributed)
        self._data: dict[tuple[str, str], list[dict]] = {}
        self._targets: dict[str, tuple[float, float]] = {}

    # ---------------------------------------------------------------------------------------------- the plan
    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def steps(self) -> dict[str, int]:
        """``{task: iterations per visit}`` for :class:`~muscle_ext.engines.TaskSchedule`."""
        return {name: spec.steps for name, spec in self.specs.items()}

    @property
    def metrics(self) -> dict[str, str]:
        """``{task: validation metric name}``."""
        return {name: spec.metric for name, spec in self.specs.items()}

    @property
    def lower_is_better(self) -> list[str]:
        """The metric names where lower is better (regression MAE), for :class:`~muscle_ext.handlers.MetricHistory`."""
        return [spec.metric for spec in self.specs.values() if spec.lower_is_better]

    # ---------------------------------------------------------------------------------------------- data
    def data(self, name: str, split: str = "training") -> list[dict]:
        """The checked items of one task's ``training``, ``validation`` or ``test`` split (``max_items`` applied;
        the datalist sections are the spec's ``train_split``, ``val_split``, ``test_split``)."""
        key = (name, split)
        if key not in self._data:
            spec = self.specs[name]
            if split not in SPLITS:
                raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
            section = getattr(spec, SPLITS[split])
            items = subset(load_datalist(spec.datalist, section), self.max_items)
            checks: dict[str, Any] = {"classification": {"classes": list(range(spec.num_classes))},
                                      "segmentation": {"mask_key": spec.mask_key},
                                      "regression": {"numeric_labels": True},
                                      "detection": {"classes": list(range(spec.num_classes)), "box_key": "box"},
                                      }[spec.kind]
            items = validate_datalist(items, on_error=spec.on_bad_data or self.on_bad_data, source=f"{name} {split}",
                                      **checks)
            if spec.kind == "segmentation" and spec.mask_key != "label":  # the pipeline's target is `label`
                items = [{**{k: v for k, v in item.items() if k != "label"}, "label": item[spec.mask_key]}
                         for item in items]
            if not items:
                raise SettingsError(f"task {name}: the {section!r} section of its datalist has no usable entry")
            self._data[key] = items
        return self._data[key]

    def target_scale(self, name: str) -> tuple[float, float]:
        """Regression: ``(label_mean, label_std)``, from the spec or else from the training labels."""
        if name not in self._targets:
            spec = self.specs[name]
            mean, std = spec.label_mean, spec.label_std
            if mean is None or std is None:
                labels = np.asarray([float(item["label"]) for item in self.data(name, "training")])
                mean = float(labels.mean()) if mean is None else mean
                std = (float(labels.std()) or 1.0) if std is None else std
                logger.info(f"task {name}: regression target scaled as (label - {mean:.4g}) / {std:.4g}")
            self._targets[name] = (mean, std)
        return self._targets[name]

    def transform(self, name: str, training: bool) -> Compose:
        """Loading and pre-processing (as the downstream bundle's), then in training mild geometry (the mask
        follows), optional flips and gamma, then ``normalize``; only ``image`` and ``label`` leave the chain."""
        spec = self.specs[name]
        size = self.image_size
        if spec.kind == "detection":
            return self._detection_transform(name, training)
        segmentation = spec.kind == "segmentation"
        chain = list(xray_preprocessing("image", mask_keys="label" if segmentation else (), size=size))
        if training:
            keys = ["image", "label"] if segmentation else "image"
            geometry: dict[str, Any] = {"mode": ["bilinear", "nearest"]} if segmentation else {}
            chain.append(RandAffined(keys=keys, prob=0.5, rotate_range=0.1, scale_range=0.1,
                                     translate_range=0.05 * size, padding_mode="zeros", **geometry))
            if spec.flip:
                chain.append(RandFlipd(keys=keys, prob=0.5, spatial_axis=1))
            chain.append(RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)))
        if spec.kind == "regression":
            mean, std = self.target_scale(name)
            chain += [EnsureTyped(keys="label", dtype=torch.float32, track_meta=False),
                      EnsureChannelFirstd(keys="label", channel_dim="no_channel"),
                      ScaleIntensityRanged(keys="label", a_min=mean, a_max=mean + std, b_min=0.0, b_max=1.0)]
        if self.normalize is not None:
            chain.append(self.normalize)
        chain.append(SelectItemsd(keys=["image", "label"]))  # datalist extras (patient ids, sources) stop here
        return Compose(chain + self._plain_tensors(["image", "label"], training))

    def _detection_transform(self, name: str, training: bool) -> Compose:
        """The downstream detection bundle's chain: whole image (longest side to the image size, padded), boxes in
        MONAI order on that grid; in training its box-aware zoom and intensity changes (flips where the spec says
        so); ``image``, ``box`` and ``label`` leave it."""
        chain = list(detection_preprocessing("image", "box", "label", size=self.image_size))
        if training:
            chain += detection_augmentation("image", "box", "label")
            if self.specs[name].flip:
                chain.append(RandFlipBoxd(image_keys="image", box_keys="box", box_ref_image_keys="image", prob=0.5,
                                          spatial_axis=1))
        if self.normalize is not None:
            chain.append(self.normalize)
        chain.append(SelectItemsd(keys=["image", "box", "label"]))
        return Compose(chain + self._plain_tensors(["image", "box", "label"], training))

    @staticmethod
    def _plain_tensors(keys: list[str], training: bool) -> list:
        # training batches as plain tensors: MetaTensor bookkeeping in every layer costs ~3 % of a step and no
        # training handler reads the meta data; the evaluation chains do not convert (benchmarks/results/trainers.md)
        return [EnsureTyped(keys=keys, track_meta=False)] if training else []

    def _collate(self, name: str) -> Any:
        # detection batches are lists: images carry different numbers of boxes
        return {"collate_fn": no_collation} if self.specs[name].kind == "detection" else {}

    def _dataset(self, name: str, split: str) -> Any:
        suffix = {"training": "", "validation": "_val"}.get(split, f"_{split}")
        cache_dir = None if self.cache_dir is None else os.path.join(self.cache_dir, name + suffix)
        return make_dataset(self.data(name, split), self.transform(name, split == "training"), cache=self.cache,
                            cache_dir=cache_dir, num_workers=self.num_workers)

    def train_loader(self, name: str) -> DataLoader:
        """Shuffled training batches with their own generator (each visit reseeds it: exact resume). With
        ``distributed``, each process draws its own shard (a ``DistributedSampler`` that each visit reseeds)."""
        dataset = self._dataset(name, "training")
        # distributed: a shard per process; the sampler pads the last shard, so every rank takes the same steps
        sampler = TorchDistributedSampler(dataset, shuffle=True) if self.distributed else None
        size = len(sampler) if sampler is not None else len(dataset)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler,
                          drop_last=size > self.batch_size, num_workers=self.num_workers, generator=torch.Generator(),
                          **self._collate(name))

    def val_loader(self, name: str, split: str = "validation") -> DataLoader:
        """Batches of the ``validation`` (or ``test``) split in datalist order, without augmentation. With
        ``distributed``, each process scores its shard and MONAI's metric handlers gather every rank's."""
        dataset = self._dataset(name, split)
        sampler = DistributedSampler(dataset, shuffle=False, even_divisible=False) if self.distributed else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          **self._collate(name))

    # ---------------------------------------------------------------------------------------------- models
    def network(self, name: str, backbone: nn.Module) -> nn.Module:
        """The task's model: its head on ``backbone`` (the same module object for every task)."""
        spec = self.specs[name]
        if spec.kind == "classification":
            return BackboneClassifier(backbone, num_outputs=spec.num_classes)
        if spec.kind == "segmentation":  # output stride 32: no dilation, so the shared backbone stays plain
            return BackboneSegmenter(backbone, num_classes=2, output_stride=32)
        if spec.kind == "detection":  # the downstream bundle's RetinaNet; anchors scaled from 256 px
            scale = self.image_size / 256
            detector = build_retinanet_detector(
                backbone, num_classes=spec.num_classes, returned_layers=spec.returned_layers,
                base_anchor_shapes=[(r * scale, c * scale) for r, c in spec.anchor_shapes])
            return with_target_keys(detector)
        return BackboneRegressor(backbone, num_outputs=1)

    def networks(self, backbone: nn.Module) -> nn.ModuleDict:
        """``{task: model}`` on the one ``backbone``, built in task order (their heads' random initialisation too)."""
        return nn.ModuleDict({name: self.network(name, backbone) for name in self.specs})

    def loss(self, name: str) -> Callable:
        kind = self.specs[name].kind
        if kind == "detection":
            return DetectionLoss()
        if kind == "classification":
            return nn.CrossEntropyLoss()
        if kind == "segmentation":
            return DiceCELoss(to_onehot_y=True, softmax=True)
        return nn.L1Loss()

    def train_tasks(self, networks: Mapping[str, nn.Module]) -> dict[str, SupervisedTask]:
        """``{task: SupervisedTask}`` for :class:`~muscle_ext.engines.MultiTaskTrainer` (builds the loaders)."""
        tasks: dict[str, SupervisedTask] = {}
        for name, spec in self.specs.items():
            if spec.kind == "detection":
                tasks[name] = DetectionTask(networks[name], self.train_loader(name), self.loss(name),
                                            weight=spec.loss_weight)
            else:
                tasks[name] = SupervisedTask(networks[name], self.loss(name), self.train_loader(name),
                                             weight=spec.loss_weight)
        return tasks

    # ---------------------------------------------------------------------------------------------- validation
    def postprocessing(self, name: str) -> Compose | None:
        spec = self.specs[name]
        if spec.kind == "detection":  # the detector returns boxes on the input grid, as the metric takes them
            return None
        if spec.kind == "classification":
            return Compose([Activationsd(keys="pred", softmax=True),
                            AsDiscreted(keys="label", to_onehot=spec.num_classes)])
        if spec.kind == "segmentation":
            return Compose([AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2)])
        mean, std = self.target_scale(name)  # back to the labels' unit
        return Compose([ScaleIntensityRanged(keys=["pred", "label"], a_min=0.0, a_max=1.0, b_min=mean,
                                             b_max=mean + std)])

    def metric(self, name: str) -> Any:
        """The validation metric handler (``<task>_auc``, ``<task>_dice``, ``<task>_mae``)."""
        pairs = from_engine(["pred", "label"])
        kind = self.specs[name].kind
        if kind == "detection":  # COCO mAP (IoU 0.50:0.95); AP50, AP75 and per-class AP logged beside it
            return DetectionCOCOMetric(classes=self.specs[name].class_names)
        if kind == "classification":
            return ROCAUC(output_transform=pairs)
        if kind == "segmentation":
            return MeanDice(include_background=False, output_transform=pairs)
        return MeanAbsoluteError(output_transform=pairs)

    def evaluators(self, networks: Mapping[str, nn.Module], val_handlers: Sequence[Any] = (),
                   device: torch.device | str = "cpu", split: str = "validation") -> dict[str, SupervisedEvaluator]:
        """``{task: SupervisedEvaluator}`` on each task's ``validation`` (or ``test``) split, its metric the key
        metric.

        ``val_handlers``: handler objects (with ``attach``) are attached to every evaluator (e.g. one
        :class:`~muscle_ext.handlers.MetricHistory`); other callables (``_mode_: callable`` in a config, a class)
        are called once per evaluator to make its own; ``None`` entries (disabled handlers) are left out.
        """
        out = {}
        for name, spec in self.specs.items():
            handlers = [h if hasattr(h, "attach") and not isinstance(h, type) else h()
                        for h in val_handlers if h is not None]
            extra = {"metric_cmp_fn": operator.lt} if spec.lower_is_better else {}
            engine = DetectionEvaluator if spec.kind == "detection" else SupervisedEvaluator
            out[name] = engine(
                device=device, val_data_loader=self.val_loader(name, split), network=networks[name],
                postprocessing=self.postprocessing(name), key_val_metric={spec.metric: self.metric(name)},
                val_handlers=[h for h in handlers if h is not None], **extra)
        return out


class TaskValidation:
    """Run every task's evaluator after every ``interval`` rounds (trainer epochs), in task order: one entry of a
    trainer's handler list for any number of tasks (MONAI's ``ValidationHandler`` takes one validator)."""

    def __init__(self, evaluators: Mapping[str, Any] | Sequence[Any], interval: int = 1,
                 epoch_level: bool = True) -> None:
        validators = list(evaluators.values()) if isinstance(evaluators, Mapping) else list(evaluators)
        self.handlers = [ValidationHandler(validator=v, interval=interval, epoch_level=epoch_level)
                         for v in validators]

    def attach(self, engine: Any) -> None:
        for handler in self.handlers:
            handler.attach(engine)


def load_task_networks(networks: nn.Module, checkpoint: str | os.PathLike | None, key: str = "network",
                       exported_iteration: int | None = None) -> str:
    """Load a continual run's task networks (the shared backbone and every head) from its training checkpoint.

    Args:
        networks: the ``nn.ModuleDict`` ``{task: model}`` of :meth:`TaskSet.networks`, for the run's ``tasks``.
        checkpoint: a checkpoint file of the run (``checkpoint_<iteration>.pt``, e.g. from
            :func:`~muscle_ext.handlers.latest_checkpoint`); ``None`` when the run's folder has none.
        key: the entry of the checkpoint that holds the networks' state dict.
        exported_iteration: the trainer iteration ``backbone.pt`` was exported at (its ``source``): the checkpoint
            must hold that same state, or the heads would be scored with another backbone than the run's result.

    Returns:
        The checkpoint's path.

    Raises:
        FileNotFoundError: no checkpoint (the run was not trained, or another ``output_dir``).
        SettingsError: the checkpoint was trained on other tasks than ``networks`` has, or holds another state than
            ``backbone.pt`` (a longer run that did not finish); the message names both and the fix.
        KeyError: the checkpoint has no ``key`` entry.
    """
    if checkpoint is None or not os.path.isfile(checkpoint):
        where = f"at {checkpoint}" if checkpoint else "found"
        raise FileNotFoundError(f"no training checkpoint of a continual run {where}: train first (configs/train.yaml), "
                                "or pass the --output_dir of a finished run")
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    iteration = int(payload.get("trainer", {}).get("iteration", -1))
    if exported_iteration is not None and iteration != int(exported_iteration):
        raise SettingsError(f"{checkpoint} holds iteration {iteration}, backbone.pt was exported at iteration "
                            f"{exported_iteration}: a longer run started from it and did not finish; finish it (run "
                            "train.yaml again with the same settings) before evaluating")
    state = payload[key]
    trained = list(dict.fromkeys(name.split(".", 1)[0] for name in state))
    wanted = list(networks.keys()) if isinstance(networks, nn.ModuleDict) else trained
    if sorted(trained) != sorted(wanted):
        raise SettingsError(f"{checkpoint} was trained on the tasks {', '.join(trained)}, the config names "
                            f"{', '.join(wanted)}: pass --tasks \"{trained!r}\" (the tasks it was trained on)")
    networks.load_state_dict(state)
    return os.fspath(checkpoint)


def _network_state(checkpoint: str | os.PathLike, key: str = "network") -> dict[str, torch.Tensor]:
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_heads: {path} is not a file; give one of a continual run's "
                                "checkpoint_<iteration>.pt files")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if key not in payload:
        raise SettingsError(f"init_heads: {path} has no '{key}' entry: not a muscle_continual training checkpoint")
    return payload[key]


def checkpoint_tasks(checkpoint: str | os.PathLike | None) -> list[str]:
    """The tasks a continual run's training checkpoint file holds networks for, in their order; ``[]`` for ``None``."""
    if not checkpoint:
        return []
    return list(dict.fromkeys(name.split(".", 1)[0] for name in _network_state(checkpoint)))


def load_task_heads(networks: nn.ModuleDict, backbone: nn.Module, checkpoint: str | os.PathLike | None,
                    atol: float = 0.0) -> nn.ModuleDict:
    """Start the heads of the tasks that an earlier continual run trained from that run's checkpoint: the hospital
    workflow, where a team continues a MUSCLE backbone with its own task and keeps the earlier tasks (and their
    trained heads) as guardrails. Tasks the checkpoint does not hold keep their fresh heads.

    The shared backbone is not loaded from the checkpoint (it comes from ``init_weights``); the checkpoint's copy must
    equal it, so that the heads are scored on the backbone they were trained with.

    Args:
        networks: ``{task: model}`` of :meth:`TaskSet.networks` on ``backbone``.
        backbone: the shared backbone, already initialised from the run's ``backbone.pt``.
        checkpoint: the earlier run's ``checkpoint_<iteration>.pt`` (``None``: nothing is loaded).
        atol: largest difference allowed between the checkpoint's backbone and ``backbone``.

    Returns:
        ``networks`` (loaded in place), for use in a config expression.

    Raises:
        FileNotFoundError: no such file or checkpoint.
        SettingsError: the checkpoint holds another backbone than ``backbone`` (the ``init_weights`` of another run
            or iteration), no task of ``networks``, or a head of another shape (a task of the same name with other
            classes or kind); each message names the fix.
    """
    if not checkpoint:
        return networks
    state = _network_state(checkpoint)
    shared = {id(t) for t in backbone.state_dict(keep_vars=True).values()}
    loaded, problems = [], []
    for task, network in networks.items():
        entries = network.state_dict(keep_vars=True)
        saved = {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == task}
        if not saved:
            continue
        backbone_keys = [k for k, v in entries.items() if id(v) in shared]
        head_keys = [k for k in entries if k not in set(backbone_keys)]
        for key in backbone_keys if not problems else ():  # the backbone is shared: one mismatch says it all
            if key in saved and not torch.allclose(saved[key].float(), entries[key].detach().float().cpu(), atol=atol,
                                                   rtol=0.0):
                problems.append(f"init_heads: {checkpoint} holds another backbone than init_weights (first difference "
                                f"at {task}.{key}): give the backbone.pt and the checkpoint of the same finished run")
                break
        mismatched = [k for k in head_keys if k not in saved or tuple(saved[k].shape) != tuple(entries[k].shape)]
        if mismatched:
            problems.append(f"init_heads: the head of task {task} in {checkpoint} does not fit its spec here "
                            f"({mismatched[0]}): the task of that name has other classes or another kind; rename the "
                            "new task or leave init_heads out")
            continue
        network.load_state_dict({**{k: v.detach() for k, v in entries.items()}, **{k: saved[k] for k in head_keys}})
        loaded.append(task)
    if problems:
        raise SettingsError(problems[0] if len(problems) == 1 else "\n".join(problems))
    if not loaded:
        held = ", ".join(checkpoint_tasks(checkpoint))
        raise SettingsError(f"init_heads: {checkpoint} holds the tasks {held}, none of which this run trains: add "
                            "them to --tasks (they are the guardrails) or leave init_heads out")
    logger.info(f"task heads from {os.path.basename(os.fspath(checkpoint))}: {', '.join(loaded)}; fresh heads: "
                f"{', '.join(t for t in networks if t not in loaded) or 'none'}")
    return networks


def evaluate_tasks(evaluators: Mapping[str, Any], path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Run every task's evaluator once and collect its key metric: ``{task: {metric name: value, "n": items}}``.

    ``path``: also written there as JSON (the continual bundle's ``test_metrics.json``). A metric that cannot be
    computed (e.g. ROC AUC of a split with one class) is ``null``.
    """
    report: dict[str, dict[str, Any]] = {}
    for name, evaluator in evaluators.items():
        evaluator.run()
        metric = evaluator.state.key_metric_name
        value = evaluator.state.metrics.get(metric)
        value = float(value) if isinstance(value, numbers.Real) and math.isfinite(float(value)) else None
        loader = evaluator.data_loader
        count = len(loader.dataset) if hasattr(loader, "dataset") else None
        report[name] = {metric: value, "n": count}
        logger.info(f"task {name}: {metric} {value if value is None else round(value, 4)} on {count} items")
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    return report
