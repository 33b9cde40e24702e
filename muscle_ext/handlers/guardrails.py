"""Guardrails for continual pre-training on a hospital's own data: when a team continues a MUSCLE backbone with its own
task, the tasks the backbone already learned stay in the schedule, and this table says what happened to each of them.

For each guardrail task: its validation score at the start (the earlier run's backbone with that run's head for the
task, :func:`~muscle_ext.engines.load_task_heads`, scored before any training step) and at the end of the run, the
change (signed so that positive is better, also for errors such as MAE), and whether it fell by more than ``margin``.
A fall beyond the margin is logged as a warning naming the task; nothing stops the run (the team decides).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from ..metrics.report import json_safe
from .visit_matrix import VisitMatrix

__all__ = ["Guardrails"]

logger = logging.getLogger(__name__)

FIELDS = ("task", "metric", "start", "final", "change", "margin", "fell")


class Guardrails:
    """Write ``<output_dir>/guardrails.csv`` and ``guardrails.json`` at the end of a finished run, from the scores
    of a :class:`~muscle_ext.handlers.VisitMatrix` (its ``initial`` row and its last row).

    Args:
        visit_matrix: the run's visit matrix; it must be enabled (it validates every task before training and after
            every visit).
        tasks: the guardrail tasks (e.g. those whose heads came from the earlier run); ``[]`` disables the handler.
        margin: largest fall tolerated, in the metric's unit (AUC, Dice, mAP; MAE in the labels' unit).
        output_dir: where the table goes.

    Raises:
        ValueError: a negative margin, a task the visit matrix does not validate, or (at ``attach``) a disabled
            visit matrix.
    """

    def __init__(self, visit_matrix: VisitMatrix, tasks: Sequence[str], margin: float = 0.02,
                 output_dir: str | os.PathLike = ".") -> None:
        if float(margin) < 0:
            raise ValueError(f"guardrail margin must be >= 0, got {margin}")
        unknown = [t for t in tasks if t not in visit_matrix.evaluators]
        if unknown:
            raise ValueError(f"guardrail tasks {unknown} are not validated by this run: "
                             f"{list(visit_matrix.evaluators)}")
        self.visit_matrix = visit_matrix
        self.tasks = list(tasks)
        self.margin = float(margin)
        self.output_dir = Path(output_dir)
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        if not self.tasks:
            return
        if not self.visit_matrix.enabled or not self.visit_matrix.initial_enabled:
            raise ValueError("guardrails compare each task's score before training with its final one: they need "
                             "validate_every_visit true")
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _completed(self, engine: Engine) -> None:
        if engine.state.iteration < engine.state.max_epochs * engine.state.epoch_length:
            return  # terminated early: no final scores
        self.rows = self.table()
        for row in self.rows:
            if row["fell"]:
                logger.warning(f"guardrail: task {row['task']} fell by {-row['change']:.4f} {row['metric']} "
                               f"({row['start']:.4f} -> {row['final']:.4f}), more than the margin {self.margin}")
        self.write()

    def table(self) -> list[dict[str, Any]]:
        """One row per guardrail task: ``task, metric, start, final, change`` (positive: better), ``margin``,
        ``fell`` (``change < -margin``; a score that is undefined, e.g. AUC on one class, never counts as a fall)."""
        matrix = self.visit_matrix
        if not matrix.rows or not matrix.initial:
            raise RuntimeError("the visit matrix has no initial or final scores yet")
        names = getattr(matrix, "metric_names", {})
        rows = []
        for task in self.tasks:
            metric = names.get(task, task)
            sign = -1.0 if metric in matrix.lower_is_better else 1.0
            start, final = float(matrix.initial[task]), float(matrix.rows[-1][task])
            change = sign * (final - start)
            rows.append({"task": task, "metric": metric, "start": start, "final": final, "change": change,
                         "margin": self.margin, "fell": bool(math.isfinite(change) and change < -self.margin)})
        return rows

    def write(self) -> None:
        if idist.get_rank() != 0:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "guardrails.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        payload = {"margin": self.margin, "tasks": self.rows, "fell": [r["task"] for r in self.rows if r["fell"]]}
        (self.output_dir / "guardrails.json").write_text(json.dumps(json_safe(payload), indent=1))
