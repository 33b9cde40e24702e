"""Pooling several datasets: one ``ConcatDataset`` and a sampler that draws from each dataset with a chosen
weight, reproducibly by seed and epoch, each DDP rank taking a disjoint shard."""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch.distributed as dist
from monai.transforms import Compose, Randomizable
from torch.utils.data import ConcatDataset, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["DrawSeededDataset", "PooledSampler", "dataset_weights", "pool_weights"]


def dataset_weights(sizes: Sequence[int], weighting: str = "temperature", temperature: float = 2.0,
                    weights: Sequence[float] | None = None) -> np.ndarray:
    """Probability of drawing from each dataset.

    ``proportional``: by size (the plain pooled dataset); ``balanced``: equal; ``temperature``: size^(1/T),
    between the two (T=1 proportional, T->inf balanced), as used for multilingual pooling; ``weights``: given.
    """
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if (sizes_arr <= 0).any():
        raise ValueError(f"every pooled dataset needs at least one item, sizes are {list(sizes)}")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != sizes_arr.shape or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights {list(weights)} must be non-negative, one per dataset ({len(sizes)})")
    elif weighting == "proportional":
        w = sizes_arr
    elif weighting == "balanced":
        w = np.ones_like(sizes_arr)
    elif weighting == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        w = sizes_arr ** (1.0 / temperature)
    else:
        raise ValueError(f"weighting must be proportional, balanced or temperature, got {weighting!r}")
    return w / w.sum()


def pool_weights(datalist: str | os.PathLike, pooled: ConcatDataset, weighting: str = "datalist") -> list[float] | None:
    """The ``dataset_weights`` a pool file records (``muscle data pool --weight NAME=W``), in the order of
    ``pooled``'s datasets (:func:`~muscle_ext.data.pool_datasets` names them); a dataset the file does not list
    weighs 1.0. With any other ``weighting`` than ``"datalist"``: ``None`` (the sampler computes its own).

    Raises:
        ValueError: ``weighting="datalist"`` but the file records no weights (named, with the command that writes
            them), or a weight for a dataset that is not in the pool (a typo would silently weigh 1.0).
    """
    if weighting != "datalist":
        return None
    recorded = json.loads(Path(datalist).read_text()).get("dataset_weights")
    if not isinstance(recorded, dict) or not recorded:
        raise ValueError(f"{datalist}: no dataset_weights recorded; write them with `muscle data pool ... --weight "
                         "NAME=W`, or choose --dataset_weighting proportional|balanced|temperature")
    names = list(getattr(pooled, "names", []))
    unknown = sorted(set(recorded) - set(names))
    if unknown:
        raise ValueError(f"{datalist}: dataset_weights name {unknown}, not in the pool's training entries {names}")
    return [float(recorded.get(name, 1.0)) for name in names]


class PooledSampler(DistributedSampler):
    """Sample indices of a ``ConcatDataset`` so that dataset ``d`` is drawn with probability ``p_d``.

    Within a dataset, items are visited in a fresh random order and repeat only after all were seen (small
    datasets are cycled, large ones subsampled). An epoch has ``num_samples`` draws in all (default: the pooled
    size), rounded up to a multiple of the world size; rank ``r`` takes draws ``r, r + R, ...`` so ranks never
    share a draw. The order depends only on ``seed`` and the epoch (MONAI workflows call ``set_epoch`` on
    ``DistributedSampler`` subclasses, which this is).

    With ``with_seeds=True`` every draw comes as ``(index, seed)``, the seed a function of ``seed``, epoch and
    draw position only: wrap the dataset in :class:`DrawSeededDataset` and augmentations no longer depend on
    worker count, worker seeding or where a resumed run restarted. ``skip(n)`` starts the next iteration at
    this rank's ``n``-th draw, so that a run resumed mid-epoch continues with the batches it had not seen.
    """

    def __init__(self, dataset: ConcatDataset | Sequence[Dataset], weighting: str = "temperature",
                 temperature: float = 2.0, weights: Sequence[float] | None = None, num_samples: int | None = None,
                 seed: int = 0, num_replicas: int | None = None, rank: int | None = None,
                 with_seeds: bool = False) -> None:
        concat = dataset if isinstance(dataset, ConcatDataset) else ConcatDataset(list(dataset))
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(concat, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.sizes = [len(d) for d in concat.datasets]
        self.offsets = [0, *concat.cumulative_sizes[:-1]]
        self.probabilities = dataset_weights(self.sizes, weighting, temperature, weights)
        total = int(num_samples) if num_samples is not None else sum(self.sizes)
        self.total_size = math.ceil(total / num_replicas) * num_replicas
        self.num_samples = self.total_size // num_replicas
        self.with_seeds = with_seeds
        self._skip = 0

    def skip(self, n: int) -> None:
        """Start the next iteration at this rank's ``n``-th draw (once; later epochs start at 0)."""
        if not 0 <= n <= self.num_samples:
            raise ValueError(f"cannot skip {n} of {self.num_samples} draws")
        self._skip = int(n)

    def _draws(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        choice = rng.choice(len(self.sizes), size=self.total_size, p=self.probabilities)
        out = np.empty(self.total_size, dtype=np.int64)
        for d, (size, offset) in enumerate(zip(self.sizes, self.offsets, strict=True)):
            positions = np.flatnonzero(choice == d)
            if positions.size == 0:
                continue
            rounds = math.ceil(positions.size / size)
            order = np.concatenate([rng.permutation(size) for _ in range(rounds)])[: positions.size]
            out[positions] = order + offset
        return out

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        positions = np.arange(self.rank, self.total_size, self.num_replicas)[self._skip :]
        self._skip = 0
        indices = self._draws()[positions].tolist()
        if not self.with_seeds:
            return iter(indices)
        seeds = np.random.SeedSequence([self.seed, self.epoch, 0x5EED]).generate_state(self.total_size)[positions]
        return iter(zip(indices, seeds.tolist(), strict=True))

    def __len__(self) -> int:
        return self.num_samples


class DrawSeededDataset(Dataset):
    """Wraps a dataset (or ``ConcatDataset`` of MONAI datasets) so that ``ds[(index, seed)]`` re-seeds the random
    transforms before producing item ``index``: the augmentation of a draw depends on its seed alone.

    Only the transform chain of the part that holds ``index`` is re-seeded, and all of its random transforms
    share one ``RandomState`` seeded with ``seed`` (they draw from it in chain order). Re-seeding with MONAI's
    ``Compose.set_random_state`` builds a new ``RandomState`` per transform: for every part's two-view MoCo chain
    that cost 23 ms per item, four times the augmentation itself.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
        self._ends = list(dataset.cumulative_sizes) if isinstance(dataset, ConcatDataset) else [len(dataset)]
        self._transforms = [getattr(p, "transform", None) for p in parts]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            index, seed = key
            part = bisect.bisect_right(self._ends, _positive(index, len(self)))
            _share_random_state(self._transforms[part], np.random.RandomState(int(seed) % (2**32)))
            return self.dataset[index]
        return self.dataset[key]


def _positive(index: int, length: int) -> int:
    if not -length <= index < length:
        raise IndexError(f"index {index} is out of range for a dataset of {length} items")
    return index % length


def _share_random_state(transform: object, state: np.random.RandomState) -> None:
    """Point every random transform of a (possibly nested) ``Compose`` at ``state``."""
    if isinstance(transform, Compose):
        Randomizable.set_random_state(transform, state=state)  # OneOf / RandomOrder draw from the Compose's own
        for child in transform.transforms:
            _share_random_state(child, state)
    elif isinstance(transform, Randomizable):
        transform.set_random_state(state=state)
