"""Pieces that make a killed run resume exactly where its last checkpoint left it."""

from __future__ import annotations

import logging
import random
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from ..settings import SettingsError

__all__ = ["KeyMetricState", "RNGStates", "ResumableCheckpoint", "ResumeDataPosition", "RunFinished",
           "checkpoint_file", "latest_checkpoint", "resume_checkpoint"]

_log = logging.getLogger(__name__)


def _load_cheaply(path: Path) -> Any:
    # mmap: only the pickled structure is read, not every weight; legacy (non-zip) files cannot be mmapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        if zipfile.is_zipfile(path):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _progress(state: Any) -> int | None:
    """Iterations completed according to an ignite engine ``state_dict`` (``iteration``, or ``epoch`` with
    ``epoch_length``, the two forms ``Engine.load_state_dict`` accepts), or ``None`` if it is not one."""
    if not isinstance(state, Mapping):
        return None
    if state.get("iteration") is not None:
        return int(state["iteration"])
    if state.get("epoch") is not None and state.get("epoch_length") is not None:
        return int(state["epoch"]) * int(state["epoch_length"])
    return None


def latest_checkpoint(folder: str | Path, prefix: str = "checkpoint", key: str = "trainer") -> str | None:
    """The checkpoint in ``folder`` (files ``<prefix>*.pt``, as ``CheckpointSaver`` names them) whose trainer state
    is the furthest along, or ``None`` if there is none: a config passes it to ``CheckpointLoader`` and disables the
    loader when it is ``None``.

    Files are compared by the trainer state stored inside them (``checkpoint[key]``, an ignite engine
    ``state_dict``: its ``iteration``, or ``epoch * epoch_length``), never by the number in their name: a finished
    run's ``checkpoint_final_iteration=20.pt`` counts iterations, a longer rerun's ``checkpoint_epoch=3.pt`` epochs.
    On a tie the more recently modified file wins. Each file is read with ``weights_only=True`` on the CPU and
    memory-mapped, so only its small pickled structure is read.

    A file that cannot be read (MONAI's ``CheckpointSaver`` writes in place, not atomically, so a run killed while
    saving, or a full disk, leaves a truncated file) or that holds no trainer state under ``key`` is skipped with
    a warning naming it; the previous checkpoint (``n_saved >= 2``) is used instead. Such files never raise.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates: list[tuple[int, int, str]] = []
    for path in sorted(folder.glob(f"{prefix}*.pt")):
        try:
            payload = _load_cheaply(path)
            mtime = path.stat().st_mtime_ns
        except Exception as exc:  # truncated, corrupt, not weights_only-loadable or gone: never resume from it
            _log.warning(f"skipping unreadable checkpoint {path.name} (interrupted while saving?): "
                         f"{type(exc).__name__}: {str(exc)[:200]}")
            continue
        # Ignite saves a lone object's state flat: then the file is the trainer's state itself
        iteration = (_progress(payload.get(key)) if key in payload else _progress(payload)) \
            if isinstance(payload, Mapping) else None
        del payload  # drop the memory map before the next file
        if iteration is None:
            _log.warning(f"skipping checkpoint {path.name}: it holds no trainer state under {key!r}")
            continue
        candidates.append((iteration, mtime, str(path)))
    return max(candidates)[2] if candidates else None


def checkpoint_file(path: str | Path | None, setting: str = "checkpoint") -> str | None:
    """``path`` itself when it is a file, the newest checkpoint (:func:`latest_checkpoint`) when it is a folder,
    ``None`` for ``None``/empty.

    Raises:
        FileNotFoundError: neither a file nor a folder with a checkpoint; the message names ``setting``.
    """
    if not path:
        return None
    if Path(path).is_file():
        return str(path)
    found = latest_checkpoint(path) if Path(path).is_dir() else None
    if found is None:
        raise FileNotFoundError(f"--{setting}: {path} is neither a checkpoint file nor a folder holding one "
                                "(checkpoint_<iteration>.pt)")
    return found


class RunFinished(SystemExit):
    """Raised by :func:`resume_checkpoint` when the run in ``ckpt_dir`` has trained its ``num_epochs`` already: the
    process ends with status 0 after saying so (a ``SystemExit``, so no traceback and no "Failed to evaluate")."""


def resume_checkpoint(folder: str | Path, num_epochs: int, setting: str = "num_epochs",
                      unit: str = "epoch") -> str | None:
    """The checkpoint a (re)run continues from: :func:`latest_checkpoint` of ``folder``, or ``None`` for a fresh run.

    A rerun into a finished output folder does not end silently: when the newest checkpoint has trained
    ``num_epochs`` epochs already, this logs ``training already finished at epoch 30 (checkpoint ...): nothing to
    do; to train longer, pass a larger --num_epochs ...`` and raises :class:`RunFinished` (exit status 0), before
    any data is read. A checkpoint further along than ``num_epochs`` (a shorter schedule than the one it was trained
    with) raises :class:`~muscle_ext.settings.SettingsError` naming both, where MONAI's ``CheckpointLoader`` would
    stop only after every data file was decoded. Otherwise the resume point is logged and its path returned.

    Args:
        folder: the checkpoint folder (``ckpt_dir``).
        num_epochs: the schedule's length this run asks for (``--num_epochs``).
        setting, unit: the override and what one step of the schedule is called, for the messages.
    """
    path = latest_checkpoint(folder)
    if path is None:
        return None
    payload = _load_cheaply(Path(path))
    state = payload.get("trainer", payload)  # as latest_checkpoint reads it (a lone trainer is saved flat)
    iteration = _progress(state)
    epoch_length = state.get("epoch_length") if isinstance(state, Mapping) else None
    del state, payload
    if not epoch_length:  # an engine state without its epoch length: let the loader decide
        return path
    done, num_epochs = int(iteration) // int(epoch_length), int(num_epochs)
    if done > num_epochs:
        raise SettingsError(
            f"the run in {folder} has trained {done} {unit}s (checkpoint {Path(path).name}); --{setting} {num_epochs} "
            f"is fewer: to train longer, pass --{setting} {done + 1} or more; for a new run, give another "
            f"--output_dir")
    if done == num_epochs:
        message = (f"training already finished at {unit} {done} (checkpoint {path}): nothing to do; to train longer, "
                   f"pass a larger --{setting} (e.g. --{setting} {2 * done}), or another --output_dir for a new run")
        _log.warning(message)
        raise RunFinished(0)
    mid = int(iteration) % int(epoch_length)
    where = f"{unit} {done + 1}, iteration {mid + 1}" if mid else f"{unit} {done + 1}"
    _log.info(f"resuming from {Path(path).name}: continuing with {where} of {num_epochs}")
    return path


def _on_cpu(value: Any, dtype: torch.dtype) -> torch.Tensor:
    # CheckpointLoader's map_location puts every tensor on the training device; RNG states are set from the CPU
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return tensor.detach().to(device="cpu", dtype=dtype)


class ResumableCheckpoint:
    """Keep the newest ``keep`` resumable training states in ``save_dir``, each written atomically.

    Ignite's ``Checkpoint`` with ``DiskSaver(atomic=True)``: a state is written to a temporary file and renamed,
    so a run killed while saving (or a full disk) leaves the previous state intact, and ``keep=1`` is safe (MONAI's
    ``CheckpointSaver`` writes in place, so it needed two). Files are ``checkpoint_<iteration>.pt``;
    :func:`latest_checkpoint` picks the furthest along by the trainer state inside, whatever the names.

    Args:
        save_dir: the folder (created when missing).
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler, trainer, ...).
        keep: how many states to keep (>= 1); older ones are deleted after a newer one is complete.
        interval: epochs (``epoch_level``) or iterations between saves. The run's last state is saved on
            ``COMPLETED`` as well, so a finished run can be extended from its end.
        epoch_level: save every ``interval`` epochs (True) or iterations (False).
    """

    def __init__(self, save_dir: str | Path, save_dict: Mapping[str, Any], keep: int = 1, interval: int = 1,
                 epoch_level: bool = True) -> None:
        if int(keep) < 1:
            raise ValueError(f"keep must be at least 1 (the state a killed run resumes from), got {keep}")
        if int(interval) < 1:
            raise ValueError(f"interval must be at least 1, got {interval}")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.keep = int(keep)
        self.interval = int(interval)
        self.epoch_level = bool(epoch_level)
        self.checkpoint: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        self.checkpoint = Checkpoint(
            self.save_dict, DiskSaver(self.save_dir, atomic=True, require_empty=False), n_saved=self.keep,
            global_step_transform=lambda e, _: e.state.iteration, filename_pattern="checkpoint_{global_step}.{ext}")
        every = Events.EPOCH_COMPLETED(every=self.interval) if self.epoch_level else \
            Events.ITERATION_COMPLETED(every=self.interval)
        engine.add_event_handler(every, self._save)
        engine.add_event_handler(Events.COMPLETED, self._save)

    def _save(self, engine: Engine) -> None:
        saved = self.checkpoint.last_checkpoint if self.checkpoint is not None else None
        if saved is not None and Path(str(saved)).name == f"checkpoint_{engine.state.iteration}.pt":
            return  # COMPLETED right after the interval's save: the same state
        self.checkpoint(engine)
        self._prune()

    def _prune(self) -> None:
        """Ignite counts only the files this run saved: states an interrupted earlier run left (the one this run
        resumed from) go too, once ``keep`` newer complete ones exist."""
        numbered = sorted(((int(m.group(1)), p) for p in self.save_dir.glob("checkpoint_*.pt")
                           if (m := re.fullmatch(r"checkpoint_(\d+)\.pt", p.name))), reverse=True)
        for _, path in numbered[self.keep:]:
            path.unlink(missing_ok=True)


class RNGStates:
    """Python, NumPy and torch RNG states as a checkpointable object (``state_dict``/``load_state_dict``).

    Stored as tensors and plain Python values only, so the checkpoint still loads with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
        """The current states: Python's and NumPy's global RNG, torch's CPU generator and, when CUDA is available,
        every CUDA device's generator."""
        version, mt_state, gauss = random.getstate()
        np_state = np.random.get_state()
        state = {
            "python": [version, torch.tensor(mt_state, dtype=torch.int64), gauss],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the states of :meth:`state_dict`, wherever the checkpoint loader mapped its tensors (CPU, or the
        training device through ``map_location``): they are copied to the CPU first.

        CUDA states are restored for as many devices as both the checkpoint and this machine have (a run resumed
        with fewer or more GPUs keeps the others' seeded states); without CUDA they are ignored.
        Raises ``KeyError`` if ``python``, ``numpy`` or ``torch`` is missing, and ``ValueError``/``RuntimeError``
        (from ``random``, NumPy or torch) if a state is malformed.
        """
        version, mt_state, gauss = state["python"]
        random.setstate((version, tuple(_on_cpu(mt_state, torch.int64).tolist()), gauss))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, _on_cpu(keys, torch.int64).numpy().astype(np.uint32), *rest))
        torch.set_rng_state(_on_cpu(state["torch"], torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            saved = [_on_cpu(s, torch.uint8) for s in state["cuda"]]
            count = torch.cuda.device_count()
            if len(saved) != count:
                _log.info(f"restoring the CUDA RNG states of {min(len(saved), count)} device(s): the checkpoint has "
                          f"{len(saved)}, this machine {count}")
            # set_rng_state_all sets device i for the i-th state: a device this machine lacks would raise
            torch.cuda.set_rng_state_all(saved[:count])


class ResumeDataPosition:
    """After a mid-epoch resume, make the sampler skip the draws the interrupted run had already trained on.

    Ignite resumes the iteration count mid-epoch but restarts the data loader from the epoch's first batch;
    with a :class:`~muscle_ext.data.PooledSampler` this handler moves the loader to the right batch instead.
    Attach it after the ``CheckpointLoader`` (both run on ``STARTED``). The sampler's epoch is set by MONAI's
    ``Workflow``, which calls ``set_epoch`` on every ``EPOCH_STARTED`` (the resumed epoch included).
    """

    def __init__(self, sampler: Any, batch_size: int) -> None:
        if not hasattr(sampler, "skip"):
            raise TypeError(f"{type(sampler).__name__} cannot skip draws; use muscle_ext.data.PooledSampler")
        self.sampler = sampler
        self.batch_size = int(batch_size)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch_length = engine.state.epoch_length
        done = engine.state.iteration % epoch_length if epoch_length else 0
        if done:
            self.sampler.skip(done * self.batch_size)
            engine.logger.info(f"resuming mid-epoch at iteration {engine.state.iteration}: skipping {done} batches")


class KeyMetricState:
    """A validator's best key metric and the best-model saver's record, as a checkpointable object.

    Put it in the trainer's checkpoint dict: after a resume the validator compares against the best metric of the
    interrupted run, and ``CheckpointSaver(save_key_metric=True)`` replaces the best model only with a better one
    (neither is part of an engine's own ``state_dict``). Plain numbers and strings only: loads with
    ``weights_only=True``.
    """

    def __init__(self, evaluator: Engine, saver: Any | None = None) -> None:
        self.evaluator = evaluator
        self.saver = saver

    def _checkpoint(self) -> Any:
        # MONAI's CheckpointSaver offers load_state_dict for its key-metric record but no state_dict
        return getattr(self.saver, "_key_metric_checkpoint", None) if self.saver is not None else None

    def state_dict(self) -> dict[str, Any]:
        """``{"best_metric", "best_metric_epoch", "saver"}``; both best values are ``None`` (not MONAI's ``-1``
        placeholders) while no validation has recorded a best epoch yet."""
        state = self.evaluator.state
        # ignite's record: {key: [(priority, filename), ...]} (the key is "_saved" in ignite 0.5)
        record = self._checkpoint().state_dict() if self._checkpoint() is not None else {}
        epoch = getattr(state, "best_metric_epoch", -1)
        validated = epoch is not None and int(epoch) >= 0
        return {"best_metric": float(state.best_metric) if validated else None,
                "best_metric_epoch": int(epoch) if validated else None,
                "saver": {k: [[float(p), str(f)] for p, f in v] for k, v in record.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # MONAI's workflows mark "no best yet" with -1 (files written before recorded -1 too)
        best, epoch = state_dict.get("best_metric"), state_dict.get("best_metric_epoch")
        self.evaluator.state.best_metric = -1 if best is None else float(best)
        self.evaluator.state.best_metric_epoch = -1 if epoch is None else int(epoch)
        if self._checkpoint() is not None and state_dict.get("saver"):
            self._checkpoint().load_state_dict({k: [tuple(i) for i in v] for k, v in state_dict["saver"].items()})
