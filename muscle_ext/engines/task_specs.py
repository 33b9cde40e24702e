"""Tasks as specs: the tasks of a multi-task continual run (MUSCLE stage 2), each described by one mapping entry, and
the factory that builds everything a task needs from it.

A spec names the task's kind and data; the rest has defaults::

    task_specs:
      pneumonia: {kind: classification, datalist: /data/pneumonia/datalist.json, num_classes: 2}
      knee:      {kind: classification, datalist: /data/knee/datalist.json, flip: true}
      lung:      {kind: segmentation, datalist: /data/lungs/datalist.json, mask_key: label}
      boneage:   {kind: regression, datalist: /data/hands/datalist.json, steps: 10, loss_weight: 0.5}

Settings of every kind (:data:`COMMON_KEYS`):

- ``kind`` (required): ``classification``, ``segmentation``, ``regression`` or ``detection``;
- ``datalist`` (required): a MONAI datalist JSON (decathlon style, paths relative to the file), with the sections
  ``train_split`` (default ``training``), ``val_split`` (default ``validation``) and, for ``configs/evaluate.yaml``,
  ``test_split`` (default ``test``);
- ``steps``: iterations per visit of this task (default: the run's ``steps_per_visit``);
- ``loss_weight``: multiplies the task's loss (default 1.0);
- ``flip``: random left-right flips in training (default false: chests are not symmetric; true suits knees, hands);
- ``on_bad_data``: ``raise`` or ``skip`` for this task's datalist (default: the run's ``on_bad_data``).

Per kind (:data:`KIND_KEYS`): classification ``num_classes`` (default 2) or ``classes`` (class names, one per
output; labels are the indices 0..n-1); segmentation ``mask_key`` (the datalist key of the mask file, default
``label``; binary: anything above 0 is foreground); regression ``label_mean`` / ``label_std`` (the target is trained
as ``(label - label_mean) / label_std``; default: the mean and standard deviation of the training labels);
detection ``classes`` / ``num_classes`` (box classes; each item has ``box``: ``[[x1, y1, x2, y2], ...]`` in pixels of
its file and ``label``: one class index per box, as the downstream bundle's detection datalists), ``anchor_shapes``
(``[rows, cols]`` anchor shapes on the finest pyramid level at 256 px, scaled with the image size; default
``[[32, 32], [48, 24], [24, 48]]``) and ``returned_layers`` (the backbone stages under the feature pyramid, default
``[2, 3, 4]``).

What each kind gets (heads on the one shared backbone, :mod:`muscle_ext.networks`), and how it is validated:

- classification: a linear head (``BackboneClassifier``), cross-entropy; ROC AUC ``<task>_auc`` (higher is better);
- segmentation: DeepLabV3+ at output stride 32 (``BackboneSegmenter``), Dice + cross-entropy; Dice ``<task>_dice``
  (higher is better);
- regression: a linear head (``BackboneRegressor``), L1 on the scaled target; mean absolute error ``<task>_mae`` in
  the labels' unit (lower is better);
- detection: RetinaNet (a feature pyramid and MONAI's ``RetinaNetDetector`` on the backbone, as the downstream
  bundle's), focal + box-regression loss; COCO mAP over IoU 0.50:0.95 ``<task>_map`` (higher is better; AP50 is
  logged beside it as ``<task>_map_ap50``). Its batches are lists (images carry different numbers of boxes), and its
  pre-processing keeps the whole image (longest side to the image size, padded), so the boxes stay inside.

:func:`parse_task_specs` checks the specs and the selected ``tasks`` without reading any data. The factory that
builds the task networks, data loaders and evaluators from them is :mod:`muscle_ext.engines.task_set`. Problems are
one line each (:class:`~muscle_ext.settings.SettingsError`), e.g. ``unknown task 'pneumona' in tasks; the
task_specs are: pneumonia, knee, lung (did you mean 'pneumonia'?)``.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..flags import as_flag
from ..settings import SettingsError

__all__ = ["COMMON_KEYS", "KINDS", "KIND_KEYS", "METRIC_SUFFIX", "SPLITS", "TaskSpec", "parse_task_specs",
           "spec_table"]

logger = logging.getLogger(__name__)

KINDS = ("classification", "segmentation", "regression", "detection")
COMMON_KEYS = ("kind", "datalist", "train_split", "val_split", "test_split", "steps", "loss_weight", "flip",
               "on_bad_data")
KIND_KEYS = {"classification": ("classes", "num_classes"), "segmentation": ("mask_key",),
             "regression": ("label_mean", "label_std"),
             "detection": ("classes", "num_classes", "anchor_shapes", "returned_layers")}
METRIC_SUFFIX = {"classification": "auc", "segmentation": "dice", "regression": "mae", "detection": "map"}
DEFAULT_ANCHOR_SHAPES = ((32.0, 32.0), (48.0, 24.0), (24.0, 48.0))  # (rows, cols) at 256 px: the downstream bundle's
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
    on_bad_data: str | None = None   # None: the run's setting
    num_classes: int = 2          # classification outputs, detection box classes; segmentation: background + foreground
    classes: tuple[str, ...] | None = None
    mask_key: str = "label"
    label_mean: float | None = None
    label_std: float | None = None
    anchor_shapes: tuple[tuple[float, float], ...] = DEFAULT_ANCHOR_SHAPES
    returned_layers: tuple[int, ...] = (2, 3, 4)

    @property
    def class_names(self) -> list[str]:
        """The classes' names (``classes``, else ``class_0`` ...)."""
        return list(self.classes) if self.classes else [f"class_{i}" for i in range(self.num_classes)]

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
    if "on_bad_data" in spec:
        if spec["on_bad_data"] not in ("raise", "skip"):
            problems.append(f"{where}: on_bad_data must be raise or skip, got {spec['on_bad_data']!r}")
        else:
            fields["on_bad_data"] = spec["on_bad_data"]

    if kind in ("classification", "detection"):
        least = 2 if kind == "classification" else 1  # a detector may find boxes of one class
        classes, count = spec.get("classes"), spec.get("num_classes")
        if count is not None and (not _is_int(count) or count < least):
            problems.append(f"{where}: num_classes must be a whole number >= {least}, got {count!r}")
            count = None
        if classes is not None:
            if (not isinstance(classes, (list, tuple)) or len(classes) < least
                    or len({str(c) for c in classes}) != len(classes)):
                problems.append(f"{where}: classes must list at least {least} distinct class names (label i is the "
                                f"i-th), got {classes!r}")
            elif count is not None and count != len(classes):
                problems.append(f"{where}: num_classes {count} but {len(classes)} classes {list(classes)}")
            else:
                fields["classes"], count = tuple(str(c) for c in classes), len(classes)
        fields["num_classes"] = int(count) if count is not None else 2
        if kind == "detection":
            problems += _check_detector(where, spec, fields)
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


def _check_detector(where: str, spec: Mapping[str, Any], fields: dict[str, Any]) -> list[str]:
    problems = []
    shapes = spec.get("anchor_shapes")
    if shapes is not None:
        if (not isinstance(shapes, (list, tuple)) or not shapes
                or not all(isinstance(s, (list, tuple)) and len(s) == 2 and all(_is_number(v) and v > 0 for v in s)
                           for s in shapes)):
            problems.append(f"{where}: anchor_shapes must list [rows, cols] pairs of positive numbers (pixels at 256 "
                            f"px), e.g. [[32, 32], [48, 24]], got {shapes!r}")
        else:
            fields["anchor_shapes"] = tuple((float(r), float(c)) for r, c in shapes)
    layers = spec.get("returned_layers")
    if layers is not None:
        if (not isinstance(layers, (list, tuple)) or not layers
                or not all(_is_int(k) and 1 <= k <= 4 for k in layers) or len(set(layers)) != len(layers)):
            problems.append(f"{where}: returned_layers must list distinct backbone stages 1..4, e.g. [2, 3, 4], "
                            f"got {layers!r}")
        else:
            fields["returned_layers"] = tuple(sorted(int(k) for k in layers))
    return problems


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
