"""Does every bundle's training data pipeline keep up with its training step? (issue #19: "with the default loader
settings every bundle's data pipeline delivers >= 1.5x what its training step consumes at the quick preset").

    python benchmarks/bench_data_path.py                               # every bundle, quick presets, real corpus
    python benchmarks/bench_data_path.py --bundles classification --epochs 3 --steps 4 --rounds 2 --name data_path_try

For each bundle trainer, in one run on one machine:

**Loader side.** The bundle's real training ``DataLoader``, built by ``monai.bundle.ConfigParser`` from the bundle's
configs as ``python -m monai.bundle run`` reads them with the quick preset merged (``muscle_pretrain``:
``train.yaml`` + ``quick.yaml``; ``muscle_continual``: ``train.yaml`` + ``quick.yaml``, one loader per task of the
preset, as ``TaskSet.train_loader`` builds it; ``downstream``: ``common.yaml`` + the task config + ``quick.yaml``),
pointed at the real datalists under ``--data`` and otherwise with the preset's own settings (image size, batch size,
cache, ``num_workers``, ``persistent_workers``, sampler). Timed: building the dataset (the datalist read and checked,
then, with ``cache: memory``, every item decoded and pre-processed into the cache), then ``--epochs`` passes over the
loader, batches only (no model). Epoch 1 counts the cache fill (images of epoch 1 / (fill + epoch 1)); the later
epochs are the cached ones (their images / their seconds). Between epochs the loader is prepared as the trainer does:
the pooled sampler's ``set_epoch`` (MONAI's workflows), the continual trainer's reseeding of the loader's generator
(and of its transforms without workers). The time to each epoch's first batch is kept (worker start-up).

**Step side.** What the training step consumes: images/s of the same bundle's trainer at the loader's image size and
batch size, timed by ``benchmarks/bench_trainers.py`` (``build(name, args, work).engine_round()``: the real engine
built from the same configs, on synthetic in-memory batches of the pipeline's shapes and types): a warm-up round, then
``--rounds`` rounds of ``--steps`` iterations, their median. The continual trainer is measured per task (one task
visited per round), so that each task's loader is compared with its own step.

**Ratio.** loader / step for the first and for the cached epochs; flagged when the cached-epoch ratio is below
``--threshold`` (1.5). A flagged loader (or every loader with ``--profile all``) is profiled: the per-epoch part of its
transform chain item by item (each transform's ms per item, the copy out of the cache, the collation of a batch).

Writes ``<--out>/<--name>.json`` (``common.write_result``) and ``.md`` beside it. Run it on an otherwise idle machine,
from the repository root: the loader and the step share the machine's cores in training but are timed here one after
the other, so the ratio says how much headroom the loader has, not what training with both gets. The serial estimate
in the table (``num_workers: 0``: the loader runs in the training process, so its time adds to the step's) is
``1 / (1/loader + 1/step)``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_trainers
import torch
import yaml
from monai.bundle import ConfigParser
from monai.data import CacheDataset, PersistentDataset
from monai.data.meta_obj import get_track_meta, set_track_meta
from monai.data.utils import set_rnd
from monai.transforms import Compose, RandomizableTrait, Transform
from monai.utils import set_determinism
from torch.utils.data import ConcatDataset

import common

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
DEFAULT_DATA = Path("../shared/data/xray")  # relative to the repository root
THRESHOLD = 1.5
NAMES = ("pretrain", "continual", "classification", "segmentation", "detection")


@dataclass
class Bundle:
    """One bundle trainer: where its configs are and which ``bench_trainers`` builder times its step."""

    name: str
    bundle: str
    configs: list[str]
    trainer: str
    overrides: dict[str, Any] = field(default_factory=dict)  # what a bundle run without a monitor or tracking sets


def bundles() -> dict[str, Bundle]:
    off = {"use_tracking": False, "progress_bar": False}
    return {
        "pretrain": Bundle("pretrain", "muscle_pretrain", ["train.yaml", "quick.yaml"], "moco",
                           {**off, "knn_monitor": False}),
        "continual": Bundle("continual", "muscle_continual", ["train.yaml", "quick.yaml"], "continual", off),
        **{task: Bundle(task, "downstream", ["common.yaml", f"{task}.yaml", "quick.yaml"], task, off)
           for task in ("classification", "segmentation", "detection")},
    }


# ---------------------------------------------------------------------------------------------------------------
# the loader side


def parse_value(text: str) -> Any:
    """A ``--override`` value as the bundle command line types it (YAML: numbers, true/false, lists, strings)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def bundle_parser(spec: Bundle, data: Path, work: Path, overrides: dict[str, Any]) -> ConfigParser:
    """The bundle's training config with its quick preset merged, pointed at ``data`` (the bundles' ``dataset_dir``:
    every default datalist lives under it), output under ``work``."""
    root = BUNDLES / spec.bundle
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / name) for name in spec.configs])
    parser.update({"bundle_root": str(root), "dataset_dir": str(data), "output_dir": str(work), **spec.overrides,
                   **overrides})
    return parser


def dataset_of(loader: Any) -> Any:
    """The dataset under a loader's wrappers (``DrawSeededDataset``)."""
    dataset = loader.dataset
    while hasattr(dataset, "dataset") and not isinstance(dataset, (CacheDataset, PersistentDataset)):
        dataset = dataset.dataset
    return dataset


def parts(dataset: Any) -> list[Any]:
    return list(dataset.datasets) if isinstance(dataset, ConcatDataset) else [dataset]


def cache_kind(dataset: Any) -> str:
    kinds = sorted({type(p).__name__ for p in parts(dataset)})
    return "+".join(kinds)


def cache_coverage(dataset: Any) -> dict[str, int]:
    """Items held in the cache against items in the dataset (a cache miss decodes again in every epoch)."""
    items = cached = 0
    for p in parts(dataset):
        items += len(p)
        if isinstance(p, CacheDataset):
            cached += sum(1 for entry in (p._cache or []) if entry is not None) if not p.hash_as_key else p.cache_num
        elif isinstance(p, PersistentDataset) and p.cache_dir is not None:
            cached += sum(1 for _ in Path(p.cache_dir).glob("*.pt"))
    return {"items": items, "cached_items": cached}


def batch_images(batch: Any) -> int:
    """Images (samples) in a batch: collated dicts (``image``, or MoCo's ``image_q``), or lists of items."""
    if isinstance(batch, (list, tuple)):
        return len(batch)
    for key in ("image", "image_q"):
        if key in batch:
            return int(batch[key].shape[0])
    raise ValueError(f"cannot count the images of a batch with keys {sorted(batch)}")


@dataclass
class Loader:
    """A bundle's training loader, just built, and what its building cost."""

    name: str
    loader: Any
    image_size: int
    batch_size: int
    datalist_s: float
    fill_s: float
    continual_seed: int | None = None  # the continual trainer reseeds each pass (visit) of its loaders

    def settings(self) -> dict[str, Any]:
        loader, dataset = self.loader, dataset_of(self.loader)
        sampler = loader.sampler
        return {"image_size": self.image_size, "batch_size": self.batch_size, "num_workers": loader.num_workers,
                "persistent_workers": bool(loader.persistent_workers), "cache": cache_kind(dataset),
                **cache_coverage(dataset), "sampler": type(sampler).__name__, "drop_last": loader.drop_last,
                "batches_per_epoch": len(loader), "images_per_epoch": len(loader) * self.batch_size
                if loader.drop_last else len(sampler)}


def build_loaders(spec: Bundle, parser: ConfigParser, seed: int, tasks: list[str] | None) -> Iterator[Loader]:
    """The bundle's training loader(s), each built (and its cache filled) as the bundle builds it; one per task for
    the continual bundle, built in turn so that one cache is held at a time."""
    if spec.name == "continual":
        task_set = parser.get_parsed_content("task_set")
        for task in tasks or task_set.names:
            if task not in task_set.specs:
                raise ValueError(f"continual: no task {task!r} in the preset (has {', '.join(task_set.names)})")
            set_determinism(seed)
            start = time.perf_counter()
            task_set.data(task, "training")  # the datalist read and checked
            checked = time.perf_counter()
            loader = task_set.train_loader(task)
            yield Loader(f"continual/{task}", loader, task_set.image_size, task_set.batch_size,
                         checked - start, time.perf_counter() - checked, continual_seed=seed)
        return
    set_determinism(seed)  # as the bundles' `initialize`
    start = time.perf_counter()
    parser.get_parsed_content("train#dataset#data")
    checked = time.perf_counter()
    parser.get_parsed_content("train#dataset")
    filled = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")
    yield Loader(spec.name, loader, int(parser.get_parsed_content("image_size")),
                 int(parser.get_parsed_content("batch_size")), checked - start, filled - checked)


def prepare_epoch(item: Loader, epoch: int) -> None:
    """What the trainer does to its loader before a pass: MONAI's workflows call ``set_epoch`` (1-based) on a
    ``DistributedSampler`` (the pre-training bundle's ``PooledSampler`` is one); the continual trainer reseeds the
    loader's generator at every visit and, without workers, the dataset's random transforms."""
    loader = item.loader
    if item.continual_seed is not None:
        seed = item.continual_seed * 1000 + epoch
        if isinstance(getattr(loader, "generator", None), torch.Generator):
            loader.generator.manual_seed(seed)
        if loader.num_workers == 0:
            set_rnd(loader.dataset, seed % 2**32)
    elif isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch + 1)


def time_epochs(item: Loader, epochs: int) -> list[dict[str, float]]:
    """``epochs`` passes over the loader, batches only: images, seconds, images/s and the wait for the first batch
    (worker start-up without persistent workers) of each."""
    out = []
    for epoch in range(epochs):
        prepare_epoch(item, epoch)
        gc.collect()
        start = time.perf_counter()
        images, first = 0, None
        for batch in item.loader:
            if first is None:
                first = time.perf_counter() - start
            images += batch_images(batch)
        seconds = time.perf_counter() - start
        out.append({"images": images, "seconds": round(seconds, 3), "img_s": round(images / seconds, 1),
                    "first_batch_s": round(first or 0.0, 3)})
    return out


def stop_workers(loader: Any) -> None:
    """End a loader's persistent worker processes (the bundle's config still holds the loader)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if hasattr(loader, "_iterator"):
        loader._iterator = None


def loader_rates(epochs: list[dict[str, float]], fill_s: float) -> dict[str, float | None]:
    """Images/s of epoch 1 counting the cache fill, of epoch 1 alone, and of the cached epochs (all their images over
    all their seconds; ``None`` with one epoch)."""
    first = epochs[0]
    cached = epochs[1:]
    return {"first_epoch": round(first["images"] / (first["seconds"] + fill_s), 1),
            "first_epoch_without_fill": round(first["images"] / first["seconds"], 1),
            "cached": round(sum(e["images"] for e in cached) / sum(e["seconds"] for e in cached), 1) if cached
            else None}


# ---------------------------------------------------------------------------------------------------------------
# the step side


def step_rate(spec: Bundle, task: str | None, image_size: int, batch_size: int, args: argparse.Namespace,
              work: Path) -> dict[str, Any]:
    """The bundle trainer's images/s on synthetic batches of the loader's size (``bench_trainers``): a warm-up
    round, then the median of ``args.rounds`` rounds of ``args.steps`` iterations."""
    argv = ["--image-size", str(image_size), "--batch-size", str(batch_size), "--steps", str(args.steps),
            "--repeats", str(args.rounds), "--seed", str(args.seed), "--work", str(work)]
    if task is not None:
        argv += ["--continual-tasks", task]
    pair = bench_trainers.build(spec.trainer, bench_trainers.arguments(argv), work)
    warm_n, warm_s = pair.engine_round()
    rates = []
    for _ in range(args.rounds):
        gc.collect()
        n, seconds = pair.engine_round()
        rates.append(n / seconds)
    out = {"img_s": round(statistics.median(rates), 2), "per_round_img_s": [round(r, 1) for r in rates],
           "warmup_img_s": round(warm_n / warm_s, 1), "engine": type(pair.trainer).__name__,
           "network": pair.info.get("network"), "amp": pair.info.get("amp"), "device": str(pair.device)}
    del pair
    gc.collect()
    return out


def ratios(loader: dict[str, float | None], step_img_s: float) -> dict[str, float | None]:
    """loader images/s over step images/s, for the first epoch (cache fill counted) and the cached epochs."""
    return {"first_epoch": round(loader["first_epoch"] / step_img_s, 2),
            "cached": None if loader["cached"] is None else round(loader["cached"] / step_img_s, 2)}


def serial_estimate(loader_img_s: float | None, step_img_s: float) -> float | None:
    """Training images/s when the loader runs in the training process (``num_workers: 0``): the times add."""
    return None if not loader_img_s else round(1.0 / (1.0 / loader_img_s + 1.0 / step_img_s), 1)


# ---------------------------------------------------------------------------------------------------------------
# profiling a loader


def _leaves(transforms: list[Any], meta_free: bool = False) -> Iterator[tuple[Any, bool]]:
    """The transforms of a chain (nested ``Compose`` opened) in the order they run, each with whether it runs with
    MONAI's meta-data tracking off (inside a ``MetaFreeCompose``). No ``Compose`` is built here: building one
    reseeds its random transforms, which would give every profiled item the same draw."""
    for transform in transforms:
        if isinstance(transform, Compose):
            inner = meta_free or type(transform).__name__ == "MetaFreeCompose"
            yield from _leaves(list(transform.transforms), inner)
        else:
            yield transform, meta_free


def _label(transform: Any) -> str:
    keys = getattr(transform, "keys", None)
    keys = f"({', '.join(map(str, keys))})" if keys else ""
    return f"{type(transform).__name__}{keys}"


def per_epoch_chain(part: Any) -> tuple[list[Any], bool]:
    """The part of a dataset's transform chain that runs at every epoch (after the cache) and whether items come
    out of a cache."""
    transform = part.transform
    if isinstance(part, (CacheDataset, PersistentDataset)) and isinstance(transform, Compose):
        start = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
        return ([] if start is None else list(transform.transforms[start:])), True
    return (list(transform.transforms) if isinstance(transform, Compose) else [transform]), False


@dataclass
class ProfileSource:
    """What profiling a loader needs, kept without the loader (whose worker processes then end)."""

    dataset: Any
    collate_fn: Any
    batch_size: int
    threads: int | None  # a worker process's torch threads (1); None: the training process's own

    @classmethod
    def of(cls, item: Loader) -> ProfileSource:
        return cls(dataset_of(item.loader), item.loader.collate_fn, item.batch_size,
                   1 if item.loader.num_workers > 0 else None)


def profile_loader(source: ProfileSource, n_items: int) -> dict[str, Any]:
    """Where a loader's per-epoch time goes, in this process with the torch threads of the process that does the
    work (one in a worker, as ``DataLoader`` sets): for ``n_items`` items spread over the dataset (after one
    untimed), the copy out of the cache and each transform of the per-epoch chain (ms per item), then the loader's
    collation of one batch (ms per item)."""
    threads = torch.get_num_threads()
    if source.threads:
        torch.set_num_threads(source.threads)
    try:
        return _profile(source, n_items)
    finally:
        torch.set_num_threads(threads)


def _profile(source: ProfileSource, n_items: int) -> dict[str, Any]:
    pool = parts(source.dataset)
    sizes = [len(p) for p in pool]
    total = sum(sizes)
    picks = sorted({int(i * total / n_items) for i in range(min(n_items, total))})
    picks = [picks[0], *picks]  # the first pass is a warm-up (lazy initialisation), not timed
    timings: dict[str, float] = {}
    order: list[str] = []
    samples = []

    def add(label: str, seconds: float) -> None:
        if label not in timings:
            timings[label] = 0.0
            order.append(label)
        timings[label] += seconds

    tracking = get_track_meta()
    try:
        for position, index in enumerate(picks):
            if position == 1:  # after the warm-up item
                timings.clear()
                order.clear()
                samples.clear()
            p, local = 0, index
            while local >= sizes[p]:
                local -= sizes[p]
                p += 1
            part = pool[p]
            chain, cached = per_epoch_chain(part)
            start = time.perf_counter()
            if cached and isinstance(part, CacheDataset):
                data = part._cache[local] if part._cache and part._cache[local] is not None else part.data[local]
                data = copy.deepcopy(data) if part.copy_cache else data
            elif cached:  # PersistentDataset: the deterministic prefix from its file
                chain_all = part.transform
                first = chain_all.get_index_of_first(lambda t: isinstance(t, RandomizableTrait)
                                                     or not isinstance(t, Transform))
                data = part._cachecheck(part.data[local]) if first is not None else part[local]
            else:
                data = dict(part.data[local])
            add("copy out of the cache" if cached else "(item from the datalist)", time.perf_counter() - start)
            for leaf, meta_free in _leaves(chain):
                set_track_meta(not meta_free and tracking)
                start = time.perf_counter()
                data = leaf(data)
                add(_label(leaf), time.perf_counter() - start)
                set_track_meta(tracking)
            samples.append(data)
    finally:
        set_track_meta(tracking)
    collate = source.collate_fn
    batch = samples[: source.batch_size]
    start = time.perf_counter()
    collate(batch)
    collate_ms = (time.perf_counter() - start) * 1000 / max(1, len(batch))
    n = len(samples)
    rows = [[label, round(timings[label] * 1000 / n, 3)] for label in order]
    rows.append([f"collate ({getattr(collate, '__name__', type(collate).__name__)})", round(collate_ms, 3)])
    total_ms = sum(ms for _, ms in rows)
    return {"items": n, "torch_threads": torch.get_num_threads(), "ms_per_item": rows,
            "total_ms_per_item": round(total_ms, 3),
            "one_process_img_s": round(1000.0 / total_ms, 1) if total_ms else None,
            "top": sorted(rows, key=lambda r: -r[1])[:3]}


# ---------------------------------------------------------------------------------------------------------------
# one bundle


def measure_bundle(spec: Bundle, args: argparse.Namespace, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    parser = bundle_parser(spec, args.data, work / "bundle_output", overrides)
    result: dict[str, Any] = {"bundle": spec.bundle, "configs": spec.configs, "trainer": spec.trainer,
                              "overrides": {k: v for k, v in overrides.items()}, "loaders": {}}
    tasks = args.continual_tasks if spec.name == "continual" else None
    for item in build_loaders(spec, parser, args.seed, tasks):
        task = item.name.split("/", 1)[1] if "/" in item.name else None
        print(f"{item.name}: built in {item.datalist_s + item.fill_s:.1f} s; {args.epochs} epochs", flush=True)
        entry: dict[str, Any] = {"settings": item.settings(), "build": {"datalist_s": round(item.datalist_s, 3),
                                                                        "cache_fill_s": round(item.fill_s, 3)}}
        entry["epochs"] = time_epochs(item, args.epochs)
        entry["loader_img_s"] = loader_rates(entry["epochs"], item.fill_s)
        print(f"  loader: {entry['loader_img_s']}", flush=True)
        source = ProfileSource.of(item) if args.profile != "none" else None
        stop_workers(item.loader)  # before the step is timed
        item.loader = None
        gc.collect()
        entry["step"] = step_rate(spec, task, item.image_size, item.batch_size, args, work / "step" / item.name)
        step = entry["step"]["img_s"]
        print(f"  step: {step} img/s ({entry['step']['per_round_img_s']})", flush=True)
        entry["ratio"] = ratios(entry["loader_img_s"], step)
        cached = entry["ratio"]["cached"]
        entry["below_threshold"] = cached is not None and cached < args.threshold
        if entry["settings"]["num_workers"] == 0:
            entry["serial_estimate_img_s"] = serial_estimate(entry["loader_img_s"]["cached"], step)
        if source is not None and (args.profile == "all" or entry["below_threshold"]):
            print(f"  profiling the loader's per-epoch chain ({args.profile_items} items)", flush=True)
            entry["profile"] = profile_loader(source, args.profile_items)
        result["loaders"][item.name] = entry
        del item, source
        gc.collect()
    return result


# ---------------------------------------------------------------------------------------------------------------
# output


def measure_decoding(data: Path, n_items: int, rounds: int = 3, size: int = 64) -> dict[str, Any]:
    """The deterministic loading chain (``xray_preprocessing`` at ``size`` px) item by item on the first
    ``n_items`` training X-rays of ``pneumonia_nih`` and of the pre-training pool, once with MONAI's
    ``ScaleIntensityRangePercentilesd`` and once with ours (``RobustIntensityScaled``, the bundles' default),
    alternating for ``rounds`` rounds: ms per item (medians) and the ratio. What every cache fill and every
    uncached epoch pays per image."""
    from monai.transforms import Compose, ScaleIntensityRangePercentilesd

    from muscle_ext.data import RobustIntensityScaled, load_datalist, xray_preprocessing

    def chain(monai_scaling: bool) -> Compose:
        steps = xray_preprocessing("image", size=size)
        if monai_scaling:
            steps = [ScaleIntensityRangePercentilesd(t.keys, t.scaler.lower, t.scaler.upper, t.scaler.b_min,
                                                     t.scaler.b_max, clip=t.scaler.clip)
                     if isinstance(t, RobustIntensityScaled) else t for t in steps]
        return Compose(steps)

    out: dict[str, Any] = {"size": size, "items": n_items, "rounds": rounds, "datasets": {}}
    for name, datalist in (("pneumonia_nih", data / "pneumonia_nih" / "datalist.json"),
                           ("pretrain pool", data / "pretrain_datalist.json")):
        items = load_datalist(datalist, "training")[:n_items]
        chains = {"monai": chain(True), "ours": chain(False)}
        times: dict[str, list[float]] = {k: [] for k in chains}
        for _ in range(rounds):
            for kind, transform in chains.items():
                start = time.perf_counter()
                for item in items:
                    transform(dict(item))
                times[kind].append(1000 * (time.perf_counter() - start) / len(items))
        monai_ms, ours_ms = statistics.median(times["monai"]), statistics.median(times["ours"])
        out["datasets"][name] = {"monai_ms_per_item": round(monai_ms, 2), "ours_ms_per_item": round(ours_ms, 2),
                                 "speedup": round(monai_ms / ours_ms, 2),
                                 "per_round_ms": {k: [round(v, 2) for v in t] for k, t in times.items()}}
    return out


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def reading(result: dict) -> list[str]:
    """A short reading of the numbers (what falls below the threshold and the profile's heaviest steps)."""
    rows = [(name, e) for r in result["results"].values() if "loaders" in r for name, e in r["loaders"].items()]
    if not rows:
        return ["Nothing was measured."]
    threshold = result["settings"]["threshold"]
    low = [(n, e) for n, e in rows if e["below_threshold"]]
    cached = [(e["ratio"]["cached"], n) for n, e in rows if e["ratio"]["cached"] is not None]
    lines = []
    if cached:
        worst = min(cached)
        lines.append(f"Cached epochs: the lowest loader / step ratio is {worst[0]}x ({worst[1]}); "
                     + ("every loader is above " if not low else f"{len(low)} of {len(rows)} below ")
                     + f"{threshold}x.")
    first = [(e["ratio"]["first_epoch"], n) for n, e in rows]
    worst_first = min(first)
    lines.append(f"First epochs (decode and cache fill counted): lowest {worst_first[0]}x ({worst_first[1]}); a "
                 "first epoch below the step's rate costs once per run, not per epoch.")
    for name, e in low:
        p = e.get("profile")
        text = f"{name} is below {threshold}x in cached epochs ({e['ratio']['cached']}x)"
        if p:
            top = "; ".join(f"`{label}` {ms} ms" for label, ms in p["top"])
            text += (f": its per-epoch chain costs {p['total_ms_per_item']} ms per item in one process "
                     f"({p['one_process_img_s']} img/s), most in {top}")
        lines.append(text + ".")
    for name, e in rows:
        later = e["epochs"][1:]
        if later and e["settings"]["num_workers"] > 0 and not e["settings"]["persistent_workers"]:
            wait = statistics.mean(x["first_batch_s"] for x in later)
            share = wait / statistics.mean(x["seconds"] for x in later)
            lines.append(f"{name}: without persistent workers each cached epoch waits {wait:.2f} s for its first "
                         f"batch ({100 * share:.0f} % of the epoch): worker start-up plus one batch made by one "
                         "worker.")
    return lines


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = ["# Each bundle's training data pipeline against its training step (quick presets)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}, "
             f"{m['torch_threads']} torch threads. Commit {result['commit']}, {result['when']}.", "",
             f"Command: `{result['command']}`", "",
             f"Data: `{s['data']}` (the real corpus's datalists). Loader: the bundle's own training DataLoader from "
             "its configs with the quick preset merged, the preset's settings as they are; the first epoch counts the "
             f"cache fill (images / (fill + epoch)), then {s['epochs'] - 1} cached epoch(s) (images / seconds), "
             "batches only, no model. Step: the bundle's trainer (benchmarks/bench_trainers.py: the real engine on "
             f"synthetic in-memory batches at the loader's image size and batch), median of {s['rounds']} rounds of "
             f"{s['steps']} iterations after a warm-up round. Ratio: loader / step; **below** when the cached ratio "
             f"is under {s['threshold']}. Loader and step are timed one after the other; in training they share the "
             "cores (with `num_workers: 0` the loader runs in the training process and its time adds: "
             "'serial' = 1 / (1/loader + 1/step)).", ""]
    notes = result.get("notes", {})
    for name, r in result["results"].items():
        lines += [f"## {name} ({r.get('bundle', '?')}: {', '.join(r.get('configs', []))})", ""]
        if "error" in r:
            lines += [f"Failed: {r['error']}", ""]
            continue
        lines += ["| loader | workers; persistent; cache | items/epoch | build + fill (s) | first epoch img/s | "
                  "cached img/s | step img/s | first / step | cached / step | serial img/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for loader_name, e in r["loaders"].items():
            st, b, li, ra = e["settings"], e["build"], e["loader_img_s"], e["ratio"]
            flag = " **below**" if e["below_threshold"] else ""
            lines.append(
                f"| {loader_name} | {st['num_workers']}; {'yes' if st['persistent_workers'] else 'no'}; {st['cache']} "
                f"({st['cached_items']}/{st['items']} cached) | {e['epochs'][0]['images']} | "
                f"{b['datalist_s']} + {b['cache_fill_s']} | {li['first_epoch']} ({li['first_epoch_without_fill']} "
                f"without fill) | {_fmt(li['cached'])} | {e['step']['img_s']} | {ra['first_epoch']} | "
                f"{_fmt(ra['cached'])}{flag} | {_fmt(e.get('serial_estimate_img_s'))} |")
        lines.append("")
        for loader_name, e in r["loaders"].items():
            st = e["settings"]
            lines.append(f"- {loader_name}: {st['image_size']} px, batch {st['batch_size']}, {st['sampler']}, "
                         f"{st['batches_per_epoch']} batches/epoch; per epoch img/s "
                         f"{', '.join(str(x['img_s']) for x in e['epochs'])}, first batch after "
                         f"{', '.join(str(x['first_batch_s']) for x in e['epochs'])} s; step "
                         f"{e['step']['engine']} ({e['step']['network']}{', bf16' if e['step']['amp'] else ''}) per "
                         f"round {', '.join(map(str, e['step']['per_round_img_s']))} img/s")
        if name in notes:
            lines += ["", notes[name]]
        lines.append("")
        for loader_name, e in r["loaders"].items():
            p = e.get("profile")
            if not p:
                continue
            lines += [f"### {loader_name}: the per-epoch chain, item by item in one process ({p['items']} items)", "",
                      f"{p['total_ms_per_item']} ms per item ({p['one_process_img_s']} img/s in one process with "
                      f"{p['torch_threads']} torch thread(s), as the loader's "
                      f"{'workers' if e['settings']['num_workers'] else 'training process'}).", "",
                      "| step | ms per item |", "|---|---|"]
            lines += [f"| `{label}` | {ms} |" for label, ms in p["ms_per_item"]]
            lines.append("")
    decoding = result.get("decoding")
    if decoding:
        lines += ["## Decoding: MONAI's percentile scaling against ours", "",
                  f"The deterministic loading chain (`xray_preprocessing`, {decoding['size']} px) item by item on the "
                  f"first {decoding['items']} training images, with MONAI's `ScaleIntensityRangePercentilesd` (a "
                  "full sort, `torch.quantile`, below 1e6 pixels) and with `RobustIntensityScaled` (the same values "
                  f"by selection, `numpy.percentile`; the bundles' default), alternating, median of "
                  f"{decoding['rounds']} rounds. Every cache fill and uncached epoch pays this per image.", "",
                  "| images | MONAI ms/item | ours ms/item | speed-up |", "|---|---|---|---|"]
        lines += [f"| {name} | {d['monai_ms_per_item']} | {d['ours_ms_per_item']} | {d['speedup']}x |"
                  for name, d in decoding["datasets"].items()]
        lines.append("")
    lines += ["## Reading", ""] + [f"- {line}" for line in reading(result)]
    if "reading" in notes:
        lines += ["", notes["reading"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# command line


def relative(path: str | os.PathLike) -> str:
    """A path as seen from the repository root when it lies in the repository's parent folder (no machine paths)."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    absolute = Path(os.path.abspath(p))  # symbolic links kept: ../shared may be one
    with contextlib.suppress(ValueError):
        absolute.relative_to(REPO.parent)
        return os.path.relpath(absolute, REPO)
    return str(p)


def recorded_command() -> None:
    """``sys.argv`` with the script and any path under the repository's parent folder relative to the repository
    root, so that the recorded command names no machine path and runs from the root."""
    sys.argv = [relative(sys.argv[0]), *(relative(a) if a.startswith("/") else a for a in sys.argv[1:])]


@contextlib.contextmanager
def results_folder(folder: Path) -> Iterator[None]:
    """``common.write_result`` writes into ``common.RESULTS``: point it at ``folder`` for the duration."""
    saved = common.RESULTS
    common.RESULTS = folder
    try:
        yield
    finally:
        common.RESULTS = saved


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the real X-ray corpus (default ../shared/data/xray, relative to the repository root)")
    parser.add_argument("--bundles", nargs="+", choices=NAMES, default=list(NAMES), metavar="NAME",
                        help=f"bundle trainers to measure, of {', '.join(NAMES)} (default: all)")
    parser.add_argument("--continual-tasks", nargs="+", default=None, metavar="TASK",
                        help="the continual bundle's tasks to measure (default: every task of its quick preset)")
    parser.add_argument("--epochs", type=int, default=4, help="loader epochs: the first, then cached ones (default 4)")
    parser.add_argument("--rounds", type=int, default=5, help="timed step rounds after a warm-up round (default 5)")
    parser.add_argument("--steps", type=int, default=8, help="iterations per step round (default 8)")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                        help="bundle settings for the loaders, as on the bundle command line (YAML values), e.g. "
                             "num_workers=0 max_items=64; the step follows the loader's image and batch size")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="flag cached ratios below (default 1.5)")
    parser.add_argument("--profile", choices=("flagged", "all", "none"), default="flagged",
                        help="profile the per-epoch transform chain of flagged loaders (default), all or none")
    parser.add_argument("--profile-items", type=int, default=64, help="items profiled per loader (default 64)")
    parser.add_argument("--decode-items", type=int, default=64,
                        help="images per dataset of the decoding comparison, MONAI's scaling vs ours (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_data_path"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=common.RESULTS,
                        help="folder of the result files (default benchmarks/results)")
    parser.add_argument("--name", default="data_path", help="result file name (default data_path)")
    parser.add_argument("--render", action="store_true", help="only rewrite <name>.md from <name>.json")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.rounds < 1 or args.steps < 1 or args.profile_items < 1:
        parser.error("--epochs must be at least 2 (one first, one cached), --rounds, --steps, --profile-items >= 1")
    bad = [o for o in args.override if "=" not in o]
    if bad:
        parser.error(f"--override takes KEY=VALUE, got {bad}")
    args.overrides = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.override)}
    if not args.data.is_absolute():
        args.data = Path(os.path.abspath(REPO / args.data))  # not resolve(): a linked ../shared stays relative
    return args


def run(args: argparse.Namespace) -> dict:
    """Measure ``args.bundles``; writes the result files after each bundle and returns the saved result."""
    if not (args.data / "pretrain_datalist.json").is_file():
        raise SystemExit(f"no X-ray corpus at {args.data} (pretrain_datalist.json missing): pass --data")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {"data": relative(args.data), "bundles": args.bundles, "continual_tasks": args.continual_tasks,
                "epochs": args.epochs, "rounds": args.rounds, "steps": args.steps, "overrides": args.overrides,
                "threshold": args.threshold, "seed": args.seed, "profile": args.profile}
    specs = bundles()
    results: dict[str, dict] = {}
    saved: dict = {}
    decoding = measure_decoding(args.data, args.decode_items) if args.decode_items else None
    for name in args.bundles:
        start = time.perf_counter()
        work = args.work / name
        shutil.rmtree(work, ignore_errors=True)  # this script's own folder of an earlier run
        print(f"{name}: building its training loader(s) from {', '.join(specs[name].configs)}", flush=True)
        try:
            results[name] = measure_bundle(specs[name], args, args.overrides, work)
        except Exception as exc:  # one bundle that fails leaves the others measured
            logging.exception(f"{name}: failed")
            results[name] = {"bundle": specs[name].bundle, "configs": specs[name].configs,
                             "error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{name}: failed: {exc}", flush=True)
        results[name]["wall_s"] = round(time.perf_counter() - start, 1)
        with results_folder(args.out):
            path = common.write_result(args.name, {"settings": settings, "results": results,
                                                   **({"decoding": decoding} if decoding else {})})
        saved = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(saved))
    return saved


def main() -> None:
    args = arguments()
    if args.render:
        path = args.out / f"{args.name}.json"
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(path.with_suffix(".md").read_text())
        return
    recorded_command()
    args.work.mkdir(parents=True, exist_ok=True)
    bench_trainers.log_to_file(args.work / "engines.log")  # the engines' per-iteration log lines, out of the console
    run(args)
    print()
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
