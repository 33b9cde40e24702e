"""Site adaptation (issue #20): a pneumonia model trained at one site, adapted to another with k labelled patients
per class, for every start (Scratch, MD-MoCo, MUSCLE), k in {5, 10, 20}, several k-shot draws and every method of
``muscle_ext.engines.adaptation``; new-site ROC AUC (mean over draws, 95 % CI over draws and test cases) and the old
site's ROC AUC after adaptation (what adapting costs at home). Then the reverse direction.

    python benchmarks/bench_site_adaptation.py --data ../shared/data/xray --runs runs/reproduce_quick \\
        --work runs/site_adaptation

Forward (NIH -> site 2): the main job's fine-tuned pneumonia models, ``<runs>/downstream/pneumonia_<start>/models/
model.pt``. Reverse (site 2 -> NIH): source models fine-tuned on ``pneumonia_site2`` from the same backbones
(``<runs>/{md_moco,muscle}/models/backbone.pt``, and scratch) with the downstream bundle's quick preset and the
main job's size settings, run as users run it (``python -m monai.bundle run``) into ``<work>/source_site2_<start>``;
a finished one is reused.

Adaptation runs in-process on images decoded once (the model's size and normalisation, as ``adapt.yaml`` loads
them): the same functions ``adapt.yaml`` calls. Methods that use no labels (``none``, ``adabn``) give one model per
start; their draws differ only in the recalibration fitted on the shots. Writes
``benchmarks/results/<name>.{json,md}`` (default ``site_adaptation``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, NormalizeIntensityd
from scipy.stats import rankdata

from muscle_ext.data import load_datalist, xray_preprocessing
from muscle_ext.engines import AdaptationConfig, adapt_model, draw_shots, predict_probabilities
from muscle_ext.metrics import bootstrap_indices, roc_auc, sensitivity, specificity
from muscle_ext.networks import BackboneClassifier, adapt_batchnorm, build_backbone, find_backbone, load_model_file

from common import RESULTS, machine, monai_run, write_result

REPO = Path(__file__).resolve().parents[1]
BUNDLE = Path("bundles/downstream")  # relative: main() runs from the repository root
STARTS = ("scratch", "md_moco", "muscle")
METHODS = ("none", "recalibrate", "adabn", "adabn+recalibrate", "head", "finetune_l2sp", "adabn+head",
           "adabn+finetune_l2sp")
# adabn+finetune_l2sp is left out by default: it doubles the fine-tuning time (the longest part) on 2 CPU cores
DEFAULT_METHODS = METHODS[:-1]
SITES = {"nih": "pneumonia_nih", "site2": "pneumonia_site2"}
GOAL = 0.85


# ---------------------------------------------------------------------------------------------------- inputs
def relative(path: Path | str) -> str:
    """``path`` relative to the repository root (the commands in the results name no folder of this machine)."""
    return os.path.relpath(Path(path).resolve(), REPO)


def load_model(path: Path) -> tuple[BackboneClassifier, dict]:
    state, settings = load_model_file(path)
    if settings is None:
        raise SystemExit(f"{path}: no settings recorded (muscle-model/1 needed for the size and normalisation)")
    model = BackboneClassifier(build_backbone(settings["arch"], **settings["backbone_kwargs"]),
                               num_outputs=int(settings["num_classes"]))
    model.load_state_dict(state)
    return model.eval(), settings


class ImageCache:
    """Every datalist section decoded once per (size, normalisation): ``(items, images (N, 1, S, S), labels)``."""

    def __init__(self) -> None:
        self.cache: dict[tuple, tuple[list[dict], torch.Tensor, np.ndarray]] = {}

    def get(self, datalist: Path, section: str, settings: dict) -> tuple[list[dict], torch.Tensor, np.ndarray]:
        key = (str(datalist), section, int(settings["image_size"]), float(settings["input_mean"]),
               float(settings["input_std"]))
        if key not in self.cache:
            items = load_datalist(datalist, section)
            transform = Compose([*xray_preprocessing("image", size=key[2]),
                                 NormalizeIntensityd(keys="image", subtrahend=key[3], divisor=key[4])])
            images = torch.stack([torch.as_tensor(transform(dict(item))["image"]).float() for item in items])
            self.cache[key] = (items, images, np.array([int(i["label"]) for i in items]))
        return self.cache[key]


def stage_size_overrides(model_path: Path) -> dict:
    """``max_items`` / ``image_size`` of the main job's stage that trained ``model_path`` (its ``stage.json``), so that
    the reverse direction's source models are trained alike."""
    stage = model_path.parent.parent / "stage.json"
    found = {}
    if stage.is_file():
        text = stage.read_text()
        for name in ("max_items", "image_size", "num_epochs", "batch_size"):
            match = re.search(rf"--{name}\\?'?\s+'?(\d+)", text)
            if match:
                found[name] = int(match.group(1))
    return found


def train_reverse_sources(args: argparse.Namespace, overrides: dict) -> dict[str, dict]:
    """Source models on site 2 from every start with the quick preset (reused when ``model.pt`` exists)."""
    out = {}
    backbones = {"md_moco": args.runs / "md_moco" / "models" / "backbone.pt",
                 "muscle": args.runs / "muscle" / "models" / "backbone.pt"}
    for start in STARTS:
        folder = args.work / f"source_site2_{start}"
        init = {"init": "scratch"} if start == "scratch" else {"init": "checkpoint",
                                                               "init_weights": relative(backbones[start])}
        settings = {"dataset_dir": relative(args.data), "datalist": relative(args.data / SITES["site2"] /
                                                                             "datalist.json"),
                    "output_dir": relative(folder), "use_tracking": False, "log_models": False, "seed": args.seed,
                    **overrides, **init}
        entry = {"settings": settings}
        if not (folder / "models" / "model.pt").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            run = monai_run(BUNDLE, ["common.yaml", "classification.yaml", "quick.yaml"], settings,
                            folder / "train.log")
            entry.update(command=run["command"], wall_s=run["wall_s"])
        else:
            entry["reused"] = True
        out[start] = {**entry, "model": folder / "models" / "model.pt"}
    return out


# -------------------------------------------------------------------------------------------------- metrics
def _aucs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores (D, N)`` by the rank-sum (Mann-Whitney) formula, ties as halves: the
    vectorised form of :func:`muscle_ext.metrics.roc_auc` (which takes ~3 ms a call: too slow for 10^5 calls)."""
    positive = labels == 1
    n1, n0 = int(positive.sum()), int((~positive).sum())
    ranks = rankdata(scores, axis=1)
    return (ranks[:, positive].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def mean_ci_over_draws_and_cases(labels: np.ndarray, scores: np.ndarray, resamples: int, seed: int) -> dict:
    """Mean ROC AUC over draws (rows of ``scores (D, N)``) and a 95 % percentile interval from resampling both the
    test cases (stratified, :func:`muscle_ext.metrics.bootstrap_indices`) and the draws (with replacement)."""
    per_draw = np.array([roc_auc(labels, s) for s in scores])
    assert np.allclose(per_draw, _aucs(labels, scores))  # the fast form agrees with the reference
    rng = np.random.default_rng(seed + 1)
    draws = len(scores)
    values = [_aucs(labels[idx], scores[:, idx])[rng.integers(0, draws, draws)].mean()
              for idx in bootstrap_indices(labels, resamples, seed)]
    low, high = np.percentile(values, [2.5, 97.5])
    return {"value": float(per_draw.mean()), "ci_low": float(low), "ci_high": float(high),
            "per_draw": per_draw.tolist()}


def at_threshold(labels: np.ndarray, scores: np.ndarray, thresholds: list[float]) -> dict:
    sens = [sensitivity(labels, s >= t) for s, t in zip(scores, thresholds, strict=True)]
    spec = [specificity(labels, s >= t) for s, t in zip(scores, thresholds, strict=True)]
    return {"sensitivity": float(np.mean(sens)), "specificity": float(np.mean(spec)),
            "threshold": float(np.mean(thresholds))}


# ----------------------------------------------------------------------------------------------- adaptation
@torch.no_grad()
def pooled_features(model: BackboneClassifier, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The backbone's pooled features ``(N, F)`` in eval mode."""
    backbone = find_backbone(model).eval()
    return torch.cat([backbone(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def adapt_start(model: BackboneClassifier, settings: dict, direction: dict, cache: ImageCache,
                args: argparse.Namespace) -> dict:
    """Every method x k x draw for one source model; per cell the scores of every draw on both test splits."""
    pool_items, pool_images, pool_labels = cache.get(direction["target"], "training", settings)
    test_items, target_images, target_labels = cache.get(direction["target"], "test", settings)
    _, source_images, source_labels = cache.get(direction["source"], "test", settings)
    config = AdaptationConfig(calibration=args.calibration, batch_size=32, finetune_epochs=args.finetune_epochs,
                              patience=args.patience)
    predict = {"target": lambda m: predict_probabilities(m, target_images),
               "source": lambda m: predict_probabilities(m, source_images)}
    started = time.perf_counter()
    adabn_model = adapt_batchnorm(copy.deepcopy(model),
                                  [pool_images[i:i + 32] for i in range(0, len(pool_images), 32)]).eval()
    fixed = {"none": (model, {s: f(model) for s, f in predict.items()}),
             "adabn": (adabn_model, {s: f(adabn_model) for s, f in predict.items()})}
    # head methods change the head only: the frozen backbone's features of both test splits are computed once
    features = {base: {"target": pooled_features(m, target_images), "source": pooled_features(m, source_images)}
                for base, (m, _) in fixed.items()}
    cells: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    for k in args.ks:
        for draw in range(args.draws):
            _, indices = draw_shots(pool_items, k, draw, exclude=test_items)
            shots = (pool_images[indices], torch.as_tensor(pool_labels[indices]))
            groups = [pool_items[i].get("patient_id") for i in indices]
            for method in args.methods:
                t0 = time.perf_counter()
                base = "adabn" if method.startswith("adabn") else "none"
                rest = method.removeprefix("adabn").lstrip("+") or "none"
                if rest in ("none", "recalibrate"):  # the weights stay those of the label-free model
                    result = adapt_model(fixed[base][0], rest, shots, groups=groups, config=config)
                    scores = {s: (p if result.recalibration is None else result.recalibration(p))
                              for s, p in fixed[base][1].items()}
                elif rest == "head":
                    result = adapt_model(copy.deepcopy(fixed[base][0]), rest, shots, groups=groups, config=config)
                    with torch.no_grad():
                        scores = {s: torch.softmax(result.model.head(f), dim=1)[:, 1].numpy().astype(float)
                                  for s, f in features[base].items()}
                else:
                    result = adapt_model(copy.deepcopy(fixed[base][0]), rest, shots, groups=groups, config=config)
                    scores = {s: f(result.model) for s, f in predict.items()}
                cell = cells[method].setdefault(k, {"target": [], "source": [], "threshold": [], "epochs": [],
                                                    "stopped_early": [], "seconds": []})
                cell["target"].append(scores["target"])
                cell["source"].append(scores["source"])
                cell["threshold"].append(result.threshold)
                cell["epochs"].append(result.history.get("epochs"))
                cell["stopped_early"].append(result.history.get("stopped_early"))
                cell["seconds"].append(time.perf_counter() - t0)
    out: dict = {"seconds": round(time.perf_counter() - started, 1), "methods": {}}
    for method, by_k in cells.items():
        out["methods"][method] = {}
        for k, cell in by_k.items():
            target, source = np.stack(cell["target"]), np.stack(cell["source"])
            out["methods"][method][str(k)] = {
                "target_auc": mean_ci_over_draws_and_cases(target_labels, target, args.resamples, args.seed),
                "source_auc": mean_ci_over_draws_and_cases(source_labels, source, args.resamples, args.seed),
                "target_at_threshold": at_threshold(target_labels, target, cell["threshold"]),
                "epochs": cell["epochs"], "stopped_early": cell["stopped_early"],
                "seconds_per_draw": round(float(np.mean(cell["seconds"])), 2)}
    out["n_target_test"], out["n_source_test"] = int(len(target_labels)), int(len(source_labels))
    return out


def run_direction(name: str, models: dict[str, Path], source: str, target: str, cache: ImageCache,
                  args: argparse.Namespace) -> dict:
    direction = {"source": args.data / SITES[source] / "datalist.json",
                 "target": args.data / SITES[target] / "datalist.json"}
    out = {"source_site": SITES[source], "target_site": SITES[target], "starts": {}}
    for start, path in models.items():
        model, settings = load_model(path)
        torch.manual_seed(args.seed)
        print(f"[{name}] {start}: {relative(path)} ({settings['image_size']} px)", flush=True)
        out["starts"][start] = {"model": relative(path), "image_size": settings["image_size"],
                                **adapt_start(model, settings, direction, cache, args)}
        print(f"[{name}] {start} done in {out['starts'][start]['seconds']} s", flush=True)
    return out


# --------------------------------------------------------------------------------------------------- report
def _fmt(entry: dict) -> str:
    return f"{entry['value']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def best_rows(direction: dict, ks: list[int]) -> list[dict]:
    rows = []
    for start, result in direction["starts"].items():
        none = result["methods"]["none"]
        for k in ks:
            cells = {m: by_k[str(k)] for m, by_k in result["methods"].items() if str(k) in by_k}
            best = max(cells, key=lambda m: cells[m]["target_auc"]["value"])
            rows.append({"start": start, "k": k, "best": best, "target_auc": cells[best]["target_auc"],
                         "source_auc": cells[best]["source_auc"], "before_target": none[str(k)]["target_auc"],
                         "before_source": none[str(k)]["source_auc"]})
    return rows


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = ["# Site adaptation: a pneumonia model moved to another site with k labelled patients per class", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads). Commit "
             f"{result['commit']}. Total {result['total_minutes']} min.", f"Command: `{result['command']}`", "",
             f"k in {s['ks']} patients per class of the new site's `training` split, {s['draws']} draws per k "
             "(`muscle_ext.engines.draw_shots`: stratified, grouped by patient, nested across k for a draw, never a "
             "test patient); AdaBN on the new site's whole `training` split without labels; the head trains on every "
             "shot; fine-tuning stops early on 20 % of the shot patients per class (at least one). ROC AUC on each "
             "site's `test` split: "
             "mean over draws, 95 % percentile interval from resampling test cases (stratified) and draws together "
             f"({s['resamples']} resamples). Recalibration: {s['calibration']} + Youden threshold on the shots "
             "(AUC unchanged by construction; the sensitivity/specificity columns show what it moves).", ""]
    for name, direction in result["directions"].items():
        lines += [f"## {name}: {direction['source_site']} -> {direction['target_site']}", ""]
        if name == "reverse":
            for start, entry in result.get("reverse_sources", {}).items():
                if "command" in entry:
                    lines += [f"- source model `{start}`: `{entry['command']}` ({entry['wall_s']} s)"]
                else:
                    lines += [f"- source model `{start}`: reused `{entry['settings']['output_dir']}/models/model.pt`"]
            lines += [""]
        lines += ["### Best method per start and k (by mean new-site AUC)", "",
                  "| start | k | best method | new-site AUC | before (no adaptation) | old-site AUC after | old site "
                  "before |", "|---|---|---|---|---|---|---|"]
        for row in best_rows(direction, s["ks"]):
            lines.append(f"| {row['start']} | {row['k']} | {row['best']} | {_fmt(row['target_auc'])} | "
                         f"{row['before_target']['value']:.3f} | {_fmt(row['source_auc'])} | "
                         f"{row['before_source']['value']:.3f} |")
        for start, res in direction["starts"].items():
            lines += ["", f"### {start} (`{res['model']}`, {res['image_size']} px; test n = {res['n_target_test']} "
                      f"new site, {res['n_source_test']} old site; {res['seconds']} s)", "",
                      "| method | " + " | ".join(f"new-site AUC, k = {k}" for k in s["ks"])
                      + " | " + " | ".join(f"old-site AUC, k = {k}" for k in s["ks"])
                      + f" | sens / spec at threshold, k = {s['ks'][-1]} |",
                      "|---|" + "---|" * (2 * len(s["ks"]) + 1)]
            for method, by_k in res["methods"].items():
                at = by_k[str(s["ks"][-1])]["target_at_threshold"]
                lines.append(f"| {method} | " + " | ".join(_fmt(by_k[str(k)]["target_auc"]) for k in s["ks"])
                             + " | " + " | ".join(f"{by_k[str(k)]['source_auc']['value']:.3f}" for k in s["ks"])
                             + f" | {at['sensitivity']:.2f} / {at['specificity']:.2f} |")
        lines += [""]
    lines += ["## Reading", "", result.get("reading", "(to be written from the tables above)"), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "xray")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "reproduce_quick",
                        help="the main job's output folder (forward models and backbones)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "site_adaptation")
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--calibration", default="temperature", choices=("temperature", "platt"))
    parser.add_argument("--resamples", type=int, default=1000)
    # shorter than AdaptationConfig's 30 / 5: one fine-tuning epoch of 32 shots at 64 px takes ~2.5 s on 2 cores
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--directions", nargs="+", default=["forward", "reverse"], choices=("forward", "reverse"))
    parser.add_argument("--name", default="site_adaptation")
    parser.add_argument("--reading", type=Path, default=None,
                        help="a text file: the reading of a finished run, added to its JSON and markdown without "
                             "rerunning anything")
    args = parser.parse_args()
    args.data, args.runs, args.work = args.data.resolve(), args.runs.resolve(), args.work.resolve()
    os.chdir(REPO)
    if args.reading is not None:
        path = RESULTS / f"{args.name}.json"
        result = json.loads(path.read_text())
        result["reading"] = args.reading.read_text().strip()
        path.write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{args.name}.md").write_text(markdown(result))
        print(f"reading added to {relative(path)} and its markdown")
        return
    started = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    cache = ImageCache()
    forward_models = {s: args.runs / "downstream" / f"pneumonia_{s}" / "models" / "model.pt" for s in STARTS}
    missing = [relative(p) for p in forward_models.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"missing source models: {missing}")
    result: dict = {"settings": {"ks": args.ks, "draws": args.draws, "methods": args.methods,
                                 "calibration": args.calibration, "resamples": args.resamples, "seed": args.seed,
                                 "adaptation_config": vars(AdaptationConfig(
                                     calibration=args.calibration, finetune_epochs=args.finetune_epochs,
                                     patience=args.patience))},
                    "directions": {}}
    if "forward" in args.directions:
        result["directions"]["forward"] = run_direction("forward", forward_models, "nih", "site2", cache, args)
    if "reverse" in args.directions:
        overrides = stage_size_overrides(forward_models["scratch"])
        overrides.setdefault("image_size", load_model(forward_models["scratch"])[1]["image_size"])
        sources = train_reverse_sources(args, overrides)
        result["reverse_sources"] = {s: {k: v for k, v in e.items() if k != "model"} for s, e in sources.items()}
        result["directions"]["reverse"] = run_direction("reverse", {s: e["model"] for s, e in sources.items()},
                                                        "site2", "nih", cache, args)
    result["total_minutes"] = round((time.perf_counter() - started) / 60, 1)
    path = write_result(args.name, result)
    md = RESULTS / f"{args.name}.md"
    md.write_text(markdown(json.loads(path.read_text())))  # as written: command, commit and machine included
    print(f"wrote {relative(path)} and {relative(md)}")


if __name__ == "__main__":
    main()
