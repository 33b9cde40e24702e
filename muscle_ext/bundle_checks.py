"""The first steps of every bundle run: a command line that would run wrong stops at once, with the fix.

``python -m monai.bundle run`` accepts any ``--id value``: an id that no config uses (``--epochs 1``; the id is
``num_epochs``) is added to the config and ignored, and the run goes on with the defaults. Every entry config's
``initialize`` list starts with two checks, which run before any data is read or any network built:

1. :func:`check_overrides` (it resolves nothing but ``output_dir``) refuses

   - an override id that the merged config files do not have (``unknown setting 'epochs' - did you mean
     'num_epochs'?``). Nested ids (``train#dataset#cache``) are checked level by level; a new key inside a component
     (a mapping with ``_target_``) is accepted when the component's callable takes it; ``--+key`` checks ``key``.
     ``--allow_unknown_settings true`` lets unknown ids through with a warning (advanced use: an id that only an
     expression of yours reads);
   - an id that was renamed (:data:`RENAMED`: ``--track`` -> ``--use_tracking``), also when a config file sets it;

2. :func:`check_run` refuses, all at once,

   - a mistyped value (:func:`muscle_ext.settings.setting_problems`, the kinds of ``typed_settings``);
   - a setting that the current combination ignores (:data:`COMBINATIONS`: ``--init_weights`` with
     ``init scratch``), and a weights file that ``init checkpoint``/``imagenet`` needs but that does not exist.

Both raise :class:`OverrideError` (a :class:`~muscle_ext.settings.SettingsError`), one line per problem.

The overrides are read from the process's command line as ``monai.bundle``'s CLI (python-fire) reads it, plus the
``--args_file`` it names; the known ids come from re-reading its ``--config_file`` list (and the metadata file) with
MONAI's ``ConfigParser``. A bundle run from Python (``monai.bundle.run(...)``) has no such command line, and its
keyword overrides are not visible to a config expression: there only the value checks run. ``--tracking`` itself
is an argument of ``monai.bundle run`` (MONAI's MLflow settings), read before any bundle code runs.

:func:`check_overrides` also installs :func:`install_error_hook`: an error of ours (bad data, a bad setting, a
missing file) anywhere in the exception chain is printed as one short block (what, which file or setting, the
override that fixes it) instead of MONAI's long "Failed to evaluate ConfigExpression" traceback, which goes to
``<output_dir>/error.log``.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .bundle_args import command_line, command_line_config, load_configs, monai_run_arguments, split_overrides
from .bundle_errors import RelayedError, install_error_hook, short_block
from .flags import as_flag
from .settings import SettingsError, setting_problems

__all__ = ["COMBINATIONS", "OPT_OUT", "RENAMED", "OverrideError", "Requires", "check_override_ids", "check_overrides",
           "check_run", "combination_problems", "command_line", "command_line_config", "install_error_hook",
           "known_ids", "missing_paths", "monai_run_arguments", "RelayedError", "short_block"]

logger = logging.getLogger(__name__)

OPT_OUT = "allow_unknown_settings"
"""``--allow_unknown_settings true``: ids that no config file has are let through (logged as a warning)."""

RENAMED: dict[str, str] = {"track": "use_tracking", "tracking": "use_tracking"}
"""Old id -> the one name every bundle now uses. An old id is refused wherever it is set (the command line, an
``--args_file``, an added config file), with the new name. (``--tracking`` on the command line itself belongs to
``monai.bundle run``: MONAI reads it as its own MLflow settings before any bundle code runs.)"""

# a name users type for a concept -> the ids bundles use for it (the first one the config has is suggested)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "epochs": ("num_epochs", "rounds"), "max_epochs": ("num_epochs", "rounds"), "num_epochs": ("rounds",),
    "warmup_epochs": ("warmup_rounds",), "lr": ("learning_rate",), "weights": ("init_weights", "backbone_path"),
}



class OverrideError(SettingsError):
    """Unknown, renamed or ignored settings on the command line (with the full list of problems)."""


# ---------------------------------------------------------------------------------------------------- known ids
def _walk(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    items = config.items() if isinstance(config, Mapping) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        id_ = f"{prefix}#{key}" if prefix else str(key)
        yield id_, value
        yield from _walk(value, id_)


def known_ids(config: Mapping) -> dict[str, Any]:
    """Every id of a (merged) config with its value: ``{"num_epochs": 30, "train#dataset#cache": "@cache", ...}``."""
    return dict(_walk(config))


def _parameters(target: Any) -> list[str] | None:
    """The argument names of a component's callable (``_target_``; ``None``: cannot tell, or it takes
    ``**kwargs``)."""
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return None
    try:
        import pydoc

        from monai.bundle.config_item import ComponentLocator

        module = ComponentLocator().get_component_module_name(target)
        module = module[0] if isinstance(module, list) else module
        fn = pydoc.locate(f"{module}.{target}" if module else target)
        params = inspect.signature(fn).parameters if fn is not None else None
    except (ValueError, TypeError, ImportError):
        return None
    if params is None or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n in params if n != "self"]


def _suggest(id_: str, ids: Mapping[str, Any], extra: Sequence[str] = ()) -> str | None:
    """The known id a mistyped ``id_`` most likely meant."""
    parent, _, leaf = id_.rpartition("#")
    siblings = [k.rpartition("#")[2] for k in ids if k.rpartition("#")[0] == parent] + list(extra)
    for name in SYNONYMS.get(leaf, ()):
        if name in siblings:
            return f"{parent}#{name}" if parent else name
    match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if match:
        return f"{parent}#{match[0]}" if parent else match[0]
    leaves: dict[str, str] = {}  # a nested id typed at another level: its last part, the shortest id ending in it
    for k in sorted(ids, key=len):
        leaves.setdefault(k.rpartition("#")[2], k)
    match = difflib.get_close_matches(leaf, [k for k in leaves if not k.isdigit()], n=1, cutoff=0.8)
    if match:
        return leaves[match[0]]
    others = [k for k in ids if not id_.startswith(f"{k}#")]  # not its own parent
    match = difflib.get_close_matches(id_, others, n=1, cutoff=0.75)
    return match[0] if match else None


def check_override_ids(overrides: Mapping[str, Any], config: Mapping, allow_unknown: bool = False) -> list[str]:
    """One line per override id that ``config`` (the merged config files) does not have, or that was renamed.

    ``overrides`` are config ids only (no ``monai.bundle run`` arguments). With ``allow_unknown`` unknown ids are
    only logged; renamed ids are refused either way.
    """
    ids = known_ids(config)
    problems, unknown = [], []
    for raw in overrides:
        id_ = raw[1:] if raw.startswith("+") else raw  # `--+key`: merge into `key`
        if id_ == OPT_OUT or id_ in ids:
            continue
        top = id_.split("#", 1)[0]
        if top in RENAMED and top not in ids:
            new = RENAMED[top] + id_[len(top):]
            value = overrides[raw]
            shown = str(value).lower() if isinstance(value, bool) else value
            problems.append(f"'{id_}' was renamed: use --{new} {shown}")
            continue
        parent = id_.rpartition("#")[0]
        parent_value = ids.get(parent) if parent else None
        extra: list[str] = []
        if isinstance(parent_value, Mapping) and "_target_" in parent_value:
            extra = _parameters(parent_value["_target_"])
            if extra is None or id_.rpartition("#")[2] in extra:
                continue  # an argument of the component's callable (which checks it when it is built)
        if parent and parent not in ids:
            missing = parent
            while "#" in missing and missing.rpartition("#")[0] not in ids:
                missing = missing.rpartition("#")[0]
            guess = _suggest(missing, ids)
            line = f"unknown setting '{id_}': the config has no '{missing}'"
            line += f" - did you mean '{guess}'?" if guess else ""
        else:
            guess = _suggest(id_, ids, extra)
            line = f"unknown setting '{id_}'" + (f" - did you mean '{guess}'?" if guess else "")
        unknown.append(line)
    if unknown and allow_unknown:
        logger.warning("--%s true: passing settings that no config file has:\n%s", OPT_OUT,
                       "\n".join(f"  {u}" for u in unknown))
    elif unknown:
        problems += unknown
    for top in RENAMED:  # set by an added config file or the args file
        if top in config and not any(k.lstrip("+").split("#", 1)[0] == top for k in overrides):
            problems.append(f"'{top}' (set in a config file) was renamed: set {RENAMED[top]} instead")
    return problems


# ------------------------------------------------------------------------------------------- combinations
@dataclass(frozen=True)
class Requires:
    """``setting``, when given, is read only if ``condition(values)``; ``needs`` says what makes it count, as typed.

    ``reads``: the settings ``condition`` looks at (the rule holds only where the typed settings have them all);
    ``workflows``: where the rule holds (``train``, ``evaluate``, ``inference``).
    """
    setting: str
    reads: tuple[str, ...]
    condition: Callable[[Mapping[str, Any]], bool]
    needs: str
    workflows: tuple[str, ...] = ("train", "evaluate", "inference")


def _flag(values: Mapping[str, Any], name: str) -> bool | None:
    try:
        return as_flag(values[name], name)
    except ValueError:
        return None  # mistyped: the type check reports it


COMBINATIONS: tuple[Requires, ...] = (
    Requires("init_weights", ("init",), lambda v: v["init"] in ("checkpoint", "imagenet"),
             "--init checkpoint (a muscle-backbone/1 file) or --init imagenet (a torchvision/timm ResNet state "
             "dict)"),
    Requires("backbone_path", ("init",), lambda v: v["init"] in ("checkpoint", "imagenet"),
             "--init checkpoint or --init imagenet", workflows=("evaluate",)),
    Requires("backbone_kwargs", ("init",), lambda v: v["init"] == "scratch",
             "--init scratch (a checkpoint brings its own backbone_kwargs, ImageNet weights imply the ImageNet stem)",
             workflows=("train",)),
    Requires("layer_decay", ("freeze_backbone",), lambda v: _flag(v, "freeze_backbone") is not True,
             "--freeze_backbone false (a frozen backbone does not train)", workflows=("train",)),
    Requires("flip_prob", ("task",), lambda v: v["task"] != "detection",
             "a classification, regression or segmentation task (detection augments without flips)",
             workflows=("train",)),
    Requires("weighting_temperature", ("dataset_weighting",), lambda v: v["dataset_weighting"] == "temperature",
             "--dataset_weighting temperature"),
    Requires("cache_dir", ("cache",), lambda v: v["cache"] == "disk", "--cache disk"),
    Requires("monitor_datalist", ("knn_monitor",), lambda v: as_flag(v["knn_monitor"], "knn_monitor"),
             "--knn_monitor true", workflows=("train",)),
    *(Requires(name, ("task_mixing",), lambda v: v["task_mixing"] == "cyclic",
               "--task_mixing cyclic (a joint step trains every task at once: no task order, no visits to remember "
               "across)", workflows=("train",))
      for name in ("reshuffle", "memorization_weight", "ewc_weight", "ewc_fisher_batches", "distillation_weight")),
    Requires("guardrail_margin", ("init_heads",), lambda v: bool(v["init_heads"]),
             "--init_heads <the earlier run's checkpoint> (the guardrails are the tasks it trained)",
             workflows=("train",)),
    Requires("init_heads", ("init",), lambda v: v["init"] == "checkpoint",
             "--init checkpoint (--init_weights: the backbone.pt of the same run the heads come from)",
             workflows=("train",)),
    Requires("init_heads", ("validate_every_visit",), lambda v: _flag(v, "validate_every_visit") is not False,
             "--validate_every_visit true (the guardrail table compares each task's score before training with its "
             "final one)", workflows=("train",)),
    *(Requires(name, ("ks",), lambda v: False,
               "adapt.yaml alone (adapt_curves.yaml sweeps --methods, --ks and --draws and writes no model)",
               workflows=("evaluate",))
      for name in ("method", "k", "draw")),
    Requires("input_dir", ("input_datalist",), lambda v: not v["input_datalist"],
             "no --input_datalist (a datalist names its own files)", workflows=("inference",)),
    Requires("input_section", ("input_datalist",), lambda v: bool(v["input_datalist"]),
             "--input_datalist <datalist.json> (a folder has no sections)", workflows=("inference",)),
)
"""Settings that a combination of other settings ignores. Given on the command line in that combination, the run
stops: the user asked for something the run would not do."""

NOT_MORE_THAN: tuple[tuple[str, str], ...] = (("warmup_epochs", "num_epochs"), ("warmup_rounds", "rounds"))
"""``(a, b)``: setting ``a`` may not exceed setting ``b`` (a warm-up longer than the training it warms up)."""

WEIGHTS_FILES = {"train": "init_weights", "evaluate": "backbone_path"}  # the file that init checkpoint/imagenet reads


def combination_problems(values: Mapping[str, Any], given: Sequence[str], workflow: str = "train") -> list[str]:
    """One line per given setting that the current combination ignores, and for a weights file that
    ``init checkpoint``/``init imagenet`` needs but that does not exist."""
    problems = []
    given = {g.lstrip("+") for g in given}
    for rule in COMBINATIONS:
        if rule.setting not in given or workflow not in rule.workflows or not all(r in values for r in rule.reads):
            continue
        try:
            if rule.condition(values):
                continue
        except (KeyError, TypeError):
            continue
        now = ", ".join(f"{r} {_typed(values[r])}" for r in rule.reads)
        problems.append(f"--{rule.setting} is ignored with {now}: it is read only with {rule.needs}; leave "
                        f"--{rule.setting} out, or switch to that")
    for short, long in NOT_MORE_THAN:
        if workflow != "train" or short not in values or long not in values:
            continue
        try:
            if float(values[short]) > float(values[long]):
                problems.append(f"--{short} {_typed(values[short])} is more than --{long} {_typed(values[long])}: "
                                f"the warm-up would outlast the training; lower --{short} (e.g. --{short} 0) or raise "
                                f"--{long}")
        except (TypeError, ValueError):
            continue  # mistyped: the type check reports it
    weights = WEIGHTS_FILES.get(workflow)
    if weights in values and values.get("init") in ("checkpoint", "imagenet"):
        path = values[weights]
        if not path or not os.path.isfile(str(path)):
            shown = "no file" if not path else f"'{path}', which does not exist"
            problems.append(f"init {values['init']} reads its weights from --{weights}, got {shown}; give the file "
                            f"as --{weights} <file>, or start from random weights with --init scratch")
    return problems


def _typed(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


# ---------------------------------------------------------------------------------------------------- the check
def _raise(source: str, problems: Sequence[str]) -> None:
    if not problems:
        return
    message = f"{source}: {len(problems)} problem(s) with the settings, nothing was run:\n" + "\n".join(
        f"  {p}" for p in problems)
    if any(p.startswith("unknown setting") for p in problems):
        message += (f"\n(a bundle reads only the ids in its config files: check the spelling; to pass an id "
                    f"that no config file has, add --{OPT_OUT} true)")
    raise OverrideError(message)  # printed once, by the error hook (and in error.log with the traceback)


def check_overrides(source: str, output_dir: str | os.PathLike | None = None,
                    argv: Sequence[str] | None = None) -> None:
    """The first entry of every entry config's ``initialize``: installs :func:`install_error_hook` and refuses
    override ids that no config file has (did you mean) or that were renamed. It reads no setting but
    ``output_dir``, so that nothing is resolved (no file read, no network built) before the ids are known good::

        initialize:
        - $muscle_ext.bundle_checks.check_overrides('downstream bundle', @output_dir)
        - $muscle_ext.bundle_checks.check_run('downstream bundle', @typed_settings, 'train')

    Args:
        source: named in the messages (the bundle).
        output_dir: where the error hook writes ``error.log`` (when the folder exists at the time of the error).
        argv: the command line (default ``sys.argv``); nothing is checked outside ``python -m monai.bundle run``.

    Raises:
        OverrideError: every unknown or renamed id, one line each.
    """
    from .handlers.privacy import install_input_summary_redaction

    install_error_hook(output_dir, source)
    # MONAI prints the run's arguments (data folders included) right after `initialize`: redact them
    install_input_summary_redaction()
    found = split_overrides(argv)
    if found is None:
        return
    given, overrides = found
    problems = []
    try:
        allow = as_flag(overrides.get(OPT_OUT, False), OPT_OUT)
    except ValueError as e:
        problems.append(str(e))
        allow = False
    problems += check_override_ids(overrides, load_configs(given), allow_unknown=allow)
    _raise(source, problems)


def check_run(source: str, typed_settings: Mapping[str, Sequence[Any]] | None = None, workflow: str = "train",
              argv: Sequence[str] | None = None) -> None:
    """The second entry of ``initialize`` (after :func:`check_overrides`): mistyped values and settings that the
    current combination ignores, all at once.

    Args:
        source: named in the messages (the bundle).
        typed_settings: ``{name: [value, kind]}`` (kinds: :mod:`muscle_ext.settings`); their values also feed the
            combination rules (:data:`COMBINATIONS`, :func:`combination_problems`).
        workflow: ``train``, ``evaluate`` or ``inference`` (which combination rules hold).
        argv: the command line (default ``sys.argv``): which settings were given.

    Raises:
        OverrideError: every mistyped or ignored setting, one line each.
    """
    typed_settings = dict(typed_settings or {})
    found = split_overrides(argv)
    given = list(found[1]) if found is not None else []
    values = {name: entry[0] for name, entry in typed_settings.items()
              if isinstance(entry, (list, tuple)) and len(entry) == 2}
    _raise(source, setting_problems(typed_settings, source) + combination_problems(values, given, workflow)
           + missing_paths(typed_settings, given, skip=(WEIGHTS_FILES.get(workflow),)))


def missing_paths(typed_settings: Mapping[str, Sequence[Any]], given: Sequence[str],
                  skip: Sequence[str | None] = ()) -> list[str]:
    """One line per ``path`` setting given on the command line that names nothing on disk (a default path may be
    missing on purpose: e.g. no kNN monitor without its datalist; a path the user typed may not)."""
    given = {g.lstrip("+") for g in given}
    problems = []
    for name, entry in typed_settings.items():
        if name in skip or name not in given or not isinstance(entry, (list, tuple)) or len(entry) != 2:
            continue
        value, kind = entry
        if str(kind).split()[0] == "path" and isinstance(value, (str, os.PathLike)) and value \
                and not os.path.exists(value):
            problems.append(f"--{name} '{value}' does not exist; give an existing file or folder")
    return problems
