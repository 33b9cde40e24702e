"""The accuracy matrix of a multi-task continual run, ``R[visit, task]``: every task's validation score after every
task visit, with the continual-learning summaries of :func:`muscle_ext.metrics.continual.continual_metrics`
(average score, backward and forward transfer, forgetting), written as CSV, JSON and a heat map."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from ..engines.continual import JOINT
from ..engines.events import TaskEvents
from ..metrics.continual import continual_metrics

__all__ = ["VisitMatrix"]

logger = logging.getLogger(__name__)


class VisitMatrix:
    """Validate every task at the end of every task visit of a :class:`~muscle_ext.engines.MultiTaskTrainer` (and
    once before training, for forward transfer) and keep the scores as ``R[visit, task]``.

    Replaces a per-round validation (it also validates at each round's end, the end of its last visit), so each
    evaluator's own handlers (metric history, MLflow) still see the end-of-round scores last. Files, rewritten after
    every visit: ``<output_dir>/forgetting_matrix.csv`` (one row per visit: visit, round, task trained, one column per
    task's key metric), ``forgetting.json`` (the matrix and its summaries) and ``forgetting_matrix.png``.
    Checkpointable (``state_dict``/``load_state_dict``, plain numbers): a resumed run keeps the earlier rows.

    The backbone's batch-norm running statistics are shared by the tasks and follow the task trained last: every
    score is measured with those statistics, as the exported backbone would be used.

    Args:
        evaluators: ``{task: evaluator}``; each evaluator's key metric is its score.
        output_dir: where the files go.
        lower_is_better: key-metric names where lower is better (e.g. a regression task's MAE).
        initial: also validate before the first visit (the row ``initial`` of the JSON).
        enabled: ``False`` makes ``attach`` a no-op (the run validates per round instead); the object still takes
            part in checkpoints.
    """

    def __init__(self, evaluators: Mapping[str, Engine], output_dir: str | os.PathLike,
                 lower_is_better: Sequence[str] = (), initial: bool = True, enabled: bool = True) -> None:
        self.evaluators = dict(evaluators)
        self.output_dir = Path(output_dir)
        self.lower_is_better = set(lower_is_better)
        self.initial_enabled = bool(initial)
        self.enabled = bool(enabled)
        self.rows: list[dict[str, Any]] = []
        self.initial: dict[str, float] = {}
        self._last_iteration = -1  # the iteration at which the matrix was last extended

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self._before_training)
        engine.add_event_handler(TaskEvents.TASK_STARTED, self._visit_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._round_completed)

    # ---- when
    def _before_training(self, engine: Engine) -> None:
        if self.initial_enabled and engine.state.iteration == 0 and not self.initial:
            self.initial = self._scores(round_index=1)[1]  # round 1's entries are replaced at its end

    def _visit_started(self, engine: Engine) -> None:
        iteration = engine.state.iteration  # the new visit's first iteration (1-based): the previous one ended before
        task, step = engine.schedule.visit_step(iteration - 1)
        if step != 0 or iteration == 1 or self._last_iteration == iteration - 1:
            return  # resumed inside a visit, the run's first visit, or the round's end already measured it
        self._record(engine, iteration - 1)

    def _round_completed(self, engine: Engine) -> None:
        if self._last_iteration != engine.state.iteration:
            self._record(engine, engine.state.iteration)

    # ---- what
    def _scores(self, round_index: int) -> tuple[dict[str, str], dict[str, float]]:
        """Run every evaluator as of round ``round_index`` (their handlers key results by the trainer's round: the
        end-of-round validation, the last one of a round, is what they keep)."""
        names, scores = {}, {}
        for task, evaluator in self.evaluators.items():
            evaluator.run(max(int(round_index), 1))
            name = evaluator.state.key_metric_name
            names[task] = name
            value = evaluator.state.metrics.get(name, float("nan"))
            scores[task] = float(value) if value is not None else float("nan")
        return names, scores

    def _record(self, engine: Engine, iteration: int) -> None:
        trained, _ = engine.schedule.visit_step(iteration - 1)
        names, scores = self._scores(round_index=engine.state.epoch)
        self.metric_names = names
        self.rows.append({"visit": len(self.rows) + 1, "round": (iteration - 1) // engine.schedule.steps_per_round + 1,
                          "task": trained, "iteration": int(iteration), **scores})
        self._last_iteration = iteration
        logger.info("after visit %d (%s): %s", len(self.rows), trained,
                    ", ".join(f"{t} {v:.4f}" for t, v in scores.items()))
        self.write()

    def summary(self) -> dict:
        """:func:`~muscle_ext.metrics.continual.continual_metrics` of the rows so far (``{}`` before the first)."""
        if not self.rows:
            return {}
        tasks = list(self.evaluators)
        names = getattr(self, "metric_names", {})
        higher = {t: names.get(t) not in self.lower_is_better for t in tasks}
        initial = [self.initial.get(t, math.nan) for t in tasks] if self.initial else None
        visits = [tasks if row["task"] == JOINT else row["task"] for row in self.rows]  # a joint visit trains all
        return continual_metrics([[row[t] for t in tasks] for row in self.rows], visits,
                                 tasks, initial=initial, higher_is_better=higher)

    def write(self) -> None:
        from ..metrics.report import json_safe

        if idist.get_rank() != 0:  # data-parallel runs: every rank has the same matrix, rank 0 writes it
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tasks = list(self.evaluators)
        with open(self.output_dir / "forgetting_matrix.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["visit", "round", "task", "iteration", *tasks])
            writer.writeheader()
            writer.writerows(self.rows)
        payload = {"tasks": tasks, "metrics": getattr(self, "metric_names", {}), "initial": self.initial,
                   "visits": self.rows, "summary": self.summary()}
        (self.output_dir / "forgetting.json").write_text(json.dumps(json_safe(payload), indent=1))
        self._plot(tasks)

    def _plot(self, tasks: list[str]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        matrix = np.array([[row[t] for t in tasks] for row in self.rows], dtype=float)
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(tasks), 1.2 + 0.32 * len(self.rows)))
        image = ax.imshow(matrix, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yticks(range(len(self.rows)), [f"{r['visit']}: {r['task']}" for r in self.rows])
        ax.set_xlabel("task validated")
        ax.set_ylabel("after visit (task trained)")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if np.isnan(value) or value < np.nanmean(matrix) else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
        fig.tight_layout()
        fig.savefig(self.output_dir / "forgetting_matrix.png", dpi=110)
        plt.close(fig)

    # ---- resume
    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "initial": dict(self.initial),
                "last_iteration": int(self._last_iteration), "metric_names": dict(getattr(self, "metric_names", {}))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]
        self.initial = dict(state["initial"])
        self._last_iteration = int(state["last_iteration"])
        self.metric_names = dict(state.get("metric_names", {}))
