"""Every validation metric of every round, for judging forgetting in multi-task continual learning."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

__all__ = ["MetricHistory"]


class MetricHistory:
    """Record the metrics of one or more validators after each of their runs, keyed by the trainer's epoch (a
    validator run by MONAI's ``ValidationHandler`` ends at the trainer's epoch), and write them to ``path`` as JSON:
    ``{"rounds": {epoch: {metric: value}}, "summary": {metric: {"best", "best_round", "final", "forgetting"}}}``.
    ``forgetting`` is how much worse the final value is than the best: best minus final where higher is better (AUC,
    Dice), final minus best for the metrics named in ``lower_is_better`` (e.g. a regression task's MAE), whose best
    is their lowest value.

    Attach it to every validator (``attach``) and to the trainer (``attach_trainer``, writes at each epoch end and
    when training completes). Checkpointable (``state_dict`` / ``load_state_dict``, plain numbers), so that a resumed
    run keeps the rounds before the interruption.
    """

    def __init__(self, path: str | os.PathLike, lower_is_better: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.lower_is_better = set(lower_is_better)
        self.rounds: dict[int, dict[str, float]] = {}

    def attach(self, validator: Engine) -> None:
        validator.add_event_handler(Events.COMPLETED, self.record)

    def attach_trainer(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.write)
        trainer.add_event_handler(Events.COMPLETED, self.write)

    def record(self, validator: Engine) -> None:
        metrics = {k: float(v) for k, v in validator.state.metrics.items() if isinstance(v, (int, float))}
        self.rounds.setdefault(int(validator.state.epoch), {}).update(metrics)

    def summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        names = sorted({name for metrics in self.rounds.values() for name in metrics})
        for name in names:
            series = [(r, m[name]) for r, m in sorted(self.rounds.items()) if name in m and not math.isnan(m[name])]
            if not series:
                continue
            lower = name in self.lower_is_better
            best_round, best = (min if lower else max)(series, key=lambda rv: rv[1])
            final = series[-1][1]
            out[name] = {"best": best, "best_round": best_round, "final": final,
                         "forgetting": final - best if lower else best - final}
        return out

    def write(self, engine: Engine | None = None) -> Path:
        if idist.get_rank() != 0:  # data-parallel runs: every rank records the same scores, rank 0 writes them
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"rounds": {str(r): m for r, m in sorted(self.rounds.items())}, "summary": self.summary()}
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.path)
        return self.path

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {str(r): dict(m) for r, m in self.rounds.items()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.rounds = {int(r): {k: float(v) for k, v in m.items()} for r, m in state.items()}
