"""Dataset construction chosen by config: caching (none / memory / disk) and pooling several datasets, each
with its own pre-processing, for MD-MoCo."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose
from torch.utils.data import ConcatDataset

logger = logging.getLogger(__name__)

__all__ = ["RecomputingPersistentDataset", "cache_key", "make_dataset", "pool_datasets", "split_by_key"]


def make_dataset(data: Sequence[Mapping], transform: Callable | Sequence[Callable], cache: str = "none",
                 cache_dir: str | os.PathLike | None = None, cache_rate: float = 1.0, num_workers: int | None = 0,
                 progress: bool = False) -> Dataset:
    """``cache="none"``: decode every epoch; ``"memory"``: MONAI ``CacheDataset`` (the deterministic prefix of
    the transform chain runs once); ``"disk"``: ``PersistentDataset`` in ``cache_dir`` (survives restarts), each
    entry keyed by the item, the size and modification time of its files (:func:`cache_key`) and the deterministic
    prefix of ``transform`` (its settings, not its code), so that one folder can serve several runs and settings;
    a cache file cut short is decoded again (:class:`RecomputingPersistentDataset`).

    Raises:
        ValueError: an unknown ``cache``, or ``"disk"`` without ``cache_dir``.
    """
    transform = transform if callable(transform) else Compose(list(transform))
    data = list(data)
    if cache == "none":
        return Dataset(data, transform)
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, progress=progress)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        # keyed by the pre-processing too: a cache written at another image size or scaling is never read back
        return RecomputingPersistentDataset(data, transform, cache_dir=cache_dir, hash_func=cache_key,
                                            hash_transform=pickle_hashing)
    raise ValueError(f"cache must be 'none', 'memory' or 'disk', got {cache!r}")


class RecomputingPersistentDataset(PersistentDataset):
    """MONAI's ``PersistentDataset`` that decodes an item again when its cache file is cut short, instead of
    stopping. MONAI writes each file in the system's temporary folder and moves it into ``cache_dir``; across file
    systems that move is a copy, so a DataLoader worker or DDP rank may open a file another one is still copying,
    and a run killed mid-copy leaves a truncated file that its resumed run would read. MONAI recomputes only files
    whose pickle is corrupt, not a truncated archive (``RuntimeError``, ``EOFError``)."""

    def _cachecheck(self, item_transformed: Any) -> Any:
        try:
            return super()._cachecheck(item_transformed)
        except (RuntimeError, EOFError):
            hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
            if not hashfile.is_file():
                raise  # not the cache file: the transforms' own error
            try:
                return torch.load(hashfile, weights_only=self.weights_only)  # another process finished copying it
            except (RuntimeError, EOFError):
                logger.warning(f"cache file {hashfile.name} is cut short: decoding its image again")
                hashfile.unlink(missing_ok=True)
            return super()._cachecheck(item_transformed)


def cache_key(item: Mapping) -> bytes:
    """MONAI's ``pickle_hashing`` of a datalist item plus the size and modification time of every file it names,
    so that a file replaced under the same name is decoded again rather than read stale from a disk cache."""
    stats = {}
    for key, value in item.items():
        if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
            info = os.stat(value)
            stats[str(key)] = (info.st_size, info.st_mtime_ns)
    return pickle_hashing({"item": dict(item), "files": stats})


def split_by_key(data: Sequence[Mapping], key: str = "dataset", default: str = "default") -> dict[str, list[dict]]:
    """Group datalist items by a tag such as ``dataset`` (insertion order kept)."""
    groups: dict[str, list[dict]] = {}
    for item in data:
        groups.setdefault(str(item.get(key, default)), []).append(dict(item))
    return groups


def _lookup(table: Mapping[str, Any], name: str, default: str, what: str) -> Any:
    if name in table:
        return table[name]
    if default in table:
        return table[default]
    raise ValueError(f"no {what} configured for '{name}' and no '{default}' entry (have {sorted(table)})")


def pool_datasets(data: Sequence[Mapping], preprocessing: Mapping[str, Sequence[Callable]],
                  augmentation: Sequence[Callable] | Mapping[str, Sequence[Callable]] = (), key: str = "dataset",
                  augmentation_key: str = "body_part", default: str = "default",
                  **dataset_kwargs: Any) -> ConcatDataset:
    """One dataset per value of ``key`` with its own pre-processing (``preprocessing[name]``, or
    ``preprocessing[default]`` for names without their own), followed by its augmentation: one shared chain, or
    a mapping looked up by the group's ``augmentation_key`` tag (e.g. left-right flips for knees and hands but
    not for chest X-rays), again with a ``default`` entry.

    Use with :class:`~muscle_ext.data.sampling.PooledSampler` to weight the datasets. With disk caching each
    dataset gets its own sub-folder, since their pre-processing differs.
    """
    groups = split_by_key(data, key, default)
    missing = [name for name in groups if name not in preprocessing and default not in preprocessing]
    if missing:
        raise ValueError(f"no pre-processing configured for dataset(s) {missing} and no '{default}' entry")
    datasets = []
    for name, items in groups.items():
        augment = augmentation
        if isinstance(augmentation, Mapping):
            tag = str(items[0].get(augmentation_key, default))
            augment = _lookup(augmentation, tag, default, f"augmentation for {augmentation_key}")
        chain = [*_lookup(preprocessing, name, default, "pre-processing"), *augment]
        kwargs = dict(dataset_kwargs)
        if kwargs.get("cache") == "disk" and kwargs.get("cache_dir") is not None:
            kwargs["cache_dir"] = os.path.join(str(kwargs["cache_dir"]), name)
        datasets.append(make_dataset(items, Compose(chain), **kwargs))
    pooled = ConcatDataset(datasets)
    pooled.names = list(groups)  # which dataset each part of the pool is, for logging and weights
    return pooled
