"""Issue #15's comparison, from finished runs of the preset benchmarks/presets/continual_four_tasks.yaml (one job
folder per seed): per continual variant (MUSCLE, MUSCLE--, joint) its accuracy matrix R[visit, task] and BWT, FWT and
forgetting; per downstream task each backbone's test score and its paired difference against MD-MoCo alone.

    muscle reproduce --preset benchmarks/presets/continual_four_tasks.yaml --data ../shared/data/xray \\
        --out runs/continual_four_tasks_seed0 --seed 0          # and --seed 1 into ..._seed1
    python benchmarks/continual_four_tasks.py runs/continual_four_tasks_seed0 runs/continual_four_tasks_seed1

Writes benchmarks/results/continual_four_tasks.json and .md. Everything is read from the job folders' files
(forgetting.json, metrics.json, per_case.csv, stage.json); nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from muscle_ext.metrics import paired_difference

from common import RESULTS, write_result

VARIANTS = {"muscle": "MUSCLE", "muscle_minus": "MUSCLE--", "joint": "Joint"}
STARTS = {"md_moco": "MD-MoCo", "muscle_minus": "MUSCLE--", "joint": "Joint", "muscle": "MUSCLE"}
HEADLINE = {"classification": "roc_auc", "segmentation": "dice", "detection": "map"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_job(folder: Path) -> dict:
    pipeline = _json(folder / "pipeline.json")
    stages = {s["name"]: s for s in pipeline["stages"]}
    out: dict = {"folder": folder.as_posix(), "seed": pipeline["seed"], "variants": {}, "downstream": {},
                 "wall_s": {}}
    for name, stage in stages.items():
        state = _json(Path(stage["output_dir"]) / "stage.json")
        if state.get("status") != "done":
            raise SystemExit(f"{folder}: stage {name} is {state.get('status')}: finish the job first")
        out["wall_s"][name] = state.get("wall_s")
    for variant in VARIANTS:
        matrix = _json(Path(stages[variant]["output_dir"]) / "forgetting.json")
        out["variants"][variant] = {"tasks": matrix["tasks"], "initial": matrix["initial"],
                                    "visits": matrix["visits"], "summary": matrix["summary"]}
    for stage in stages.values():
        if stage.get("kind") != "downstream":
            continue
        report = _json(Path(stage["output_dir"]) / "metrics.json")
        metric = HEADLINE[report["task"]]
        entry = {"kind": report["task"], "metric": metric, "test": report[metric], "n": report.get("n")}
        if stage["start"] != "md_moco":
            reference = stages[f"{stage['task']}_md_moco"]
            mine, theirs = (Path(s["output_dir"]) / "per_case.csv" for s in (stage, reference))
            if mine.is_file() and theirs.is_file():
                entry["vs_md_moco"] = paired_difference(mine, theirs)[metric]
        out["downstream"].setdefault(stage["task"], {})[stage["start"]] = entry
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _ci(entry: dict | None) -> str:
    if not entry:
        return ""
    return f"{_fmt(entry['value'])} [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"


def markdown(result: dict) -> str:
    jobs = result["jobs"]
    lines = ["# Continual stage on the paper's four tasks: MUSCLE, MUSCLE-- and the joint baseline", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}. Commit {result['commit']}.", "",
             "Commands (from the repository root, one per seed; then this summary):", ""]
    for job in jobs:
        lines.append(f"- `muscle reproduce --preset benchmarks/presets/continual_four_tasks.yaml --data "
                     f"../shared/data/xray --out {job['folder']} --seed {job['seed']}`")
    lines += [f"- `{result['command']}`", "",
              "What ran (per seed): MD-MoCo's quick preset (2 epochs at 64 px); from it the continual bundle's quick "
              "preset on pneumonia (NIH), knee OA, lung segmentation and TB detection (3 rounds, 12 steps of batch "
              "32 per task and round, lung 8, at 64 px, at most 160 images per split and task) as MUSCLE (reshuffled, "
              "L2-SP 0.01), MUSCLE-- (fixed order, no pull) and the joint baseline (every task in every step, the "
              "same batches per task and round); then each backbone and MD-MoCo alone fine-tuned on the four tasks "
              "(the downstream quick preset: 96 px, 3 epochs, at most 320 training images) and tested. Scores are "
              "validation scores inside the continual stage, test scores downstream. Minutes of CPU at 64-96 px: "
              "these compare the variants under one small budget, not at the paper's scale.", "",
              "## Forgetting in the continual stage", "",
              "From each variant's R[visit, task] (every task validated before training and after every visit; "
              "joint: after every round). BWT: final minus right-after-own-last-visit score, averaged over tasks "
              "(negative: forgotten; the joint baseline has no last visit of one task, so none); FWT: score before "
              "a task's first visit minus before training; forgetting: best earlier score minus final.", "",
              "| seed | variant | average final | BWT | FWT | mean forgetting | " + " | ".join(
                  f"{t} final" for t in jobs[0]["variants"]["muscle"]["tasks"]) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(jobs[0]["variants"]["muscle"]["tasks"])]
    for job in jobs:
        for variant, label in VARIANTS.items():
            data = job["variants"][variant]
            summary = data["summary"]
            finals = [summary["per_task"][t]["final"] for t in data["tasks"]]
            lines.append(f"| {job['seed']} | {label} | {_fmt(summary['average'])} | {_fmt(summary['bwt'])} | "
                         f"{_fmt(summary['fwt'])} | {_fmt(summary['mean_forgetting'])} | "
                         + " | ".join(_fmt(v) for v in finals) + " |")
    lines += ["", "Mean over seeds:", "", "| variant | average final | BWT | mean forgetting |", "|---|---|---|---|"]
    for variant, label in VARIANTS.items():
        values = {k: [job["variants"][variant]["summary"][k] for job in jobs] for k in ("average", "bwt",
                                                                                        "mean_forgetting")}
        lines.append(f"| {label} | " + " | ".join(
            _fmt(float(np.mean(v)) if all(x is not None for x in v) else None) for v in values.values()) + " |")

    lines += ["", "## Fine-tuned on the four tasks (test split)", "",
              "Headline metric with its 95 % bootstrap interval; Δ: paired difference against MD-MoCo alone over the "
              "same test cases (detection has no per-case score: no paired difference).", ""]
    for task in jobs[0]["downstream"]:
        first = jobs[0]["downstream"][task]["md_moco"]
        lines += [f"### {task} ({first['kind']}, {first['metric']}, test n = {first['n']})", "",
                  "| seed | " + " | ".join(STARTS.values()) + " | " + " | ".join(
                      f"Δ {STARTS[s]} vs MD-MoCo" for s in STARTS if s != "md_moco") + " |",
                  "|---|" + "---|" * (2 * len(STARTS) - 1)]
        for job in jobs:
            row = job["downstream"][task]
            lines.append(f"| {job['seed']} | " + " | ".join(_ci(row[s]["test"]) for s in STARTS) + " | "
                         + " | ".join(_ci(row[s].get("vs_md_moco")) for s in STARTS if s != "md_moco") + " |")
        mean = {s: float(np.mean([job["downstream"][task][s]["test"]["value"] for job in jobs])) for s in STARTS}
        lines.append("| mean | " + " | ".join(_fmt(mean[s]) for s in STARTS) + " | " + " | ".join(
            _fmt(mean[s] - mean["md_moco"]) for s in STARTS if s != "md_moco") + " |")
        lines.append("")
    lines += ["## The matrices", ""]
    for job in jobs:
        for variant, label in VARIANTS.items():
            data = job["variants"][variant]
            lines += [f"Seed {job['seed']}, {label}:", "", "| after visit | task trained | " + " | ".join(
                data["tasks"]) + " |", "|---|---|" + "---|" * len(data["tasks"]),
                "| before training | - | " + " | ".join(_fmt(data["initial"].get(t)) for t in data["tasks"]) + " |"]
            lines += [f"| {row['visit']} | {row['task']} | " + " | ".join(_fmt(row[t]) for t in data["tasks"]) + " |"
                      for row in data["visits"]]
            lines.append("")
    lines += ["## Stage wall times (s)", "", "| seed | " + " | ".join(jobs[0]["wall_s"]) + " |",
              "|---|" + "---|" * len(jobs[0]["wall_s"])]
    lines += [f"| {job['seed']} | " + " | ".join(str(v) for v in job["wall_s"].values()) + " |" for job in jobs]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", nargs="+", type=Path, help="job folders of the preset, one per seed")
    parser.add_argument("--name", default="continual_four_tasks")
    args = parser.parse_args()
    jobs = [read_job(folder) for folder in args.jobs]
    path = write_result(args.name, {"jobs": jobs})
    (RESULTS / f"{args.name}.md").write_text(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
