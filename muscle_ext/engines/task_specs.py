"""Tasks as specs: the tasks of a multi-task continual run (MUSCLE stage 2), each described by one mapping entry, and
the factory that builds everything a task needs from it.

A spec names the task's kind and data; the rest has defaults::

    task_specs:
      pneumonia: {kind: classification, datalist: /data/pneumonia/datalist.json, num_classes: 2}
      knee:      {kind: classification, datalist: /data/knee/datalist.json, flip: true}
      lung:      {kind: segmentation, datalist: /data/lungs/datalist.json, mask_key: label}
      boneage:   {kind: regression, datalist: /data/hands/datalist.json, steps: 10, loss_weight: 0.5}

Settings of every kind (:data:`COMMON_KEYS`):

- ``kind`` (required): ``classification``, ``segmentation`` or ``regression`` (``detection``: not yet);
- ``datalist`` (required): a MONAI datalist JSON (decathlon style, paths relative to the file), with the sections
  ``train_split`` (default ``training``), ``val_split`` (default ``validation``) and, for ``configs/evaluate.yaml``,
  ``test_split`` (default ``test``);
- ``steps``: iterations per visit of this task (default: the run's ``steps_per_visit``);
- ``loss_weight``: multiplies the task's loss (default 1.0);
- ``flip``: random left-right flips in training (default false: chests are not symmetric; true suits knees, hands).

Per kind (:data:`KIND_KEYS`): classification ``num_classes`` (default 2) or ``classes`` (class names, one per
output; labels are the indices 0..n-1); segmentation ``mask_key`` (the datalist key of the mask file, default
``label``; binary: anything above 0 is foreground); regression ``label_mean`` / ``label_std`` (the target is trained
as ``(label - label_mean) / label_std``; default: the mean and standard deviation of the training labels).

What each kind gets (heads on the one shared backbone, :mod:`muscle_ext.networks.heads`), and how it is validated:

- classification: a linear head (``BackboneClassifier``), cross-entropy; ROC AUC ``<task>_auc`` (higher is better);
- segmentation: DeepLabV3+ at output stride 32 (``BackboneSegmenter``), Dice + cross-entropy; Dice ``<task>_dice``
  (higher is better);
- regression: a linear head (``BackboneRegressor``), L1 on the scaled target; mean absolute error ``<task>_mae`` in
  the labels' unit (lower is better).

:func:`parse_task_specs` checks the specs and the selected ``tasks`` without reading any data; :class:`TaskSet`
builds the task networks, data loaders, :class:`~muscle_ext.engines.SupervisedTask` objects and validation
evaluators, and :class:`TaskValidation` runs every task's evaluator after each round. Problems are one line each
(:class:`~muscle_ext.settings.SettingsError`), e.g. ``unknown task 'pneumona' in tasks; the task_specs are:
pneumonia, knee, lung (did you mean 'pneumonia'?)``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import numbers
import operator
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, DistributedSampler
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
from ..flags import as_flag
from ..networks.heads import BackboneClassifier, BackboneRegressor, BackboneSegmenter
from ..settings import SettingsError
from .continual import SupervisedTask

__all__ = ["COMMON_KEYS", "KINDS", "KIND_KEYS", "TaskSet", "TaskSpec", "TaskValidation", "evaluate_tasks",
           "load_task_networks", "parse_task_specs", "spec_table"]

logger = logging.getLogger(__name__)

KINDS = ("classification", "segmentation", "regression")
COMMON_KEYS = ("kind", "datalist", "train_split", "val_split", "test_split", "steps", "loss_weight", "flip")
KIND_KEYS = {"classification": ("classes", "num_classes"), "segmentation": ("mask_key",),
             "regression": ("label_mean", "label_std")}
METRIC_SUFFIX = {"classification": "auc", "segmentation": "dice", "regression": "mae"}
SPLITS = {"training": "train_split", "validation": "val_split", "test": "test_split"}  # split -> TaskSpec field


@dataclass(frozen=True)
class TaskSpec:
    """One checked task spec (see the module docstring for what each field means)."""

    name: str
    kind: str
    datalist: str
    train_split: str = "training"
    val_split: str = "validation"
    test_split: str = "test"
    steps: int = 1
    loss_weight: float = 1.0
    flip: bool = False
    num_classes: int = 2          # classification outputs; segmentation: background + foreground
    classes: tuple[str, ...] | None = None
    mask_key: str = "label"
    label_mean: float | None = None
    label_std: float | None = None

    @property
    def metric(self) -> str:
        """The name of the task's validation metric: ``<task>_auc``, ``<task>_dice`` or ``<task>_mae``."""
        return f"{self.name}_{METRIC_SUFFIX[self.kind]}"

    @property
    def lower_is_better(self) -> bool:
        return self.kind == "regression"


def spec_table(**specs: Any) -> dict[str, Any]:
    """``{name: spec}`` in the order given: the ``_target_`` of a bundle's ``task_specs`` mapping.

    A callable that takes any keyword makes ``task_specs`` a component that accepts new entries, so that the
    bundles' command-line check (:mod:`muscle_ext.bundle_checks`) lets ``--task_specs#my_task "{...}"`` add a task;
    the specs are checked by :func:`parse_task_specs`.
    """
    return dict(specs)


# ------------------------------------------------------------------------------------------------ checking specs
def _suggest(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_spec(name: str, spec: Any, steps_per_visit: int) -> tuple[TaskSpec | None, list[str]]:
    where = f"task_specs#{name}"
    if not isinstance(spec, Mapping):
        return None, [f"{where} must be a mapping such as {{'kind': 'classification', 'datalist': "
                      f"'/data/x/datalist.json'}}, got {spec!r}"]
    kind = spec.get("kind")
    if kind == "detection":
        return None, [f"{where}: kind 'detection' is not supported yet (issue #15); kinds: {', '.join(KINDS)}"]
    if kind not in KINDS:
        what = "has no kind" if kind is None else f"has kind {kind!r}"
        return None, [f"{where} {what}; set kind to one of {', '.join(KINDS)}{_suggest(kind, KINDS)}"]
    known = COMMON_KEYS + KIND_KEYS[kind]
    problems = [f"{where}: unknown setting '{key}' for a {kind} task; known: {', '.join(known)}{_suggest(key, known)}"
                for key in spec if key not in known]
    fields: dict[str, Any] = {"name": name, "kind": kind, "steps": steps_per_visit}

    datalist = spec.get("datalist")
    if not isinstance(datalist, (str, os.PathLike)) or not str(datalist).strip():
        problems.append(f"{where}: datalist must be the path of a MONAI datalist JSON, got {datalist!r}")
    else:
        fields["datalist"] = os.fspath(datalist)
    for key in ("train_split", "val_split", "test_split"):
        if key in spec:
            if not isinstance(spec[key], str) or not spec[key]:
                problems.append(f"{where}: {key} must be the name of a datalist section, got {spec[key]!r}")
            else:
                fields[key] = spec[key]
    if "steps" in spec:
        if not _is_int(spec["steps"]) or spec["steps"] < 1:
            problems.append(f"{where}: steps must be a whole number >= 1 (iterations per visit), got {spec['steps']!r}")
        else:
            fields["steps"] = int(spec["steps"])
    if "loss_weight" in spec:
        if not _is_number(spec["loss_weight"]) or spec["loss_weight"] <= 0:
            problems.append(f"{where}: loss_weight must be a number > 0, got {spec['loss_weight']!r}")
        else:
            fields["loss_weight"] = float(spec["loss_weight"])
    if "flip" in spec:
        try:
            fields["flip"] = as_flag(spec["flip"], f"{where}#flip")
        except ValueError:
            problems.append(f"{where}: flip must be true or false, got {spec['flip']!r}")

    if kind == "classification":
        classes, count = spec.get("classes"), spec.get("num_classes")
        if count is not None and (not _is_int(count) or count < 2):
            problems.append(f"{where}: num_classes must be a whole number >= 2, got {count!r}")
            count = None
        if classes is not None:
            if (not isinstance(classes, (list, tuple)) or len(classes) < 2
                    or len({str(c) for c in classes}) != len(classes)):
                problems.append(f"{where}: classes must list at least 2 distinct class names (label i is the i-th), "
                                f"got {classes!r}")
            elif count is not None and count != len(classes):
                problems.append(f"{where}: num_classes {count} but {len(classes)} classes {list(classes)}")
            else:
                fields["classes"], count = tuple(str(c) for c in classes), len(classes)
        fields["num_classes"] = int(count) if count is not None else 2
    elif kind == "segmentation":
        mask_key = spec.get("mask_key", "label")
        if not isinstance(mask_key, str) or not mask_key or mask_key == "image":
            problems.append(f"{where}: mask_key must name the datalist key of the mask files, got {mask_key!r}")
        else:
            fields["mask_key"] = mask_key
    else:
        for key in ("label_mean", "label_std"):
            value = spec.get(key)
            if value is None:
                continue
            if not _is_number(value) or (key == "label_std" and value <= 0):
                bound = " > 0" if key == "label_std" else ""
                problems.append(f"{where}: {key} must be a number{bound} (or left out: from the training labels), "
                                f"got {value!r}")
            else:
                fields[key] = float(value)
    return (TaskSpec(**fields) if not problems else None), problems


def _task_names(tasks: Any) -> list[str] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise SettingsError(f"tasks must be a list of task names, e.g. --tasks \"['pneumonia','lung']\", got {tasks!r}")
    return list(tasks)


def parse_task_specs(task_specs: Mapping[str, Any], tasks: Sequence[str] | str | None = None,
                     steps_per_visit: int = 1, source: str = "muscle_continual") -> list[TaskSpec]:
    """The checked specs of the selected ``tasks`` (all of ``task_specs``, in its order, when ``None``), in the
    order of ``tasks``. Reads no data: configs call it first, so that a mistake stops the run at once.

    Raises:
        SettingsError: one line per problem: an unknown task name (naming the known ones), a spec without kind or
            datalist, an unknown or mistyped setting in a spec (naming the known settings).
    """
    problems: list[str] = []
    if not isinstance(task_specs, Mapping) or not task_specs:
        problems.append(f"task_specs must map task names to specs, e.g. {{'pneumonia': {{'kind': 'classification', "
                        f"'datalist': ...}}}}, got {task_specs!r}")
    else:
        names = _task_names(tasks)
        known = [str(n) for n in task_specs]
        if names is None:
            names = known
        unknown = [n for n in names if n not in task_specs]
        if unknown:  # one line, before any spec is looked at: the most likely mistake is a typo in --tasks
            message = (f"{source}: unknown task{'s' if len(unknown) > 1 else ''} "
                       f"{', '.join(repr(n) for n in unknown)} in tasks; the task_specs are: {', '.join(known)}"
                       f"{_suggest(unknown[0], known) if len(unknown) == 1 else ''}")
            logger.error(message)
            raise SettingsError(message)
        if not names:
            problems.append(f"tasks selects no task; choose from: {', '.join(known)}")
        if len(set(names)) != len(names):
            problems.append(f"tasks names a task twice: {names}")
        specs = []
        for name in names:
            spec, spec_problems = _check_spec(name, task_specs[name], steps_per_visit)
            problems += spec_problems
            specs.append(spec)
    if problems:
        message = f"{source}: " + ("\n  ".join(problems) if len(problems) == 1 else
                                   f"{len(problems)} problems in the task specs:\n  " + "\n  ".join(problems))
        logger.error(message)
        raise SettingsError(message)
    return specs


# ------------------------------------------------------------------------------------------------------ factory
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
                                      "regression": {"numeric_labels": True}}[spec.kind]
            items = validate_datalist(items, on_error=self.on_bad_data, source=f"{name} {split}", **checks)
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
        return Compose(chain)

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
                          drop_last=size > self.batch_size, num_workers=self.num_workers, generator=torch.Generator())

    def val_loader(self, name: str, split: str = "validation") -> DataLoader:
        """Batches of the ``validation`` (or ``test``) split in datalist order, without augmentation. With
        ``distributed``, each process scores its shard and MONAI's metric handlers gather every rank's."""
        dataset = self._dataset(name, split)
        sampler = DistributedSampler(dataset, shuffle=False, even_divisible=False) if self.distributed else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    # ---------------------------------------------------------------------------------------------- models
    def network(self, name: str, backbone: nn.Module) -> nn.Module:
        """The task's model: its head on ``backbone`` (the same module object for every task)."""
        spec = self.specs[name]
        if spec.kind == "classification":
            return BackboneClassifier(backbone, num_outputs=spec.num_classes)
        if spec.kind == "segmentation":  # output stride 32: no dilation, so the shared backbone stays plain
            return BackboneSegmenter(backbone, num_classes=2, output_stride=32)
        return BackboneRegressor(backbone, num_outputs=1)

    def networks(self, backbone: nn.Module) -> nn.ModuleDict:
        """``{task: model}`` on the one ``backbone``, built in task order (their heads' random initialisation too)."""
        return nn.ModuleDict({name: self.network(name, backbone) for name in self.specs})

    def loss(self, name: str) -> nn.Module:
        kind = self.specs[name].kind
        if kind == "classification":
            return nn.CrossEntropyLoss()
        if kind == "segmentation":
            return DiceCELoss(to_onehot_y=True, softmax=True)
        return nn.L1Loss()

    def train_tasks(self, networks: Mapping[str, nn.Module]) -> dict[str, SupervisedTask]:
        """``{task: SupervisedTask}`` for :class:`~muscle_ext.engines.MultiTaskTrainer` (builds the loaders)."""
        return {name: SupervisedTask(networks[name], self.loss(name), self.train_loader(name),
                                     weight=self.specs[name].loss_weight)
                for name in self.specs}

    # ---------------------------------------------------------------------------------------------- validation
    def postprocessing(self, name: str) -> Compose:
        spec = self.specs[name]
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
            out[name] = SupervisedEvaluator(
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
