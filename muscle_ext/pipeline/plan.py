"""The main job as stages: a preset (a YAML file naming each bundle's configs, overrides and the downstream tasks)
and a data folder become the list of :class:`~muscle_ext.pipeline.runner.Stage` objects that ``muscle reproduce``
runs: MD-MoCo pre-training -> continual learning from it (one stage per variant: MUSCLE, MUSCLE--, joint) -> for every
downstream task and every starting point, fine-tuning then evaluation on the task's test split.

A preset's keys (``presets/quick.yaml`` is the reference):

- ``description``: one line for the report; ``warning``: a line the report shows in bold;
- ``synthetic``: ``true`` when the data are generated phantoms (``muscle_ext.data.synthetic``): without ``--data``,
  the job writes them to ``<out>/synthetic_data`` first;
- ``pretrain``: ``configs`` (of ``bundles/muscle_pretrain``), ``overrides``;
- ``continual``: ``configs``, ``overrides`` and ``variants`` (``{name: overrides}``; each starts from the MD-MoCo
  backbone);
- ``downstream``: ``configs`` merged after the task's config (e.g. ``quick.yaml``), ``overrides`` for fine-tuning,
  ``evaluate_overrides`` for the test-set evaluations (e.g. ``n_bootstrap``), ``starts`` (``scratch``, ``imagenet``,
  ``md_moco`` or a continual variant), ``tasks`` (``{name: {config, datalist, overrides, paper, external}}``;
  ``config`` is a task config of ``bundles/downstream``; ``paper``, optional, names the paper's dataset whose
  published results the report shows beside the task's, a key of :data:`muscle_ext.pipeline.paper.PAPER`;
  ``external``, optional, a datalist of another site whose ``test`` split each fine-tuned model is also scored on,
  unchanged: the report gives internal vs external with the drop; ``adapt``, optional with ``external`` on a
  classification task, ``{methods, ks, draws, finetune_epochs}`` (any subset; the rest as in ``adapt_curves.yaml``):
  each fine-tuned model is then adapted to that site with k labelled patients per class of its ``training`` split,
  every method, k and draw (``adapt_curves.yaml``, one stage per start), and the report draws the curves;
  ``simulated_site``, optional (``true`` or a look of ``muscle_ext.data.simulated_site``): each fine-tuned model
  is also scored on the test split as another detector would show it, and (classification) recalibrated on a
  slice of the simulated validation split, in ``simulated/``; the report gives internal vs simulated and ECE before
  and after recalibration; ``evaluate_overrides``, optional: the task's own evaluation settings (e.g.
  ``subgroups``, ``operating_point``: a threshold chosen at home is carried to the other site),
  over the section's. The evaluation report card, optional per task:
  ``label_efficiency: {fractions, seeds, starts}`` fine-tunes on nested, stratified (patient-grouped) subsets of
  the training split (default 1 %, 10 %, 100 %; seeds job seed + 0, 1, 2; every start), one stage per start,
  fraction and seed (the task's own stage is the 100 % run at the job's seed), and the report draws the curves with
  intervals over test cases and seeds; ``protocols: {methods, starts}`` judges the same backbones frozen,
  ``linear_probe`` (``--freeze_backbone true``) and, for classification, ``knn`` (``knn.yaml``), beside
  fine-tuning);
- ``nproc_per_node`` (optional, in ``pretrain``, ``continual`` and ``downstream``): train under ``torchrun`` with
  that many processes (one per GPU), the bundle's ``multi_gpu_train.yaml`` merged after its training config;
  ``muscle reproduce --nproc-per-node N`` sets it for every section. Evaluation stays one process, and detection
  fine-tuning too (its downstream multi-GPU config does not cover detection);
- ``embedding_map`` (optional): ``datalist``, ``section`` and ``color_by`` (an item key, e.g. ``body_part``): each
  pre-trained start's backbone embeds that section (``muscle_pretrain``'s ``inference.yaml``, one stage per start)
  and the report draws a t-SNE map of each, coloured by ``color_by``.

``{data}`` in any value stands for the data folder; nothing else names a folder. ``imagenet`` is a start only when a
local ImageNet weights file is given (nothing is downloaded).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..settings import SettingsError
from .runner import BundleCommand, Stage

__all__ = ["PRESETS", "build_stages", "load_preset"]

PRESETS = Path(__file__).with_name("presets")
PRESET_KEYS = ("description", "warning", "synthetic", "pretrain", "continual", "downstream", "embedding_map")
SECTION_KEYS = {"pretrain": ("configs", "overrides", "nproc_per_node"),
                "continual": ("configs", "overrides", "variants", "nproc_per_node"),
                "downstream": ("configs", "overrides", "evaluate_overrides", "starts", "tasks", "nproc_per_node"),
                "embedding_map": ("datalist", "section", "color_by")}
TASK_KEYS = ("config", "datalist", "overrides", "evaluate_overrides", "paper", "external", "simulated_site", "adapt",
             "label_efficiency", "protocols")
CARD_KEYS = {"label_efficiency": ("fractions", "seeds", "starts"), "protocols": ("methods", "starts")}
PROTOCOLS = ("linear_probe", "knn")
# settings of evaluate.yaml alone (its report card): kept out of the kNN and adaptation commands (not in their configs)
EVALUATE_ONLY = ("operating_point", "operating_point_datalist", "simulated_site", "recalibrate_on", "recalibration",
                 "recalibration_k")
# the fine-tuning settings a kNN stage shares (sizes and loading; no training settings: nothing trains)
KNN_SETTINGS = ("image_size", "max_items", "batch_size", "num_workers", "cache", "label_fraction", "class_names")
ADAPT_KEYS = ("methods", "ks", "draws", "finetune_epochs")  # settings of bundles/downstream/configs/adapt_curves.yaml


def load_preset(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A preset by name (``quick``; the files in ``muscle_ext/pipeline/presets``) or as a YAML file of your own.

    Raises:
        SettingsError: an unknown preset name, or keys the preset format does not have (each named).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise SettingsError(f"unknown preset '{name_or_path}'; the presets are: {known} (or a YAML file of yours)")
    elif not path.is_file():
        raise FileNotFoundError(f"preset file {path} does not exist")
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(preset, Mapping):
        raise SettingsError(f"{path}: a preset is a mapping of {', '.join(PRESET_KEYS)}; got a {type(preset).__name__}")
    unknown = sorted(set(preset) - set(PRESET_KEYS))
    if unknown:
        raise SettingsError(f"{path.name}: unknown preset keys {', '.join(unknown)}; known: {', '.join(PRESET_KEYS)}")
    # a misspelled key below a section would be dropped silently (its settings never reach a command): refuse it
    unknown = [f"{section}#{key}" for section, known in SECTION_KEYS.items()
               if isinstance(preset.get(section), Mapping) for key in preset[section] if key not in known]
    unknown += [f"downstream#tasks#{task}#{key}" for task, spec in ((preset.get("downstream") or {}).get("tasks")
                or {}).items() if isinstance(spec, Mapping) for key in spec if key not in TASK_KEYS]
    unknown += [f"downstream#tasks#{task}#{entry}#{key}" for task, spec in ((preset.get("downstream") or {})
                .get("tasks") or {}).items() if isinstance(spec, Mapping) for entry, keys in CARD_KEYS.items()
                if isinstance(spec.get(entry), Mapping) for key in spec[entry] if key not in keys]
    unknown += [f"downstream#tasks#{task}#adapt#{key}" for task, spec in ((preset.get("downstream") or {}).get("tasks")
                or {}).items() if isinstance(spec, Mapping) and isinstance(spec.get("adapt"), Mapping)
                for key in spec["adapt"] if key not in ADAPT_KEYS]
    if unknown:
        allowed = "; ".join(f"{section}: {', '.join(keys)}" for section, keys in SECTION_KEYS.items())
        raise SettingsError(f"{path.name}: unknown preset keys {', '.join(unknown)}; known: {allowed}; "
                            f"each task: {', '.join(TASK_KEYS)}; adapt: {', '.join(ADAPT_KEYS)}")
    required = {"pretrain": ("configs",), "downstream": ("starts", "tasks")}
    problems = [f"{section}#{key}" for section, keys in required.items() for key in (section, *keys)[1:]
                if not isinstance(preset.get(section), Mapping) or key not in preset[section]]
    problems += [f"downstream#tasks#{task}#{key}" for task, spec in (preset.get("downstream") or {}).get("tasks", {})
                 .items() for key in ("config", "datalist") if not isinstance(spec, Mapping) or key not in spec]
    problems += [f"downstream#tasks#{task}#external (adapt needs another site's datalist)" for task, spec in
                 (preset.get("downstream") or {}).get("tasks", {}).items()
                 if isinstance(spec, Mapping) and spec.get("adapt") is not None and not spec.get("external")]
    if problems:
        raise SettingsError(f"{path.name} lacks {', '.join(problems)} (presets/quick.yaml shows every key)")
    preset["name"] = path.stem
    return preset


def _fill(value: Any, data: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{data}", str(data))
    if isinstance(value, Mapping):
        return {k: _fill(v, data) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, data) for v in value]
    return value


def _datalists(overrides: Mapping[str, Any]) -> list[Path]:
    """The datalists an override set names (their bytes are part of the stage's fingerprint)."""
    return [Path(v) for v in overrides.values() if isinstance(v, str) and v.endswith(".json")]


def _json_inputs(overrides: Mapping[str, Any]) -> tuple[Path, ...]:
    return tuple(p for p in _datalists(overrides) if p.is_file())


def _processes(section: Mapping[str, Any], override: int | None, where: str) -> int:
    value = override if override is not None else section.get("nproc_per_node", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError(f"{where}#nproc_per_node must be a whole number >= 1 (processes per node), got {value!r}")
    return value


def _multi_gpu(configs: tuple[str, ...], after: str, nproc: int) -> tuple[str, ...]:
    """``configs`` with ``multi_gpu_train.yaml`` right after ``after`` (the training config) when ``nproc > 1``."""
    if nproc == 1 or "multi_gpu_train.yaml" in configs:
        return configs
    index = configs.index(after) + 1
    return (*configs[:index], "multi_gpu_train.yaml", *configs[index:])


@dataclass
class _TaskCommands:
    """The commands of one downstream task: its fine-tunings (from any start, with extra settings) and evaluations."""

    datalist: Path
    spec: Mapping[str, Any]
    section: Mapping[str, Any]          # the preset's downstream section
    common: Mapping[str, Any]           # seed, experiment name
    backbones: Mapping[str, Path]
    nproc: int
    imagenet_weights: str | os.PathLike | None

    def __post_init__(self) -> None:
        self.scoring_overrides = {**self.section.get("evaluate_overrides", {}),
                                  **(self.spec.get("evaluate_overrides") or {})}
        self.processes = 1 if self.spec["config"] == "detection.yaml" else self.nproc  # no multi-GPU detection
        self.configs = _multi_gpu(("common.yaml", self.spec["config"], *self.section.get("configs", ())),
                                  self.spec["config"], self.processes)
        self.evaluate_configs = ("common.yaml", self.spec["config"], "evaluate.yaml")

    def start_of(self, start: str) -> tuple[dict[str, Any], tuple[str, ...], tuple[Path, ...]]:
        """(init overrides, stages needed, input files) of a start."""
        if start == "imagenet":
            weights = Path(self.imagenet_weights).absolute()  # type: ignore[arg-type]
            return {"init": "imagenet", "init_weights": weights}, (), (self.datalist, weights)
        if start != "scratch":
            return {"init": "checkpoint", "init_weights": self.backbones[start]}, (start,), (self.datalist,)
        return {"init": "scratch"}, (), (self.datalist,)

    def fine_tuning(self, folder: Path, init: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                    seed: int | None = None) -> tuple[BundleCommand, BundleCommand, dict[str, Any]]:
        """Fine-tuning into ``folder`` and its test-set evaluation (``extra``: more training settings), and the
        evaluation's overrides."""
        where = {"datalist": self.datalist, "output_dir": folder, **self.common,
                 **({"seed": seed} if seed is not None else {})}
        scoring = {**self.scoring_overrides, **where}
        train = BundleCommand("downstream", self.configs, {**self.section.get("overrides", {}),
                                                           **self.spec.get("overrides", {}), **(extra or {}),
                                                           **where, **init}, self.processes)
        return train, BundleCommand("downstream", self.evaluate_configs, scoring), scoring


def _without(overrides: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if k not in names}


def _percent(fraction: float) -> str:
    """``0.01`` -> ``"1"``, ``0.005`` -> ``"0.5"``: a fraction as the percentage in stage names and the report."""
    return f"{100 * fraction:g}"


def _label_efficiency(task: str, entry: Any, starts: list[str], seed: int) -> tuple[list[float], list[int],
                                                                                      list[str]]:
    """``(fractions, seeds, starts)`` of a task's ``label_efficiency`` entry, checked.

    Raises:
        SettingsError: a fraction outside (0, 1], a seed that is not a whole number, a start the job does not make.
    """
    where = f"downstream#tasks#{task}#label_efficiency"
    if not isinstance(entry, Mapping):
        raise SettingsError(f"{where} is a mapping of {', '.join(CARD_KEYS['label_efficiency'])}, got {entry!r}")
    fractions = list(entry.get("fractions", [0.01, 0.1, 1.0]))
    seeds = list(entry.get("seeds", [seed, seed + 1, seed + 2]))
    chosen = list(entry.get("starts", starts))
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1]
    if bad or not fractions:
        raise SettingsError(f"{where}#fractions: shares of the training labels above 0 and at most 1, e.g. [0.01, "
                            f"0.1, 1.0]; got {fractions}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise SettingsError(f"{where}#seeds: whole numbers, e.g. [0, 1, 2]; got {seeds}")
    _check_starts(where, chosen, starts)
    return sorted({float(f) for f in fractions}), list(dict.fromkeys(seeds)), chosen


def _protocols(task: str, spec: Mapping[str, Any], entry: Any, starts: list[str]) -> tuple[list[str], list[str]]:
    """``(methods, starts)`` of a task's ``protocols`` entry, checked.

    Raises:
        SettingsError: an unknown method, kNN on a task that is not classification, a start the job does not make.
    """
    where = f"downstream#tasks#{task}#protocols"
    if not isinstance(entry, Mapping):
        raise SettingsError(f"{where} is a mapping of {', '.join(CARD_KEYS['protocols'])}, got {entry!r}")
    methods = list(entry.get("methods", ["linear_probe", "knn"] if spec["config"] == "classification.yaml"
                             else ["linear_probe"]))
    unknown = [m for m in methods if m not in PROTOCOLS]
    if unknown or not methods:
        raise SettingsError(f"{where}#methods: {unknown or methods} unknown; known: {', '.join(PROTOCOLS)} "
                            "(fine-tuning is the task's own stage)")
    if "knn" in methods and spec["config"] != "classification.yaml":
        raise SettingsError(f"{where}#methods: knn votes classes; {task} uses {spec['config']}: keep linear_probe only")
    chosen = list(entry.get("starts", starts))
    _check_starts(where, chosen, starts)
    return methods, chosen


def _check_starts(where: str, chosen: list[str], starts: list[str]) -> None:
    unknown = [s for s in chosen if s not in starts]
    if unknown or not chosen:
        raise SettingsError(f"{where}#starts: {unknown or chosen} not among this job's starts ({', '.join(starts)})")


def _adaptation_stage(task: str, start: str, spec: Mapping[str, Any], scoring: Mapping[str, Any], trained: Path,
                      out: Path) -> Stage:
    """The fine-tuned ``task`` model of ``start`` adapted to the ``external`` site: ``adapt_curves.yaml``."""
    if spec["config"] != "classification.yaml":
        raise SettingsError(f"downstream#tasks#{task}#adapt: adaptation is for classification tasks (two classes); "
                            f"{task} uses {spec['config']}: remove its adapt entry")
    name, folder = f"adapt_{task}_{start}", out / "adaptation" / f"{task}_{start}"
    external = Path(spec["external"])
    overrides = {**scoring, **dict(spec["adapt"] or {}), "model_path": trained / "models" / "model.pt",
                 "target_datalist": external, "output_dir": folder}
    command = BundleCommand("downstream", ("common.yaml", spec["config"], "adapt.yaml", "adapt_curves.yaml"),
                            overrides)
    return Stage(name, folder, [command], needs=(f"{task}_{start}",), inputs=(Path(spec["datalist"]), external),
                 outputs=("adaptation_curves.json",),
                 description=f"{task} from {start} adapted to {external.parent.name}",
                 extra={"kind": "adaptation", "task": task, "start": start, "external": external.parent.name})


def build_stages(preset: Mapping[str, Any], data: str | os.PathLike, out: str | os.PathLike,
                 imagenet_weights: str | os.PathLike | None = None, seed: int = 0,
                 experiment_name: str | None = None, nproc_per_node: int | None = None) -> list[Stage]:
    """The stages of ``preset`` on ``data``, with their folders under ``out`` (see the module docstring).
    ``seed`` and ``experiment_name`` (the MLflow experiment; default: each bundle's own) go to every bundle run;
    ``nproc_per_node`` (default: each section's own, else 1) trains every section under ``torchrun``.

    Raises:
        FileNotFoundError: a datalist the preset names is missing under ``data`` (named, with what to do).
        SettingsError: a start that no stage makes (e.g. ``imagenet`` without ``imagenet_weights``), or a process
            count that is not a whole number >= 1.
    """
    data, out = Path(data).resolve(), Path(out).absolute()
    preset = _fill(dict(preset), data)
    stages: list[Stage] = []
    common: dict[str, Any] = {"seed": seed, **({"experiment_name": experiment_name} if experiment_name else {})}
    pre, cont, down = preset["pretrain"], preset.get("continual") or {}, preset["downstream"]

    named = [*_datalists(pre.get("overrides", {})), *_datalists(cont.get("overrides", {})),
             *(Path(spec[key]) for spec in down["tasks"].values() for key in ("datalist", "external") if spec.get(key))]
    missing = [p for p in named if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"no datalist at {missing[0]}: point --data at a folder with the preset's datalists, or give a preset "
            "file of yours (--preset my_pipeline.yaml) that names your own")
    reserved = {"md_moco", "scratch", "imagenet", "downstream", "superseded"}
    clash = sorted(reserved & set(cont.get("variants") or {}))
    if clash:
        raise SettingsError(f"continual variant name {clash[0]!r} is taken (by a start or a folder of the job); "
                            "rename the variant")

    nproc = {name: _processes(section, nproc_per_node, name)
             for name, section in (("pretrain", pre), ("continual", cont), ("downstream", down))}
    pre_overrides = {**pre.get("overrides", {}), **common, "output_dir": out / "md_moco"}
    pre_configs = _multi_gpu(tuple(pre["configs"]), "train.yaml", nproc["pretrain"])
    stages.append(Stage("md_moco", out / "md_moco", [BundleCommand("muscle_pretrain", pre_configs, pre_overrides,
                                                                   nproc["pretrain"])],
                        inputs=_json_inputs(pre_overrides), outputs=("models/backbone.pt",),
                        description="MD-MoCo pre-training on the pooled images", extra={"kind": "pretrain"}))
    backbones = {"md_moco": out / "md_moco" / "models" / "backbone.pt"}

    for variant, extra in (cont.get("variants") or {}).items():
        overrides = {**cont.get("overrides", {}), **(extra or {}), **common, "init": "checkpoint",
                     "init_weights": backbones["md_moco"], "output_dir": out / variant}
        configs = _multi_gpu(tuple(cont["configs"]), "train.yaml", nproc["continual"])
        stages.append(Stage(variant, out / variant, [BundleCommand("muscle_continual", configs, overrides,
                                                                   nproc["continual"])],
                            needs=("md_moco",), inputs=_json_inputs(overrides),
                            outputs=("models/backbone.pt", "forgetting.json"),
                            description=f"continual learning ({variant}) from MD-MoCo",
                            extra={"kind": "continual", "variant": variant}))
        backbones[variant] = out / variant / "models" / "backbone.pt"

    starts = list(down["starts"])
    if imagenet_weights is not None and "imagenet" not in starts:
        starts.insert(1, "imagenet")
    for start in starts:
        if start == "imagenet" and imagenet_weights is None:
            raise SettingsError("start 'imagenet' needs a local weights file: --imagenet-weights <torchvision/timm "
                                "ResNet state dict> (nothing is downloaded)")
        if start not in ("scratch", "imagenet") and start not in backbones:
            raise SettingsError(f"start '{start}' is made by no stage; starts: scratch, imagenet, "
                                f"{', '.join(backbones)}")
    for task, spec in down["tasks"].items():
        datalist = Path(spec["datalist"])
        plan = _TaskCommands(datalist, spec, down, common, backbones, nproc["downstream"], imagenet_weights)

        for start in starts:
            name = f"{task}_{start}"
            folder = out / "downstream" / name
            init, needs, inputs = plan.start_of(start)
            train, evaluate, scoring = plan.fine_tuning(folder, init)
            commands, outputs, extra = [train, evaluate], ["metrics.json"], {}
            if spec.get("external"):  # the same model on another site's test split, in its own folder
                external = Path(spec["external"])
                home = ({"operating_point_datalist": datalist}  # a threshold is chosen at home, then carried
                        if str(scoring.get("operating_point", "fixed")) != "fixed" else {})
                commands.append(BundleCommand("downstream", plan.evaluate_configs,
                                              {**scoring, **home, "datalist": external,
                                               "output_dir": folder / "external", "model_dir": folder / "models"}))
                inputs = (*inputs, external)
                extra = {"external": external.parent.name, "external_datalist": str(external)}
                outputs.append("external/metrics.json")
            if spec.get("simulated_site"):  # the test split as another detector would show it, then recalibrated
                look = spec["simulated_site"]
                recalibrate = ({"recalibrate_on": datalist} if spec["config"] == "classification.yaml" else {})
                commands.append(BundleCommand("downstream", plan.evaluate_configs,
                                              {**scoring, "simulated_site": look, **recalibrate,
                                               "output_dir": folder / "simulated", "model_dir": folder / "models"}))
                extra = {**extra, "simulated_site": str(look)}
                outputs.append("simulated/metrics.json")
            stages.append(Stage(name, folder, commands, needs=needs, inputs=inputs,
                                outputs=tuple(outputs), description=f"{task} from {start}",
                                extra={"kind": "downstream", "task": task, "start": start, **extra,
                                       **({"paper": spec["paper"]} if spec.get("paper") else {})}))
            if spec.get("adapt") is not None:
                stages.append(_adaptation_stage(task, start, spec, _without(scoring, EVALUATE_ONLY), folder, out))

        efficiency = spec.get("label_efficiency")
        if efficiency is not None:  # fine-tuning on nested, stratified subsets of the training split, several seeds
            fractions, seeds, chosen = _label_efficiency(task, efficiency, starts, seed)
            for start in chosen:
                init, needs, inputs = plan.start_of(start)
                for fraction in fractions:
                    for run_seed in seeds:
                        if fraction == 1.0 and run_seed == seed:
                            continue  # the task's own stage is this run
                        name = f"{task}_{start}_fraction{_percent(fraction)}_seed{run_seed}"
                        folder = out / "card" / "label_efficiency" / name
                        train, evaluate, _ = plan.fine_tuning(folder, init, {"label_fraction": fraction}, run_seed)
                        stages.append(Stage(name, folder, [train, evaluate], needs=needs, inputs=inputs,
                                            outputs=("metrics.json",),
                                            description=f"{task} from {start} on {_percent(fraction)} % of the "
                                                        f"training labels (seed {run_seed})",
                                            extra={"kind": "label_efficiency", "task": task, "start": start,
                                                   "fraction": fraction, "seed": run_seed}))
        protocols = spec.get("protocols")
        if protocols is not None:  # the same backbones judged frozen: a linear probe and kNN
            methods, chosen = _protocols(task, spec, protocols, starts)
            for start in chosen:
                init, needs, inputs = plan.start_of(start)
                for method in methods:
                    name = f"{task}_{start}_{method}"
                    folder = out / "card" / "protocols" / name
                    if method == "linear_probe":
                        train, evaluate, _ = plan.fine_tuning(folder, init, {"freeze_backbone": True})
                        commands = [train, evaluate]
                    else:  # knn: nothing trains; the training split's embeddings vote
                        where = {"datalist": datalist, "output_dir": folder, **common}
                        sizes = {k: v for k, v in {**down.get("overrides", {}), **spec.get("overrides", {})}.items()
                                 if k in KNN_SETTINGS}
                        commands = [BundleCommand("downstream", ("common.yaml", spec["config"], "knn.yaml"),
                                                  {**sizes, **_without(plan.scoring_overrides, EVALUATE_ONLY),
                                                   **where, **init})]
                    stages.append(Stage(name, folder, commands, needs=needs, inputs=inputs,
                                        outputs=("metrics.json",), description=f"{task}: {method} on {start}",
                                        extra={"kind": "protocol", "task": task, "start": start,
                                               "protocol": method}))
    mapping = preset.get("embedding_map")
    if mapping:
        datalist = Path(mapping["datalist"])
        if not datalist.is_file():
            raise FileNotFoundError(f"no datalist at {datalist} (embedding_map): point --data at a folder with it")
        for start in (s for s in starts if s in backbones):  # the pre-trained starts: a backbone file each
            folder = out / "embeddings" / start
            overrides = {"backbone_path": backbones[start], "datalist": datalist,
                         "section": mapping.get("section", "validation"), "output_dir": folder, **common}
            overrides.pop("seed", None)  # inference has no randomness (and no seed setting)
            stages.append(Stage(f"embed_{start}", folder, [BundleCommand("muscle_pretrain", ("inference.yaml",),
                                                                         overrides)],
                                needs=(start,), inputs=(datalist,), outputs=("embeddings.npz",),
                                description=f"{start} backbone embeds the {overrides['section']} images",
                                extra={"kind": "embedding", "start": start, "datalist": str(datalist),
                                       "section": overrides["section"],
                                       "color_by": mapping.get("color_by", "body_part")}))
    return stages
