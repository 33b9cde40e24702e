"""Training throughput of every bundle's trainer against a plain-PyTorch loop doing the same work, in one run
(issue #19).

    python benchmarks/bench_trainers.py                      # the five trainers at the quick presets' 64 px, batch 32
    python benchmarks/bench_trainers.py --only classification detection --steps 8 --repeats 3 --name trainers_try

The trainers: ``moco`` (muscle_pretrain: MoCoTrainer), ``continual`` (muscle_continual: MultiTaskTrainer, cyclic
reshuffled schedule over a classification and a segmentation task, cross-task memorization on), ``classification`` and
``segmentation`` (downstream: MONAI's SupervisedTrainer with the AutocastInferer), ``detection`` (downstream:
DetectionTrainer on MONAI's RetinaNet).

**Engine side.** The real engine object, built by ``monai.bundle.ConfigParser`` from the bundle's train config merged
with its ``quick.yaml`` (``train#trainer``, and the network, optimiser, LR schedule and loss it references), with the
handlers that run at every training iteration (LR schedule, loss logging to a log file at INFO as a bundle run logs;
the continual trainer's memorization) and without those that validate, checkpoint, export a backbone, track in MLflow
or draw a progress bar (they run per epoch or write files, and a plain loop would pay the same for the same feature).
The data loader is replaced by an in-memory list of synthetic batches with the shapes and types the bundle's own
pipeline yields (plain tensors: every training chain ends without MetaTensor tracking; lists of item dicts for
detection), so that loading and augmentation are excluded.

**Reference side.** A hand-written PyTorch loop over the same batches as plain tensors (what a plain PyTorch pipeline
yields), with a second network, optimiser, LR schedule and loss from a second parse of the same config (the same
initial weights, checked): ``zero_grad``, forward under the bundle's autocast setting, loss, backward, optimiser step,
schedule step, plus what the trainer's step computes besides: MoCo's key-encoder update and queue, the continual
trainer's L2-SP pull towards the start-of-visit backbone (the same schedule of task visits), detection's gradient
clipping.

Rounds of ``--steps`` iterations come in pairs, engine first in one pair and reference first in the next (ABBA, so
that drift favours neither); the first pair is warm-up, and
also checks that both compute the same first loss from the same weights and batch (equal work). Reported: the median
images/s of each over ``--repeats`` timed rounds, engine / reference, and a flag below 0.95. A flagged trainer gets
one more round of each under cProfile: the functions only the engine calls, with their time per iteration, go into
the result as the likely cause. Writes ``benchmarks/results/<--name>.json`` and ``.md`` (after each trainer, so an
interrupted run keeps what it measured). ``--render`` rewrites the ``.md`` from the ``.json``, e.g. after adding
``"notes": {"<trainer>": "what was tried"}`` to it (shown in the table).

Run it on an otherwise idle machine, from the repository root; at the defaults it trains 960 iterations of batch 32 at
64 px (5 trainers x 2 sides x 6 rounds x 16), plus 32 under the profiler per flagged trainer: roughly 10-20 minutes
on the 2-core CPU machines here (each trainer's ``wall_s`` is in the result). ``--meta-inputs`` gives the downstream
and continual engines MetaTensor images (what their training chains yielded before 2026-12-01) to show that cost.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import itertools
import json
import logging
import pstats
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.apps.utils import DEFAULT_FMT
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate
from monai.utils import set_determinism

from muscle_ext.engines import unwrap_moco
from muscle_ext.engines.detection import with_target_keys
from muscle_ext.flags import as_flag
from muscle_ext.networks.regularizers import l2sp_penalty, named_trainable, snapshot

from common import RESULTS, write_result

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
TRAINERS = ("moco", "continual", "classification", "segmentation", "detection")
THRESHOLD = 0.95
# the entries of a bundle's train#handlers that act at every training iteration: kept on the engine
KEEP_HANDLERS = ("LrScheduleHandler", "StatsHandler", "CrossTaskMemorization", "EWCMemorization",
                 "FeatureDistillation")
DISTINCT_BATCHES = 4  # different synthetic batches per loader, cycled (their content does not change the speed)


# ---------------------------------------------------------------------------------------------------------------
# synthetic batches of the bundles' shapes and types


def _image(g: torch.Generator, size: int) -> torch.Tensor:
    return torch.rand(1, size, size, generator=g)


def _mask(g: torch.Generator, size: int) -> torch.Tensor:
    """A random foreground rectangle (0/1 float), as the pipeline's binarised masks."""
    mask = torch.zeros(1, size, size)
    r0, c0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
    r1, c1 = (int(v) for v in torch.randint(size // 2 + 1, size + 1, (2,), generator=g))
    mask[:, r0:r1, c0:c1] = 1.0
    return mask


def _boxes(g: torch.Generator, size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-3 boxes of 10-45 % of the side (TBX11K's at 256 px: 26-120 px), MONAI order on the input grid."""
    n = int(torch.randint(1, 4, (1,), generator=g))
    side = (0.10 + 0.35 * torch.rand(n, 2, generator=g)) * size
    start = torch.rand(n, 2, generator=g) * (size - side)
    boxes = torch.cat([start, start + side], dim=1).float()
    return boxes, torch.randint(0, num_classes, (n,), generator=g, dtype=torch.int64)


def supervised_batch(g: torch.Generator, kind: str, batch: int, size: int, num_classes: int = 2,
                     meta: bool = False) -> Any:
    """One batch as the bundle's loader yields it: collated image (and mask) tensors for classification and
    segmentation, a list of item dicts (image, box, label) for detection. ``meta``: images (and masks) as MetaTensors,
    as the training chains yielded them before they ended in ``EnsureTyped(track_meta=False)``."""
    wrap = MetaTensor if meta else (lambda x: x)
    if kind == "classification":
        items = [{"image": wrap(_image(g, size)),
                  "label": torch.tensor(int(torch.randint(0, num_classes, (1,), generator=g)))} for _ in range(batch)]
        return list_data_collate(items)
    if kind == "segmentation":
        items = [{"image": wrap(_image(g, size)), "label": wrap(_mask(g, size))} for _ in range(batch)]
        return list_data_collate(items)
    if kind == "detection":
        out = []
        for _ in range(batch):
            boxes, labels = _boxes(g, size, num_classes)
            out.append({"image": wrap(_image(g, size)), "box": boxes, "label": labels})
        return out
    raise ValueError(f"no synthetic batches for tasks of kind {kind!r}")


def moco_batch(g: torch.Generator, batch: int, size: int) -> dict[str, torch.Tensor]:
    """Two views, plain tensors: the bundle's two-view chain runs without MetaTensor tracking."""
    return {"image_q": torch.rand(batch, 1, size, size, generator=g),
            "image_k": torch.rand(batch, 1, size, size, generator=g)}


def plain(value: Any) -> Any:
    """The same batch as plain tensors (what a plain PyTorch pipeline yields); no copy."""
    if isinstance(value, MetaTensor):
        return value.as_tensor()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def cycled(batches: list, steps: int) -> list:
    return [batches[i % len(batches)] for i in range(steps)]


# ---------------------------------------------------------------------------------------------------------------
# building from the bundle configs


def training_handlers(parser: ConfigParser, key: str = "train#handlers") -> tuple[list[str], list[str]]:
    """Keep the entries of ``key`` that act at every training iteration (:data:`KEEP_HANDLERS`); returns the names
    of the kept and of the dropped entries."""
    kept, names, dropped = [], [], []
    for entry in parser[key]:
        target = parser[entry[1:]] if isinstance(entry, str) and entry.startswith("@") else entry
        name = str(target.get("_target_", "")) if isinstance(target, dict) else str(entry)
        short = name.rsplit(".", 1)[-1]
        if short in KEEP_HANDLERS:
            kept.append(entry)
            names.append(short)
        else:
            dropped.append(short or str(entry))
    parser[key] = kept
    return names, dropped


def parse(files: list[Path], overrides: dict[str, Any], batches: Any) -> tuple[ConfigParser, list[str], list[str]]:
    """The bundle config as ``monai.bundle run`` reads it, with ``overrides`` and ``$bench_batches`` standing for
    the synthetic batches; per-iteration handlers only."""
    parser = ConfigParser(globals={"bench_batches": batches})
    parser.read_config([str(f) for f in files])
    parser.update(overrides)
    kept, dropped = training_handlers(parser)
    parser.parse()
    return parser, kept, dropped


def engine_and_reference(files: list[Path], overrides: dict[str, Any], batches: Any,
                         seed: int) -> tuple[ConfigParser, Any, list[str], list[str], ConfigParser]:
    """The engine from one parse and a second parse of the same config for the reference loop's network, optimiser
    and schedule, each from the same seed (the same initial weights). Returns ``(parser, trainer, kept handlers,
    dropped handlers, reference parser)``."""
    parser, kept, dropped = parse(files, overrides, batches)
    set_determinism(seed)
    trainer = parser.get_parsed_content("train#trainer")
    ref, _, _ = parse(files, overrides, batches)
    set_determinism(seed)
    return parser, trainer, kept, dropped, ref


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest absolute difference between the floating-point entries of two networks' state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return max((float((sa[k].float() - sb[k].float()).abs().max()) for k in sa
                if sa[k].is_floating_point() and sa[k].numel()), default=0.0)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Pair:
    """One trainer and its plain reference, ready to run rounds of ``steps`` iterations."""

    name: str
    trainer: Any
    reference: Callable[[list | None], int]  # one round; appends the first loss to the list when given one
    batch_size: int
    device: torch.device
    info: dict = field(default_factory=dict)
    networks: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (engine's, reference's)
    rounds_done: int = 0

    def engine_round(self, first: list | None = None) -> tuple[int, float]:
        trainer = self.trainer
        handle = None
        if first is not None:
            def capture(engine: Any) -> None:
                first.append(loss_of(engine.state.output))

            handle = trainer.add_event_handler(Events.ITERATION_COMPLETED(once=trainer.state.iteration + 1), capture)
        trainer.state.max_epochs = self.rounds_done + 1
        before = trainer.state.iteration
        sync(self.device)
        start = time.perf_counter()
        trainer.run()
        sync(self.device)
        seconds = time.perf_counter() - start
        if handle is not None:
            handle.remove()
        self.rounds_done += 1
        return (trainer.state.iteration - before) * self.batch_size, seconds

    def reference_round(self, first: list | None = None) -> tuple[int, float]:
        sync(self.device)
        start = time.perf_counter()
        images = self.reference(first)
        sync(self.device)
        return images, time.perf_counter() - start


def loss_of(output: Any) -> float:
    """The loss in an engine's output: a dict, or a decollated list of dicts (each holding the batch's loss)."""
    return float((output[0] if isinstance(output, list) else output)["loss"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """The bundles' mixed precision: bf16 autocast on the device's own type when ``amp``."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device)  # as the engines' prepare_batch (non_blocking off)


def common_overrides(args: argparse.Namespace, work: Path, bundle: str) -> dict[str, Any]:
    out = {"bundle_root": str(BUNDLES / bundle), "dataset_dir": str(work / "no_data"), "output_dir": str(work),
           "image_size": args.image_size, "batch_size": args.batch_size, "seed": args.seed, "cache": "none",
           "num_workers": 0, "use_tracking": False, "progress_bar": False}
    if args.device:
        out["device"] = f"$torch.device('{args.device}')"
    return out


def build_moco(args: argparse.Namespace, work: Path) -> Pair:
    g = torch.Generator().manual_seed(args.seed)
    distinct = [moco_batch(g, args.batch_size, args.image_size) for _ in range(DISTINCT_BATCHES)]
    batches = cycled(distinct, args.steps)
    root = BUNDLES / "muscle_pretrain" / "configs"
    files = [root / "train.yaml", root / "quick.yaml"]
    overrides = {**common_overrides(args, work, "muscle_pretrain"), "num_epochs": args.repeats + 3,
                 "knn_monitor": False, "train#dataloader": "$bench_batches"}
    parser, trainer, kept, dropped, ref = engine_and_reference(files, overrides, batches, args.seed)
    network = ref.get_parsed_content("network")
    optimizer = ref.get_parsed_content("train#optimizer")
    scheduler = ref.get_parsed_content("train#lr_scheduler")
    device = torch.device(ref.get_parsed_content("device"))
    amp = as_flag(ref.get_parsed_content("amp"), "amp")
    channels_last = as_flag(ref.get_parsed_content("channels_last"), "channels_last")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    moco = unwrap_moco(network)
    loss_function = torch.nn.CrossEntropyLoss()  # MoCoTrainer's default, as train.yaml leaves it
    plain_batches = plain(batches)

    def reference(first: list | None) -> int:
        network.train()
        for batch in plain_batches:
            im_q = _to(batch["image_q"], device).contiguous(memory_format=memory_format)
            im_k = _to(batch["image_k"], device).contiguous(memory_format=memory_format)
            optimizer.zero_grad()
            with autocast(device, amp):
                logits, labels, keys = network(im_q, im_k, return_keys=True)
                loss = loss_function(logits.float(), labels)
            loss.backward()
            optimizer.step()
            moco.update_key_encoder()
            moco.dequeue_and_enqueue(keys)
            scheduler.step()
            if first is not None and not first:
                first.append(float(loss.detach()))
        return len(plain_batches) * args.batch_size

    info = {"bundle": "muscle_pretrain", "configs": ["train.yaml", "quick.yaml"],
            "network": f"MoCo({parser.get_parsed_content('arch')}, queue {moco.queue_size}, "
                       f"{parser.get_parsed_content('bn_splits')} BN splits)",
            "loss": "InfoNCE (cross-entropy)", "optimizer": type(optimizer).__name__, "amp": amp,
            "channels_last": channels_last, "params": count_params(network), "handlers": kept,
            "handlers_left_out": dropped, "engine_inputs": "plain tensors (as the two-view chain yields)",
            "same_initial_weights": same_weights(parser.get_parsed_content("network"), network)}
    return Pair("moco", trainer, reference, args.batch_size, device, info, (trainer.network, network))


def build_continual(args: argparse.Namespace, work: Path) -> Pair:
    tasks = list(args.continual_tasks)
    per_visit = max(1, args.steps // len(tasks))  # a round (an engine epoch) visits every task once
    root = BUNDLES / "muscle_continual" / "configs"
    files = [root / "train.yaml", root / "quick.yaml"]
    overrides = {**common_overrides(args, work, "muscle_continual"), "rounds": args.repeats + 3, "tasks": tasks,
                 "steps_per_visit": per_visit, "init": "scratch", "init_weights": None,
                 **{f"task_specs#{t}#steps": per_visit for t in tasks}}

    def build(parser: ConfigParser) -> tuple[Any, dict[str, list]]:
        """The task set with its training loaders replaced by synthetic batches, before anything resolves them."""
        task_set = parser.get_parsed_content("task_set")
        g = torch.Generator().manual_seed(args.seed)
        batches = {}
        for name, spec in task_set.specs.items():
            batches[name] = [supervised_batch(g, spec.kind, args.batch_size, args.image_size, spec.num_classes or 2,
                                              meta=args.meta_inputs) for _ in range(DISTINCT_BATCHES)]
        task_set.train_loader = batches.__getitem__  # TaskSet.train_tasks builds the tasks with these
        return task_set, batches

    parser, kept, dropped = parse(files, overrides, None)
    build(parser)
    set_determinism(args.seed)
    trainer = parser.get_parsed_content("train#trainer")
    ref, _, _ = parse(files, overrides, None)
    task_set, batches = build(ref)
    set_determinism(args.seed)
    networks = ref.get_parsed_content("network")
    task_objects = ref.get_parsed_content("train#tasks")
    optimizer = ref.get_parsed_content("train#optimizer")
    scheduler = ref.get_parsed_content("train#lr_scheduler")
    schedule = ref.get_parsed_content("train#schedule")
    backbone = ref.get_parsed_content("backbone")
    weight = float(ref.get_parsed_content("memorization_weight"))
    device = torch.device(ref.get_parsed_content("device"))
    amp = as_flag(ref.get_parsed_content("amp"), "amp")
    kinds = {name: spec.kind for name, spec in task_set.specs.items()}
    plain_batches = {name: plain(b) for name, b in batches.items()}
    state: dict[str, Any] = {"iteration": 0, "anchor": None, "batches": None}

    def forward_loss(name: str, batch: Any) -> torch.Tensor:
        task = task_objects[name]
        if kinds[name] == "detection":
            images = [_to(item["image"], device) for item in batch]
            targets = [{"box": _to(item["box"], device), "label": _to(item["label"], device)} for item in batch]
            return task.weight * task.loss_function(task.network(images, targets)).float()
        pred = task.network(_to(batch["image"], device))
        return task.weight * task.loss_function(pred, _to(batch["label"], device)).mean()

    def reference(first: list | None) -> int:
        networks.train()
        for _ in range(schedule.steps_per_round):
            name, step = schedule.visit_step(state["iteration"])
            if step == 0:  # a new visit: its anchor (L2-SP) and a new pass over its task's batches
                state["anchor"] = snapshot(named_trainable(backbone)) if weight else None
                state["batches"] = itertools.cycle(plain_batches[name])
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                loss = forward_loss(name, next(state["batches"]))
                if weight:
                    loss = loss + weight * l2sp_penalty(named_trainable(backbone), state["anchor"])
            loss.backward()
            optimizer.step()
            scheduler.step()
            state["iteration"] += 1
            if first is not None and not first:
                first.append(float(loss.detach()))
        return schedule.steps_per_round * args.batch_size

    info = {"bundle": "muscle_continual", "configs": ["train.yaml", "quick.yaml"],
            "network": f"{parser.get_parsed_content('arch')} shared by "
                       + ", ".join(f"{t} ({kinds[t]})" for t in tasks),
            "loss": ", ".join(f"{t}: {type(task_objects[t].loss_function).__name__}" for t in tasks)
                    + f"; L2-SP memorization weight {weight}",
            "optimizer": type(optimizer).__name__, "amp": amp, "params": count_params(networks),
            "schedule": repr(schedule), "handlers": kept, "handlers_left_out": dropped,
            "engine_inputs": "collated MetaTensor images (and masks) (--meta-inputs)" if args.meta_inputs else
                             "collated tensors, as TaskSet's training loaders yield",
            "same_initial_weights": same_weights(parser.get_parsed_content("network"), networks)}
    return Pair("continual", trainer, reference, args.batch_size, device, info, (trainer.network, networks))


def build_downstream(args: argparse.Namespace, work: Path, task: str) -> Pair:
    root = BUNDLES / "downstream" / "configs"
    files = [root / "common.yaml", root / f"{task}.yaml", root / "quick.yaml"]
    g = torch.Generator().manual_seed(args.seed)
    num_classes = 2  # classification: the default two classes; segmentation: background and lung; detection: 2
    distinct = [supervised_batch(g, task, args.batch_size, args.image_size, num_classes, meta=args.meta_inputs)
                for _ in range(DISTINCT_BATCHES)]
    batches = cycled(distinct, args.steps)
    overrides = {**common_overrides(args, work, "downstream"), "num_epochs": args.repeats + 3, "init": "scratch",
                 "train#dataloader": "$bench_batches"}
    parser, trainer, kept, dropped, ref = engine_and_reference(files, overrides, batches, args.seed)
    network = ref.get_parsed_content("network")
    optimizer = ref.get_parsed_content("train#optimizer")
    scheduler = ref.get_parsed_content("train#lr_scheduler")
    loss_function = ref.get_parsed_content("train#loss")
    device = torch.device(ref.get_parsed_content("device"))
    amp = as_flag(ref.get_parsed_content("flags#amp"), "amp")
    plain_batches = plain(batches)

    if task == "detection":
        detector = with_target_keys(network)  # as DetectionTrainer does: the datalist's key names
        max_grad_norm = ref.get_parsed_content("max_grad_norm")

        def reference(first: list | None) -> int:
            detector.train()
            for batch in plain_batches:
                images = [_to(item["image"], device) for item in batch]
                targets = [{"box": _to(item["box"], device), "label": _to(item["label"], device)} for item in batch]
                optimizer.zero_grad()
                with autocast(device, amp):
                    loss = loss_function(detector(images, targets)).float()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(detector.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                if first is not None and not first:
                    first.append(float(loss.detach()))
            return len(plain_batches) * args.batch_size
    else:
        def reference(first: list | None) -> int:
            network.train()
            for batch in plain_batches:
                inputs, targets = _to(batch["image"], device), _to(batch["label"], device)
                optimizer.zero_grad()
                with autocast(device, amp):
                    pred = network(inputs)
                loss = loss_function(pred.float(), targets).mean()  # the AutocastInferer returns float32
                loss.backward()
                optimizer.step()
                scheduler.step()
                if first is not None and not first:
                    first.append(float(loss.detach()))
            return len(plain_batches) * args.batch_size

    engine_net = parser.get_parsed_content("network")
    info = {"bundle": "downstream", "configs": ["common.yaml", f"{task}.yaml", "quick.yaml"],
            "network": f"{type(network).__name__}({parser.get_parsed_content('arch')})",
            "loss": type(loss_function).__name__, "optimizer": type(optimizer).__name__, "amp": amp,
            "params": count_params(network), "handlers": kept, "handlers_left_out": dropped,
            "engine_inputs": ("lists of items" if task == "detection" else "collated batches")
                             + (" with MetaTensor images (--meta-inputs)" if args.meta_inputs
                                else " of plain tensors, as the bundle's training loader yields"),
            "same_initial_weights": same_weights(engine_net, network)}
    if task == "detection":
        info["max_grad_norm"] = max_grad_norm
    return Pair(task, trainer, reference, args.batch_size, device, info, (trainer.network, network))


def build(name: str, args: argparse.Namespace, work: Path) -> Pair:
    if name == "moco":
        return build_moco(args, work)
    if name == "continual":
        return build_continual(args, work)
    return build_downstream(args, work, name)


# ---------------------------------------------------------------------------------------------------------------
# measuring


def _where(key: tuple) -> str:
    file, line, func = key
    if file == "~":
        return func
    parts = Path(file).parts
    for anchor in ("site-packages", "muscle_ext", "benchmarks"):
        if anchor in parts:
            i = parts.index(anchor)
            parts = parts[i + 1:] if anchor == "site-packages" else parts[i:]
            break
    return f"{'/'.join(parts[-3:])}:{line}({func})"


def _ancestors(stats: dict, roots: set) -> set:
    """Every function of ``stats`` that calls one of ``roots``, directly or not."""
    seen, todo = set(), list(roots)
    while todo:
        key = todo.pop()
        for caller in stats.get(key, (0, 0, 0, 0, {}))[4]:
            if caller not in seen:
                seen.add(caller)
                todo.append(caller)
    return seen


def profile(pair: Pair, top: int = 6) -> dict:
    """One engine round and one reference round under cProfile, per iteration: the functions whose own time grew
    most from the plain loop to the engine (those only the engine calls included), and the functions only the engine
    calls by cumulative time, leaving out those that wrap work the plain loop does too (the model's forward and
    backward, the optimiser step: any function above one that takes a tenth of the plain loop's time)."""
    engine_prof, reference_prof = cProfile.Profile(), cProfile.Profile()
    gc.collect()
    engine_prof.enable()
    n_engine, s_engine = pair.engine_round()
    engine_prof.disable()
    gc.collect()
    reference_prof.enable()
    n_reference, s_reference = pair.reference_round()
    reference_prof.disable()
    # {(file, line, function): (primitive calls, calls, own time, cumulative time, {caller: ...})}
    engine_stats, reference_stats = pstats.Stats(engine_prof).stats, pstats.Stats(reference_prof).stats
    ms_e = 1000.0 / max(1, n_engine // pair.batch_size)
    ms_r = 1000.0 / max(1, n_reference // pair.batch_size)
    grown = sorted(((k, v[2] * ms_e - (reference_stats[k][2] * ms_r if k in reference_stats else 0.0), v[1])
                    for k, v in engine_stats.items()), key=lambda x: -x[1])[:top]
    heavy = {k for k, v in reference_stats.items() if v[3] > 0.1 * s_reference}
    wrappers = _ancestors(engine_stats, heavy & set(engine_stats)) | heavy
    only = {k: v for k, v in engine_stats.items() if k not in reference_stats}
    by_cum = sorted(((k, v) for k, v in only.items() if k not in wrappers), key=lambda kv: -kv[1][3])[:top]
    return {"engine_ms_per_iter": round(s_engine * ms_e, 2), "reference_ms_per_iter": round(s_reference * ms_r, 2),
            "engine_only_self_ms_per_iter": round(sum(v[2] for v in only.values()) * ms_e, 2),
            "top_own_time_growth": [[_where(k), round(d, 2), n] for k, d, n in grown],
            "top_engine_only_cumulative": [[_where(k), round(v[3] * ms_e, 2), v[1]] for k, v in by_cum]}


def measure(pair: Pair, args: argparse.Namespace) -> dict:
    first = {"engine": [], "reference": []}
    # warm-up pair, from the same weights and RNG state: also the equal-work check
    set_determinism(args.seed)
    warm = {"engine": pair.engine_round(first["engine"])}
    set_determinism(args.seed)
    warm["reference"] = pair.reference_round(first["reference"])
    drift = weight_difference(*pair.networks) if pair.networks else None  # after the same steps on the same batches
    rates: dict[str, list[float]] = {"engine": [], "reference": []}
    for r in range(args.repeats):
        # engine first in even rounds, the plain loop first in odd ones: a machine that speeds up or slows down
        # during a pair favours neither side
        for side in ("engine", "reference") if r % 2 == 0 else ("reference", "engine"):
            gc.collect()
            n, seconds = pair.engine_round() if side == "engine" else pair.reference_round()
            rates[side].append(n / seconds)
        print(f"  {pair.name} round {r + 1}/{args.repeats}: engine {rates['engine'][-1]:.1f} img/s, "
              f"reference {rates['reference'][-1]:.1f} img/s", flush=True)
    engine, reference = statistics.median(rates["engine"]), statistics.median(rates["reference"])
    ratio = engine / reference
    e1, r1 = first["engine"][0], first["reference"][0]
    result = {**pair.info, "engine": type(pair.trainer).__name__,
              "engine_img_s": round(engine, 2), "reference_img_s": round(reference, 2),
              "ratio_engine_over_reference": round(ratio, 3), "below_threshold": ratio < args.threshold,
              "per_round_img_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
              "paired_ratios": [round(e / r, 3) for e, r in zip(rates["engine"], rates["reference"], strict=True)],
              "warmup_img_s": {k: round(n / s, 1) for k, (n, s) in warm.items()},
              "first_loss": {"engine": e1, "reference": r1},
              "same_first_loss": abs(e1 - r1) <= 1e-4 * max(1.0, abs(r1)),
              "max_weight_difference_after_warmup": drift}
    if ratio < args.threshold and args.profile:
        print(f"  {pair.name}: {ratio:.3f}x, profiling one round of each", flush=True)
        result["profile"] = profile(pair)
    return result


# ---------------------------------------------------------------------------------------------------------------
# output


def why(r: dict, notes: dict, name: str) -> str:
    text = []
    if not r.get("same_initial_weights", True):
        text.append("the two networks started from different weights")
    if not r.get("same_first_loss", True):
        text.append(f"first losses differ ({r['first_loss']['engine']:.5g} vs {r['first_loss']['reference']:.5g})")
    if r["below_threshold"]:
        p = r.get("profile")
        if p:
            grown = "; ".join(f"`{w}` +{ms} ms" for w, ms, _ in p["top_own_time_growth"][:3])
            extra = "; ".join(f"`{w}` {ms} ms" for w, ms, _ in p["top_engine_only_cumulative"][:2])
            text.append(f"profile (per iteration): engine {p['engine_ms_per_iter']} ms, plain "
                        f"{p['reference_ms_per_iter']} ms; own time grown most: {grown}; engine-only: {extra}")
        else:
            text.append("below 0.95x; not profiled (--no-profile)")
    if name in notes:
        text.append(notes[name])
    return " ".join(text).replace("|", "\\|") or "-"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    device = m.get("gpu", m["cpu"]) if s["device"].startswith("cuda") else m["cpu"]
    lines = ["# Each bundle's trainer against a plain-PyTorch loop doing the same work", "",
             f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}; ran on "
             f"{s['device']} ({device}); torch {m['torch']}, {m['torch_threads']} torch threads. "
             f"Commit {result['commit']}, {result['when']}.", "",
             f"Command: `{result['command']}`", "",
             f"{s['image_size']} px, batch {s['batch_size']}, {s['steps']} iterations per round; a warm-up pair, then "
             f"timed rounds ({s['repeats']} of each), engine and plain loop alternating"
             f"{' (engine first, then plain loop first: ABBA)' if s.get('order') == 'abba' else ''}; the median of "
             "each. Synthetic "
             "in-memory batches (no loading, no augmentation): the engine gets the bundle pipeline's types, the plain "
             "loop plain tensors. Engines are built from the bundle configs (train config + quick.yaml) with their "
             "per-iteration handlers (LR schedule, loss logging, memorization); validation, checkpoints, exports, "
             "MLflow and the progress bar are left out. Flag: engine / plain below "
             f"{s['threshold']}. Same start: both sides begin from the same weights and compute the same first loss "
             "on the same batch; in brackets the largest weight difference between the two networks after the "
             "warm-up round (the same steps on the same batches).", "",
             "| trainer | engine | model; loss; optimiser | engine img/s | plain img/s | engine / plain | "
             "same start | why (flagged) |",
             "|---|---|---|---|---|---|---|---|"]
    notes = result.get("notes", {})
    for name, r in result["results"].items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | - | failed: {r['error']} |")
            continue
        flag = " **below**" if r["below_threshold"] else ""
        same = "yes" if r["same_first_loss"] and r["same_initial_weights"] else "no"
        if r.get("max_weight_difference_after_warmup") is not None:
            same += f" (then {r['max_weight_difference_after_warmup']:.2g})"
        lines.append(f"| {name} | {r['engine']} ({r['bundle']}) | {r['network']}; {r['loss']}; {r['optimizer']}"
                     f"{', bf16' if r['amp'] else ''} | {r['engine_img_s']} | {r['reference_img_s']} | "
                     f"{r['ratio_engine_over_reference']}{flag} | {same} | "
                     f"{why(r, notes, name)} |")
    lines += ["", "Per-round images/s (engine / plain) and the paired ratios:", ""]
    for name, r in result["results"].items():
        if "error" not in r:
            lines.append(f"- {name}: {', '.join(map(str, r['per_round_img_s']['engine']))} / "
                         f"{', '.join(map(str, r['per_round_img_s']['reference']))}; ratios "
                         f"{', '.join(map(str, r['paired_ratios']))}")
    for name, r in result["results"].items():
        p = r.get("profile")
        if not p:
            continue
        lines += ["", f"## {name}: where the engine's extra time goes (cProfile, one round of each)", "",
                  f"Engine {p['engine_ms_per_iter']} ms/iteration, plain loop {p['reference_ms_per_iter']} "
                  "ms/iteration under the profiler; functions only the engine calls: "
                  f"{p['engine_only_self_ms_per_iter']} ms/iteration of their own time.", "",
                  "Own time grown most from the plain loop to the engine (ms/iteration):", "",
                  "| function | engine - plain | calls by the engine |", "|---|---|---|"]
        lines += [f"| `{w}` | {ms} | {n} |" for w, ms, n in p["top_own_time_growth"]]
        lines += ["", "Functions only the engine calls, by cumulative time (not those around the shared forward, "
                  "backward and step):", "", "| function | cumulative ms/iter | calls |", "|---|---|---|"]
        lines += [f"| `{w}` | {ms} | {n} |" for w, ms, n in p["top_engine_only_cumulative"]]
    return "\n".join(lines) + "\n"


def log_to_file(path: Path) -> None:
    """The engines' StatsHandler logs every iteration at INFO to its own logger, as in a bundle run (there to
    stdout): here into ``path``, as are the other log messages, so that the console shows the measurements."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(DEFAULT_FMT))
    # created before MONAI's get_logger sees it, which then adds no stdout handler to it
    stats = logging.getLogger("monai.handlers.StatsHandler")
    stats.handlers[:] = [handler]
    stats.propagate = False
    stats.setLevel(logging.INFO)
    logging.basicConfig(handlers=[handler], level=logging.INFO, force=True)


def relative_command() -> None:
    """``sys.argv[0]`` relative to the repository, so the recorded command runs from its root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        sys.argv[0] = str(script.relative_to(REPO))


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``: a list, as in the tests; ``None``: ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=TRAINERS, default=list(TRAINERS), metavar="NAME",
                        help=f"trainers to measure, of {', '.join(TRAINERS)} (default: all)")
    parser.add_argument("--image-size", type=int, default=64, help="the quick presets' size (default 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="the quick presets' batch (default 32)")
    parser.add_argument("--steps", type=int, default=16, help="iterations per round (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each side (default 5)")
    parser.add_argument("--continual-tasks", nargs="+", default=["pneumonia", "lung"],
                        help="tasks of the continual trainer (names of its task_specs; default pneumonia lung)")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: the bundles' own choice)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--meta-inputs", action="store_true",
                        help="give the downstream and continual engines MetaTensor images (what they cost)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="do not profile the trainers below the threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_trainers"),
                        help="scratch folder (the engines' log file)")
    parser.add_argument("--name", default="trainers", help="result file name (default trainers)")
    parser.add_argument("--render", action="store_true", help="only rewrite <name>.md from <name>.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    return args


def main() -> None:
    args = arguments()
    if args.render:
        path = (RESULTS / f"{args.name}.md")
        path.write_text(markdown(json.loads((RESULTS / f"{args.name}.json").read_text())))
        print(path.read_text())
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    relative_command()
    args.work.mkdir(parents=True, exist_ok=True)
    log_to_file(args.work / "engines.log")
    settings = {"image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
                "repeats": args.repeats, "threshold": args.threshold, "seed": args.seed,
                "continual_tasks": args.continual_tasks, "meta_inputs": args.meta_inputs, "order": "abba",
                "device": "?"}
    results: dict[str, dict] = {}
    for name in args.only:
        start = time.perf_counter()
        print(f"{name}: building", flush=True)
        try:
            shutil.rmtree(args.work / name, ignore_errors=True)  # this script's own folder of an earlier run
            pair = build(name, args, args.work / name)
        except Exception as exc:  # one trainer that cannot be built leaves the others measured
            logging.exception(f"{name}: could not be built")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{name}: could not be built: {exc}", flush=True)
        else:
            settings["device"] = str(pair.device)
            results[name] = measure(pair, args)
            results[name]["wall_s"] = round(time.perf_counter() - start, 1)
            del pair
            gc.collect()
        payload = {"settings": settings, "results": results}
        write_result(args.name, payload)
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(markdown(saved))
    print()
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
