"""Downstream fine-tuning from scratch vs from an MD-MoCo backbone, with the same budget, on the real subsets:
pneumonia and knee OA classification (ROC AUC, accuracy, sensitivity, specificity), lung segmentation (Dice, mIoU)
and bone-age regression (MAE, RMSE), each scored on its test split with 95 % bootstrap CIs.

    python benchmarks/bench_downstream.py --mdmoco runs/md_moco/models/backbone.pt --data ../shared/data/xray \\
        --work /tmp/bench_downstream --epochs 20 --size 224

Runs the bundle exactly as users do (`python -m monai.bundle run`, train then evaluate), records wall time and peak
RSS of each training run, and writes benchmarks/results/<name>.json and <name>.md (default name: downstream) with
the metrics, their CIs and the exact commands. `--imagenet <torchvision resnet state dict>` adds ImageNet
initialisation as a third arm. Budgets, image size and learning rate are the same for every arm.

Every pre-trained arm is also compared with scratch case by case (the evaluate report's per_case.csv: both arms
scored the same test images in the same order), as a paired bootstrap interval of the difference in the task's
headline metric (ROC AUC, mean Dice, MAE): an interval that excludes 0 says the two differ even where their
separate intervals overlap.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from muscle_ext.metrics import paired_difference

from common import RESULTS, monai_run, write_result

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "downstream"

# task -> (task config, extra overrides given the data folder, metrics for the table)
CLASSIFICATION_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity")
TASKS = {
    "pneumonia": ("classification.yaml", lambda data: {}, CLASSIFICATION_METRICS),
    "knee_oa": ("classification.yaml",
                lambda data: {"datalist": data / "knee_oa" / "datalist.json", "flip_prob": 0.5,
                              "class_names": "['normal','abnormal']"}, CLASSIFICATION_METRICS),
    "lung_segmentation": ("segmentation.yaml", lambda data: {}, ("dice", "miou", "dice_pooled", "miou_pooled")),
    "bone_age": ("regression.yaml", lambda data: {}, ("mae", "rmse")),
    # RetinaNet keeps its own SGD recipe (detection.yaml's learning rate), the same for every arm
    "tb_detection": ("detection.yaml", lambda data: {"learning_rate": 0.01}, ("map", "ap50", "ap75")),
}


def arms(args: argparse.Namespace) -> dict[str, dict]:
    out = {"scratch": {"init": "scratch"}, "md_moco": {"init": "checkpoint", "init_weights": args.mdmoco}}
    if args.imagenet is not None:
        out["imagenet"] = {"init": "imagenet", "init_weights": args.imagenet}
    for name, path in args.checkpoint:
        out[name] = {"init": "checkpoint", "init_weights": path}
    return out


def name_and_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH of a backbone checkpoint, got {text!r}")
    return name, Path(path)


def run_arm(args: argparse.Namespace, task: str, arm: str, init: dict) -> dict:
    config, extra, _ = TASKS[task]
    out = args.work / task / arm
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make the bundle resume
    out.mkdir(parents=True)
    settings = {"dataset_dir": args.data, "output_dir": out, "model_dir": out / "models", "image_size": args.size,
                "batch_size": args.batch, "num_epochs": args.epochs, "learning_rate": args.lr,
                "num_workers": args.workers, "seed": args.seed, "n_bootstrap": args.resamples, "log_models": False,
                **extra(args.data), **init}
    if args.max_items is not None:
        settings["max_items"] = args.max_items
    train = monai_run(BUNDLE, ["common.yaml", config], settings, out / "train.log")
    evaluation = {k: v for k, v in settings.items() if k != "init_weights"}  # model.pt replaces the weights
    evaluate = monai_run(BUNDLE, ["common.yaml", config, "evaluate.yaml"], evaluation, out / "evaluate.log")
    return {"train": train, "evaluate": {"command": evaluate["command"], "wall_s": evaluate["wall_s"]},
            "metrics": json.loads((out / "metrics.json").read_text()), "per_case": str(out / "per_case.csv")}


def paired_vs_scratch(arm: dict, scratch: dict, resamples: int, seed: int) -> dict | None:
    """The arm's headline metric minus scratch's (or another reference arm's), with a paired bootstrap CI over the
    same test images (:func:`muscle_ext.metrics.paired_difference`); ``None`` for detection (no per-image scores)."""
    if not (Path(arm["per_case"]).is_file() and Path(scratch["per_case"]).is_file()):
        return None
    if arm["metrics"]["n"] != scratch["metrics"]["n"]:
        raise ValueError(f"{arm['per_case']} and {scratch['per_case']} scored different cases")
    return paired_difference(arm["per_case"], scratch["per_case"], resamples, seed)


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None and math.isfinite(low) else ""
    return f"{entry['value']:.3f}{ci}"


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# Downstream fine-tuning benchmark: scratch vs MD-MoCo", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}. Commit {result['commit']}.", f"Command: `{result['command']}`", "",
             f"Same budget for every arm: {s['epochs']} epochs, {s['image_size']} px, batch {s['batch_size']}, "
             f"learning rate {s['learning_rate']}"
             + (" (RetinaNet: its own 0.01)" if "tb_detection" in result["tasks"] else "") + f", seed {s['seed']}"
             + (f", at most {s['max_items']} images per split" if s["max_items"] else "") + ". Test split, 95 % "
             f"percentile bootstrap CIs ({s['resamples']} resamples)."]
    if s["max_items"]:
        lines += ["", "**Smoke-sized run: the numbers say that the pipeline works, not how well the methods do.**"]
    for task, by_arm in result["tasks"].items():
        names = TASKS[task][2]
        n = next(iter(by_arm.values()))["metrics"].get("n")
        lines += ["", f"## {task} (test n = {n})", "",
                  "| init | " + " | ".join(names) + " | train wall (s) | peak RSS (GiB) |",
                  "|---|" + "---|" * (len(names) + 2)]
        for arm, r in by_arm.items():
            row = [arm, *(_fmt(r["metrics"].get(m)) for m in names), str(r["train"]["wall_s"]),
                   str(r["train"]["peak_rss_gib"])]
            lines.append("| " + " | ".join(row) + " |")
        paired = {arm: r["paired_vs_scratch"] for arm, r in by_arm.items() if r.get("paired_vs_scratch")}
        for arm, diff in paired.items():
            (metric, entry), = diff.items()
            better = "lower" if metric == "mae" else "higher"
            lines += ["", f"Paired difference {arm} - scratch, {metric} ({better} is better for {arm}; each "
                      f"bootstrap resample draws {n} test images with replacement, the same draw for both arms): "
                      f"**{_fmt(entry)}**."]
        for arm, r in by_arm.items():
            if r.get("paired_vs_md_moco"):
                (metric, entry), = r["paired_vs_md_moco"].items()
                lines += ["", f"Paired difference {arm} - md_moco, {metric}: **{_fmt(entry)}**."]
        lines += ["", "Commands:", ""]
        for arm, r in by_arm.items():
            lines += [f"- {arm}, train: `{r['train']['command']}`", f"- {arm}, evaluate: `{r['evaluate']['command']}`"]
    lines += ["", "Metrics: ROC AUC, accuracy, sensitivity, specificity at threshold 0.5 (classification); Dice and "
              "IoU per image over the lung class, and pooled over all pixels incl. background (`_pooled`, the "
              "paper's convention) (segmentation); MAE and RMSE in months (bone age); COCO mAP over IoU "
              "0.50:0.95, AP at IoU 0.50 and 0.75 (detection; RetinaNet, learning rate 0.01 with SGD for every "
              "arm)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdmoco", type=Path, required=True, help="MD-MoCo backbone (muscle-backbone/1 file)")
    parser.add_argument("--imagenet", type=Path, default=None, help="optional torchvision ResNet state dict")
    parser.add_argument("--checkpoint", action="append", default=[], type=name_and_path, metavar="NAME=PATH",
                        help="another backbone checkpoint as an arm, e.g. muscle=runs/muscle/models/backbone.pt; "
                             "also compared case by case with md_moco")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/xray")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_downstream"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-items", type=int, default=None, help="images per split (smoke runs only)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="downstream", help="result files: benchmarks/results/<name>.json/.md")
    args = parser.parse_args()
    if not args.mdmoco.is_file():
        parser.error(f"--mdmoco {args.mdmoco}: no such file")
    args.work.mkdir(parents=True, exist_ok=True)

    settings = {"epochs": args.epochs, "image_size": args.size, "batch_size": args.batch, "learning_rate": args.lr,
                "max_items": args.max_items, "resamples": args.resamples, "seed": args.seed, "arch": "resnet18",
                "mdmoco": str(args.mdmoco), "checkpoints": {name: str(path) for name, path in args.checkpoint}}
    tasks: dict[str, dict] = {}
    for task in args.tasks:
        tasks[task] = {arm: run_arm(args, task, arm, init) for arm, init in arms(args).items()}
        for arm, r in tasks[task].items():
            if arm != "scratch":
                r["paired_vs_scratch"] = paired_vs_scratch(r, tasks[task]["scratch"], args.resamples, args.seed)
            if arm in dict(args.checkpoint):
                r["paired_vs_md_moco"] = paired_vs_scratch(r, tasks[task]["md_moco"], args.resamples, args.seed)
        # written after each task, so an interrupted benchmark keeps what it measured
        write_result(args.name, {"settings": settings, "tasks": tasks})
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(markdown(saved))


if __name__ == "__main__":
    main()
