"""What ``python -m monai.bundle run`` was given: its arguments, the config-id overrides among them, and the config
it is running (the files, the metadata and the overrides merged as MONAI merges them).

The command line is read as ``monai.bundle``'s CLI (python-fire) reads it, plus the ``--args_file`` it names. A
bundle run from Python (``monai.bundle.run(...)``) has no such command line: every function here then returns
``None``.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["command_line", "command_line_config", "load_configs", "monai_run_arguments", "split_overrides"]


def monai_run_arguments() -> frozenset[str]:
    """Arguments of ``monai.bundle run`` itself (``config_file``, ``logging_file``, ``tracking``, ``run_id``, ...),
    read from MONAI's signatures: these are not config ids."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run

    names = set()
    for fn in (run, create_workflow, ConfigWorkflow.__init__):
        names |= {n for n, p in inspect.signature(fn).parameters.items()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    return frozenset(names)


def _is_flag(token: str) -> bool:  # as python-fire tells a flag from a value (a negative number is a value)
    return token.startswith("--") or (len(token) > 1 and token[0] == "-" and token[1].isalpha())


def _parse_fire_value(text: str) -> Any:
    try:
        from fire.parser import DefaultParseValue
    except ImportError:  # fire is what runs `python -m monai.bundle`: without it there is no CLI to check
        return text
    return DefaultParseValue(text)


def _fire_keywords(tokens: Sequence[str]) -> dict[str, Any]:
    """``--key value``, ``--key=value`` and a bare ``--key`` (True; ``--nokey``: ``key`` False) as python-fire
    passes them to a function with ``**kwargs``; values parsed as fire parses them."""
    if "--" in tokens:  # fire's own flags follow the last separator
        tokens = tokens[:len(tokens) - 1 - list(tokens)[::-1].index("--")]
    out: dict[str, Any] = {}
    skip = False
    for index, token in enumerate(tokens):
        if skip:
            skip = False
            continue
        if not _is_flag(token):
            continue  # positional: run_id, init_id, ...
        stripped = token.lstrip("-")
        if "=" in stripped:
            key, value = stripped.split("=", 1)
        else:
            key, value = stripped, None
        key = key.replace("-", "_")
        if value is None:
            if index + 1 == len(tokens) or _is_flag(tokens[index + 1]):
                key, value = (key[2:], "False") if key.startswith("no") and len(key) > 2 else (key, "True")
            else:
                value, skip = tokens[index + 1], True
        out[key] = _parse_fire_value(value)
    return out


def command_line(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Everything given to ``python -m monai.bundle run`` (``--args_file`` content first, the command line over it),
    or ``None`` when this process is not such a run (a test calling a config, ``monai.bundle.run`` from Python)."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or argv[1] not in (
            "run", "run_workflow"):
        return None
    given = _fire_keywords(argv[2:])
    args_file = given.get("args_file")
    if args_file:
        from monai.bundle import ConfigParser

        return {**ConfigParser.load_config_file(args_file), **given}
    return given


def load_configs(run_args: Mapping[str, Any]) -> dict:
    """The merged config files (and metadata) that ``monai.bundle run`` reads, before overrides."""
    from monai.bundle import ConfigParser

    files = run_args.get("config_file")
    if not files:
        return {}
    if isinstance(files, str) and "," in files and not Path(files).is_file():
        files = files.split(",")
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    config = dict(ConfigParser.load_config_files(files))
    meta = run_args.get("meta_file") or Path(files[0]).parent / "metadata.json"
    try:
        config["_meta_"] = ConfigParser.load_config_files(meta)
    except (OSError, ValueError):
        pass  # MONAI reports a missing metadata file itself
    tracking = run_args.get("tracking")
    if tracking:  # `--tracking mlflow` / a settings file adds top-level ids that may then be overridden
        from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

        try:
            settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) if isinstance(tracking, str) else None
            settings = settings or ConfigParser.load_config_files(tracking)
            for key, value in settings.get("configs", {}).items():
                config.setdefault(key, value)
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    return config


def split_overrides(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(everything given to ``monai.bundle run``, the config-id overrides among it), or ``None`` (no such run)."""
    given = command_line(argv)
    if given is None:
        return None
    run_args = monai_run_arguments()
    return given, {k: v for k, v in given.items() if k not in run_args}


def command_line_config(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The config that ``python -m monai.bundle run`` is running: its config files and metadata (``_meta_``) with the
    command line's overrides applied, as MONAI merges them (raw: expressions stay text). ``None`` when this process
    is not such a run (a test calling a config, ``monai.bundle.run`` from Python): pass the config explicitly there.
    """
    found = split_overrides(argv)
    if found is None:
        return None
    given, overrides = found
    from monai.bundle import ConfigParser

    parser = ConfigParser(load_configs(given))
    parser.update(overrides)
    return parser.get()
