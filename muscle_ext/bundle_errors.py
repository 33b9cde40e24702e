"""Our errors as a short block: what went wrong, which file or setting, the fix, and where the full traceback is.

:func:`install_error_hook` (installed by :func:`muscle_ext.bundle_checks.check_overrides`, the first step of every
config's ``initialize``) prints an error of ours found anywhere in the exception chain (bad data, a bad setting, a
missing file) as a few lines instead of MONAI's long "Failed to evaluate ConfigExpression" traceback, which goes to
``<output_dir>/error.log``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from .settings import SettingsError

__all__ = ["MAX_BLOCK_LINES", "RelayedError", "install_error_hook", "short_block"]

MAX_BLOCK_LINES = 10  # message lines of the short error block; the rest is in the log file

# exception class name -> the fix as typed on the command line, unless the message names that override already
_HINTS = {
    "DatalistError": ("--on_bad_data", "fix or remove these files, or leave them out with --on_bad_data skip"),
    "XRayReadError": ("--on_bad_data", "fix or remove this file, or leave unreadable files out with --on_bad_data "
                                       "skip"),
    "FileNotFoundError": ("--", "check the path you gave (e.g. --dataset_dir, --datalist, --init_weights, "
                                "--model_dir)"),
}


class RelayedError(Exception):
    """An error of ours that a DataLoader worker raised: torch re-raises it in the main process as the outermost
    type with the worker's formatted traceback as its message (MONAI's transform wrapper makes that a
    ``RuntimeError``), so only the name and the message survive. ``kind`` is the original type's name."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


_OURS = ("SettingsError", "OverrideError", "ModelSettingsError", "DatalistError", "XRayReadError")
# "<module>.XRayReadError: <message>" up to the next exception of the formatted chain, in a worker's traceback text
_NAMES = "|".join((*_OURS, "FileNotFoundError"))
_RELAYED = re.compile(rf"^(?:[\w.]+\.)?({_NAMES}): (.*?)(?=\n\n(?:The above exception|During handling)|\Z)",
                      re.MULTILINE | re.DOTALL)


def _relayed(error: BaseException) -> list[RelayedError]:
    text = str(error)
    if "Original Traceback" not in text:  # torch.utils.data's ExceptionWrapper.reraise
        return []
    return [RelayedError(m.group(1), m.group(2).strip()) for m in _RELAYED.finditer(text)]


def _user_error(exc: BaseException | None) -> BaseException | None:
    """Our error in ``exc``'s chain (``__cause__``/``__context__``), also one that a DataLoader worker raised
    (:class:`RelayedError`): the outermost of our own types, else the outermost ``FileNotFoundError``; ``None``
    when there is neither."""
    from .data.datalist import DatalistError
    from .data.pixels import XRayReadError

    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        chain.extend(_relayed(exc))
        exc = exc.__cause__ or exc.__context__
    for kinds, names in (((SettingsError, DatalistError, XRayReadError), _OURS),
                         ((FileNotFoundError,), ("FileNotFoundError",))):
        for error in chain:
            if isinstance(error, kinds) or getattr(error, "kind", None) in names:
                return error
    return None


def _log_path(output_dir: str | os.PathLike | None, error: BaseException) -> Path | None:
    """``<output_dir>/error.log`` when the folder exists (a refused run leaves no new folder behind); else a file
    in the temp folder, or none for a settings error (nothing ran: the message is all there is)."""
    rank = os.environ.get("RANK", "0")
    name = "error.log" if rank in ("", "0") else f"error.rank{rank}.log"
    if output_dir and os.path.isdir(output_dir):
        return Path(output_dir) / name
    if isinstance(error, SettingsError):
        return None
    return Path(tempfile.gettempdir()) / f"muscle_bundle_{os.getpid()}_{name}"


def short_block(error: BaseException, log_file: str | os.PathLike | None) -> str:
    """What went wrong, which file or setting, the fix, and where the full traceback is: a few lines."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    if len(lines) > MAX_BLOCK_LINES:  # the head and the last line (our messages end with the fix)
        hidden = len(lines) - MAX_BLOCK_LINES + 1
        lines = [*lines[:MAX_BLOCK_LINES - 2], f"  ... and {hidden} more lines (all in the log file)", lines[-1]]
    kind = getattr(error, "kind", type(error).__name__)  # a RelayedError names the worker's error
    marker, hint = _HINTS.get(kind, ("", None))
    if hint and marker in "\n".join(lines):
        hint = None  # the message names the override already
    block = [f"{kind}: {lines[0]}", *lines[1:]]
    if hint:
        block.append(f"Fix: {hint}")
    if log_file:
        block.append(f"(full traceback: {log_file})")
    return "\n".join(block)


def install_error_hook(output_dir: str | os.PathLike | None = None, source: str = "bundle") -> None:
    """Print our errors as a short block on stderr and write the full traceback to ``<output_dir>/error.log``.

    Recognised anywhere in the exception chain: :class:`~muscle_ext.settings.SettingsError` (and
    :class:`OverrideError`), :class:`~muscle_ext.data.DatalistError`, :class:`~muscle_ext.data.XRayReadError`,
    ``FileNotFoundError``. Other exceptions keep Python's traceback. The process exits with status 1 either way.
    """
    previous = sys.excepthook
    if getattr(previous, "_muscle_hook", False):
        previous = previous._previous  # installed before (another workflow in this process): replace it

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        error = _user_error(exc)
        if error is None:
            previous(exc_type, exc, tb)
            return
        log_file = _log_path(output_dir, error)
        try:
            if log_file is not None:
                log_file.write_text(f"{source}\n" + "".join(traceback.format_exception(exc_type, exc, tb)))
        except OSError:
            log_file = None
        print(short_block(error, log_file), file=sys.stderr, flush=True)

    hook._muscle_hook = True  # type: ignore[attr-defined]
    hook._previous = previous  # type: ignore[attr-defined]
    sys.excepthook = hook
