"""MD-MoCo on the real X-ray pool, judged frozen on pneumonia (kNN and linear-probe ROC AUC with 95% CI), against
the same architecture at random init, after the same short CPU budget; and fp32 vs bf16 at equal epochs.

    python benchmarks/bench_pretrain.py --data ../shared/data/xray --work /tmp/bench_pretrain

Runs the bundles exactly as users do (`python -m monai.bundle run`), records wall time and peak RSS of each
training run, and writes benchmarks/results/pretrain.json and pretrain.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, write_result

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "muscle_pretrain"


def monai_run(configs: list[str], overrides: dict, log: Path) -> dict:
    files = [str(BUNDLE / "configs" / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files) if len(files) > 1 else files[0],
           "--bundle_root", str(BUNDLE), "--logging_file", str(BUNDLE / "configs" / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB; the max over finished children so far
    return {"command": " ".join(["python", *cmd[1:]]), "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak / 2**20, 2) if peak > before else None}


def pretrain(args: argparse.Namespace, name: str, epochs: int, amp: bool) -> dict:
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make the bundle resume
    overrides = {"dataset_dir": args.data, "output_dir": out, "model_dir": out / "models", "image_size": args.size,
                 "batch_size": args.batch, "num_epochs": epochs, "warmup_epochs": 1, "amp": amp,
                 "channels_last": True, "num_workers": 2, "knn_interval": max(1, epochs // 4), "seed": args.seed}
    run = monai_run(["train.yaml"], overrides, args.work / f"{name}.log")
    run["epochs"], run["amp_bf16"] = epochs, amp
    return run


def evaluate(args: argparse.Namespace, name: str, init: str, backbone: Path | None) -> dict:
    out = args.work / f"eval_{name}"
    overrides = {"dataset_dir": args.data, "output_dir": out, "init": init, "image_size": args.size,
                 "seed": args.seed, "n_resamples": 1000}
    if backbone is not None:
        overrides["backbone_path"] = backbone
    run = monai_run(["evaluate.yaml"], overrides, args.work / f"eval_{name}.log")
    return {"command": run["command"], **json.loads((out / "metrics.json").read_text())}


def markdown(result: dict) -> str:
    def auc(m: dict, key: str) -> str:
        v = m[key]
        return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"

    lines = ["# MD-MoCo pre-training benchmark", "", f"Machine: {result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores, torch {result['machine']['torch']}. Commit {result['commit']}.",
             f"Command: `{result['command']}`", "",
             "Frozen backbone on pneumonia_nih (reference: training split, scored: test split, n=160), "
             f"{result['settings']['image_size']} px:", "",
             "| backbone | kNN AUC [95% CI] | linear-probe AUC [95% CI] | embedding spread |", "|---|---|---|---|"]
    for name, m in result["evaluations"].items():
        lines.append(f"| {name} | {auc(m, 'knn_auc')} | {auc(m, 'linear_probe_auc')} | {m['embedding_spread']:.3f} |")
    lines += ["", "| training run | epochs | precision | wall (s) | peak RSS (GiB) |", "|---|---|---|---|---|"]
    for name, r in result["training"].items():
        lines.append(f"| {name} | {r['epochs']} | {'bf16 autocast' if r['amp_bf16'] else 'fp32'} | {r['wall_s']} | "
                     f"{r['peak_rss_gib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/xray")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_pretrain"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12, help="epochs of the main MD-MoCo run")
    parser.add_argument("--precision-epochs", type=int, default=4, help="epochs of the fp32-vs-bf16 pair")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    training = {"md_moco_bf16": pretrain(args, "md_moco_bf16", args.epochs, amp=True)}
    evaluations = {
        f"MD-MoCo, {args.epochs} epochs (bf16)": evaluate(args, "md_moco", "checkpoint",
                                                          args.work / "md_moco_bf16" / "models" / "backbone.pt"),
        "random init (same architecture)": evaluate(args, "scratch", "scratch", None),
    }
    for amp in (True, False):
        name = f"short_{'bf16' if amp else 'fp32'}"
        training[name] = pretrain(args, name, args.precision_epochs, amp=amp)
        evaluations[f"MD-MoCo, {args.precision_epochs} epochs ({'bf16' if amp else 'fp32'})"] = evaluate(
            args, name, "checkpoint", args.work / name / "models" / "backbone.pt")
    result = {"settings": {"image_size": args.size, "batch_size": args.batch, "arch": "resnet18",
                           "eval_task": "pneumonia_nih"}, "training": training, "evaluations": evaluations}
    write_result("pretrain", result)
    saved = json.loads((RESULTS / "pretrain.json").read_text())
    (RESULTS / "pretrain.md").write_text(markdown(saved))


if __name__ == "__main__":
    main()
