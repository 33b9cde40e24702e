"""Continual-learning metrics from the accuracy matrix ``R[visit, task]``: each task's validation score after every
task visit (row ``v`` = after visit ``v``), optionally with the scores before any training (``initial``).

Definitions (Lopez-Paz & Ranzato, NeurIPS 2017; Chaudhry et al., ECCV 2018; Avalanche's ``forgetting_bwt``), for a
schedule that may visit a task several times (MUSCLE's cyclic rounds):

- average score: the mean of the last row;
- backward transfer of task ``t``: its final score minus its score right after its own last visit (BWT < 0:
  forgotten); the last-visited task has none; BWT is the mean over the others;
- forgetting of task ``t``: the best score it reached after any visit before the final one minus its final score
  (>= 0 by construction when higher is better);
- forward transfer of task ``t``: its score right before its first visit minus its score before any training
  (``initial``): what the earlier tasks did for it before it was trained.

A visit may train several tasks at once (the joint multi-task baseline: every task in every visit): its entry in
``visits`` is then the sequence of those tasks, and each of them counts it as its own visit.

For metrics where lower is better (an error such as MAE) pass ``higher_is_better=False``: every difference is then
taken so that positive means better (BWT, FWT) or worse (forgetting) as above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["continual_metrics"]


def _nanmean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def continual_metrics(scores: Sequence[Sequence[float]], visits: Sequence[str | Sequence[str]], tasks: Sequence[str],
                      initial: Sequence[float] | None = None,
                      higher_is_better: bool | Mapping[str, bool] = True) -> dict:
    """Summaries of the accuracy matrix.

    Args:
        scores: ``R`` of shape ``(len(visits), len(tasks))``: row ``v`` holds every task's score after visit ``v``
            (NaN where a score is undefined).
        visits: the task trained at each visit, in order (a sequence of tasks for a visit that trains several).
        tasks: the column names.
        initial: every task's score before any training (same order as ``tasks``), for forward transfer.
        higher_is_better: one flag, or one per task.

    Returns:
        ``{"average": float, "bwt": float|None, "fwt": float|None, "mean_forgetting": float|None,
        "per_task": {task: {"final", "after_own_last_visit", "bwt", "forgetting", "fwt"}}}``.

    Raises:
        ValueError: a shape that does not match ``visits`` x ``tasks``, or a visited task that is not a column.
    """
    matrix = np.asarray(scores, dtype=float)
    tasks = list(tasks)
    if matrix.shape != (len(visits), len(tasks)):
        raise ValueError(f"scores have shape {matrix.shape}, expected (visits, tasks) = ({len(visits)}, {len(tasks)})")
    trained = [{v} if isinstance(v, str) else set(v) for v in visits]
    unknown = sorted(set().union(*trained) - set(tasks)) if trained else []
    if unknown:
        raise ValueError(f"visits name tasks {unknown} that are not columns {tasks}")
    signs = {t: 1.0 if (higher_is_better[t] if isinstance(higher_is_better, Mapping) else higher_is_better)
             else -1.0 for t in tasks}
    final_row = matrix[-1]
    per_task: dict[str, dict] = {}
    for j, task in enumerate(tasks):
        sign = signs[task]
        own = [v for v, names in enumerate(trained) if task in names]
        final = float(final_row[j])
        entry: dict = {"final": final, "after_own_last_visit": None, "bwt": None, "forgetting": None, "fwt": None}
        if own:
            last = own[-1]
            entry["after_own_last_visit"] = float(matrix[last, j])
            if last != len(visits) - 1:
                entry["bwt"] = sign * (final - float(matrix[last, j]))
            earlier = matrix[:-1, j]
            earlier = earlier[np.isfinite(earlier)]
            if earlier.size:
                best = earlier.max() if sign > 0 else earlier.min()
                entry["forgetting"] = sign * (float(best) - final)
            if initial is not None and own[0] > 0:
                entry["fwt"] = sign * (float(matrix[own[0] - 1, j]) - float(initial[j]))
        per_task[task] = entry
    return {
        "average": _nanmean([float(v) for v in final_row]),
        "bwt": _nanmean([e["bwt"] for e in per_task.values()]),
        "fwt": _nanmean([e["fwt"] for e in per_task.values()]),
        "mean_forgetting": _nanmean([e["forgetting"] for e in per_task.values()]),
        "per_task": per_task,
    }
