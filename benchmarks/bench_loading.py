"""Loading throughput on the real pre-training pool: images/s for the first epoch and for cached epochs.

    python benchmarks/bench_loading.py --data ../shared/data/xray --size 224 --workers 2

Each cache mode runs the same pipeline (XRayReader -> percentile scaling -> resize/pad -> two random views)
through a DataLoader; the first epoch includes decoding (and filling the cache), later epochs reuse it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from monai.data import DataLoader

from muscle_ext.data import load_datalist, make_dataset, xray_preprocessing
from muscle_ext.data.augment import TwoViewd, moco_view_augmentations

from common import write_result


def epoch_rate(loader: DataLoader) -> float:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["image_q"].shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/xray")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=600, help="images per epoch (a fixed slice of the pool)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    items = load_datalist(args.data / "pretrain_datalist.json", "training")
    items = items[:: max(1, len(items) // args.images)][: args.images]
    transform = [*xray_preprocessing("image", size=args.size), TwoViewd("image", ("image_q", "image_k")),
                 *moco_view_augmentations("image_q", args.size, flip_lr=False),
                 *moco_view_augmentations("image_k", args.size, flip_lr=False)]
    results = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for cache in ("none", "memory", "disk"):
            start = time.perf_counter()
            # CacheDataset decodes when it is built: that time counts towards its first epoch.
            dataset = make_dataset(items, transform, cache=cache, cache_dir=cache_dir, num_workers=args.workers)
            build_s = time.perf_counter() - start
            loader = DataLoader(dataset, batch_size=32, num_workers=args.workers, shuffle=True)
            rates = [epoch_rate(loader) for _ in range(args.epochs)]
            first = len(items) / (len(items) / rates[0] + build_s)
            results[cache] = {"first_epoch_img_s": round(first, 1),
                              "cached_epochs_img_s": round(sum(rates[1:]) / max(1, len(rates) - 1), 1),
                              "wall_s": round(time.perf_counter() - start, 1)}
            print(cache, results[cache], flush=True)
    write_result("loading", {"images": len(items), "size": args.size, "workers": args.workers, "batch": 32,
                             "img_per_s": results})


if __name__ == "__main__":
    main()
