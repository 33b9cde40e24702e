"""Self-describing models: the training settings that ``models/model.pt`` and ``backbone.pt`` carry, read back by
evaluation and inference.

A bundle writes its settings once, from one config entry (``model_settings``: image size, input normalisation,
pre-processing, task, class names, arch and backbone kwargs, head settings, where the backbone started), with
:class:`~muscle_ext.handlers.BestModelSaver` (``settings=``) into ``model.pt`` and with
:class:`~muscle_ext.handlers.BackboneExporter` / :func:`~muscle_ext.networks.save_backbone` into ``backbone.pt``.
Evaluate and inference configs read them into ``from_model`` (:func:`read_model_settings`,
:func:`read_backbone_settings`); each recorded config id is written ``"$@from_model.get('image_size', 224)"``,
so the trained value wins there and the default applies while training (``from_model: {}``) or for an old file.
:func:`check_model_settings` then refuses a value given on the command line that contradicts the file.

``model.pt`` (format ``muscle-model/1``)::

    {"model": <state dict of the task network>,
     "settings": {"format": "muscle-model/1", "task": "classification", "arch": "resnet18",
                  "backbone_kwargs": {"imagenet_stem": True}, "init": "checkpoint",
                  "init_weights": {"file": "backbone.pt", "sha256": "...", "source": {...}},
                  "image_size": 96, "input_mean": 0.0, "input_std": 1.0,
                  "preprocessing": {"lower_percentile": 0.5, "upper_percentile": 99.5, "clahe": False},
                  "class_names": ["normal", "abnormal"], "num_classes": 2, ...task-specific keys...}}

Keys of ``settings`` are the config ids they came from (nested dicts for nested ids: ``detector#fpn_channels``);
every value is a plain type (dict, list, str, int, float, bool, None), so ``torch.load(weights_only=True)`` reads
the file. An old ``model.pt`` is the bare state dict: it still loads, and its settings come from the config (with a
warning).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.transforms import ScaleIntensityRangePercentilesd

from ..settings import SettingsError
from .backbone import BACKBONE_FORMAT, file_sha256

__all__ = [
    "MODEL_FORMAT",
    "ModelSettingsError",
    "SettingsRecord",
    "TrainedSettings",
    "check_model_settings",
    "describe_preprocessing",
    "describe_weights",
    "load_model_file",
    "plain_settings",
    "read_backbone_settings",
    "read_model_settings",
]

MODEL_FORMAT = "muscle-model/1"
# recorded for provenance only: never compared with the config
PROVENANCE_KEYS = frozenset({"format", "init_weights"})
# recorded and compared, but no command-line setting chooses them (the code does)
FIXED_KEYS = frozenset({"preprocessing"})

logger = logging.getLogger(__name__)


class ModelSettingsError(SettingsError):
    """A setting given for evaluation or inference contradicts what the model file says it was trained with."""


# ------------------------------------------------------------------------------------------------------ writing
def plain_settings(value: Any, where: str = "model_settings") -> Any:
    """``value`` as plain types only (dict with str keys, list, str, int, float, bool, None), which
    ``torch.load(weights_only=True)`` reads back; tuples become lists, numpy/torch scalars numbers.

    Raises:
        TypeError: naming the entry (``model_settings#detector#fpn_channels``) that holds anything else.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return plain_settings(value.item(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            out[key] = plain_settings(item, f"{where}#{key}")
        return out
    if isinstance(value, Sequence):
        return [plain_settings(item, f"{where}#{k}") for k, item in enumerate(value)]
    raise TypeError(f"{where}: a model file records plain values only (numbers, strings, lists, dicts), "
                    f"got {type(value).__name__} {value!r}")


def describe_weights(path: str | os.PathLike | None) -> dict | None:
    """Provenance of the file a backbone started from: its name, SHA-256 and, for a ``muscle-backbone/1`` file, its
    ``source`` (bundle, run id, epoch). Only the file name is kept, not the folder. ``None`` for no file."""
    if path is None or not os.path.isfile(path):
        return None
    described: dict[str, Any] = {"file": Path(path).name, "sha256": file_sha256(path)}
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # an ImageNet state dict of another layout: name and hash say enough
        return described
    if isinstance(payload, Mapping) and payload.get("format") == BACKBONE_FORMAT:
        described["source"] = plain_settings(payload.get("source", {}), "source")
    return described


def describe_preprocessing(chain: Sequence | Mapping) -> dict:
    """The intensity steps of an ``xray_preprocessing`` chain as plain values: ``lower_percentile``,
    ``upper_percentile`` (robust scaling to [0, 1]) and ``clahe`` (``False`` or its parameters). A mapping of chains
    (MD-MoCo's per-dataset pre-processing) gives one entry per key."""
    if isinstance(chain, Mapping):
        return {str(name): describe_preprocessing(item) for name, item in chain.items()}
    described: dict[str, Any] = {"clahe": False}
    for transform in getattr(chain, "transforms", chain):
        scaler = getattr(transform, "scaler", None)
        if isinstance(transform, ScaleIntensityRangePercentilesd) and scaler is not None:
            described["lower_percentile"] = float(scaler.lower)
            described["upper_percentile"] = float(scaler.upper)
        clahe = getattr(transform, "clahe", None)
        if clahe is not None and hasattr(clahe, "clip_limit"):
            described["clahe"] = {"tiles": list(clahe.tiles), "clip_limit": float(clahe.clip_limit),
                                  "num_bins": int(clahe.num_bins)}
    return described


class SettingsRecord:
    """The ``settings`` entry of a checkpoint for Ignite's ``Checkpoint`` (which saves ``obj.state_dict()``)."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = {"format": MODEL_FORMAT, **plain_settings(dict(settings))}

    def state_dict(self) -> dict[str, Any]:
        return plain_settings(self.settings)  # a fresh copy

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.settings = dict(state)


# ------------------------------------------------------------------------------------------------------ reading
def load_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(state_dict, settings)`` of a ``model.pt``; ``settings`` is ``None`` for an old file (a bare state dict)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, Mapping) and "model" in payload and isinstance(payload.get("settings"), Mapping):
        return payload["model"], dict(payload["settings"])
    return payload, None


class TrainedSettings(dict):
    """The settings a model file records; ``get('detector#fpn_channels', 256)`` follows nested ids (``#`` or MONAI's
    ``::``). ``path`` is the file; ``recorded`` is False for an old file without settings (then every ``get`` gives
    the config's default)."""

    def __init__(self, settings: Mapping[str, Any] | None, path: str | os.PathLike, recorded: bool = True) -> None:
        super().__init__(settings or {})
        self.path = Path(path)
        self.recorded = recorded

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self
        for part in str(key).replace("::", "#").split("#"):  # MONAI rewrites '#' in config strings to '::'
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = dict.__getitem__(self, part) if node is self else node[part]
        return node


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: no {what} there; train one first, or point --model_dir at the folder that "
                             f"holds it (muscle_pretrain and muscle_continual: --backbone_path at the file)")


def read_model_settings(path: str | os.PathLike) -> TrainedSettings:
    """What a downstream ``model.pt`` says about its training (evaluate/inference ``from_model``)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "model.pt")
    _, settings = load_model_file(path)
    if settings is None:
        logger.warning(f"{path.name} records no training settings (saved before {MODEL_FORMAT}): image size, class "
                       "names, input normalisation and head settings come from the config, its defaults and your "
                       "overrides; give the values it was trained with (e.g. --image_size, --class_names, --init)")
        return TrainedSettings({}, path, recorded=False)
    if settings.get("format") != MODEL_FORMAT:
        raise ModelSettingsError(f"{path}: settings in format {settings.get('format')!r}; this code reads "
                                 f"{MODEL_FORMAT}")
    return TrainedSettings(settings, path)


def read_backbone_settings(path: str | os.PathLike) -> TrainedSettings:
    """What a ``muscle-backbone/1`` file says about its training: ``arch`` and ``backbone_kwargs`` (always there)
    plus its ``settings`` (image size, input normalisation, pre-processing; absent in files written before them)."""
    from .backbone import load_backbone_checkpoint

    path = Path(path)
    if not path.is_file():
        raise _missing(path, "backbone checkpoint")
    payload = load_backbone_checkpoint(path)
    settings = payload.get("settings")
    base = {"arch": payload["arch"], "backbone_kwargs": dict(payload["backbone_kwargs"])}
    if not isinstance(settings, Mapping):
        logger.warning(f"{path.name} records no training settings (written before backbone files carried them): "
                       "the image size and input normalisation come from the config, its defaults and your overrides")
        return TrainedSettings(base, path, recorded=False)
    return TrainedSettings({**dict(settings), **base}, path)


# ------------------------------------------------------------------------------------------------------ checking
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _differences(recorded: Mapping, configured: Mapping, prefix: str = "") -> list[tuple[str, Any, Any]]:
    found = []
    for key, value in recorded.items():
        if (not prefix and key in PROVENANCE_KEYS) or key not in configured:
            continue
        mine = configured[key]
        if isinstance(value, Mapping) and isinstance(mine, Mapping) and value.keys() == mine.keys():
            found += _differences(value, mine, f"{prefix}{key}#")
        elif not _same(value, mine):
            found.append((f"{prefix}{key}", value, mine))
    return found


def _typed(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, Mapping)):
        return f'"{plain_settings(value)!r}"'
    return repr(value)


def check_model_settings(trained: Mapping[str, Any], configured: Mapping[str, Any]) -> None:
    """Refuse settings that contradict the model file: ``configured`` (the config's ``model_settings`` as this run
    resolved it) must equal what ``trained`` (:func:`read_model_settings` / :func:`read_backbone_settings`) records,
    key by key; keys one side lacks are not compared. Nothing is checked for an old file without settings.

    Raises:
        ModelSettingsError: one line per contradiction, each naming the override to leave out.
    """
    if not trained or not getattr(trained, "recorded", True):
        return
    name = getattr(trained, "path", None)
    name = name.name if isinstance(name, Path) else "the model file"
    lines = []
    for key, recorded, mine in _differences(trained, plain_settings(dict(configured))):
        if key == "task":
            lines.append(f"{name} holds a {recorded} model; the merged task config is for {mine}: merge "
                         f"configs/{recorded}.yaml instead")
        elif key.split("#")[0] in FIXED_KEYS:
            lines.append(f"{name} was trained with {key} {_typed(recorded)}; this code applies {_typed(mine)}: "
                         "evaluate it with the code version it was trained with")
        else:
            lines.append(f"{name} was trained with {key} {_typed(recorded)}; --{key} {_typed(mine)} contradicts "
                         "it: leave it out (evaluate and inference read it from the file)")
    if lines:
        where = getattr(trained, "path", "")
        raise ModelSettingsError("\n".join(lines) + (f"\n(model file: {where})" if where else ""))
