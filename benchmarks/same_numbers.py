"""Does a refactor change the numbers? The downstream bundle trained and evaluated on a fixed seed at two commits.

    python benchmarks/same_numbers.py --before 5286ace --data ../shared/data/xray --work /tmp/same_numbers

For each downstream task kind (classification, segmentation, regression, detection) it fine-tunes from scratch with
the same small settings and seed at ``--before`` (a ``git worktree``) and at the working tree, evaluates on the test
split, and compares every number of ``metrics.json``. Each run imports the ``muscle_ext`` of its own tree
(``PYTHONPATH``, checked). Writes benchmarks/results/<name>.json and .md with both values, the largest difference and
the commands. A difference is not a failure by itself: the report lists it, for the commit message to explain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import RESULTS, bundle_command, machine, run_command, write_result

REPO = Path(__file__).resolve().parents[1]
SMALL = {"image_size": 64, "batch_size": 8, "num_epochs": 2, "max_items": 24, "num_workers": 0, "n_bootstrap": 100,
         "seed": 0, "use_tracking": "false", "log_models": "false", "cache": "none", "init": "scratch"}
TASKS = {  # name -> (task config, datalist below --data, extra overrides)
    "classification": ("classification.yaml", "pneumonia_nih/datalist.json", {}),
    "segmentation": ("segmentation.yaml", "lung_seg_cxr/datalist.json", {}),
    "regression": ("regression.yaml", "hand_boneage/datalist.json", {}),
    "detection": ("detection.yaml", "tb_detection_tbx11k/datalist.json",
                  {"detector#fpn_channels": 32, "batch_size": 4, "max_items": 12}),
}


def scalars(tree: object, prefix: str = "") -> dict[str, float]:
    """Every number of a metrics.json, by dotted key."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(scalars(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix[:-1]] = float(tree)
    return out


def difference(a: float | None, b: float | None) -> float:
    """|a - b|; 0 when both are undefined (NaN), infinite when only one is, or a number is missing on one side."""
    if a is None or b is None:
        return math.inf
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b)


def run_task(tree: Path, task: str, data: Path, work: Path) -> dict:
    config, datalist, extra = TASKS[task]
    bundle = tree / "bundles" / "downstream"
    out = work / task
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = {**SMALL, **extra, "datalist": data / datalist, "output_dir": out / "out", "model_dir": out / "models"}
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([sys.executable, "-c", "import muscle_ext; print(muscle_ext.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(tree)):
        raise RuntimeError(f"{tree}: runs would import muscle_ext from {where}")
    commands = []
    for configs in (["common.yaml", config], ["common.yaml", config, "evaluate.yaml"]):
        result = run_command(bundle_command(bundle, configs, overrides), out / f"{len(commands)}.log", env=env)
        commands.append(result["command"].replace(str(tree), "<tree>").replace(str(data), "<data>")
                        .replace(str(work), "<work>"))
        if result["returncode"]:
            raise RuntimeError(f"{task} at {tree} failed: see {out / f'{len(commands) - 1}.log'}")
    return {"metrics": scalars(json.loads((out / "out" / "metrics.json").read_text())), "commands": commands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit to compare with (e.g. the one before a refactor)")
    parser.add_argument("--data", type=Path, required=True, help="the X-ray folder (../shared/data/xray)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/same_numbers"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--name", default="same_numbers")
    args = parser.parse_args()
    data, work = args.data.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # not the repository: its muscle_ext would shadow the tree's (the current folder comes first)
    before = work / "before_tree"
    if before.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False)
    subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                   capture_output=True)
    before_commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=before, text=True).strip()
    rows, payload = [], {"before": before_commit, "settings": SMALL, "tasks": {}}
    try:
        for task in args.tasks:
            old = run_task(before, task, data, work / "before")
            new = run_task(REPO, task, data, work / "after")
            keys = sorted(set(old["metrics"]) | set(new["metrics"]))
            diffs = {k: difference(old["metrics"].get(k), new["metrics"].get(k)) for k in keys}
            largest = max(diffs.values(), default=0.0)
            payload["tasks"][task] = {"before": old["metrics"], "after": new["metrics"], "largest_difference": largest,
                                      "differing": {k: d for k, d in diffs.items() if d != 0},
                                      "commands": new["commands"]}
            rows.append((task, len(keys), sum(d != 0 for d in diffs.values()), largest))
            print(f"{task}: {len(keys)} numbers, {rows[-1][2]} differ, largest difference {largest:.3g}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False)
    write_result(args.name, payload)
    lines = [f"# Same numbers before and after: {before_commit} vs the working tree", "",
             f"Command: `python benchmarks/same_numbers.py --before {args.before} --data <data>` on "
             f"{machine()['cpu']} ({machine()['cores']} cores). Downstream bundle, from scratch, seed 0, "
             f"{json.dumps(SMALL)}; train then evaluate on the test split.", "",
             "| task | numbers in metrics.json | differing | largest difference |", "|---|---|---|---|"]
    lines += [f"| {t} | {n} | {d} | {x:.3g} |" for t, n, d, x in rows]
    for task, entry in payload["tasks"].items():
        if entry["differing"]:
            lines += ["", f"{task}: " + ", ".join(f"`{k}` {entry['before'].get(k)} -> {entry['after'].get(k)}"
                                                  for k in list(entry["differing"])[:12])]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
