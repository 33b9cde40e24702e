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
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, NormalizeIntensityd

from muscle_ext.data import load_datalist, xray_preprocessing
from muscle_ext.engines import AdaptationConfig, LabelledImages, adaptation_curves, best_methods
from muscle_ext.networks import BackboneClassifier, build_backbone, load_model_file

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


def adapt_start(model: BackboneClassifier, settings: dict, direction: dict, cache: ImageCache,
                args: argparse.Namespace) -> dict:
    """Every method x k x draw for one source model (:func:`muscle_ext.engines.adaptation_curves`)."""
    def section(datalist: Path, name: str) -> LabelledImages:
        return LabelledImages(*cache.get(datalist, name, settings))

    config = AdaptationConfig(calibration=args.calibration, batch_size=32, finetune_epochs=args.finetune_epochs,
                              patience=args.patience)
    return adaptation_curves(model, args.methods, args.ks, args.draws, section(direction["target"], "training"),
                             section(direction["target"], "test"), section(direction["source"], "test"),
                             config=config, n_resamples=args.resamples, seed=args.seed)


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


def best_rows(direction: dict) -> list[dict]:
    """The best method per start and k (:func:`muscle_ext.engines.best_methods`); results written before the curves
    moved to the library lack ``ks``: they are read from the cells."""
    rows = []
    for start, result in direction["starts"].items():
        ks = result.get("ks") or sorted({int(k) for by_k in result["methods"].values() for k in by_k})
        rows += [{"start": start, **row} for row in best_methods({**result, "ks": ks})]
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
        for row in best_rows(direction):
            lines.append(f"| {row['start']} | {row['k']} | {row['method']} | {_fmt(row['target_auc'])} | "
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
