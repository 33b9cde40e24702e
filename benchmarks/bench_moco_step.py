"""One MoCo training step without data loading (random inputs), for each precision x memory format x split-BN
setting: the measurement behind the defaults of `amp` and `channels_last` in bundles/muscle_pretrain/configs/train.yaml.

    python benchmarks/bench_moco_step.py --size 96 --batch 64

Whether bf16 pays off depends on the CPU (AMX or not), so the result records the CPU's bf16 features. Median of
`--steps` timed steps after one warm-up step; the machine is shared: read the numbers as ratios within one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from muscle_ext.networks import MoCo, build_backbone

from common import RESULTS, plain_moco_step, write_result


def step_rate(bn_splits: int, bf16: bool, channels_last: bool, size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    moco = MoCo(build_backbone("resnet18", imagenet_stem=True), queue_size=1024, bn_splits=bn_splits)
    moco = moco.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.01, momentum=0.9)
    views = [torch.randn(batch, 1, size, size).contiguous(memory_format=memory_format) for _ in range(2)]
    seconds = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        plain_moco_step(moco, optimizer, *views, amp=bf16)
        seconds.append(time.perf_counter() - start)
    return batch / statistics.median(seconds[1:])


def markdown(result: dict) -> str:
    lines = ["# One MoCo step (no data loading): precision x memory format x split-BN", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}; CPU bf16 features: {result['cpu_bf16']}. Commit {result['commit']}.",
             f"Command: `{result['command']}`", "",
             f"resnet18 (ImageNet stem), queue 1024, {result['image_size']} px, batch {result['batch_size']}, median "
             f"of {result['steps']} steps.", "",
             "| bn_splits | precision | memory format | img/s | vs fp32 contiguous (same bn_splits) |",
             "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['bn_splits']} | {row['precision']} | {row['memory_format']} | {row['img_s']} | "
                     f"{row['relative']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for bn_splits, bf16, channels_last in itertools.product((8, 2, 1), (False, True), (False, True)):
        rate = step_rate(bn_splits, bf16, channels_last, args.size, args.batch, args.steps)
        rows.append({"bn_splits": bn_splits, "precision": "bf16 autocast" if bf16 else "fp32",
                     "memory_format": "channels_last" if channels_last else "contiguous", "img_s": round(rate, 1)})
        print(rows[-1], flush=True)
    for row in rows:
        base = next(r for r in rows if r["bn_splits"] == row["bn_splits"] and r["precision"] == "fp32"
                    and r["memory_format"] == "contiguous")
        row["relative"] = round(row["img_s"] / base["img_s"], 2)
    cpu_bf16 = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported()}
    write_result("moco_step", {"image_size": args.size, "batch_size": args.batch, "steps": args.steps,
                               "cpu_bf16": cpu_bf16, "rows": rows})
    (RESULTS / "moco_step.md").write_text(markdown(json.loads((RESULTS / "moco_step.json").read_text())))


if __name__ == "__main__":
    main()
