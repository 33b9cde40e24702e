"""What a tracked run says about itself, as pure functions: config + versions + datalists + lineage -> params and tags.

Every config value passes :class:`~muscle_ext.handlers.privacy.PrivacyFilter` (the rule is in that module's
docstring): paths outside the allowed roots, patient-like keys and expressions that may name data become hashes.
Datasets, batches and image meta data are never described; a datalist is described by its SHA-256 and item count.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..privacy import PrivacyFilter, datalist_fingerprint, flatten_config, sanitize_key

__all__ = [
    "RunDescription",
    "checkpoint_lineage",
    "default_run_name",
    "describe_run",
    "environment_versions",
    "loss_from_output",
    "scalar_metrics",
]

logger = logging.getLogger(__name__)

_SEED_KEYS = ("seed", "random_seed")
_META_TAGS = {"name": "muscle.bundle", "version": "muscle.bundle_version"}
_ROOT_KEYS = ("bundle_root", "output_dir")
_KEY_RULE = PrivacyFilter()  # the key rule only (no roots needed)


def environment_versions() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced (logged as ``version.<name>`` params)."""
    import ignite
    import mlflow
    import monai
    import numpy

    import muscle_ext

    return {
        "muscle_ext": muscle_ext.__version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda or "none"),
        "ignite": ignite.__version__,
        "mlflow": mlflow.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def checkpoint_lineage(path: str | os.PathLike) -> dict[str, str]:
    """Lineage tags of a checkpoint: ``muscle.parent_checkpoint_sha256`` and what its ``source`` dict says
    (``muscle.parent_run_id``, ``muscle.parent_bundle``, ``muscle.parent_epoch``). A checkpoint that cannot be
    read with ``weights_only=True`` is still identified by its hash (with a warning).

    Raises:
        OSError: the file cannot be read at all.
    """
    from muscle_ext.networks.backbone import file_sha256

    tags = {"muscle.parent_checkpoint_sha256": file_sha256(path)}
    try:
        try:  # mmap: read the small source dict without paging in every weight
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) checkpoints cannot be mmapped
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        logger.warning(f"checkpoint_lineage: cannot read the checkpoint's source dict ({type(exc).__name__}); "
                       "only its SHA-256 is recorded.")
        payload = None
    source = payload.get("source") if isinstance(payload, Mapping) else None
    if isinstance(source, Mapping):
        for key, tag in (("mlflow_run_id", "muscle.parent_run_id"), ("bundle", "muscle.parent_bundle"),
                         ("epoch", "muscle.parent_epoch")):
            if source.get(key) is not None:
                tags[tag] = str(source[key])
    return tags


def loss_from_output(output: Any) -> float | None:
    """The scalar loss of an engine output: a dict with ``loss``, a decollated list of them, or a scalar."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        output = output.get("loss")
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return float(output.detach().item())
    if isinstance(output, (int, float)) and not isinstance(output, bool):
        return float(output)
    return None


def scalar_metrics(values: Mapping[str, Any], prefix: str = "", nested: bool = False) -> Iterator[tuple[str, float]]:
    """``(name, value)`` of the scalar entries of a (nested) metrics dict, names sanitised for MLflow and nested
    names joined with ``.``. Tensors, arrays, strings and meta data are skipped, and so are nested entries keyed
    by something path-like or patient-like (per-case results keyed by file name)."""
    for key, value in values.items():
        if nested and (PrivacyFilter.looks_like_path(str(key)) or _KEY_RULE.is_sensitive_key(str(key))):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from scalar_metrics(value, name + ".", nested=True)
        elif isinstance(value, (bool, int, float)):
            yield sanitize_key(name), float(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            yield sanitize_key(name), float(value.item())
        elif isinstance(value, (np.ndarray, np.generic)) and value.size == 1 and np.issubdtype(value.dtype, np.number):
            yield sanitize_key(name), float(value.item())


def default_run_name(config: Mapping[str, Any] | None, workflow: str) -> str:
    """``<bundle name from _meta_, else the workflow>_<YYYYmmdd_HHMMSS>``."""
    meta = (config or {}).get("_meta_") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return f"{name or workflow}_{time.strftime('%Y%m%d_%H%M%S')}"


@dataclass
class RunDescription:
    """What :func:`describe_run` found: ``params`` and ``tags`` for the run, and the redacted config for the
    ``config/config.json`` artifact (``None`` without a config)."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None


def describe_run(
    config: Mapping[str, Any] | None,
    workflow: str,
    allowed_roots: Sequence[str | os.PathLike] = (),
    extra_sensitive_keys: Sequence[str] = (),
    datalists: Mapping[str, Any] | None = None,
    seed: int | None = None,
    parent_checkpoint: str | os.PathLike | None = None,
    tags: Mapping[str, Any] | None = None,
    engine_params: Mapping[str, Any] | None = None,
) -> RunDescription:
    """The params and tags of a run.

    Args:
        config: the bundle config (raw: expressions stay text), or None.
        workflow: ``train``, ``evaluate``, ``inference`` ... (tag ``muscle.workflow``).
        allowed_roots: folders whose paths may appear (the output folder; the config's literal ``bundle_root`` and
            ``output_dir`` are added).
        extra_sensitive_keys: regular expressions of more key names to redact (:class:`PrivacyFilter`).
        datalists: ``{name: datalist}`` (a path, a list, a decathlon dict); default: the config's literal values
            under keys like ``*datalist*``. Each becomes ``datalist.<name>.sha256`` and ``.count``.
        seed: logged as ``seed``; default: the config's literal ``seed``/``random_seed``, else ``unset``.
        parent_checkpoint: the checkpoint the run starts from (:func:`checkpoint_lineage` tags).
        tags: more tags (their values pass the privacy filter).
        engine_params: more params (``max_epochs``, ``epoch_length`` of the engine).
    """
    config = dict(config) if config else None
    roots = [*allowed_roots, *(v for k, v in (config or {}).items() if k in _ROOT_KEYS and _literal_path(v))]
    privacy = PrivacyFilter(allowed_roots=roots, extra_sensitive_keys=extra_sensitive_keys)
    out = RunDescription(tags={"muscle.workflow": workflow})
    if config:
        meta = config.pop("_meta_", None)
        if isinstance(meta, Mapping):  # metadata goes to tags (and the artifact), not to hundreds of params
            out.tags.update({tag: meta[k] for k, tag in _META_TAGS.items() if isinstance(meta.get(k), (str, int))})
        out.params.update(flatten_config(config, privacy=privacy, prefix="config."))
        out.config = privacy.redact({**config, **({"_meta_": meta} if meta is not None else {})})
    out.params.update({f"version.{k}": v for k, v in environment_versions().items()})
    out.params["seed"] = seed if seed is not None else _literal_seed(config)
    out.params["torch_initial_seed"] = torch.initial_seed()
    out.params.update(engine_params or {})
    for name, source in (datalists if datalists is not None else _config_datalists(config)).items():
        try:
            fingerprint = datalist_fingerprint(source) if source is not None else None
        except Exception as exc:  # never the path in the message: it may name a patient
            logger.warning(f"tracking: could not fingerprint datalist '{name}' ({type(exc).__name__}).")
            continue
        if fingerprint is not None:
            out.params[f"datalist.{sanitize_key(str(name))}.sha256"] = fingerprint["sha256"]
            out.params[f"datalist.{sanitize_key(str(name))}.count"] = fingerprint["count"]
    if parent_checkpoint:
        try:
            out.tags.update(checkpoint_lineage(parent_checkpoint))
        except OSError as exc:
            logger.warning(f"tracking: cannot read the parent checkpoint ({type(exc).__name__}); no lineage tags.")
    out.tags.update(privacy.redact(dict(tags or {})))
    out.params = {sanitize_key(k): str(v) for k, v in out.params.items()}
    out.tags = {sanitize_key(k): str(v)[:5000] for k, v in out.tags.items()}
    return out


def _literal_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and not str(value).startswith(("$", "@", "%"))


def _literal_seed(config: Mapping[str, Any] | None) -> Any:
    for key in _SEED_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return "unset"


def _config_datalists(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Literal datalists in a config: values under keys that name a datalist (an existing file, or the items)."""
    found = {}
    for id_, value in _walk_ids(config or {}):
        key = id_.split("#")[-1]
        if not (_KEY_RULE.is_sensitive_key(key) and "list" in key.lower()):
            continue
        if _literal_path(value) and os.path.isfile(value) or isinstance(value, (list, tuple)):
            found[id_.replace("#", ".")] = value
    return found


def _walk_ids(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(MONAI config id, value) of every item, e.g. ``("train#dataset#data", ...)``."""
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        id_ = f"{prefix}#{key}" if prefix else str(key)
        yield id_, value
        if isinstance(value, (Mapping, list)):
            yield from _walk_ids(value, id_)
