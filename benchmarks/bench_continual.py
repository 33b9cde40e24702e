"""MUSCLE vs MUSCLE-- vs the joint multi-task baseline on the real X-ray tasks: the muscle_continual bundle from one
MD-MoCo backbone, with the cyclic reshuffled schedule and cross-task memorization (MUSCLE), without them (MUSCLE--:
fixed task order, no L2-SP pull), and with every task in every step (joint), the same tasks and batches per task.

    python benchmarks/bench_continual.py --mdmoco runs/md_moco/models/backbone.pt --data ../shared/data/xray \\
        --work /tmp/bench_continual

Records each run's wall time, peak RSS, its per-round validation scores (task_metrics.json: every task after every
round, and forgetting = best - final) and the summaries of its visit matrix (forgetting.json: average, BWT, FWT,
forgetting), and writes benchmarks/results/continual.json and .md. The exported
backbones are what `bench_downstream.py --checkpoint muscle=... --checkpoint muscle_minus=...` fine-tunes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import RESULTS, monai_run, write_result

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "muscle_continual"
VARIANTS = {"muscle": {"reshuffle": True}, "muscle_minus": {"reshuffle": False, "memorization_weight": 0.0},
            "joint": {"task_mixing": "joint"},
            # the other memorization methods in MUSCLE's schedule, each alone. EWC's weight puts its mean per-parameter
            # stiffness (mean diagonal Fisher ~5e-7 on pneumonia at 64 px) near L2-SP's 0.01
            "muscle_ewc": {"reshuffle": True, "memorization_weight": 0.0, "ewc_weight": 2.0e4},
            "muscle_distillation": {"reshuffle": True, "memorization_weight": 0.0, "distillation_weight": 1.0}}


def run_variant(args: argparse.Namespace, name: str) -> dict:
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make the bundle resume
    overrides = {"dataset_dir": args.data, "output_dir": out, "model_dir": out / "models", "init_weights": args.mdmoco,
                 "image_size": args.size, "batch_size": args.batch, "rounds": args.rounds,
                 "steps_per_visit": args.steps, "learning_rate": args.lr, "num_workers": args.workers,
                 "seed": args.seed, "cache": "memory", "use_tracking": False, **VARIANTS[name]}
    if args.tasks:
        overrides["tasks"] = repr(args.tasks)
    if args.max_items:
        overrides["max_items"] = args.max_items
    if name == "muscle":
        overrides["memorization_weight"] = args.memorization_weight
    if name == "joint":  # the joint schedule has no order and no visits: these settings are refused with it
        overrides.pop("reshuffle", None)
    out.mkdir(parents=True)
    run = monai_run(BUNDLE, ["train.yaml"], overrides, out / "train.log")
    visits = json.loads((out / "forgetting.json").read_text())
    return {**run, "backbone": str(out / "models" / "backbone.pt"),
            "task_metrics": json.loads((out / "task_metrics.json").read_text()),
            "continual": {k: visits["summary"].get(k) for k in ("average", "bwt", "fwt", "mean_forgetting")}}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# Multi-task continual learning: MUSCLE, MUSCLE-- and the joint multi-task baseline", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}. Commit {result['commit']}.", f"Command: `{result['command']}`", "",
             f"From the same MD-MoCo backbone: {s['rounds']} rounds, {s['steps_per_visit']} iterations of batch "
             f"{s['batch_size']} per task and round at {s['image_size']} px, AdamW learning rate "
             f"{s['learning_rate']}, seed {s['seed']}. MUSCLE: a new task order every round and an L2-SP pull "
             f"of weight {s['memorization_weight']} towards the start-of-visit backbone; MUSCLE--: tasks in a fixed "
             "order, no pull; joint: every task in every step. Validation split after every round; forgetting = "
             "best round's score - final score. From the visit matrix (every task after every visit): average final "
             "score, backward transfer (BWT), forward transfer (FWT), mean forgetting.", ""]
    first = next(iter(result["variants"].values()))
    metrics = list(first["task_metrics"]["summary"])
    lines += ["| variant | " + " | ".join(f"{m} final (best, round)" for m in metrics)
              + " | mean forgetting (rounds) | BWT | FWT | wall (s) | peak RSS (GiB) |",
              "|---|" + "---|" * (len(metrics) + 5)]

    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for name, r in result["variants"].items():
        summary = r["task_metrics"]["summary"]
        cells = [f"{summary[m]['final']:.3f} ({summary[m]['best']:.3f}, {summary[m]['best_round']})" for m in metrics]
        forgetting = sum(summary[m]["forgetting"] for m in metrics) / len(metrics)
        continual = r.get("continual", {})
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {forgetting:.3f} | {number(continual.get('bwt'))} | "
                     f"{number(continual.get('fwt'))} | {r['wall_s']} | {r['peak_rss_gib']} |")
    for name, r in result["variants"].items():
        lines += ["", f"{name}, validation after each round:", "", "| round | " + " | ".join(metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for round_index, m in r["task_metrics"]["rounds"].items():
            lines.append(f"| {round_index} | " + " | ".join(f"{m[k]:.3f}" for k in metrics) + " |")
        lines += ["", f"Command: `{r['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdmoco", type=Path, required=True, help="MD-MoCo backbone (muscle-backbone/1 file)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/xray")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_continual"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="iterations per task visit")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--memorization-weight", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", help="a subset of the bundle's tasks (default: all four)")
    parser.add_argument("--max-items", type=int, help="at most this many items per split and task (quick preset: 160)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["muscle", "muscle_minus", "joint"])
    parser.add_argument("--name", default="continual", help="result files: benchmarks/results/<name>.json/.md")
    args = parser.parse_args()
    if not args.mdmoco.is_file():
        parser.error(f"--mdmoco {args.mdmoco}: no such file")
    args.work.mkdir(parents=True, exist_ok=True)

    settings = {"image_size": args.size, "batch_size": args.batch, "rounds": args.rounds, "steps_per_visit": args.steps,
                "learning_rate": args.lr, "memorization_weight": args.memorization_weight, "seed": args.seed,
                "arch": "resnet18", "mdmoco": str(args.mdmoco), "tasks": args.tasks or "all",
                "max_items": args.max_items}
    variants = {name: run_variant(args, name) for name in args.variants}
    path = write_result(args.name, {"settings": settings, "variants": variants})
    (RESULTS / f"{args.name}.md").write_text(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
