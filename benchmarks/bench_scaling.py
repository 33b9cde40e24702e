"""How the bundles' cost scales (issue #19): peak memory of every bundle's quick and full preset, pre-training cost
against the size of the pool, the continual stage against the number of tasks, and DDP on the CPU with 1 and 2
processes; in one run on one machine, every run a bundle subprocess started as users start it.

    python benchmarks/bench_scaling.py                                   # everything, data in ../shared/data/xray
    python benchmarks/bench_scaling.py --parts pool --pool-base 64 --pool-epochs 1 --out scaling_try   # a tiny try

Parts (``--parts``, comma-separated; default all four):

``memory``  Each bundle's quick preset (``configs/quick.yaml`` merged after the train config) run to completion, and its
    full preset (the bundle's defaults, no quick.yaml) bounded to a few iterations with every other setting at its
    default: muscle_pretrain (1 epoch of ``--full-draws`` draws, the kNN monitor once), muscle_continual (1 round of
    ``--full-steps`` iterations per task visit, every task validated after every visit), downstream classification
    and segmentation (1 epoch). What each bound leaves out, and why the peak is still the full run's, is written into
    the result. Recorded: wall time, the run's own peak RSS (``os.wait4``: the largest single process, e.g. the main
    process with its cache), the summed RSS and PSS of the run's whole process tree (DataLoader workers, torchrun
    ranks) sampled every 0.5 s, GPU memory in use when ``nvidia-smi`` exists, and the image size, batch, cache and
    workers the run resolved from its configs.
``pool``    MD-MoCo at the quick preset's settings on 1x, 2x and 4x a pool (``--pool-base`` entries, default a quarter
    of pretrain_datalist.json's training section, so that 4x is the whole real pool; beyond the pool entries repeat
    under a distinct ``pool_copy`` key, said in the table), the same number of epochs, an epoch one pass over the pool
    (``--pool-draws pool``; ``quick``: quick.yaml's 640 draws whatever the pool) and the kNN monitor off (a fixed cost
    per epoch that would hide per-image growth); with ``cache: memory`` and ``cache: disk`` (the default since 49b4e63,
    PersistentDataset). Wall time, training time (the trainer's own), their time per 1000 pool images against 1x
    and the growth exponent ``log(t_4x / t_1x) / log 4`` (1 = linear), peak RSS and its growth per 1000 images.
``continual`` The continual stage's quick preset with 2, 3 and 4 tasks (pneumonia, knee, lung, tb in that order), from
    random weights (``--init scratch``; starting weights change neither time nor memory).
``ddp``     MD-MoCo's quick preset with ``configs/multi_gpu_train.yaml`` under ``torchrun --standalone`` with 1 and 2
    processes (gloo on the CPU), ``OMP_NUM_THREADS`` = cores / processes, the kNN monitor off: samples/s of the
    training iterations from the run's own log (the iterations after the first ``--skip-iterations`` of each epoch),
    speed-up and efficiency = samples/s with 2 / (2 x samples/s with 1).

Writes ``benchmarks/results/<--out>.json`` (``common.write_result``) and ``<--out>.md``, after every part so that an
interrupted run keeps what it measured; ``--render`` rewrites the .md from the .json. Tracking (MLflow) goes to a
store in ``--work`` in the memory part (as users run) and is off in the other parts. Run from the repository root on
an otherwise idle machine; the full run takes about 40-60 minutes on the 2-core CPU machines here (the estimate per
part is printed at the start).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from muscle_ext.pipeline.runner import with_placeholders

from common import RESULTS, bundle_command, monai_run, printable, run_command, write_result

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
PARTS = ("memory", "pool", "continual", "ddp")
CONTINUAL_TASKS = ("pneumonia", "knee", "lung", "tb")   # train.yaml's task_specs, in its order
MEMORY_RUNS = ("pretrain", "continual", "classification", "segmentation")
# acceptance: "Pre-training cost grows at most linearly with pool size, and its peak memory does not grow with it"
LINEAR_TOLERANCE = 1.10     # growth exponent of time vs pool size still read as linear (timing noise here ~5-10 %)
FLAT_MEMORY_MIB = 16.0      # peak RSS rising less than this from 1x to the largest pool reads as flat (run-to-run
FLAT_MEMORY_SHARE = 0.01    # noise of a peak here: ~10 MiB) ... or less than this share of the 1x peak, if larger
NOISY_SHARE = 0.05          # other processes using more of the CPU than this during a run: flagged in the report


# ------------------------------------------------------------------------------------------------ pure helpers
def pool_order(entries: Sequence[Mapping]) -> list[dict]:
    """The pool's entries interleaved so that every prefix keeps the pool's mix of datasets: each entry is ranked by
    its position within its own dataset as a fraction of that dataset's size (ties: the datalist's order). Prefixes
    of this order are the nested 1x, 2x, 4x pools."""
    sizes = Counter(str(e.get("dataset", "default")) for e in entries)
    seen: Counter = Counter()
    ranked = []
    for position, entry in enumerate(entries):
        name = str(entry.get("dataset", "default"))
        ranked.append(((seen[name] + 0.5) / sizes[name], position, dict(entry)))
        seen[name] += 1
    return [entry for _, _, entry in sorted(ranked, key=lambda r: (r[0], r[1]))]


def build_pool(entries: Sequence[Mapping], size: int) -> list[dict]:
    """The first ``size`` entries of :func:`pool_order`; past the end of the pool the order repeats, each repeat
    under a distinct ``pool_copy`` key (1, 2, ...; 0 for the originals, so that every entry has the same keys), which
    makes a repeated image a distinct item for ``CacheDataset`` and ``PersistentDataset`` (whose file name is a hash
    of the whole entry)."""
    if size < 1:
        raise ValueError(f"a pool needs at least one entry, got {size}")
    if not entries:
        raise ValueError("no entries to build a pool from")
    order = pool_order(entries)
    return [{**order[i % len(order)], "pool_copy": i // len(order)} for i in range(size)]


def pool_summary(pool: Sequence[Mapping]) -> dict:
    """Entries, distinct images and entries that repeat an image, and entries per dataset tag."""
    images = {str(e["image"]) for e in pool}
    return {"entries": len(pool), "distinct_images": len(images), "repeated_entries": len(pool) - len(images),
            "by_dataset": dict(sorted(Counter(str(e.get("dataset", "default")) for e in pool).items()))}


_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
ITERATION = re.compile(_STAMP + r" - INFO - Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+)")
TRAINER_DONE = re.compile(r"Trainer - INFO - Engine run finished\. Time taken: (\d+):(\d+):(\d+(?:\.\d+)?)")


def _seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def trainer_seconds(log: str) -> float | None:
    """The trainer's own run time (Ignite's ``Engine run finished. Time taken`` of the ``...Trainer`` engine, its
    handlers included), i.e. the run's wall time without start-up, data checks and caching; ``None`` if absent."""
    found = TRAINER_DONE.findall(log)
    if not found:
        return None
    hours, minutes, seconds = found[-1]
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def iteration_throughput(log: str, samples_per_iteration: int, skip: int = 2) -> dict:
    """Samples/s of the training iterations from the ``Epoch: e/E, Iter: i/I`` lines a bundle run logs (one per
    iteration, stamped to the millisecond): per epoch, from the iteration ``skip + 1`` line to the epoch's last line
    (the first ``skip`` iterations wait for DataLoader workers to start and are left out, as is anything between
    epochs: validation, kNN monitor), summed over epochs. ``samples_per_iteration``: the global batch (batch per
    process x processes). Returns samples/s (``None`` when no epoch has two lines past ``skip``), iterations and
    seconds counted."""
    by_epoch: dict[int, list[tuple[int, float]]] = {}
    for stamp, epoch, _, iteration, _ in ITERATION.findall(log):
        by_epoch.setdefault(int(epoch), []).append((int(iteration), _seconds(stamp)))
    iterations, seconds = 0, 0.0
    for lines in by_epoch.values():
        kept = sorted(line for line in lines if line[0] > skip)
        if len(kept) >= 2:
            iterations += kept[-1][0] - kept[0][0]
            seconds += kept[-1][1] - kept[0][1]
    rate = iterations * samples_per_iteration / seconds if iterations and seconds > 0 else None
    return {"samples_per_s": rate, "iterations": iterations, "seconds": round(seconds, 3),
            "samples_per_iteration": samples_per_iteration, "skipped_per_epoch": skip}


def growth(rows: Sequence[Mapping], size_key: str = "pool_size", time_key: str = "wall_s") -> dict:
    """How ``time_key`` and peak RSS grow from the smallest to the largest ``size_key`` of ``rows``: time per 1000
    items of each row against the smallest (``per_item_ratio``: 1 = linear, below 1 = less than linear), the growth
    exponent ``log(t_max / t_min) / log(n_max / n_min)`` (1 = linear), and the peak RSS rise in MiB in all and per
    1000 items, with the verdicts against :data:`LINEAR_TOLERANCE` and :data:`FLAT_MEMORY_MIB` /
    :data:`FLAT_MEMORY_SHARE`. Failed runs (``ok`` false) and rows without the values are left out."""
    done = sorted((r for r in rows if r.get("ok", True) and r.get(time_key) and r.get(size_key)),
                  key=lambda r: r[size_key])
    if len(done) < 2:
        return {"rows": len(done)}
    first, last = done[0], done[-1]
    per_item = [r[time_key] / r[size_key] for r in done]
    out: dict[str, Any] = {
        "rows": len(done), "sizes": [r[size_key] for r in done],
        "per_1000_s": [round(1000 * p, 3) for p in per_item],
        "per_item_ratio": [round(p / per_item[0], 3) for p in per_item],
    }
    if last[size_key] > first[size_key]:
        exponent = math.log(last[time_key] / first[time_key]) / math.log(last[size_key] / first[size_key])
        out["exponent"] = round(exponent, 3)
        out["at_most_linear"] = exponent <= LINEAR_TOLERANCE
    if first.get("peak_rss_gib") is not None and last.get("peak_rss_gib") is not None:
        rise_mib = (last["peak_rss_gib"] - first["peak_rss_gib"]) * 1024
        out["rss_rise_mib"] = round(rise_mib, 1)
        out["rss_mib_per_1000"] = round(1000 * rise_mib / (last[size_key] - first[size_key]), 2) \
            if last[size_key] > first[size_key] else None
        out["memory_flat"] = rise_mib < max(FLAT_MEMORY_MIB, FLAT_MEMORY_SHARE * first["peak_rss_gib"] * 1024)
    return out


def ddp_efficiency(single: float | None, multi: float | None, processes: int = 2) -> dict:
    """Speed-up ``multi / single`` and efficiency ``multi / (processes x single)`` (1 = perfect scaling)."""
    if not single or not multi:
        return {"speedup": None, "efficiency": None}
    return {"speedup": round(multi / single, 3), "efficiency": round(multi / (processes * single), 3)}


def cached_tensor_mib(images: int, image_size: int, channels: int = 1, bytes_per_value: int = 4) -> float:
    """The pixel data a memory cache holds after pre-processing: ``images`` float32 ``(1, size, size)`` tensors."""
    return images * channels * image_size * image_size * bytes_per_value / 2**20


# ----------------------------------------------------------------------------------- process-tree memory sampler
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])  # after "pid (name) state"
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(root: int) -> list[int]:
    children, out, todo = _children_map(), [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _rss_pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


def _gpu_used_mib() -> float | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return sum(float(x) for x in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class TreeMemory:
    """While a bundle run is in progress (``with TreeMemory() as m: monai_run(...)``), sample every ``interval``
    seconds the summed RSS and PSS of every process below this one (the bundle process, its DataLoader workers,
    torchrun's ranks) and, where ``nvidia-smi`` exists, the GPU memory in use above what was in use before the run.
    ``result()``: the peaks in GiB and the most processes seen. RSS counts shared pages once per process; PSS splits
    them, so the PSS sum is the tree's real footprint."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_rss_kib = self.peak_pss_kib = self.max_processes = 0
        self.gpu_baseline = _gpu_used_mib()
        self.peak_gpu_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = descendants(os.getpid())
        totals = [_rss_pss_kib(pid) for pid in pids]
        self.peak_rss_kib = max(self.peak_rss_kib, sum(r for r, _ in totals))
        self.peak_pss_kib = max(self.peak_pss_kib, sum(p for _, p in totals))
        self.max_processes = max(self.max_processes, len(pids))
        if self.gpu_baseline is not None:
            used = _gpu_used_mib()
            if used is not None:
                self.peak_gpu_mib = max(self.peak_gpu_mib or 0.0, used - self.gpu_baseline)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        return {"tree_rss_gib": round(self.peak_rss_kib / 2**20, 2),
                "tree_pss_gib": round(self.peak_pss_kib / 2**20, 2),
                "max_processes": self.max_processes,
                "gpu_gib": None if self.peak_gpu_mib is None else round(self.peak_gpu_mib / 1024, 2)}


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that were waited for (a finished bundle run with its workers
    and ranks, each reaped by its parent)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


class OtherLoad:
    """The share of the machine's CPU that processes other than this benchmark and its runs used while a run was in
    progress: (machine busy time - our CPU time) / (wall time x cores). Above a few per cent, the machine was not
    quiet and times (and, less so, peaks) are not comparable."""

    def __enter__(self) -> OtherLoad:
        self.busy, self.own, self.start = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.start
        other = (_machine_busy_s() - self.busy) - (_own_cpu_s() - self.own)
        self.share = max(0.0, round(other / (wall * (os.cpu_count() or 1)), 3)) if wall > 0 else None


# ------------------------------------------------------------------------------------------------------- runs
def resolved_settings(bundle: str, configs: Sequence[str], overrides: Mapping[str, Any], keys: Sequence[str]) -> dict:
    """The values the run's merged configs give ``keys`` (``a#b`` ids; missing ids left out), parsed as the bundle
    parses them: what was used, not what we meant to use."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    parser.update({k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})
    out = {}
    for key in keys:
        if key not in parser:
            continue
        try:
            value = parser.get_parsed_content(key)
        except Exception as exc:  # noqa: BLE001 - a value we cannot resolve here is reported as such
            value = f"unresolved ({type(exc).__name__})"
        out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


def torchrun_command(bundle: str, configs: Sequence[str], overrides: Mapping[str, Any], nproc: int) -> list[str]:
    """``bundle_command`` under ``torchrun --standalone --nproc_per_node=nproc``, for 1 process too (which
    ``bundle_command`` runs without torchrun): both DDP runs then take the same code path."""
    cmd = bundle_command(BUNDLES / bundle, list(configs), overrides, nproc_per_node=2)
    return [f"--nproc_per_node={int(nproc)}" if c == "--nproc_per_node=2" else c for c in cmd]


class Runner:
    """Runs bundles for the parts: a fresh output folder per run, the log next to it, commands shown with the data
    and work folders as ``<data>`` and ``<work>`` and repository paths relative."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.placeholders = {str(args.data): "<data>", str(args.work): "<work>", f"{REPO}/": ""}

    def folder(self, part: str, name: str) -> Path:
        out = self.args.work / part / name
        shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make the bundle resume
        out.mkdir(parents=True)
        return out

    def show(self, text: str) -> str:
        return with_placeholders(text, self.placeholders)

    def bundle(self, part: str, name: str, bundle: str, configs: Sequence[str], overrides: dict,
               env: Mapping[str, str] | None = None, nproc: int | None = None) -> dict:
        """One bundle run: ``monai_run`` (a plain ``python -m monai.bundle run``) or, with ``nproc``, the same under
        ``torchrun --standalone --nproc_per_node=nproc``. Never raises for a failed run: the row says it failed."""
        out = self.folder(part, name)
        overrides = {"output_dir": out, **overrides}
        log = out.parent / f"{name}.log"
        started = time.perf_counter()
        try:
            with OtherLoad() as load, TreeMemory() as tree:
                if nproc is None and env is None:
                    run = monai_run(BUNDLES / bundle, list(configs), overrides, log)
                else:
                    cmd = torchrun_command(bundle, configs, overrides, nproc) if nproc else \
                        bundle_command(BUNDLES / bundle, list(configs), overrides)
                    run = run_command(cmd, log, env={**os.environ, **(env or {})})
                    if run.pop("returncode"):
                        raise subprocess.CalledProcessError(1, cmd, output=f"see {log}")
            run.update(tree.result(), other_cpu_share=load.share)
            run["ok"] = True
        except subprocess.CalledProcessError:
            tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
            run = {"ok": False, "wall_s": round(time.perf_counter() - started, 1), "error": self.show(tail)}
            print(f"FAILED: {name} ({log})\n{tail[-1500:]}", file=sys.stderr)
        text = log.read_text(errors="replace") if log.is_file() else ""
        run["train_s"] = trainer_seconds(text)
        run["command"] = self.show(run.get("command") or printable(
            torchrun_command(bundle, configs, overrides, nproc) if nproc else
            bundle_command(BUNDLES / bundle, list(configs), overrides)))
        run["log"] = self.show(str(log))
        run["output_dir"] = self.show(str(out))
        return run


CACHE_NOTES = {
    "none": "`cache: none` decodes every batch anew, so nothing accumulates from one {unit} to the next",
    "memory": "`cache: memory` fills a CacheDataset with every item of the split before the first step, so the bounded "
              "run already holds all of it",
    "disk": "`cache: disk` keeps pre-processed items in files, not in memory, so nothing accumulates in memory",
}


def memory_runs(args: argparse.Namespace) -> list[dict]:
    """The memory part's runs: bundle, preset, configs, overrides, and what the bound leaves out and why the peak is
    still the full run's, written from the defaults the configs give (resolved, not typed in here)."""
    data = args.data
    store = {"tracking_uri": f"sqlite:///{args.work / 'mlflow.db'}"}  # tracking on, as users run, in our own store
    limit = {"max_items": args.max_items} if args.max_items else {}
    up_to = f"; at most {args.max_items} items per split" if args.max_items else ""
    pool = len(json.loads((data / "pretrain_datalist.json").read_text())["training"])
    base = {"dataset_dir": data}
    runs = []
    if "pretrain" in args.bundles:
        d = resolved_settings("muscle_pretrain", ["train.yaml"], base,
                              ("num_epochs", "warmup_epochs", "batch_size", "image_size", "cache", "monitor_size"))
        steps = args.full_draws // d["batch_size"]
        pixels = cached_tensor_mib(pool, d["image_size"])
        if d["cache"] == "memory":
            why = (f"`cache: memory` fills a CacheDataset with every pool image (here {pool} x 1x{d['image_size']}x"
                   f"{d['image_size']} float32 = {pixels:.0f} MiB of pixels) before the first step, so the bounded "
                   "run holds all of it")
        else:
            why = CACHE_NOTES.get(d["cache"], "").format(unit="epoch")
        keys = ("image_size", "batch_size", "cache", "num_workers", "num_epochs", "train#sampler#num_samples")
        runs += [
            {"name": "pretrain_quick", "label": "muscle_pretrain", "bundle": "muscle_pretrain", "preset": "quick",
             "configs": ["train.yaml", "quick.yaml"], "overrides": {**base, **store},
             "bounded": "nothing: runs to completion", "keys": keys},
            {"name": "pretrain_full", "label": "muscle_pretrain", "bundle": "muscle_pretrain", "preset": "full",
             "configs": ["train.yaml"],
             "overrides": {**base, **store, "num_epochs": 1, "knn_interval": 1,
                           "train#sampler#num_samples": args.full_draws,
                           **({"warmup_epochs": 1} if d["warmup_epochs"] > 1 else {})},
             "bounded": (f"1 epoch of {args.full_draws} draws ({steps} step(s) of batch {d['batch_size']}) instead of "
                         f"{d['num_epochs']} epochs of {pool} (one pass over the pool)"
                         + (f"; warmup_epochs 1 (the default {d['warmup_epochs']} would outlast 1 epoch, which the "
                            "bundle refuses)" if d["warmup_epochs"] > 1 else "")
                         + f"; knn_interval 1, so that the kNN monitor ({d['monitor_size']} reference images and the "
                         f"monitor's validation images, embedded at {d['image_size']} px) runs once inside the bounded "
                         f"run. Representative: {why}; the activations of one step are the same at every step, and "
                         "the monitor's pass is included; nothing else accumulates over epochs."
                         + (" The cache holds the whole pool, so this peak grows with the pool (see the pool part)."
                            if d["cache"] == "memory" else "")),
             "keys": keys},
        ]
    if "continual" in args.bundles:
        d = resolved_settings("muscle_continual", ["train.yaml"], {**base, "init": "scratch"},
                              ("rounds", "steps_per_visit", "batch_size", "image_size", "cache"))
        keys = ("image_size", "batch_size", "cache", "num_workers", "rounds", "steps_per_visit", "max_items", "tasks")
        runs += [
            {"name": "continual_quick", "label": "muscle_continual", "bundle": "muscle_continual", "preset": "quick",
             "configs": ["train.yaml", "quick.yaml"], "overrides": {**base, **store, "init": "scratch"},
             "bounded": "nothing: runs to completion (from random weights, --init scratch)", "keys": keys},
            {"name": "continual_full", "label": "muscle_continual", "bundle": "muscle_continual", "preset": "full",
             "configs": ["train.yaml"],
             "overrides": {**base, **store, "init": "scratch", "rounds": 1, "steps_per_visit": args.full_steps,
                           **limit},
             "bounded": (f"1 round of {args.full_steps} iterations per task visit instead of {d['rounds']} rounds of "
                         f"{d['steps_per_visit']} (from random weights, --init scratch){up_to}. Representative: "
                         + CACHE_NOTES.get(d["cache"], "").format(unit="round")
                         + "; every task is visited once with its own loader and workers, and after every "
                         "visit every task is validated on its whole validation split, so each task's largest step "
                         f"(RetinaNet's included, batch {d['batch_size']} at {d['image_size']} px) and evaluation run "
                         "inside the bounded run."),
             "keys": keys},
        ]
    for task, config in (("classification", "classification.yaml"), ("segmentation", "segmentation.yaml")):
        if task not in args.bundles:
            continue
        d = resolved_settings("downstream", ["common.yaml", config], base, ("num_epochs", "warmup_epochs", "cache"))
        keys = ("image_size", "batch_size", "cache", "num_workers", "num_epochs", "max_items", "datalist")
        runs += [
            {"name": f"{task}_quick", "label": f"downstream {task}", "bundle": "downstream", "preset": "quick",
             "configs": ["common.yaml", config, "quick.yaml"], "overrides": {**base, **store, **limit},
             "bounded": "nothing: runs to completion" + (f" (at most {args.max_items} items per split)"
                                                         if args.max_items else ""), "keys": keys},
            {"name": f"{task}_full", "label": f"downstream {task}", "bundle": "downstream", "preset": "full",
             "configs": ["common.yaml", config],
             "overrides": {**base, **store, "num_epochs": 1, **limit,
                           **({"warmup_epochs": 1} if d["warmup_epochs"] > 1 else {})},
             "bounded": (f"1 epoch instead of {d['num_epochs']}{up_to}. Representative: "
                         + CACHE_NOTES.get(d["cache"], "").format(unit="epoch")
                         + "; the bounded run is one whole epoch (training over the training split, validation, the "
                         "best model's export), the same work as every epoch of the full run."),
             "keys": keys},
        ]
    return [r for r in runs if r["preset"] in args.presets]


def part_memory(args: argparse.Namespace, runner: Runner) -> dict:
    rows = []
    for spec in memory_runs(args):
        print(f"[memory] {spec['name']}", flush=True)
        settings = resolved_settings(spec["bundle"], spec["configs"], spec["overrides"], spec["keys"])
        run = runner.bundle("memory", spec["name"], spec["bundle"], spec["configs"], spec["overrides"])
        rows.append({"name": spec["name"], "bundle": spec["label"], "preset": spec["preset"],
                     "bounded": spec["bounded"], "settings": {k: runner.show(str(v)) if isinstance(v, str) else v
                                                              for k, v in settings.items()}, **run})
    return {"runs": rows}


def write_pool(path: Path, pool: Sequence[Mapping], data: Path) -> Path:
    """A pretrain datalist of ``pool`` with absolute image paths (the pool file lives in the work folder)."""
    rows = [{**e, "image": str((data / e["image"]).resolve())} for e in pool]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": rows}))
    return path


def folder_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1) if path.exists() else 0.0


QUICK_PRETRAIN = ("image_size", "batch_size", "cache", "num_workers", "num_epochs", "train#sampler#num_samples")
QUICK_CONTINUAL = ("image_size", "batch_size", "cache", "num_workers", "rounds", "steps_per_visit",
                   "task_specs#lung#steps", "max_items", "learning_rate")


def part_pool(args: argparse.Namespace, runner: Runner) -> dict:
    entries = json.loads((args.data / "pretrain_datalist.json").read_text())["training"]
    base = args.pool_base or len(entries) // 4
    quick = resolved_settings("muscle_pretrain", ["train.yaml", "quick.yaml"], {"dataset_dir": args.data},
                              QUICK_PRETRAIN)
    rows = []
    for cache in args.pool_caches:
        for multiple in args.pool_multiples:
            size = base * multiple
            pool = build_pool(entries, size)
            datalist = write_pool(args.work / "pool" / "datalists" / f"pool_{size}.json", pool, args.data)
            # at least one batch per epoch (drop_last: fewer draws than a batch would make an epoch of no steps)
            draws = max(size, quick["batch_size"]) if args.pool_draws == "pool" else quick["train#sampler#num_samples"]
            overrides = {"dataset_dir": args.data, "pretrain_datalist": datalist, "cache": cache,
                         "num_epochs": args.pool_epochs, "knn_monitor": False, "use_tracking": False,
                         "train#sampler#num_samples": draws}
            name = f"{cache}_x{multiple}"
            print(f"[pool] {name}: {size} entries", flush=True)
            run = runner.bundle("pool", name, "muscle_pretrain", ["train.yaml", "quick.yaml"], overrides)
            run["disk_cache_mib"] = folder_mib(args.work / "pool" / name / "cache") if cache == "disk" else None
            rows.append({"name": name, "cache": cache, "multiple": multiple, "pool_size": size,
                         "pool": pool_summary(pool), "draws_per_epoch": draws, "epochs": args.pool_epochs, **run})
    by_cache = {}
    for cache in args.pool_caches:
        mine = [r for r in rows if r["cache"] == cache]
        by_cache[cache] = {"wall": growth(mine, time_key="wall_s"), "train": growth(mine, time_key="train_s")}
    return {"base": base, "available": len(entries), "draws": args.pool_draws, "epochs": args.pool_epochs,
            "quick": quick, "image_size": quick["image_size"], "runs": rows, "growth": by_cache,
            "cached_pixels_mib_per_1000": round(cached_tensor_mib(1000, quick["image_size"]), 2)}


def part_continual(args: argparse.Namespace, runner: Runner) -> dict:
    quick = resolved_settings("muscle_continual", ["train.yaml", "quick.yaml"],
                              {"dataset_dir": args.data, "init": "scratch",
                               **({"max_items": args.max_items} if args.max_items else {})}, QUICK_CONTINUAL)
    rows = []
    for count in args.continual_sets:
        tasks = list(CONTINUAL_TASKS[:count])
        overrides = {"dataset_dir": args.data, "init": "scratch", "use_tracking": False, "tasks": repr(tasks),
                     **({"max_items": args.max_items} if args.max_items else {})}
        name = f"tasks_{count}"
        print(f"[continual] {name}: {tasks}", flush=True)
        run = runner.bundle("continual", name, "muscle_continual", ["train.yaml", "quick.yaml"], overrides)
        rows.append({"name": name, "tasks": tasks, "task_count": count, **run})
    return {"runs": rows, "quick": quick, "growth": {"wall": growth(rows, "task_count", "wall_s"),
                                     "train": growth(rows, "task_count", "train_s")}}


def part_ddp(args: argparse.Namespace, runner: Runner) -> dict:
    cores = os.cpu_count() or 1
    quick = resolved_settings("muscle_pretrain", ["train.yaml", "quick.yaml"], {"dataset_dir": args.data},
                              QUICK_PRETRAIN)
    batch, workers = quick["batch_size"], quick["num_workers"]  # per process
    rows = []
    for processes in (1, 2):
        threads = max(1, cores // processes)
        overrides = {"dataset_dir": args.data, "knn_monitor": False, "use_tracking": False,
                     "num_epochs": args.ddp_epochs, "train#sampler#num_samples": args.ddp_draws}
        name = f"nproc_{processes}"
        print(f"[ddp] {name}: {threads} torch threads each", flush=True)
        run = runner.bundle("ddp", name, "muscle_pretrain", ["train.yaml", "quick.yaml", "multi_gpu_train.yaml"],
                            overrides, env={"OMP_NUM_THREADS": str(threads)}, nproc=processes)
        log = args.work / "ddp" / f"{name}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        rows.append({"name": name, "processes": processes, "torch_threads": threads, "batch_per_process": batch,
                     "global_batch": batch * processes, "dataloader_workers_per_process": workers,
                     "throughput": iteration_throughput(text, batch * processes, args.skip_iterations), **run})
    rates = [r["throughput"]["samples_per_s"] for r in rows]
    return {"runs": rows, "cores": cores, "quick": quick, **ddp_efficiency(rates[0], rates[1])}


# -------------------------------------------------------------------------------------------------- markdown
def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _peak(run: Mapping) -> str:
    return _num(run.get("peak_rss_gib")) if run.get("ok", True) else "**failed**"


def memory_table(part: Mapping) -> list[str]:
    runs = part.get("runs", [])
    gpu = any(r.get("gpu_gib") is not None for r in runs)
    head = ("| bundle | preset | image size | batch | cache | workers | wall (s) | peak RSS, largest process (GiB) "
            "| process tree RSS / PSS (GiB) | processes |" + (" GPU (GiB) |" if gpu else ""))
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in runs:
        s = r.get("settings", {})
        cells = [r["bundle"], r["preset"], _num(s.get("image_size")), _num(s.get("batch_size")), _num(s.get("cache")),
                 _num(s.get("num_workers")), _num(r.get("wall_s"), 1), _peak(r),
                 f"{_num(r.get('tree_rss_gib'))} / {_num(r.get('tree_pss_gib'))}", _num(r.get("max_processes"))]
        if gpu:
            cells.append(_num(r.get("gpu_gib")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "What each run was bounded to, and why its peak is the full run's:", ""]
    for r in runs:
        lines.append(f"- **{r['bundle']}, {r['preset']}**: {r['bounded']}")
    return lines


def pool_table(part: Mapping) -> list[str]:
    lines = ["| cache | pool | entries (distinct images, repeats) | draws per epoch x epochs | wall (s) | training (s) "
             "| wall per 1000 images (s) | vs 1x | training per 1000 (s) | vs 1x | peak RSS (GiB) | tree PSS (GiB) "
             "| disk cache (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cache in dict.fromkeys(r["cache"] for r in part["runs"]):
        rows = [r for r in part["runs"] if r["cache"] == cache]
        wall, train = part["growth"][cache]["wall"], part["growth"][cache]["train"]
        for r in rows:
            def ratio(g: Mapping, key: str, r: Mapping = r) -> tuple[str, str]:
                sizes = g.get("sizes", [])
                if r.get(key) is None or r["pool_size"] not in sizes:
                    return "n/a", "n/a"
                i = sizes.index(r["pool_size"])
                return _num(g["per_1000_s"][i], 1), _num(g["per_item_ratio"][i])
            w, wr = ratio(wall, "wall_s")
            t, tr = ratio(train, "train_s")
            p = r["pool"]
            lines.append(f"| {cache} | {r['multiple']}x | {p['entries']} ({p['distinct_images']}, "
                         f"{p['repeated_entries']}) | {r['draws_per_epoch']} x {r['epochs']} | "
                         f"{_num(r.get('wall_s'), 1)} | {_num(r.get('train_s'), 1)} | {w} | {wr} | {t} | {tr} | "
                         f"{_peak(r)} | {_num(r.get('tree_pss_gib'))} | {_num(r.get('disk_cache_mib'), 1)} |")
    lines += ["", "| cache | growth exponent of wall time (1 = linear) | of training time | at most linear "
              f"(exponent <= {LINEAR_TOLERANCE}) | peak RSS rise, smallest to largest pool (MiB) | per 1000 images "
              "(MiB) | memory flat |", "|---|---|---|---|---|---|---|"]
    for cache, g in part["growth"].items():
        wall, train = g["wall"], g["train"]
        lines.append(f"| {cache} | {_num(wall.get('exponent'))} | {_num(train.get('exponent'))} | "
                     f"{_num(wall.get('at_most_linear'))} (wall), {_num(train.get('at_most_linear'))} (training) | "
                     f"{_num(wall.get('rss_rise_mib'), 1)} | {_num(wall.get('rss_mib_per_1000'))} | "
                     f"{_num(wall.get('memory_flat'))} |")
    return lines


def continual_table(part: Mapping) -> list[str]:
    lines = ["| tasks | which | task visits per round | validations per round | wall (s) | training (s) "
             "| wall per task (s) | peak RSS (GiB) | tree PSS (GiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in part["runs"]:
        n = r["task_count"]
        per_task = r["wall_s"] / n if r.get("wall_s") else None
        lines.append(f"| {n} | {', '.join(r['tasks'])} | {n} | {n * n} | {_num(r.get('wall_s'), 1)} | "
                     f"{_num(r.get('train_s'), 1)} | {_num(per_task, 1)} | {_peak(r)} | "
                     f"{_num(r.get('tree_pss_gib'))} |")
    g = part["growth"]["wall"]
    if g.get("exponent") is not None:
        lines += ["", f"Wall time grows with the number of tasks with exponent {_num(g['exponent'])} "
                  f"(training time: {_num(part['growth']['train'].get('exponent'))}; 1 = linear); peak RSS rises "
                  f"{_num(g.get('rss_rise_mib'), 1)} MiB from {g['sizes'][0]} to {g['sizes'][-1]} tasks."]
    return lines


def ddp_table(part: Mapping) -> list[str]:
    lines = ["| processes | torch threads each | DataLoader workers each | batch per process (global) "
             "| iterations timed | samples/s | wall (s) | peak RSS, largest process (GiB) | tree RSS / PSS (GiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in part["runs"]:
        t = r["throughput"]
        lines.append(f"| {r['processes']} | {r['torch_threads']} | {r['dataloader_workers_per_process']} | "
                     f"{r['batch_per_process']} ({r['global_batch']}) | {t['iterations']} | "
                     f"{_num(t['samples_per_s'], 1)} | {_num(r.get('wall_s'), 1)} | {_peak(r)} | "
                     f"{_num(r.get('tree_rss_gib'))} / {_num(r.get('tree_pss_gib'))} |")
    lines += ["", f"Speed-up (samples/s with 2 / with 1): **{_num(part.get('speedup'))}**; efficiency = samples/s "
              f"with 2 / (2 x samples/s with 1): **{_num(part.get('efficiency'))}**."]
    return lines


SHAPE = ("image_size", "batch_size", "num_workers")   # what the pool and DDP parts keep of the quick preset


def described(settings: Mapping, keys: Sequence[str] | None = None) -> str:
    """``image_size 64, batch_size 32, ...``: the settings a run resolved (those of ``keys``), for the report."""
    return ", ".join(f"{key.replace('#', '.')} {value}" for key, value in settings.items()
                     if keys is None or key in keys)


def reading(result: Mapping) -> list[str]:
    """A few sentences from the numbers (nothing typed in)."""
    parts, out = result.get("parts", {}), []
    memory = parts.get("memory")
    if memory and memory.get("runs"):
        done = [r for r in memory["runs"] if r.get("ok")]
        if done:
            top = max(done, key=lambda r: r["peak_rss_gib"])
            out.append(f"- Memory: the largest single-process peak is {top['bundle']} ({top['preset']}) at "
                       f"{top['peak_rss_gib']} GiB; the largest process-tree PSS is "
                       f"{max(r.get('tree_pss_gib') or 0 for r in done):.2f} GiB.")
        failed = [f"{r['bundle']} ({r['preset']})" for r in memory["runs"] if not r.get("ok")]
        if failed:
            out.append(f"- Failed runs: {', '.join(failed)} (their logs are named in the JSON).")
    pool = parts.get("pool")
    if pool:
        for cache, g in pool["growth"].items():
            wall, train = g["wall"], g["train"]
            if wall.get("exponent") is None:
                continue
            linear = "at most linearly" if wall.get("at_most_linear") else "**faster than linearly**"
            text = (f"- Pool, `cache: {cache}`: wall time grows {linear} with the pool (exponent "
                    f"{wall['exponent']}, training alone {_num(train.get('exponent'))}; time per 1000 images at the "
                    f"largest pool is {wall['per_item_ratio'][-1]}x that at 1x). Peak RSS rises "
                    f"{_num(wall.get('rss_rise_mib'), 1)} MiB from {wall['sizes'][0]} to {wall['sizes'][-1]} images "
                    f"({_num(wall.get('rss_mib_per_1000'))} MiB per 1000 images): ")
            if wall.get("memory_flat") is None:
                text += "no peak to compare."
            elif wall["memory_flat"]:
                text += "flat within the threshold (peak memory does not grow with the pool)."
            else:
                text += ("**peak memory grows with the pool** (the memory cache keeps every pre-processed image; "
                         f"its pixels alone are {pool['cached_pixels_mib_per_1000']} MiB per 1000 images at "
                         f"{pool['image_size']} px, {cached_tensor_mib(1000, 224):.0f} MiB at 224 px).")
            out.append(text)
    continual = parts.get("continual")
    if continual and continual["growth"]["wall"].get("exponent") is not None:
        g = continual["growth"]["wall"]
        out.append(f"- Continual: wall time grows with exponent {g['exponent']} in the number of tasks; with "
                   "validation after every visit a round validates every task after each of its T visits (T^2 "
                   "validations per round), so more-than-linear growth is expected there.")
    ddp = parts.get("ddp")
    if ddp and ddp.get("efficiency") is not None:
        head = (f"- DDP on {ddp['cores']} cores: speed-up {ddp['speedup']}, efficiency {ddp['efficiency']}. Both "
                f"runs share the same {ddp['cores']} cores: one process with {ddp['cores']} torch threads, or two "
                "with 1 thread each that also all-reduce their gradients (gloo) and all-gather the keys for "
                "shuffle-BN at every step. ")
        if ddp["efficiency"] >= 0.8:
            out.append(head + "That two processes nearly double the samples/s says that one process leaves these "
                       "cores partly idle at this image and batch size (intra-op threads of small convolutions "
                       "wait on each other, and its DataLoader workers compete with them), not that DDP scales on "
                       "a CPU: the cores are the same. On GPUs each process has its own device, and this number "
                       "would be the scaling efficiency.")
        else:
            out.append(head + "With the cores shared, a speed-up near 1 (efficiency near 0.5) is what to expect: "
                       "DDP on a CPU tests correctness, not speed. On GPUs each process has its own device, and "
                       "this number would be the scaling efficiency.")
    return out


def markdown(result: Mapping) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = ["# How the bundles scale: memory, pool size, tasks, DDP on the CPU", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} torch threads "
             f"by default)" + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + f". Commit {result['commit']}, "
             f"{result['when']}.", "", f"Command: `{result['command']}`", "",
             "Every run is a bundle subprocess (`python -m monai.bundle run`, or under `torchrun`), one at a time. "
             "Peak RSS, largest process: the run's own peak as `os.wait4` reports it, which is the largest single "
             "process of the run (the main process with its caches; DataLoader workers and torchrun ranks are "
             "separate processes). Process tree RSS / PSS: the sums over every process of the run, sampled every "
             "0.5 s (RSS counts pages shared between processes once per process, PSS splits them: the PSS sum is "
             "the run's real footprint). `<data>` is the X-ray folder, `<work>` the work folder."]
    shares = {f"{part}/{r['name']}": r["other_cpu_share"] for part, p in result.get("parts", {}).items()
              for r in p.get("runs", []) if r.get("other_cpu_share") is not None}
    if shares:
        noisy = ", ".join(f"{name} {share:.0%}" for name, share in shares.items() if share > NOISY_SHARE)
        lines += ["", f"Other processes on the machine used {min(shares.values()):.0%}-{max(shares.values()):.0%} of "
                  "its CPU during the runs (machine busy time minus this benchmark's own, per run)"
                  + (f"; **above {NOISY_SHARE:.0%} in {noisy}: the machine was not quiet, those times are not "
                     "comparable**." if noisy else ": a quiet machine.")]
    if s.get("tiny"):
        lines += ["", "**Tiny run (sizes cut down): the numbers say that the benchmark works, not how the bundles "
                  "scale.**"]
    parts = result.get("parts", {})
    if "memory" in parts:
        lines += ["", "## 1. Peak memory of each bundle's quick and full preset", ""] + memory_table(parts["memory"])
    if "pool" in parts:
        p = parts["pool"]
        repeats = any(r["pool"]["repeated_entries"] for r in p["runs"])
        lines += ["", "## 2. Pre-training cost against the size of the pool", "",
                  f"MD-MoCo at the quick preset's settings ({described(p.get('quick', {}), SHAPE)}) with the kNN "
                  f"monitor off, {p['epochs']} epoch(s), on 1x = {p['base']} entries of pretrain_datalist.json's "
                  f"{p['available']} training entries, 2x and 4x, each a prefix of one order that keeps the pool's mix "
                  "of datasets (so smaller pools are inside larger ones)"
                  + ("; entries past the pool repeat an image under a distinct `pool_copy` key" if repeats else
                     "; every entry a distinct real image (no repeats)") + ". An epoch is "
                  + ("one pass over the pool (draws = pool size), so the training work itself grows linearly."
                     if p["draws"] == "pool" else "quick.yaml's draws per epoch whatever the pool size.")
                  + " Training = the trainer's own time; wall - training = start-up, the datalist check (every "
                  "image decoded once) and filling the cache.", ""] + pool_table(p)
    if "continual" in parts:
        c = parts["continual"]
        counts = [str(r["task_count"]) for r in c["runs"]]
        lines += ["", f"## 3. The continual stage with {', '.join(counts[:-1])}{' and ' if len(counts) > 1 else ''}"
                  f"{counts[-1]} tasks", "",
                  f"The continual bundle's quick preset ({described(c.get('quick', {}))}; every task validated after "
                  "every visit), from random weights, tracking off.", ""] + continual_table(c)
    if "ddp" in parts:
        d = parts["ddp"]
        lines += ["", "## 4. DDP on the CPU: 1 and 2 torchrun processes (gloo)", "",
                  f"MD-MoCo's quick preset ({described(d.get('quick', {}), SHAPE)}) merged with "
                  "`configs/multi_gpu_train.yaml` (real shuffle-BN across processes, `bn_splits 1`, learning rate "
                  "scaled by the world size, batch per process), both under `torchrun --standalone` so that they "
                  f"run the same code, {s.get('ddp_epochs')} epoch(s) of {s.get('ddp_draws')} draws (split over the "
                  f"processes), kNN monitor off, tracking off. `OMP_NUM_THREADS` = {d['cores']} cores / processes. "
                  "Samples/s from the iteration lines of rank 0's log, leaving out the first "
                  f"{s.get('skip_iterations')} iterations of each epoch (workers starting).", ""]
        lines += ddp_table(d)
    text = reading(result)
    if text:
        lines += ["", "## Reading", ""] + text
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main
def estimate(args: argparse.Namespace) -> dict:
    """Rough minutes per part on the 2-core CPU machines here (from the tiny runs and the presets' known times)."""
    memory = {"pretrain": 1.5 + 3.5, "continual": 3.5 + 4, "classification": 2.5 + 2, "segmentation": 3 + 3.5}
    per_684_draws = 0.25  # minutes of MD-MoCo at 64 px, batch 32 (~45 img/s), per 684 draws
    minutes = {"memory": sum(v for k, v in memory.items() if k in args.bundles and k in MEMORY_RUNS),
               "pool": per_684_draws * len(args.pool_caches) * sum(args.pool_multiples) * args.pool_epochs
               * ((args.pool_base or 684) / 684) + 0.6 * len(args.pool_caches) * len(args.pool_multiples),
               "continual": sum({1: 1.0, 2: 1.5, 3: 2.5, 4: 4.0}[n] for n in args.continual_sets),
               "ddp": 2 * (0.6 + per_684_draws * args.ddp_epochs * args.ddp_draws / 684)}
    return {part: round(minutes[part], 1) for part in args.parts}


def _csv(kind: type, allowed: Sequence | None = None):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {list(allowed or [kind.__name__])}")
        return values
    return parse


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="the X-ray folder (default: ../shared/data/xray from the repository root)")
    parser.add_argument("--parts", type=_csv(str, PARTS), default=list(PARTS), help="memory,pool,continual,ddp")
    parser.add_argument("--out", default="scaling", help="result name: benchmarks/results/<out>.json and .md")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_scaling"), help="run folders and logs")
    parser.add_argument("--render", action="store_true", help="only rewrite <out>.md from <out>.json")
    g = parser.add_argument_group("memory part")
    g.add_argument("--bundles", type=_csv(str, MEMORY_RUNS), default=list(MEMORY_RUNS),
                   help="pretrain,continual,classification,segmentation")
    g.add_argument("--presets", type=_csv(str, ("quick", "full")), default=["quick", "full"])
    g.add_argument("--full-draws", type=int, default=640, help="pretrain full: draws of its one epoch (default 640)")
    g.add_argument("--full-steps", type=int, default=5, help="continual full: iterations per task visit (default 5)")
    g.add_argument("--max-items", type=int, default=None,
                   help="items per split of downstream and continual runs, continual part too (tiny runs only; "
                        "default: the presets')")
    g = parser.add_argument_group("pool part")
    g.add_argument("--pool-base", type=int, default=None, help="entries in the 1x pool (default: pool / 4)")
    g.add_argument("--pool-multiples", type=_csv(int), default=[1, 2, 4])
    g.add_argument("--pool-epochs", type=int, default=2, help="epochs of every pool run (default 2, as quick.yaml)")
    g.add_argument("--pool-draws", choices=("pool", "quick"), default="pool",
                   help="draws per epoch: the pool size (default) or quick.yaml's 640")
    g.add_argument("--pool-caches", type=_csv(str, ("memory", "disk", "none")), default=["memory", "disk"])
    g = parser.add_argument_group("continual part")
    g.add_argument("--continual-sets", type=_csv(int, (1, 2, 3, 4)), default=[2, 3, 4],
                   help=f"numbers of tasks, the first of {','.join(CONTINUAL_TASKS)}")
    g = parser.add_argument_group("ddp part")
    g.add_argument("--ddp-epochs", type=int, default=2, help="epochs of each run (default 2, as quick.yaml)")
    g.add_argument("--ddp-draws", type=int, default=640, help="draws per epoch, all processes together (default 640, "
                   "as quick.yaml)")
    g.add_argument("--skip-iterations", type=int, default=2, help="iterations per epoch left out of samples/s")
    args = parser.parse_args(argv)
    args.data = (args.data or REPO.parent / "shared" / "data" / "xray").resolve()
    args.work = args.work.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = arguments(argv)
    md = RESULTS / f"{args.out}.md"
    if args.render:
        md.write_text(markdown(json.loads((RESULTS / f"{args.out}.json").read_text())))
        return
    if not (args.data / "pretrain_datalist.json").is_file():
        raise SystemExit(f"--data {args.data}: no pretrain_datalist.json there")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # it would win over the memory part's tracking_uri
    args.work.mkdir(parents=True, exist_ok=True)
    minutes = estimate(args)
    print(f"expected minutes per part on a 2-core CPU machine: {minutes} (about {sum(minutes.values()):.0f} in all)",
          flush=True)
    tiny = bool(args.max_items or (args.pool_base and args.pool_base < 300) or args.full_draws < 640
                or args.full_steps < 5 or args.pool_epochs < 2 or args.ddp_epochs < 2 or args.ddp_draws < 640)
    settings = {key: value for key, value in vars(args).items() if key not in ("data", "work", "render", "out")}
    settings["tiny"] = tiny
    runner = Runner(args)
    parts: dict[str, Any] = {}
    functions = {"memory": part_memory, "pool": part_pool, "continual": part_continual, "ddp": part_ddp}
    for part in args.parts:
        started = time.perf_counter()
        parts[part] = functions[part](args, runner)
        parts[part]["part_wall_s"] = round(time.perf_counter() - started, 1)
        write_result(args.out, {"settings": settings, "expected_minutes": minutes, "parts": parts})
        md.write_text(markdown(json.loads((RESULTS / f"{args.out}.json").read_text())))


if __name__ == "__main__":
    main()
