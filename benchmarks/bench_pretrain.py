"""MD-MoCo on the real X-ray pool, judged frozen on pneumonia (kNN and linear-probe ROC AUC with 95% CI), against
the same architecture at random init, after the same short CPU budget; and fp32 vs bf16 at equal epochs.

    python benchmarks/bench_pretrain.py --data ../shared/data/xray --work /tmp/bench_pretrain

Runs the bundles exactly as users do (`python -m monai.bundle run`), records wall time and peak RSS of each
training run, and writes benchmarks/results/pretrain.json and pretrain.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from muscle_ext.metrics import bootstrap_ci, ci_dict, paired_difference_ci, read_case_scores, roc_auc
from muscle_ext.metrics.embedding import knn_scores

from common import (
    RESULTS,
    bundle_command,
    case_scores,
    load_labelled_images,
    monai_run,
    printable,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "muscle_pretrain"


def pretrain(args: argparse.Namespace, name: str, epochs: int, amp: bool) -> dict:
    out = args.work / name
    overrides = {"dataset_dir": args.data, "output_dir": out, "model_dir": out / "models", "image_size": args.size,
                 "batch_size": args.batch, "num_epochs": epochs, "warmup_epochs": 1, "learning_rate": args.lr,
                 "amp": amp, "num_workers": 2, "knn_interval": max(1, epochs // 5), "seed": args.seed,
                 **({"bn_splits": args.bn_splits} if args.bn_splits else {}),
                 **({"view_augmentation": args.view_augmentation} if args.view_augmentation else {}),
                 **dict(args.set)}
    record = out / "benchmark_run.json"
    config_sha256 = hashlib.sha256((BUNDLE / "configs" / "train.yaml").read_bytes()).hexdigest()
    if args.reuse and record.exists():  # a run an earlier invocation finished with this command and config file
        run = json.loads(record.read_text())
        if (run["command"], run.get("config_sha256")) == (
                printable(bundle_command(BUNDLE, ["train.yaml"], overrides)), config_sha256):
            return run
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make the bundle resume
    run = monai_run(BUNDLE, ["train.yaml"], overrides, args.work / f"{name}.log")
    run.update(epochs=epochs, amp_bf16=amp, learning_rate=args.lr, config_sha256=config_sha256)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(run))
    return run


def evaluate(args: argparse.Namespace, name: str, init: str, backbone: Path | None, section: str = "test") -> dict:
    out = args.work / (f"eval_{name}" if section == "test" else f"eval_{name}_{section}")
    overrides = {"dataset_dir": args.data, "output_dir": out, "init": init, "image_size": args.size,
                 "seed": args.seed, "n_resamples": 1000, "query_section": section}
    if backbone is not None:
        overrides["backbone_path"] = backbone
    run = monai_run(BUNDLE, ["evaluate.yaml"], overrides, out.with_suffix(".log"))
    # the per-case scores go into the result (160 rows, no file names) so that paired comparisons across results,
    # e.g. benchmarks/seed_summary.py, need nothing outside benchmarks/results/
    case_scores = {k: v.tolist() for k, v in read_case_scores(out / "query_scores.csv").items()}
    return {"command": run["command"], "case_scores": case_scores, **json.loads((out / "metrics.json").read_text())}


def histogram_knn(args: argparse.Namespace, sections: tuple[str, ...] = ("test", "validation"),
                  bins: int = 32) -> dict:
    """The same kNN on each image's grey-level histogram (after the same pre-processing), per query section: what
    global intensity alone tells about the label, the bar that random-init ResNet features turn out to sit at."""
    datalist = args.data / "pneumonia_nih" / "datalist.json"

    def histograms(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = load_labelled_images(datalist, split, args.size)
        return torch.stack([torch.histc(x, bins=bins, min=0.0, max=1.0) / x.numel() for x in images]), labels

    ref_x, ref_y = histograms("training")
    result = {}
    for section in sections:
        query_x, query_y = histograms(section)
        scores = knn_scores(ref_x, ref_y, query_x, num_classes=2)[:, 1].numpy()
        result[section] = {"knn_auc": ci_dict(bootstrap_ci(roc_auc, query_y.numpy(), scores, n_resamples=1000,
                                                           seed=args.seed))}
    return result


def paired_difference(a: dict, b: dict, seed: int) -> dict:
    """AUC(a) - AUC(b) per method, with a paired bootstrap CI over the same test cases (both scored the same
    query split in the same order)."""
    sa, sb = case_scores(a), case_scores(b)
    if not np.array_equal(sa["label"], sb["label"]):
        raise ValueError("the two evaluations scored different cases")
    return {f"{method}_auc": ci_dict(paired_difference_ci(roc_auc, sa["label"], sa[method], sb[method],
                                                          n_resamples=1000, seed=seed))
            for method in ("knn", "linear_probe")}


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
    histogram = result.get("histogram_knn")
    if histogram:
        lines.append(f"| no network: 32-bin grey-level histogram kNN | {auc(histogram['test'], 'knn_auc')} | | |")
    lines += ["", "The same on the validation split (n=132), the split that settings are chosen on:", "",
              "| backbone | kNN AUC [95% CI] | linear-probe AUC [95% CI] |", "|---|---|---|"]
    for name, m in result.get("validation", {}).items():
        lines.append(f"| {name} | {auc(m, 'knn_auc')} | {auc(m, 'linear_probe_auc')} |")
    if histogram:
        lines.append(f"| no network: 32-bin histogram kNN | {auc(histogram['validation'], 'knn_auc')} | |")
    lines += ["", "Paired difference to random init (AUC of the MD-MoCo backbone minus AUC at random init, the "
              "same 160 test cases in every bootstrap resample; an interval above 0 means MD-MoCo is better):", "",
              "| backbone | kNN AUC difference [95% CI] | linear-probe AUC difference [95% CI] |", "|---|---|---|"]
    for name, d in result["paired_vs_random_init"].items():
        lines.append(f"| {name} | {auc(d, 'knn_auc')} | {auc(d, 'linear_probe_auc')} |")
    lines += ["", "| training run | epochs | learning rate | precision | wall (s) | peak RSS (GiB) |",
              "|---|---|---|---|---|---|"]
    for name, r in result["training"].items():
        precision = "bf16 autocast" if r["amp_bf16"] else "fp32"
        lines.append(f"| {name} | {r['epochs']} | {r['learning_rate']} | {precision} | {r['wall_s']} | "
                     f"{r['peak_rss_gib']} |")
    return "\n".join(lines) + "\n"


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a train.yaml override), got {text!r}")
    return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/xray")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_pretrain"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.075, help="SGD learning rate (MoCo v2's rule gives 0.0075)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the main MD-MoCo run")
    parser.add_argument("--precision-epochs", type=int, default=1, help="epochs of the fp32-vs-bf16 pair")
    parser.add_argument("--bn-splits", type=int, default=None, help="split-BN groups (default: train.yaml's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                        help="any other train.yaml override for the MD-MoCo runs, e.g. --set temperature=0.1")
    parser.add_argument("--view-augmentation", type=str, default=None,
                        help="train.yaml's view_augmentation override, a Python dict literal (default: train.yaml's)")
    parser.add_argument("--result-name", default="pretrain", help="benchmarks/results/<name>.json and .md")
    parser.add_argument("--reuse", action="store_true", help="reuse training runs an earlier invocation finished")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    training = {"md_moco_fp32": pretrain(args, "md_moco_fp32", args.epochs, amp=False)}
    main_backbone = args.work / "md_moco_fp32" / "models" / "backbone.pt"
    evaluations = {
        f"MD-MoCo, {args.epochs} epochs (fp32)": evaluate(args, "md_moco", "checkpoint", main_backbone),
        "random init (same architecture)": evaluate(args, "scratch", "scratch", None),
    }
    validation = {f"MD-MoCo, {args.epochs} epochs (fp32)": evaluate(args, "md_moco", "checkpoint", main_backbone,
                                                                    "validation"),
                  "random init (same architecture)": evaluate(args, "scratch", "scratch", None, "validation")}
    for amp in (True, False) if args.precision_epochs > 0 else ():
        name = f"short_{'bf16' if amp else 'fp32'}"
        training[name] = pretrain(args, name, args.precision_epochs, amp=amp)
        evaluations[f"MD-MoCo, {args.precision_epochs} epochs ({'bf16' if amp else 'fp32'})"] = evaluate(
            args, name, "checkpoint", args.work / name / "models" / "backbone.pt")
    baseline = evaluations["random init (same architecture)"]
    paired = {name: paired_difference(m, baseline, args.seed) for name, m in evaluations.items() if m is not baseline}
    result = {"settings": {"seed": args.seed, "image_size": args.size, "batch_size": args.batch,
                           "learning_rate": args.lr,
                           "bn_splits": args.bn_splits or "train.yaml default (batch // 32, at least 2)",
                           "view_augmentation": args.view_augmentation or "train.yaml default",
                           "other_overrides": dict(args.set),
                           "arch": "resnet18", "eval_task": "pneumonia_nih"}, "training": training,
              "evaluations": evaluations, "paired_vs_random_init": paired, "validation": validation,
              "histogram_knn": histogram_knn(args)}
    write_result(args.result_name, result)
    saved = json.loads((RESULTS / f"{args.result_name}.json").read_text())
    (RESULTS / f"{args.result_name}.md").write_text(markdown(saved))


if __name__ == "__main__":
    main()
