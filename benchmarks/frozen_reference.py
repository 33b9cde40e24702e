"""How high frozen features can go on pneumonia here: a backbone trained *with* the pneumonia training labels,
judged exactly as bench_pretrain.py judges MD-MoCo (the muscle_pretrain bundle's evaluate.yaml: kNN and linear probe
of the frozen backbone, test split), next to the same architecture at random init.

    python benchmarks/frozen_reference.py --data ../shared/data/xray --work /tmp/frozen_reference

The supervised backbone comes from the downstream bundle (classification, from scratch, best validation AUC), so it
has seen the labels that MD-MoCo never sees: a reference for what "clearly better than random init" asks of
self-supervised features on this data, not a competitor. Writes benchmarks/results/pretrain_supervised_reference.*.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench_pretrain import BUNDLE as PRETRAIN_BUNDLE
from bench_pretrain import evaluate, paired_difference
from common import monai_run, write_result

REPO = Path(__file__).resolve().parents[1]
DOWNSTREAM = REPO / "bundles" / "downstream"
RANDOM_INIT = "random init (same architecture)"


def supervised_backbone(args: argparse.Namespace) -> tuple[Path, dict]:
    out = args.work / "supervised"
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make the bundle resume
    settings = {"dataset_dir": args.data, "output_dir": out, "model_dir": out / "models", "image_size": args.size,
                "batch_size": 32, "num_epochs": args.epochs, "learning_rate": 3e-4, "num_workers": 2,
                "seed": args.seed, "n_bootstrap": 1000, "log_models": False, "init": "scratch"}
    out.mkdir(parents=True)
    configs = ["common.yaml", "classification.yaml"]
    train = monai_run(DOWNSTREAM, configs, settings, out / "train.log")
    classifier = monai_run(DOWNSTREAM, [*configs, "evaluate.yaml"], settings, out / "evaluate.log")
    metrics = json.loads((out / "metrics.json").read_text())
    return out / "models" / "backbone.pt", {"train": train, "evaluate": classifier["command"],
                                            "classifier_test_roc_auc": metrics["roc_auc"]}


def markdown(result: dict) -> str:
    def auc(m: dict, key: str) -> str:
        v = m[key]
        return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"

    s, sup = result["settings"], result["supervised"]
    lines = ["# Frozen-feature reference: a backbone trained with the pneumonia labels", "",
             f"Machine: {result['machine']['cpu']}, torch {result['machine']['torch']}. Commit {result['commit']}.",
             f"Command: `{result['command']}`", "",
             f"pneumonia_nih, {s['image_size']} px, seed {s['seed']}. The supervised backbone: the downstream bundle's "
             f"classifier trained from scratch for {s['supervised_epochs']} epochs on the training split's labels "
             "(best validation AUC kept); its own test AUC as a classifier: "
             f"{auc(sup, 'classifier_test_roc_auc')}. Frozen, it is judged as bench_pretrain.py judges MD-MoCo "
             "(evaluate.yaml: kNN and linear probe, reference = training split, scored = test split, n = 160).", "",
             "| backbone | kNN AUC [95% CI] | linear-probe AUC [95% CI] |", "|---|---|---|"]
    for label, m in result["evaluations"].items():
        lines.append(f"| {label} | {auc(m, 'knn_auc')} | {auc(m, 'linear_probe_auc')} |")
    d = result["paired_vs_random_init"]
    lines += ["", f"Paired difference to random init (same test cases in every resample): kNN {auc(d, 'knn_auc')}, "
              f"linear probe {auc(d, 'linear_probe_auc')}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/xray")
    parser.add_argument("--work", type=Path, default=Path("/tmp/frozen_reference"))
    parser.add_argument("--size", type=int, default=96, help="as bench_pretrain.py")
    parser.add_argument("--epochs", type=int, default=10, help="supervised training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-name", default="pretrain_supervised_reference")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    backbone, supervised = supervised_backbone(args)
    name = f"supervised on pneumonia labels, {args.epochs} epochs"
    evaluations = {name: evaluate(args, "supervised", "checkpoint", backbone),
                   RANDOM_INIT: evaluate(args, "scratch", "scratch", None)}
    result = {"settings": {"seed": args.seed, "image_size": args.size, "supervised_epochs": args.epochs,
                           "arch": "resnet18", "evaluate_bundle": str(PRETRAIN_BUNDLE.relative_to(REPO))},
              "supervised": supervised, "evaluations": evaluations,
              "paired_vs_random_init": paired_difference(evaluations[name], evaluations[RANDOM_INIT], args.seed)}
    path = write_result(args.result_name, result)
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
