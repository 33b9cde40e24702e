"""Pieces that make a killed run resume exactly where its last checkpoint left it."""

from __future__ import annotations

import logging
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = ["KeyMetricState", "RNGStates", "ResumeDataPosition", "latest_checkpoint"]

_NUMBER = re.compile(r"=(\d+)\.pt$")


def _is_complete(path: Path) -> bool:
    # torch.save writes a zip whose central directory comes last: a write cut short by a kill has none.
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def latest_checkpoint(folder: str | Path, prefix: str = "checkpoint") -> str | None:
    """The newest complete checkpoint (highest iteration/epoch number) that ``CheckpointSaver`` wrote in ``folder``,
    or ``None``: a config passes it to ``CheckpointLoader`` and disables the loader when it is ``None``.

    MONAI's ``CheckpointSaver`` writes in place (not atomically), so a run killed while saving leaves a truncated
    file; it is skipped with a warning and the previous checkpoint (``n_saved >= 2``) is used.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.glob(f"{prefix}*.pt") if (m := _NUMBER.search(p.name))),
                   reverse=True)
    for _, path in found:
        if _is_complete(path):
            return str(path)
        logging.getLogger(__name__).warning(f"skipping incomplete checkpoint {path.name} (interrupted while saving)")
    return None


class RNGStates:
    """Python, NumPy and torch RNG states as a checkpointable object (``state_dict``/``load_state_dict``).

    Stored as tensors and plain Python values only, so the checkpoint still loads with ``weights_only=True``.
    """

    def state_dict(self) -> dict[str, Any]:
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
        version, mt_state, gauss = state["python"]
        random.setstate((version, tuple(int(v) for v in mt_state.tolist()), gauss))
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


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
        state = self.evaluator.state
        # ignite's record: {key: [(priority, filename), ...]} (the key is "_saved" in ignite 0.5)
        record = self._checkpoint().state_dict() if self._checkpoint() is not None else {}
        return {"best_metric": float(getattr(state, "best_metric", -1)),
                "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
                "saver": {k: [[float(p), str(f)] for p, f in v] for k, v in record.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        if self._checkpoint() is not None and state_dict.get("saver"):
            self._checkpoint().load_state_dict({k: [tuple(i) for i in v] for k, v in state_dict["saver"].items()})
