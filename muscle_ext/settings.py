"""Typed settings of the bundles, checked before a run starts.

``python -m monai.bundle run`` reads each ``--name value`` with Python's literal syntax and keeps the text when that
fails: ``--class_names "[no-finding,pneumonia]"`` arrives as the *string* ``'[no-finding,pneumonia]'`` (``-`` is not
valid inside a bare name), ``--max_items null`` as the string ``'null'``, ``--amp false`` as ``'false'``. Such a
value used to reach the run: ``len('[no-finding,pneumonia]')`` made a 22-class head. Each bundle lists its typed
settings with their kind in ``typed_settings`` and calls :func:`check_settings` first thing in ``initialize``, so a
mistyped value stops the run before any data is read or any network is built, with a message that shows how to
type it.

Kinds (a string; ``" or null"`` at the end also accepts ``None``):

- ``int``, ``int >= 0``, ``int >= 1``, ``int > 0``: a whole number (not a bool, not ``2.0``), with an optional bound;
- ``number``, ``number > 0``, ``number >= 0``: an int or float, finite, with an optional bound;
- ``fraction``: a number from 0 to 1;
- ``share``: a number above 0, at most 1 (a part that cannot be empty, e.g. a label fraction);
- ``flag``: a yes/no value as :func:`muscle_ext.flags.as_flag` reads it (``true``/``false``, ``yes``/``no``, ...);
- ``names``: a non-empty list of distinct, non-empty strings (class names, task names);
- ``ints``: a non-empty list of whole numbers; ``list``: any list; ``dict``: a mapping;
- ``path``: a file or folder path (text; whether it exists is checked where it is needed);
- ``one of a|b|c``: one of these strings.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import operator
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .flags import as_flag

__all__ = ["SettingsError", "check_setting", "check_settings", "setting_problems"]

_BOUND = re.compile(r"^(int|number)\s*(?:(>=|>|<=|<)\s*(-?\d+(?:\.\d*)?(?:e-?\d+)?))?$")
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_NULL_WORDS = {"null", "none", "~"}

logger = logging.getLogger(__name__)


class SettingsError(ValueError):
    """Raised by :func:`check_settings` with every mistyped setting at once (one line each)."""


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if value is None:
        return "null (None)"
    if isinstance(value, bool):
        return f"{value} (a yes/no value)"
    return f"{value!r} (a {type(value).__name__})"


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number_text(value: Any) -> str | None:
    """The number a mistyped value stands for, as it should be typed ('30' for 30.0 or "'30'"), or None."""
    if isinstance(value, str):
        text = value.strip().strip("'\"").strip()
        try:
            value = float(text)
        except ValueError:
            return None
    if not _is_number(value) or not math.isfinite(value):
        return None
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _names_from(value: Any) -> list[str]:
    """The names a user meant: '[no-finding, pneumonia]' -> ['no-finding', 'pneumonia']."""
    if isinstance(value, str):
        parts = value.strip().strip("[]()").split(",")
    elif isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        parts = [str(value)]
    return [p.strip().strip("'\"").strip() for p in parts if p.strip().strip("'\"").strip()]


def _list_literal(items: Sequence[Any]) -> str:
    return "[" + ",".join(repr(i) for i in items) + "]"


def _check_number(name: str, value: Any, whole: bool, op: str | None, bound: float | None,
                  described: str) -> str | None:
    typed = _is_number(value) and math.isfinite(value) and (not whole or isinstance(value, numbers.Integral))
    if typed and (op is None or _OPS[op](value, bound)):
        return None
    if typed:  # the right type, out of range
        return f"{name} must be {described}, got {value!r}"
    fix = _number_text(value)
    if fix is not None and whole and "." in fix:
        fix = None
    if fix is not None and op is not None and not _OPS[op](float(fix), bound):
        fix = None
    if fix is None:  # nothing to salvage: show the syntax with an example that satisfies the bound
        step = 1 if whole else 0.001
        example = {">=": bound, ">": (bound or 0) + step, "<=": bound, "<": (bound or 0) - step}.get(op or "",
                                                                                                     10 * step)
        fix = str(int(example)) if whole or float(example).is_integer() else str(example)
        return f"{name} must be {described}, got {_shown(value)}; type a plain number, e.g. --{name} {fix}"
    return f"{name} must be {described}, got {_shown(value)}; type it as --{name} {fix}"


def check_setting(name: str, value: Any, kind: str) -> str | None:
    """The problem with one setting (``None`` when ``value`` is of ``kind``; kinds: see the module docstring).

    Returns one line that names the setting, what it must be, what arrived, and how to type it on the
    ``monai.bundle run`` command line.

    Raises:
        ValueError: for an unknown ``kind`` (a mistake in the config, not in the user's value).
    """
    kind = kind.strip()
    nullable = kind.endswith(" or null")
    base = kind[: -len(" or null")].strip() if nullable else kind
    or_null = " or null" if nullable else ""
    if value is None and nullable:
        return None
    if nullable and isinstance(value, str) and value.strip().lower() in _NULL_WORDS:
        # `--x None` means "no override" to monai.bundle run and `--x null` arrives as text: only leaving it out works
        return (f"{name} must be {_describe(base)}{or_null}, got {_shown(value)}; to keep null, leave --{name} out "
                f"(on the command line None means 'no change' and null arrives as text)")
    match = _BOUND.match(base)
    if match:
        op, bound = match.group(2), None if match.group(3) is None else float(match.group(3))
        return _check_number(name, value, match.group(1) == "int", op, bound, _describe(base) + or_null)
    if base == "share":  # a part of a whole that cannot be empty: (0, 1]
        return _check_number(name, value, False, ">", 0.0, _describe(base) + or_null) or (
            None if value <= 1 else f"{name} must be {_describe(base)}{or_null}, got {value!r}; type it as e.g. "
                                    f"--{name} 0.1")
    if base == "fraction":
        return _check_number(name, value, False, ">=", 0.0, _describe(base) + or_null) or (
            None if value <= 1 else f"{name} must be {_describe(base)}{or_null}, got {value!r}; type it as e.g. "
                                    f"--{name} 0.5")
    if base == "flag":
        try:
            as_flag(value, name)
            return None
        except ValueError:
            return f"{name} must be true or false, got {_shown(value)}; type it as --{name} true or --{name} false"
    if base == "names":
        if (isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value)
                and len(set(value)) == len(value)):
            return None
        names = _names_from(value)
        if isinstance(value, (list, tuple)) and len(set(map(str, value))) != len(value):
            return f"{name} must be {_describe(base)}{or_null}, got {value!r}: names repeat"
        fix = f"; type it as --{name} \"{_list_literal(names)}\"" if names else \
            f"; type it as e.g. --{name} \"['first','second']\""
        return f"{name} must be {_describe(base)}{or_null}, got {_shown(value)}{fix}"
    if base == "ints":
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, numbers.Integral) and not isinstance(
                v, bool) for v in value):
            return None
        parts = [_number_text(p) for p in _names_from(value)]
        fix = _list_literal([int(p) for p in parts]) if parts and all(p and "." not in p for p in parts) else "[2,3,4]"
        return f"{name} must be {_describe(base)}{or_null}, got {_shown(value)}; type it as --{name} \"{fix}\""
    if base == "list":
        if isinstance(value, (list, tuple)):
            return None
        return (f"{name} must be {_describe(base)}{or_null}, got {_shown(value)}; type it with quotes around each "
                f"text item, e.g. --{name} \"{_list_literal(_names_from(value) or ['a', 'b'])}\"")
    if base == "path":
        if isinstance(value, (str, os.PathLike)) and str(value).strip():
            return None
        return f"{name} must be {_describe(base)}{or_null}, got {_shown(value)}; type it as e.g. --{name} /data/file.pt"
    if base == "dict":
        if isinstance(value, Mapping):
            return None
        return (f"{name} must be {_describe(base)}{or_null}, got {_shown(value)}; type it with quoted keys, e.g. "
                f"--{name} \"{{'key': 1}}\"")
    if base.startswith("one of "):
        choices = [c.strip() for c in base[len("one of "):].split("|")]
        if isinstance(value, str) and value in choices:
            return None
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        fix = f"did you mean --{name} {close[0]}?" if close else f"type it as e.g. --{name} {choices[0]}"
        return f"{name} must be {_describe(base)}{or_null}, got {_shown(value)}; {fix}"
    raise ValueError(f"unknown kind {kind!r} for setting {name!r}")


def _describe(base: str) -> str:
    match = _BOUND.match(base)
    if match:
        what = "a whole number" if match.group(1) == "int" else "a number"
        return what if match.group(2) is None else f"{what} {match.group(2)} {match.group(3)}"
    if base.startswith("one of "):
        return "one of " + ", ".join(c.strip() for c in base[len("one of "):].split("|"))
    return {"fraction": "a number from 0 to 1", "share": "a number above 0, at most 1", "flag": "true or false",
            "names": "a list of distinct names",
            "ints": "a list of whole numbers", "list": "a list", "dict": "a mapping",
            "path": "a file or folder path"}.get(base, base)


def setting_problems(settings: Mapping[str, Sequence[Any]], source: str = "settings") -> list[str]:
    """One line per mistyped setting of ``settings`` (``{name: (value, kind)}``; see :func:`check_settings`).

    Raises:
        ValueError: for an entry that is not a (value, kind) pair or an unknown kind (a config mistake).
    """
    problems = []
    for name, entry in settings.items():
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], str):
            raise ValueError(f"{source}: typed setting {name!r} must be [value, kind], got {entry!r}")
        problem = check_setting(name, entry[0], entry[1])
        if problem:
            problems.append(problem)
    return problems


def check_settings(settings: Mapping[str, Sequence[Any]], source: str = "settings") -> None:
    """Check typed settings before a run, all at once.

    Args:
        settings: ``{name: (value, kind)}``, e.g. ``{"class_names": (["a", "b"], "names"), "batch_size": (32,
            "int >= 1")}``; in a bundle config ``typed_settings: {batch_size: ['@batch_size', int >= 1]}`` and
            ``initialize: ["$muscle_ext.settings.check_settings(@typed_settings)"]``.
        source: named in the error (e.g. the bundle).

    Raises:
        SettingsError: one line per mistyped setting, each showing how to type it on the command line.
        ValueError: for an entry that is not a (value, kind) pair or an unknown kind (a config mistake).
    """
    problems = setting_problems(settings, source)
    if problems:
        message = f"{source}: {len(problems)} setting(s) of the wrong type, nothing was run:\n" + "\n".join(
            f"  {p}" for p in problems)
        logger.error(message)  # in the run's log too, not only in the traceback that MONAI wraps around it
        raise SettingsError(message)
