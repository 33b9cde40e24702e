"""The main job's report: the paper's comparison, built only from the files the stages wrote.

:func:`build_report` reads ``<root>/pipeline.json`` (what ``muscle reproduce`` planned: preset, data, stages) and each
stage's ``stage.json`` and outputs, and writes ``<root>/report.md``:

- per downstream task, every starting point's test metrics with their 95 % bootstrap intervals (the evaluate
  reports' ``metrics.json``), and the paired difference of each start against Scratch and against MD-MoCo over the
  same test cases (:func:`muscle_ext.metrics.paired_difference`), with a line that says whether the ranking the paper
  reports (MD-MoCo above Scratch, MUSCLE at least MUSCLE--) holds here and whether the intervals can tell;
- per classification task, the ROC curves of every start in one figure (``figures/<task>_roc.png``);
- with an ``embedding_map`` in the preset, a t-SNE map of each pre-trained backbone's embeddings, coloured by an item
  key such as the body part (``figures/embeddings_tsne.png``);
- per classification task with another site and ``adapt`` in the preset, the models adapted to that site with k
  labelled patients per class: the best method per start and k and a figure of every method's curve
  (``figures/<task>_adaptation.png``);
- with the report card in the preset: fine-tuning beside the linear probe and kNN of the same backbones, and the
  label-efficiency table and curves (mean over seeds, intervals over test cases and seeds);
- the continual stage's forgetting summary per variant (average score, BWT, FWT, forgetting; ``forgetting.json``);
- every stage's wall time, peak memory and the exact commands it ran (each runnable on its own).

A stage that has not finished is listed as missing; no number is filled in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from ..metrics import paired_difference
from .data_check import LEAKAGE_FILE
from .paper import PAPER, SOURCE, paper_value

__all__ = ["HEADLINE", "build_report"]

# the metrics shown per task kind (evaluate's metrics.json keys); the first one is the headline for comparisons
HEADLINE = {"classification": ("roc_auc", "accuracy", "sensitivity", "specificity", "ece"),
            "segmentation": ("dice", "miou"), "regression": ("mae", "rmse"), "detection": ("map", "ap50")}
LOWER_IS_BETTER = {"mae", "rmse"}
logger = logging.getLogger(__name__)

NAMES = {"scratch": "Scratch", "imagenet": "ImageNet", "md_moco": "MD-MoCo", "muscle_minus": "MUSCLE--",
         "joint": "Joint multi-task", "muscle": "MUSCLE"}


def _fmt(entry: Any) -> str:
    if isinstance(entry, (int, float)):
        return f"{entry:.3f}" if math.isfinite(entry) else "n/a"
    if not isinstance(entry, dict) or entry.get("value") is None or not math.isfinite(entry["value"]):
        return "n/a"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _verdict(name: str, diff: dict | None, lower_is_better: bool, strict: bool = True) -> str:
    """``name: yes|no (difference [CI]; whether the interval excludes 0)``."""
    if not diff:
        return f"{name}: not measured"
    value, low, high = diff["value"], diff["ci_low"], diff["ci_high"]
    if value is None or not math.isfinite(value):
        return f"{name}: not measured (undefined difference)"
    gain = -value if lower_is_better else value
    holds = gain > 0 if strict else gain >= 0
    clear = all(math.isfinite(x) for x in (low, high)) and (high < 0 or low > 0)
    tell = "the interval excludes 0" if clear else "the interval includes 0: cannot tell"
    return f"{name}: {'yes' if holds else 'no'} ({_fmt(diff)}; {tell})"


def _paired(stage: dict, reference: dict, headline: str, n_resamples: int) -> dict | None:
    """The paired difference ``stage - reference`` of the headline metric, or ``None`` without per-case scores."""
    mine, theirs = Path(stage["output_dir"]) / "per_case.csv", Path(reference["output_dir"]) / "per_case.csv"
    if not (mine.is_file() and theirs.is_file()):
        return None  # detection: no per-image scores
    try:
        return paired_difference(mine, theirs, n_resamples).get(headline)
    except ValueError:  # evaluated on other cases (another split or max_items): not comparable case by case
        return None


VALIDATION_KEYS = ("val_auc", "val_mean_dice", "val_dice", "val_mae", "val_map")


def _stage_runs(root: Path) -> dict[str, Any]:
    """``{stage name: its training run}`` from the job's MLflow store (runs nested under the job's run and tagged
    ``muscle.stage``); ``{}`` without a job run or when the store cannot be read (the report then has no curves)."""
    record = _read_json(root / "job_run.json")
    if not record or not record.get("run_id") or not record.get("tracking_uri"):
        return {}
    try:
        import mlflow

        client = mlflow.MlflowClient(record["tracking_uri"])
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{record['run_id']}' and "
                                                             "tags.`muscle.workflow` = 'train'")
        out = {}
        for run in found:
            stage = run.data.tags.get("muscle.stage")
            if stage:
                keys = [k for k in VALIDATION_KEYS if k in run.data.metrics]
                out[stage] = {"validation_key": keys[0] if keys else None,
                              **{name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                                 for name, key in (("validation", keys[0] if keys else None),
                                                   ("train_loss", "train_loss")) if key}}
        return out
    except Exception as exc:  # noqa: BLE001 - a report without curves beats no report
        logger.warning(f"training curves left out: the job's MLflow store could not be read ({exc})")
        return {}


def _curves_figure(root: Path, task: str, stages: dict[str, dict], runs: dict[str, Any]) -> tuple[Path, str] | None:
    """``(<root>/figures/<task>_curves.png, validation metric)``: every start's validation metric and training loss
    as its MLflow run logged them, or ``None`` when no run of the task was found."""
    from ..metrics.plots import plot_training_curves

    curves = {NAMES.get(start, start): runs[stage["name"]] for start, stage in stages.items() if stage["name"] in runs}
    keys = {c["validation_key"] for c in curves.values() if c.get("validation_key")}
    if not curves or not keys:
        return None
    path = root / "figures" / f"{task}_curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = sorted(keys)[0]
    return plot_training_curves(curves, path, key, title=task), key


def _roc_figure(root: Path, task: str, stages: dict[str, dict], metrics: dict[str, dict]) -> Path | None:
    """``<root>/figures/<task>_roc.png``: every start's ROC curve on the task's test set (from its ``per_case.csv``),
    or ``None`` when no start has per-case scores."""
    from ..metrics.plots import plot_roc_curves
    from ..metrics.report import read_case_scores

    curves = {}
    for start, stage in stages.items():
        path = Path(stage["output_dir"]) / "per_case.csv"
        if path.is_file():
            scores = read_case_scores(path)
            auc = metrics[start].get("roc_auc") or {}
            ci = (auc["ci_low"], auc["ci_high"]) if auc.get("ci_low") is not None else None
            curves[NAMES.get(start, start)] = (scores["label"], scores["score"], ci)
    if not curves:
        return None
    return plot_roc_curves(curves, root / "figures" / f"{task}_roc.png", title=f"{task}: ROC curves (test set)")


def _embedding_figure(root: Path, stages: list[dict]) -> Path | None:
    """``<root>/figures/embeddings_tsne.png``: one t-SNE panel per finished embedding stage, points coloured by the
    ``color_by`` key of their datalist items; ``None`` when no stage finished."""
    import numpy as np

    from ..data import load_datalist
    from ..metrics import embedding_map_2d
    from ..metrics.plots import plot_embedding_maps

    maps = {}
    for stage in stages:
        arrays = np.load(Path(stage["output_dir"]) / "embeddings.npz")
        items = load_datalist(stage["datalist"], stage["section"])
        groups = [str(items[int(i)].get(stage["color_by"], "unknown")) for i in arrays["index"]]
        maps[NAMES.get(stage["start"], stage["start"])] = (embedding_map_2d(arrays["embeddings"]), groups)
    if not maps:
        return None
    return plot_embedding_maps(maps, root / "figures" / "embeddings_tsne.png")


def _external_lines(by_start: dict[str, dict], done: set[str], headline: str) -> list[str]:
    """Internal vs another site's test split for the starts whose stage scored one (``external`` in the preset)."""
    rows = []
    for start, stage in by_start.items():
        if not stage.get("external") or stage["name"] not in done:
            continue
        internal = (_read_json(Path(stage["output_dir"]) / "metrics.json") or {}).get(headline)
        external_metrics = _read_json(Path(stage["output_dir"]) / "external" / "metrics.json") or {}
        external = external_metrics.get(headline)
        value = [e.get("value") if isinstance(e, dict) else e for e in (internal, external)]
        drop = f"{value[1] - value[0]:+.3f}" if None not in value else "n/a"
        rows.append(f"| {NAMES.get(start, start)} | {_fmt(internal)} | {_fmt(external)} | {drop} |")
        site, n = stage["external"], external_metrics.get("n", "?")
    if not rows:
        return []
    return ["", f"Another site: the same models, unchanged, on the `{site}` test split (n = {n}); the change is the "
                "external minus the internal value, over different cases (no pairing).", "",
            f"| start | internal {headline} | external {headline} | change |", "|---|---|---|---|", *rows]


def _label_efficiency_lines(root: Path, task: str, by_start: dict[str, dict], stages: list[dict],
                            done: set[str], job_seed: int, n_resamples: int) -> list[str]:
    """Per start and share of the training labels: the headline metric averaged over seeds, its 95 % interval over
    test cases and seeds (:func:`muscle_ext.metrics.mean_over_runs`), and the curve figure. The 100 % run at the
    job's seed is the task's own stage."""
    from ..metrics import mean_over_runs
    from ..metrics.plots import plot_label_efficiency

    if not stages:
        return []
    runs: dict[str, dict[float, list[Path]]] = {}
    for stage in stages:
        if stage["name"] in done:
            runs.setdefault(stage["start"], {}).setdefault(stage["fraction"], []).append(
                Path(stage["output_dir"]) / "per_case.csv")
    for start, stage in by_start.items():  # the task's own stage is the 100 % run at the job's seed
        if start in runs and stage["name"] in done:
            runs[start].setdefault(1.0, []).insert(0, Path(stage["output_dir"]) / "per_case.csv")
    fractions = sorted({s["fraction"] for s in stages} | {1.0})
    seeds = sorted({s["seed"] for s in stages} | {job_seed})
    lines = ["", f"### Label efficiency on {task}", "",
             f"Fine-tuned on {', '.join(f'{100 * f:g} %' for f in fractions)} of the training split (stratified by "
             "class, grouped by patient where a patient id exists, nested: the smaller subset inside the larger for "
             f"one seed), seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; the test metric "
             "averaged over seeds, with a 95 % interval over test cases and seeds.", ""]
    if not runs:
        return [*lines, "No finished run yet."]
    curves: dict[str, dict[float, dict]] = {}
    metric = ""
    for start, by_fraction in runs.items():
        for fraction, files in by_fraction.items():
            files = [f for f in files if f.is_file()]
            if files:
                curves.setdefault(NAMES.get(start, start), {})[fraction] = result = mean_over_runs(
                    files, n_resamples)
                metric = result["metric"]
    lines += ["| start | " + " | ".join(f"{100 * f:g} % of labels" for f in fractions) + " |",
              "|---|" + "---|" * len(fractions)]
    for name, by_fraction in curves.items():
        cells = [f"{_fmt(by_fraction[f])} ({by_fraction[f]['runs']} seed{'s' if by_fraction[f]['runs'] > 1 else ''})"
                 if f in by_fraction else "missing" for f in fractions]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    figure = plot_label_efficiency(curves, root / "figures" / f"{task}_label_efficiency.png", metric,
                                   title=f"{task}: label efficiency (test {metric})")
    return [*lines, "", f"![{task}: test {metric} against the share of training labels, a line per start]"
                        f"({figure.relative_to(root).as_posix()})"]


def _value(entry: Any) -> float | None:
    value = entry.get("value") if isinstance(entry, dict) else entry
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _sens_spec(metrics: dict | None) -> str:
    if not metrics:
        return "n/a"
    sens, spec = _value(metrics.get("sensitivity")), _value(metrics.get("specificity"))
    return "n/a" if sens is None or spec is None else f"{sens:.2f} / {spec:.2f}"


def _site_card_lines(by_start: dict[str, dict], done: set[str], headline: str) -> list[str]:
    """The simulated site (the test split as another detector shows it) and the operating point carried from the
    home validation split: per start, the headline metric at home and at the simulated site, ECE there before and
    after recalibration on a small slice, and sensitivity / specificity at the carried threshold everywhere."""
    lines: list[str] = []
    simulated = {start: stage for start, stage in by_start.items()
                 if stage.get("simulated_site") and stage["name"] in done}
    if simulated:
        site = None
        rows: list[str] = []
        warnings: list[str] = []
        for start, stage in simulated.items():
            folder = Path(stage["output_dir"])
            home, there = _read_json(folder / "metrics.json") or {}, _read_json(folder / "simulated" /
                                                                                 "metrics.json") or {}
            site = there.get("site", site)
            recal = there.get("recalibration") or {}
            change = (f"{_value(there.get(headline)) - _value(home.get(headline)):+.3f}"
                      if None not in (_value(there.get(headline)), _value(home.get(headline))) else "n/a")
            ece = (f"{_fmt(recal.get('ece_before'))} -> {_fmt(recal.get('ece_after'))}" if recal
                   else _fmt(there.get("ece")))
            if recal.get("warning"):  # e.g. a temperature at the edge of its search: near-constant probabilities
                ece += " ⚠"
                warnings.append(f"{NAMES.get(start, start)}: {recal['warning']}")
            rows.append(f"| {NAMES.get(start, start)} | {_fmt(home.get(headline))} | {_fmt(there.get(headline))} | "
                        f"{change} | {ece} |")
        lines += ["", f"A simulated site, clearly not a real one: the test images as {site or 'another detector'} "
                      "would show them. ECE there before -> after recalibration (temperature scaling fitted on a "
                      "k-patient slice of the simulated validation split; ROC AUC unchanged by it).", "",
                  f"| start | {headline} as acquired | {headline} simulated | change | "
                  "ECE simulated, before -> after |",
                  "|---|---|---|---|---|", *rows]
        if warnings:
            lines += ["", "⚠ " + "; ".join(warnings)]
    carried = {}
    for start, stage in by_start.items():
        if stage["name"] not in done:
            continue
        folder = Path(stage["output_dir"])
        home = _read_json(folder / "metrics.json") or {}
        if home.get("operating_point"):
            carried[start] = (home, _read_json(folder / "external" / "metrics.json"),
                              _read_json(folder / "simulated" / "metrics.json"))
    if carried:
        first = next(iter(carried.values()))[0]["operating_point"]
        lines += ["", f"Operating point: the threshold chosen on the home validation split ({first['rule']}) and "
                      "carried unchanged; sensitivity / specificity it gives on each test split.", "",
                  "| start | threshold | home test | other site | simulated site |", "|---|---|---|---|---|"]
        for start, (home, external, sim) in carried.items():
            lines.append(f"| {NAMES.get(start, start)} | {home['operating_point']['threshold']:.3f} | "
                         f"{_sens_spec(home)} | {_sens_spec(external)} | {_sens_spec(sim)} |")
    return lines


def _subgroup_lines(by_start: dict[str, dict], done: set[str], headline: str) -> list[str]:
    """Each start's test metric per value of the datalist fields the evaluation grouped by (``subgroups``)."""
    tables: dict[str, dict[str, dict[str, dict]]] = {}  # field -> value -> start -> row
    for start, stage in by_start.items():
        report = _read_json(Path(stage["output_dir"]) / "metrics.json") if stage["name"] in done else None
        for field, rows in ((report or {}).get("subgroups") or {}).items():
            for row in rows:
                tables.setdefault(field, {}).setdefault(str(row["value"]), {})[start] = row
    lines = []
    for field, by_value in tables.items():
        starts = list(dict.fromkeys(start for rows in by_value.values() for start in rows))
        lines += ["", f"Test {headline} by `{field}` (each row computed on that value's test cases alone):", "",
                  f"| {field} | n | " + " | ".join(NAMES.get(s, s) for s in starts) + " |",
                  "|---|---|" + "---|" * len(starts)]
        warned = False
        for value, rows in by_value.items():
            first = next(iter(rows.values()))
            warning = " ⚠" if first.get("warning") else ""
            warned |= bool(warning)
            lines.append(f"| {value} | {first.get('n', '?')}{warning} | "
                         + " | ".join(_fmt(rows[s].get(headline)) if s in rows else "" for s in starts) + " |")
        if warned:
            lines += ["", "⚠ fewer test cases than `min_group_size`: too few to say anything about that group."]
    return lines


def _protocol_lines(task: str, by_start: dict[str, dict], stages: list[dict], done: set[str],
                    headline: str) -> list[str]:
    """Fine-tuning beside the frozen-backbone protocols (linear probe, kNN) of the same backbones."""
    if not stages:
        return []
    methods = list(dict.fromkeys(s["protocol"] for s in stages))
    cells = {(s["start"], s["protocol"]): _read_json(Path(s["output_dir"]) / "metrics.json") if s["name"] in done
             else None for s in stages}
    lines = ["", f"### Fine-tuning, linear probe and kNN on {task}", "",
             "The same backbones: fine-tuned (the task's own stage), frozen with a trained linear head "
             "(`--freeze_backbone true`) and, for classification, frozen with a kNN vote of the training split's "
             f"embeddings (`knn.yaml`, nothing trained). Test {headline} with 95 % intervals.", "",
             "| start | fine-tuned | " + " | ".join(m.replace("_", " ") for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for start in dict.fromkeys(s["start"] for s in stages):
        own = by_start.get(start)
        tuned = _read_json(Path(own["output_dir"]) / "metrics.json") if own and own["name"] in done else None
        row = [_fmt((tuned or {}).get(headline)) if tuned else "missing"]
        row += [_fmt((cells.get((start, m)) or {}).get(headline)) if cells.get((start, m)) else "missing"
                for m in methods]
        lines.append(f"| {NAMES.get(start, start)} | " + " | ".join(row) + " |")
    return lines


def _adaptation_lines(root: Path, task: str, stages: list[dict], done: set[str]) -> list[str]:
    """The fine-tuned models adapted to the other site (``adapt_curves.yaml``'s ``adaptation_curves.json``): per start
    and k the best method's new-site AUC against the model as it came, the old site's AUC after adapting, and one
    figure with a panel per start."""
    from ..engines import best_methods
    from ..metrics.plots import plot_adaptation_curves

    if not stages:
        return []
    curves = {s["start"]: _read_json(Path(s["output_dir"]) / "adaptation_curves.json") for s in stages
              if s["name"] in done}
    curves = {start: c for start, c in curves.items() if c}
    site = stages[0]["external"]
    lines = ["", f"### Adapting the {task} models to `{site}`", ""]
    if not curves:
        return [*lines, "No finished adaptation stage yet."]
    first = next(iter(curves.values()))
    lines += [f"Each fine-tuned model adapted with k labelled patients per class of `{site}`'s training split "
              f"({first['draws']} k-shot draws per k, nested across k, never a test patient) by each of "
              f"{', '.join(f'`{m}`' for m in first['methods'])}; ROC AUC on `{site}`'s test split (n = "
              f"{first['n_target_test']}; mean over draws, 95 % interval over test cases and draws) and on the "
              f"task's own test split after adapting (what it costs at home). `none` is the model as it came.", "",
              "| start | k | best method | new-site ROC AUC | as it came | own site after | own site before |",
              "|---|---|---|---|---|---|---|"]
    for start, result in curves.items():
        for row in best_methods(result):
            before = row["before_target"], row["before_source"]
            lines.append(f"| {NAMES.get(start, start)} | {row['k']} | {row['method']} | {_fmt(row['target_auc'])} | "
                         f"{_fmt(before[0]['value']) if before[0] else 'n/a'} | {_fmt(row['source_auc'])} | "
                         f"{_fmt(before[1]['value']) if before[1] else 'n/a'} |")
    figure = plot_adaptation_curves({NAMES.get(start, start): c for start, c in curves.items()},
                                    root / "figures" / f"{task}_adaptation.png",
                                    title=f"{task}: adapting to {site} (new-site test ROC AUC)")
    lines += ["", f"![{task} models adapted to {site}: new-site ROC AUC against k, a line per method]"
                  f"({figure.relative_to(root).as_posix()})"]
    return lines


def _leakage_section(check: dict | None) -> list[str]:
    """The data check (:mod:`.data_check`): what of each test split also sits in training or pre-training data."""
    if check is None:
        return ["", "## Data check", "", "Not run: no leakage.json in this folder."]
    lines = ["", "## Data check: test splits against training and pre-training data", "",
             f"Each downstream test split against {len(check['reference'])} sections the stages read (the pre-training "
             "pool and the training and validation splits): identical files (SHA-256), near-duplicate radiographs "
             f"(64 x 64 thumbnail correlation >= {check['threshold']}) and shared patient ids.", "",
             "| test split | entries | identical file | near duplicate | same patient |", "|---|---|---|---|---|"]
    for summary in check["tests"]:
        reasons = [leak["reason"] for leak in summary["leaks"]]
        lines.append(f"| `{summary['datalist']}:{summary['section']}` | {summary['n']} | "
                     + " | ".join(str(reasons.count(r)) for r in ("identical file", "near duplicate", "same patient"))
                     + " |")
    if check["leaks"]:
        entries = sum(len({leak["entry"] for leak in s["leaks"]}) for s in check["tests"])
        lines += ["", f"> **{entries} test entries also sit in data a stage trains on: the metrics measured on them "
                      "are inflated. `leakage.json` lists them (entry positions); `muscle data check-leakage` checks "
                      "a fixed datalist.**"]
    else:
        lines += ["", "No test image or patient found in them."]
    return lines


def build_report(root: str | os.PathLike, n_resamples: int = 1000) -> Path:
    """Write ``<root>/report.md`` from a main job's folder; returns its path.

    Raises:
        FileNotFoundError: ``root`` holds no ``pipeline.json`` (not a ``muscle reproduce`` folder).
    """
    root = Path(root)
    pipeline = _read_json(root / "pipeline.json")
    if pipeline is None:
        raise FileNotFoundError(f"{root}: no pipeline.json; give the --out folder of `muscle reproduce`")
    stages = pipeline["stages"]
    states = {s["name"]: _read_json(Path(s["output_dir"]) / "stage.json") or {} for s in stages}
    done = {name for name, state in states.items() if state.get("status") == "done"}
    lines = [f"# MUSCLE main job: {pipeline['preset']} preset", "",
             f"{pipeline.get('description', '')}", "",
             f"Data: `{pipeline['data_name']}`; seed {pipeline['seed']}; {len(done)} of {len(stages)} stages "
             "finished. Built from the files of the runs listed at the end (`muscle report <out>` rebuilds it, `<out>` "
             "being this folder).",
             "Test metrics with 95 % percentile bootstrap intervals; Δ: paired difference over the same test cases."]
    if pipeline.get("warning"):
        lines += ["", f"> **{pipeline['warning']}**"]
    lines += _leakage_section(_read_json(root / LEAKAGE_FILE))

    runs = _stage_runs(root)
    tasks: dict[str, dict[str, dict]] = {}
    for stage in stages:
        if stage.get("kind") == "downstream":
            tasks.setdefault(stage["task"], {})[stage["start"]] = stage
    for task, by_start in tasks.items():
        metrics = {start: _read_json(Path(s["output_dir"]) / "metrics.json") for start, s in by_start.items()
                   if s["name"] in done}
        kind = next((m.get("task") for m in metrics.values() if m), None)
        names = HEADLINE.get(kind or "", ())
        n = next((m.get("n") for m in metrics.values() if m), "?")
        lines += ["", f"## {task} ({kind or 'not evaluated yet'}, test n = {n})", ""]
        if not names:
            lines.append("No finished evaluation yet.")
            continue
        headline = names[0]
        lower = headline in LOWER_IS_BETTER
        paper = next((s.get("paper") for s in by_start.values() if s.get("paper")), None)
        published = PAPER.get(paper) if paper else None
        paper_column = [f"paper ({published['metric']}, ResNet-18)"] if published else []
        lines += ["| start | " + " | ".join([*names, *paper_column]) + f" | Δ {headline} vs Scratch | "
                  f"Δ {headline} vs MD-MoCo |", "|---|" + "---|" * (len(names) + len(paper_column) + 2)]
        diffs: dict[str, dict[str, dict | None]] = {}
        for start, stage in by_start.items():
            report = metrics.get(start)
            if not report:
                lines.append(f"| {NAMES.get(start, start)} | " + " | ".join("missing" for _ in [*names, *paper_column])
                             + " | | |")
                continue
            row = [NAMES.get(start, start), *(_fmt(report.get(m)) for m in names)]
            if published:
                value = paper_value(paper, start)
                row.append("-" if value is None else f"{value:.3f}")
            diffs[start] = {}
            for reference in ("scratch", "md_moco"):
                diff = None
                if reference != start and metrics.get(reference):
                    diff = _paired(stage, by_start[reference], headline, n_resamples)
                diffs[start][reference] = diff
                row.append(_fmt(diff) if diff else "")
            lines.append("| " + " | ".join(row) + " |")
        checks = []
        if "md_moco" in diffs:
            checks.append(_verdict("MD-MoCo above Scratch", diffs["md_moco"].get("scratch"), lower))
        if metrics.get("muscle") and metrics.get("muscle_minus"):
            diff = _paired(by_start["muscle"], by_start["muscle_minus"], headline, n_resamples)
            checks.append(_verdict("MUSCLE at least MUSCLE--", diff, lower, strict=False))
        if metrics.get("muscle") and metrics.get("joint"):  # not the paper's claim: the baseline a reviewer asks for
            diff = _paired(by_start["muscle"], by_start["joint"], headline, n_resamples)
            checks.append(_verdict("MUSCLE at least the joint multi-task baseline", diff, lower, strict=False))
        if checks:
            lines += ["", "Does the paper's ranking hold here? " + "; ".join(checks) + "."]
        if published:
            lines += ["", f"Paper column: the published ResNet-18 result ({SOURCE}; {published['note']}): full "
                          "datasets and training, the paper's own splits and heads. A reference for the ranking, not a "
                          "target for this run's numbers."]
        curves = _curves_figure(root, task, {start: by_start[start] for start in metrics if metrics[start]}, runs)
        if curves is not None:
            lines += ["", f"![Training curves of every start on {task}: validation {curves[1]} per epoch, training "
                          f"loss]({curves[0].relative_to(root).as_posix()})"]
        if kind == "classification":
            figure = _roc_figure(root, task, {start: by_start[start] for start in metrics if metrics[start]},
                                 metrics)
            if figure is not None:
                lines += ["", f"![ROC curves of every start on the {task} test set]"
                              f"({figure.relative_to(root).as_posix()})"]
        lines += _external_lines(by_start, done, headline)
        lines += _adaptation_lines(root, task, [s for s in stages if s.get("kind") == "adaptation"
                                                and s["task"] == task], done)
        lines += _site_card_lines(by_start, done, headline)
        lines += _subgroup_lines(by_start, done, headline)
        lines += _protocol_lines(task, by_start, [s for s in stages if s.get("kind") == "protocol"
                                                  and s["task"] == task], done, headline)
        lines += _label_efficiency_lines(root, task, by_start, [s for s in stages if s.get("kind") ==
                                                                "label_efficiency" and s["task"] == task],
                                         done, int(pipeline.get("seed", 0)), n_resamples)

    continual = [s for s in stages if s.get("kind") == "continual"]
    if continual:
        lines += ["", "## Continual stage: forgetting", "",
                  "| variant | average final score | BWT | FWT | mean forgetting | matrix |",
                  "|---|---|---|---|---|---|"]
        for stage in continual:
            if stage["name"] not in done:  # an unfinished run's matrix is partial: no number from it
                lines.append(f"| {NAMES.get(stage['name'], stage['name'])} | not finished | | | | |")
                continue
            summary = (_read_json(Path(stage["output_dir"]) / "forgetting.json") or {}).get("summary", {})
            png = Path(stage["output_dir"]) / "forgetting_matrix.png"
            link = f"[png]({os.path.relpath(png, root)})" if png.is_file() else "missing"
            lines.append(f"| {NAMES.get(stage['name'], stage['name'])} | "
                         + " | ".join(_fmt(summary.get(k)) for k in ("average", "bwt", "fwt", "mean_forgetting"))
                         + f" | {link} |")

    embedding = [s for s in stages if s.get("kind") == "embedding"]
    if embedding:
        lines += ["", "## Backbone embeddings", ""]
        figure = _embedding_figure(root, [s for s in embedding if s["name"] in done])
        if figure is None:
            lines.append("No finished embedding stage yet.")
        else:
            first = embedding[0]
            lines += [f"Each pre-trained backbone's features of the `{first['section']}` images of "
                      f"`{Path(first['datalist']).name}`, mapped to 2-D by t-SNE and coloured by `{first['color_by']}` "
                      "(a map, not a metric: distances between clusters mean little).", "",
                      f"![t-SNE maps of the backbone embeddings]({figure.relative_to(root).as_posix()})"]

    lines += ["", "## Stages", "", "| stage | status | wall (s) | peak RSS (GiB) | log |", "|---|---|---|---|---|"]
    for stage in stages:
        state = states[stage["name"]]
        logs = ", ".join(f"[{i + 1}]({os.path.relpath(Path(stage['output_dir']) / c['log'], root)})"
                         for i, c in enumerate(state.get("commands", [])))
        lines.append(f"| {stage['name']} | {state.get('status', 'not started')} | {state.get('wall_s', '')} | "
                     f"{state.get('peak_rss_gib', '')} | {logs} |")
    lines += ["", "Each stage on its own (the commands it ran, in order; run them from the repository root, with "
              "`<data>` the --data folder and `<out>` this job's folder):", ""]
    for stage in stages:
        for command in states[stage["name"]].get("commands", []):
            lines.append(f"- {stage['name']}: `{command['command']}`")
    path = root / "report.md"
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    write_html(text, root / "report.html", title=f"MUSCLE: {pipeline.get('preset', 'main job')} report")
    return path


def summary_lines(root: str | os.PathLike) -> list[str]:
    """The job's results on one screen: per task, each start's headline test metric with its 95 % interval, and
    each continual variant's forgetting; read from the same files as the report (an unfinished stage is left out)."""
    root = Path(root)
    pipeline = _read_json(root / "pipeline.json") or {"stages": []}
    lines, tasks = [], {}
    for stage in pipeline["stages"]:
        if stage.get("kind") == "downstream":
            tasks.setdefault(stage["task"], []).append(stage)
        elif stage.get("kind") == "continual":
            summary = (_read_json(Path(stage["output_dir"]) / "forgetting.json") or {}).get("summary")
            if summary:
                lines.append(f"  continual {NAMES.get(stage['name'], stage['name'])}: average final "
                             f"{_fmt(summary.get('average'))}, mean forgetting {_fmt(summary.get('mean_forgetting'))}")
    for task, stages in tasks.items():
        cells = []
        for stage in stages:
            metrics = _read_json(Path(stage["output_dir"]) / "metrics.json")
            if metrics and HEADLINE.get(metrics.get("task", "")):
                headline = HEADLINE[metrics["task"]][0]
                cells.append(f"{NAMES.get(stage['start'], stage['start'])} {_fmt(metrics.get(headline))}")
        if cells:
            lines.append(f"  {task} ({headline}): " + "; ".join(cells))
    return lines


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1b1f24; line-height: 1.45; }}
h1, h2 {{ border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }}
th, td {{ border: 1px solid #d0d7de; padding: .35rem .6rem; text-align: left; }}
th {{ background: #f6f8fa; }}
tr:nth-child(even) td {{ background: #fbfcfd; }}
img {{ max-width: 100%; border: 1px solid #eaeef2; margin: .5rem 0; }}
code {{ background: #f6f8fa; padding: .1rem .3rem; border-radius: 4px; font-size: .85rem; word-break: break-all; }}
blockquote {{ background: #fff8c5; border-left: 4px solid #d4a72c; margin: 1rem 0; padding: .5rem 1rem; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def write_html(markdown_text: str, path: str | os.PathLike, title: str = "MUSCLE report") -> Path:
    """The report as one self-contained HTML page (Python-Markdown with its ``tables`` extension): every figure that
    ``markdown_text`` links relative to ``path``'s folder is inlined as a ``data:`` URI, so the page shows its figures
    when mailed or uploaded alone; links to logs stay relative into the job's folder. Returns ``path``."""
    import html

    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    path = Path(path)
    body = _IMG_SRC.sub(lambda m: m.group(1) + _data_uri(path.parent, html.unescape(m.group(2))) + m.group(3), body)
    path.write_text(_PAGE.format(title=html.escape(title), body=body))
    return path


_IMG_SRC = re.compile(r'(<img\b[^>]*?\bsrc=")([^"]+)(")')


def _data_uri(folder: Path, src: str) -> str:
    """``src`` as a base64 ``data:`` URI when it names a figure file under ``folder``; else ``src`` unchanged (an
    absolute URL, or a figure that is missing: the browser then shows its alt text)."""
    import base64
    import html
    import mimetypes

    file = folder / src
    mime = mimetypes.guess_type(file.name)[0] or ""
    if not mime.startswith("image/") or "://" in src or src.startswith("data:") or not file.is_file():
        return html.escape(src)
    return f"data:{mime};base64," + base64.b64encode(file.read_bytes()).decode("ascii")
