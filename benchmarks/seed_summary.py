"""MD-MoCo vs random init over several seeds of bench_pretrain.py: each seed's paired AUC difference, and their mean
with a bootstrap interval over the test cases (each resample draws the same cases for every seed and both arms).

    python benchmarks/seed_summary.py pretrain_seed0 pretrain_seed1 pretrain_seed2

Reads benchmarks/results/<name>.json and the per-case scores its evaluations wrote (query_scores.csv in the
benchmark's work folder: rerun the commands in those files to recreate them), writes
benchmarks/results/pretrain_seeds.json and .md. With a handful of seeds, the interval covers the test cases'
sampling only, not the spread between seeds: read it next to the per-seed rows.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from muscle_ext.metrics import bootstrap_ci, ci_dict, roc_auc

from common import RESULTS, case_scores, write_result

RANDOM_INIT = "random init (same architecture)"
METHODS = ("knn", "linear_probe")
ARMS = ("mdmoco", "random_init")


def seed_runs(names: list[str]) -> list[dict]:
    runs = []
    for name in names:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        mdmoco = next(k for k in result["evaluations"] if k.startswith("MD-MoCo"))
        evaluations = {"mdmoco": result["evaluations"][mdmoco], "random_init": result["evaluations"][RANDOM_INIT]}
        runs.append({"name": name, "seed": _seed_of(result),
                     "commit": result["commit"], "wall_s": result["training"]["md_moco_fp32"]["wall_s"],
                     **{arm: case_scores(e) for arm, e in evaluations.items()},
                     **{f"{m}_auc": [evaluations[arm][f"{m}_auc"]["value"] for arm in ARMS] for m in METHODS},
                     "paired": result["paired_vs_random_init"][mdmoco]})
    labels = {tuple(r[arm]["label"]) for r in runs for arm in ARMS}
    if len(labels) != 1:
        raise ValueError("the runs scored different test cases")
    return runs


def _seed_of(result: dict) -> int:
    if "seed" in result["settings"]:
        return int(result["settings"]["seed"])
    words = result["command"].split()  # results written before bench_pretrain recorded its seed
    return int(words[words.index("--seed") + 1]) if "--seed" in words else 0


def mean_difference(runs: list[dict], method: str, resamples: int = 1000) -> dict:
    """Mean over seeds of AUC(MD-MoCo) - AUC(random init), bootstrapped over the test cases."""
    y = runs[0]["mdmoco"]["label"]
    scores = np.stack([r[arm][method] for r in runs for arm in ARMS], axis=1)

    def metric(labels: np.ndarray, s: np.ndarray) -> float:
        return float(np.mean([roc_auc(labels, s[:, 2 * i]) - roc_auc(labels, s[:, 2 * i + 1])
                              for i in range(len(runs))]))

    return ci_dict(bootstrap_ci(metric, y, scores, n_resamples=resamples, seed=0))


def markdown(result: dict) -> str:
    def fmt(e: dict) -> str:
        return f"{e['value']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"

    lines = ["# MD-MoCo vs random init across seeds (pneumonia_nih test split, frozen backbone)", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores. "
             f"Command: `{result['command']}`", "",
             "Each seed is one `bench_pretrain.py` run (the seed sets MD-MoCo's training and the random-init "
             "baseline's weights): AUC difference MD-MoCo minus random init with a paired bootstrap 95 % CI over the "
             "160 test cases.", "",
             "| seed | kNN AUC (MD-MoCo / random) | kNN difference | linear probe (MD-MoCo / random) | "
             "linear-probe difference | training wall (s) | result |", "|---|---|---|---|---|---|---|"]
    for r in result["seeds"]:
        lines.append(f"| {r['seed']} | {r['knn_auc'][0]:.3f} / {r['knn_auc'][1]:.3f} | {fmt(r['paired']['knn_auc'])} "
                     f"| {r['linear_probe_auc'][0]:.3f} / {r['linear_probe_auc'][1]:.3f} | "
                     f"{fmt(r['paired']['linear_probe_auc'])} | {r['wall_s']} | `{r['name']}.md` ({r['commit']}) |")
    mean = result["mean_over_seeds"]
    lines += ["", f"Mean over the {len(result['seeds'])} seeds (bootstrap over test cases only, the same cases for "
              f"every seed and arm): kNN {fmt(mean['knn_auc'])}, linear probe {fmt(mean['linear_probe_auc'])}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="bench_pretrain result names (benchmarks/results/<name>.json)")
    parser.add_argument("--result-name", default="pretrain_seeds")
    args = parser.parse_args()
    runs = seed_runs(args.names)
    seeds = [{k: v for k, v in r.items() if k not in ARMS} for r in runs]  # the per-case scores stay in their CSVs
    result = {"seeds": seeds, "mean_over_seeds": {f"{m}_auc": mean_difference(runs, m) for m in METHODS}}
    write_result(args.result_name, result)
    saved = json.loads((RESULTS / f"{args.result_name}.json").read_text())
    (RESULTS / f"{args.result_name}.md").write_text(markdown(saved))


if __name__ == "__main__":
    main()
