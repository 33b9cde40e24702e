"""``muscle``: the main job and its helpers on the command line.

    muscle reproduce --preset quick --data ../shared/data/xray --out runs/reproduce   # the whole comparison
    muscle status runs/reproduce                                                     # which stages are done
    muscle report runs/reproduce                                                     # rebuild report.md
    muscle export-zoo bundles/muscle_pretrain dist/muscle_pretrain                   # a model-zoo-ready folder

``reproduce`` runs every stage of the preset (:mod:`muscle_ext.pipeline.plan`) as its bundle's own command, reuses
finished stages (same fingerprint), resumes a killed one, and writes ``<out>/report.md``. Its MLflow runs go to one
store, ``<out>/mlflow.db`` (``MLFLOW_TRACKING_URI`` wins), in the experiment ``muscle_reproduce``: the job's own run
(:mod:`muscle_ext.pipeline.job_run`, with the report) and every stage's runs as its children, so ``mlflow ui
--backend-store-uri sqlite:///<out>/mlflow.db`` shows the comparison as one run, opened into its stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["JOB_EXPERIMENT", "main"]

JOB_EXPERIMENT = "muscle_reproduce"  # the MLflow experiment of the job's run and of every stage's runs


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def _reproduce(args: argparse.Namespace) -> int:
    from .handlers.tracking import PARENT_RUN_ENV
    from .pipeline import Stage, StageFailed, StageRunner, build_report, build_stages, load_preset, printable
    from .pipeline.data_check import check_job_data
    from .pipeline.job_run import JobRun

    preset = load_preset(args.preset)
    if args.data is None and preset.get("synthetic"):
        args.data = Path(args.out).absolute() / "synthetic_data"
        if not (args.data / "pretrain_datalist.json").is_file():
            from .data.synthetic import write_synthetic_corpus

            print(f"writing phantom radiographs to {args.data}", flush=True)
            write_synthetic_corpus(args.data)
    if args.data is None:
        print("muscle reproduce: no data given. Point --data at a folder with the preset's datalists (e.g. "
              "--data ../shared/data/xray for the quick preset), convert a public dataset into datalists first "
              "(`muscle data convert --list`), or give your own preset file (--preset my_pipeline.yaml) that names "
              "your datalists.", file=sys.stderr)
        return 2
    out = Path(args.out).absolute()
    stages = build_stages(preset, args.data, out, imagenet_weights=args.imagenet_weights, seed=args.seed,
                          experiment_name=JOB_EXPERIMENT, nproc_per_node=args.nproc_per_node)
    StageRunner.check(stages)  # a setting no bundle has stops here, before anything runs
    repository = Path(__file__).resolve().parents[1]
    # the report's commands name no folder of this machine: <data>, <out>, and bundle paths from the repository root
    placeholders = {str(Path(args.data).resolve()): "<data>", str(out): "<out>", f"{repository}/": ""}
    env = dict(os.environ)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    began = time.monotonic()
    started: dict[str, float] = {}
    took: list[float] = []  # seconds of each stage that ran (reused ones take none)

    def progress(index: int, total: int, stage: Stage, state: str) -> None:
        now = time.monotonic()
        if state == "done":
            if stage.name in started:
                took.append(now - started.pop(stage.name))
            return
        if bar is not None:
            bar.close()
        left = f", about {_clock(sum(took) / len(took) * (total - index + 1))} left" if took else ""
        print(f"[{index}/{total}] {stage.name}: {state} ({stage.description}; {_clock(now - began)} elapsed{left})",
              flush=True)
        if state != "reuse":
            started[stage.name] = now

    if args.dry_run:  # nothing is written
        print("(<data>: the --data folder; <out>: the --out folder; run the commands from the repository root)")
        for stage, action in StageRunner(out, placeholders=placeholders).plan(stages):
            print(f"{stage.name}: {action}")
            for command in stage.commands:
                print(f"    {printable(command.argv(), placeholders)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    pipeline = {"preset": preset["name"], "description": preset.get("description", ""),
                "data_name": Path(args.data).absolute().name, "seed": args.seed,
                "placeholders": {"<data>": "the --data folder", "<out>": "this job's folder"},
                "stages": [{"name": s.name, "output_dir": str(s.output_dir), "needs": list(s.needs),
                            "description": s.description, **s.extra} for s in stages]}
    if preset.get("warning"):
        pipeline["warning"] = preset["warning"]
    (out / "pipeline.json").write_text(json.dumps(pipeline, indent=2) + "\n")
    checked = check_job_data(stages, out, placeholders)
    tests = ", ".join(f"{s['datalist']}:{s['section']} {len(s['leaks'])}" for s in checked["tests"])
    if checked["leaks"]:
        print(f"WARNING: test entries found in data the stages train on ({tests} pairs; {out / 'leakage.json'}): "
              "their metrics will be inflated; the report says so", flush=True)
    else:
        print(f"data check: no test image or patient in the pre-training pool or a training split "
              f"({len(checked['tests'])} test splits against {len(checked['reference'])} sections)", flush=True)

    job = JobRun(out, env["MLFLOW_TRACKING_URI"], JOB_EXPERIMENT, f"reproduce_{preset['name']}")
    if job.open():
        env[PARENT_RUN_ENV] = job.run_id  # every stage's runs nest under the job's run
    bar = _StageBar() if sys.stdout.isatty() else None  # a log file gets the stage lines only
    runner = StageRunner(out, env=env, progress=progress, placeholders=placeholders,
                         step_progress=bar.show if bar else None)
    try:
        runner.run(stages)
    except StageFailed as exc:
        print(f"muscle reproduce: {exc}", file=sys.stderr)
        job.finish({s.name: StageRunner.read_state(s) or {} for s in stages}, build_report(out), status="FAILED")
        return 1
    report = build_report(out)
    job.finish({s.name: StageRunner.read_state(s) or {} for s in stages}, report)
    from .pipeline.report import summary_lines

    print(f"\nAll {len(stages)} stages done in {_clock(time.monotonic() - began)}. Test metrics (95 % intervals):")
    print("\n".join(summary_lines(out)))
    print(f"Report: {report} (and report.html beside it). MLflow: {env['MLFLOW_TRACKING_URI']}, experiment "
          f"{JOB_EXPERIMENT}")
    return 0


class _StageBar:
    """A progress bar under the current stage's line (tqdm), fed by :class:`~muscle_ext.pipeline.LogProgress`."""

    def __init__(self) -> None:
        self._bar, self._key = None, None

    def show(self, stage: Any, command: int, fraction: float) -> None:
        from tqdm import tqdm

        if self._key != (stage.name, command):
            self.close()
            self._bar = tqdm(total=100, desc=f"    {stage.name} [{command}]", leave=False,
                             bar_format="{desc} {bar:30} {percentage:3.0f}% ({elapsed}<{remaining})")
            self._key = (stage.name, command)
        self._bar.update(round(fraction * 100) - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None


def _status(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        pipeline = json.loads((out / "pipeline.json").read_text())
    except (OSError, ValueError):
        what = "holds no pipeline.json" if out.is_dir() else "does not exist"
        print(f"muscle status: {out} {what}; give the --out folder of `muscle reproduce`", file=sys.stderr)
        return 2
    from .pipeline.runner import code_fingerprint

    code = code_fingerprint()
    print(f"{pipeline['preset']} preset on {pipeline['data_name']} (seed {pipeline['seed']})")
    stale = 0
    for stage in pipeline["stages"]:
        try:
            state = json.loads((Path(stage["output_dir"]) / "stage.json").read_text())
        except (OSError, ValueError):
            state = {}
        wall = f"{state['wall_s']:.0f} s" if "wall_s" in state else ""
        changed = state.get("code") not in (None, code)
        stale += changed
        note = "  (muscle_ext changed since: reruns)" if changed else ""
        print(f"  {stage['name']:<28} {state.get('status', 'not started'):<12} {wall}{note}")
    if stale:
        print(f"{stale} stage(s) ran with other muscle_ext code than this one: `muscle reproduce` with the same "
              "arguments reruns them (their results stay in the report until then)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .pipeline import build_report

    print(build_report(args.out))
    return 0


def _sections(spec: str) -> list[tuple[str, str]]:
    """``datalist.json`` (every section) or ``datalist.json:section[,section]`` -> [(path, section), ...]."""
    path, _, wanted = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no datalist at {path}")
    sections = wanted.split(",") if wanted else [k for k, v in json.loads(Path(path).read_text()).items()
                                                  if isinstance(v, list)]
    return [(path, section) for section in sections]


def _check_leakage(args: argparse.Namespace) -> int:
    from .data.leakage import check_datalists

    reference = [section for spec in args.reference for section in _sections(spec)]
    test = [section for spec in args.test for section in _sections(spec)]
    found = 0
    for summary in check_datalists(test, reference, threshold=args.threshold, near_duplicates=not args.no_images):
        found += len(summary["leaks"])
        print(f"{summary['datalist']}:{summary['section']}: {summary['n']} entries, {len(summary['leaks'])} found in "
              "the reference sets")
        for leak in summary["leaks"]:  # entry positions and reasons only: no file names or patient ids in the output
            score = f" (r = {leak['correlation']})" if leak["reason"] == "near duplicate" else ""
            print(f"  entry {leak['entry']} = {leak['reference']} entry {leak['reference_entry']}: {leak['reason']}"
                  f"{score}")
    print(f"{found} leak(s) in all" if found else "no leak found")
    return 1 if found else 0


def _convert(args: argparse.Namespace) -> int:
    from .data.converters import DATASETS, convert_dataset

    if args.list:
        for name, info in DATASETS.items():
            print(f"{name:<24} {info.title} ({info.source})")
        return 0
    if not (args.name and args.src and args.out):
        print("muscle data convert: give NAME SRC OUT (or --list for the known names)", file=sys.stderr)
        return 2
    try:
        content = convert_dataset(args.name, args.src, args.out, seed=args.seed, uncertain=args.uncertain)
    except ValueError as exc:  # an unknown name or option, or a layout with wrong content: one line, exit 2
        print(f"muscle data convert: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s} {len(content[s])}" for s in ("training", "validation", "test"))
    print(f"{Path(args.out) / 'datalist.json'}: {content['dataset']} ({counts}); licence: {content['licence']}")
    return 0


def _pool(args: argparse.Namespace) -> int:
    from .data.converters import pool_datalists

    def table(pairs: Sequence[str], kind: type, what: str) -> dict:
        out = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            try:
                out[name] = kind(value)
            except ValueError:
                sep = ""
            if not sep or not name:
                raise ValueError(f"{what} must be NAME={kind.__name__.replace('float', 'number')}, got {pair!r}")
        return out

    try:
        content = pool_datalists(args.datalists, args.out, weights=table(args.weight, float, "--weight") or None,
                                 limits=table(args.limit, int, "--limit") or None)
    except ValueError as exc:
        print(f"muscle data pool: {exc}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{n} {d['training']}/{d['validation']}" for n, d in content["datasets"].items())
    print(f"{args.out}: {len(content['training'])} training, {len(content['validation'])} validation images "
          f"(training/validation per dataset: {sizes})")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .data.converters import merge_datalists

    try:
        content = merge_datalists(args.datalists, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"muscle data merge: {exc}", file=sys.stderr)
        return 2
    sizes = "; ".join(f"{n} {d['training']}/{d['validation']}/{d['test']}" for n, d in content["datasets"].items())
    print(f"{args.out}: training {len(content['training'])}, validation {len(content['validation'])}, test "
          f"{len(content['test'])} (training/validation/test per dataset: {sizes})")
    return 0


def _export_zoo(args: argparse.Namespace) -> int:
    from .zoo import export_bundle

    print(export_bundle(args.bundle, args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``muscle`` console script (see the module docstring); returns the exit status."""
    from .pipeline import PRESETS

    parser = argparse.ArgumentParser(prog="muscle", description="MUSCLE main job: pre-training, continual learning "
                                     "and fine-tuning from every start, compared in one report.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    reproduce = verbs.add_parser("reproduce", help="run the whole comparison and write its report")
    presets = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
    reproduce.add_argument("--preset", default="quick", help=f"{presets}, or a preset YAML file of yours")
    reproduce.add_argument("--data", help="the folder the preset's datalists are in ({data} in the preset); not needed "
                           "for --preset synthetic")
    reproduce.add_argument("--out", required=True, help="the job's folder: stages, logs, mlflow.db, report.md")
    reproduce.add_argument("--imagenet-weights", help="a local torchvision/timm ResNet state dict: adds the ImageNet "
                           "start (nothing is downloaded)")
    reproduce.add_argument("--seed", type=int, default=0, help="seed of every stage (default 0)")
    reproduce.add_argument("--nproc-per-node", type=int, help="train every stage under torchrun with this many "
                           "processes (one per GPU; default: the preset's own, else 1)")
    reproduce.add_argument("--dry-run", action="store_true", help="print what would run (or be reused), run "
                           "nothing (the synthetic preset still writes its phantoms)")
    reproduce.set_defaults(run=_reproduce)
    status = verbs.add_parser("status", help="which stages of a job are done")
    status.add_argument("out")
    status.set_defaults(run=_status)
    report = verbs.add_parser("report", help="rebuild report.md from a job's finished stages")
    report.add_argument("out")
    report.set_defaults(run=_report)
    data = verbs.add_parser("data", help="datalist tools")
    data_verbs = data.add_subparsers(dest="data_verb", required=True)
    leakage = data_verbs.add_parser("check-leakage", help="evaluation entries that also sit in reference sets (the "
                                    "same file, a near-duplicate radiograph, the same patient); exit status 1 if any")
    leakage.add_argument("--test", nargs="+", required=True, help="datalist.json[:section,...] to check (e.g. "
                         "each task's datalist.json:test)")
    leakage.add_argument("--reference", nargs="+", required=True, help="datalist.json[:section,...] that must not "
                         "hold them (the pre-training pool, training sections)")
    leakage.add_argument("--threshold", type=float, default=0.975, help="thumbnail correlation of a near duplicate")
    leakage.add_argument("--no-images", action="store_true", help="compare file hashes and patients only")
    leakage.set_defaults(run=_check_leakage)
    convert = data_verbs.add_parser("convert", help="a public dataset's released layout to a datalist "
                                    "(docs/DATASETS.md)")
    convert.add_argument("name", nargs="?", help="the dataset (--list shows them)")
    convert.add_argument("src", nargs="?", help="the dataset as downloaded and unpacked")
    convert.add_argument("out", nargs="?", help="folder for datalist.json (images stay in SRC and are referenced)")
    convert.add_argument("--list", action="store_true", help="list the known datasets")
    convert.add_argument("--seed", type=int, help="seed of the grouped stratified split where one is made (default 0)")
    convert.add_argument("--uncertain", help="CheXpert only: uncertain labels (-1) become 1 (u_ones, default), 0 "
                         "(u_zeros) or stay -1 (ignore)")
    convert.set_defaults(run=_convert)
    pool = data_verbs.add_parser("pool", help="the MD-MoCo pre-training pool (training + validation images, never "
                                 "test) from converted datalists")
    pool.add_argument("datalists", nargs="+", help="datalist.json files written by `muscle data convert`")
    pool.add_argument("--out", required=True, help="the pool file, e.g. data/pretrain_datalist.json")
    pool.add_argument("--weight", action="append", default=[], metavar="NAME=W", help="a dataset's sampling weight, "
                      "recorded in the pool (the pretrain bundle samples by them with --dataset_weighting datalist)")
    pool.add_argument("--limit", action="append", default=[], metavar="NAME=N", help="at most N training images of "
                      "a dataset (validation in proportion)")
    pool.set_defaults(run=_pool)
    merge = data_verbs.add_parser("merge", help="one labelled datalist of a task from several sites or datasets, "
                                  "every split kept, entries tagged with their dataset (for --subgroups "
                                  "\"['dataset']\")")
    merge.add_argument("datalists", nargs="+", help="datalist.json files of the same task and classes")
    merge.add_argument("--out", required=True, help="the merged datalist, e.g. data/pneumonia_pooled.json")
    merge.set_defaults(run=_merge)
    export = verbs.add_parser("export-zoo", help="a bundle folder for the MONAI model zoo, muscle_ext in scripts/")
    export.add_argument("bundle")
    export.add_argument("out")
    export.set_defaults(run=_export_zoo)
    args = parser.parse_args(argv)
    from .settings import SettingsError

    try:
        return args.run(args)
    except (SettingsError, FileNotFoundError, FileExistsError) as exc:
        print(f"muscle {args.verb}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
