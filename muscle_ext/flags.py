"""On/off settings as users type them: ``monai.bundle run`` passes ``--flag false`` through as the *string*
``"false"``, which Python counts as true. Every yes/no setting that changes what a run writes goes through
:func:`as_flag`."""

from __future__ import annotations

from typing import Any

__all__ = ["as_flag"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0", "none", "null", ""}


def as_flag(value: Any, name: str = "setting") -> bool:
    """``value`` as a bool: bools, ``None``, 0/1 and the strings true/false, yes/no, on/off, 1/0 (any case).

    Raises:
        ValueError: naming ``name``, for anything else (a typo must not switch a privacy setting on).
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")
