"""Training throughput of the muscle_pretrain bundle's MoCoTrainer against a plain-PyTorch MoCo loop with the
identical model, batch, precision, memory format, augmentations and data loader, timed in one process.

    python benchmarks/bench_moco_throughput.py --data ../shared/data/xray --size 96

The bundle side is built from configs/train.yaml exactly as `monai.bundle run` builds it (handlers included:
LR schedule, stats logging, resumable checkpoints every `ckpt_interval` iterations, backbone export). Rounds
alternate plain epoch / bundle epoch so that machine noise hits both alike; the first round is warm-up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from common import RESULTS, plain_moco_step, write_result

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "muscle_pretrain"


def build(args: argparse.Namespace, work: Path, amp: bool, channels_last: bool) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(args.data), "output_dir": str(work),
                   "model_dir": str(work / "models"), "image_size": args.size, "batch_size": args.batch,
                   "num_epochs": args.rounds, "warmup_epochs": 0, "cache": "memory", "num_workers": args.workers,
                   "knn_monitor": "false", "amp": amp, "channels_last": channels_last,
                   "train#sampler#num_samples": args.batch * args.iters,
                   **({"bn_splits": args.bn_splits} if args.bn_splits else {})})
    parser.parse()
    return parser


def plain_epoch(network, optimizer, scheduler, loader, amp: bool, channels_last: bool) -> int:
    """The MoCo step written by hand: what a user would write without MONAI/Ignite."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    seen = 0
    network.train()
    for batch in loader:
        im_q = batch["image_q"].as_subclass(torch.Tensor).contiguous(memory_format=memory_format)
        im_k = batch["image_k"].as_subclass(torch.Tensor).contiguous(memory_format=memory_format)
        plain_moco_step(network, optimizer, im_q, im_k, amp)
        scheduler.step()
        seen += im_q.shape[0]
    return seen


def measure(args: argparse.Namespace, name: str, amp: bool, channels_last: bool) -> dict:
    work = args.work / name
    shutil.rmtree(work, ignore_errors=True)  # a checkpoint left there would make the bundle resume
    set_determinism(0)
    parser = build(args, work, amp, channels_last)
    trainer = parser.get_parsed_content("train#trainer")
    for handler in parser.get_parsed_content("train#resume_handlers"):
        handler.attach(trainer)
    loader = parser.get_parsed_content("train#dataloader")
    # The plain loop gets its own copy of the same network and optimiser settings, and the same loader.
    fresh = ConfigParser()
    fresh.read_config(str(BUNDLE / "configs" / "train.yaml"))
    fresh.update(parser.config)
    fresh.parse()
    plain_net = fresh.get_parsed_content("network")
    plain_opt = fresh.get_parsed_content("train#optimizer")
    plain_sched = torch.optim.lr_scheduler.LambdaLR(plain_opt, lambda step: 1.0)
    images = {"plain": [], "bundle": []}
    seconds = {"plain": [], "bundle": []}
    for r in range(args.rounds):
        start = time.perf_counter()
        n = plain_epoch(plain_net, plain_opt, plain_sched, loader, amp, channels_last)
        seconds["plain"].append(time.perf_counter() - start)
        images["plain"].append(n)
        start = time.perf_counter()
        trainer.state.max_epochs = r + 1
        before = trainer.state.iteration
        trainer.run()
        seconds["bundle"].append(time.perf_counter() - start)
        images["bundle"].append((trainer.state.iteration - before) * args.batch)
        print(f"round {r}: plain {images['plain'][-1] / seconds['plain'][-1]:.1f} img/s, "
              f"bundle {images['bundle'][-1] / seconds['bundle'][-1]:.1f} img/s", flush=True)
    rate = {k: sum(images[k][1:]) / sum(seconds[k][1:]) for k in images}
    bn_splits = parser.get_parsed_content("bn_splits")  # round 0 is warm-up (cache fill)
    return {"bn_splits": bn_splits, "plain_img_s": round(rate["plain"], 2), "bundle_img_s": round(rate["bundle"], 2),
            "ratio_bundle_over_plain": round(rate["bundle"] / rate["plain"], 3),
            "per_round_img_s": {k: [round(i / s, 1) for i, s in zip(images[k], seconds[k], strict=True)]
                                for k in images}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/xray")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_throughput"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=12, help="iterations per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bn-splits", type=int, default=None, help="split-BN groups (default: train.yaml's)")
    args = parser.parse_args()
    results = {}
    # the bundle's default on this CPU first (fp32, contiguous: see train.yaml), then the alternatives
    for name, amp, channels_last in (("fp32", False, False), ("fp32_channels_last", False, True),
                                     ("bf16_channels_last", True, True)):
        results[name] = measure(args, name, amp=amp, channels_last=channels_last)
        # written after each pass, so an interrupted run keeps what it measured
        write_result("moco_throughput", {"image_size": args.size, "batch_size": args.batch,
                                         "iters_per_round": args.iters, "rounds": args.rounds,
                                         "arch": "resnet18 (ImageNet stem)",
                                         "bn_splits": results[name]["bn_splits"],
                                         "results": results})
        saved = json.loads((RESULTS / "moco_throughput.json").read_text())
        (RESULTS / "moco_throughput.md").write_text(markdown(saved))


def markdown(result: dict) -> str:
    lines = ["# MoCo training throughput: the muscle_pretrain bundle vs a plain-PyTorch loop", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}. Commit {result['commit']}.", f"Command: `{result['command']}`", "",
             f"{result['arch']}, split-BN ({result['bn_splits']} splits), {result['image_size']} px, batch "
             f"{result['batch_size']}, two augmented views from the in-memory cache, 2 loader workers; "
             f"{result['rounds']} rounds of {result['iters_per_round']} iterations, plain and bundle alternating, "
             "round 0 not counted (warm-up).", "",
             "| precision / memory format | plain img/s | bundle img/s | bundle / plain |", "|---|---|---|---|"]
    for name, r in result["results"].items():
        lines.append(f"| {name} | {r['plain_img_s']} | {r['bundle_img_s']} | {r['ratio_bundle_over_plain']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
