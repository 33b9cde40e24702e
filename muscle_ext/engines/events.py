"""The events our engines fire beyond Ignite's and MONAI's (``IterationEvents``): handlers import them from here."""

from __future__ import annotations

from ignite.engine import EventEnum

__all__ = ["TaskEvents"]


class TaskEvents(EventEnum):
    """Fired by :class:`~muscle_ext.engines.MultiTaskTrainer`. ``TASK_STARTED``: the first iteration of a task visit,
    before its batch is drawn (``engine.state`` holds the task's name)."""

    TASK_STARTED = "task_started"
