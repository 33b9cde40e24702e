"""Multi-task continual learning (MUSCLE stage 2): one shared backbone trained on several supervised X-ray tasks in
turn, by a cyclic and reshuffled task schedule.

- :class:`TaskSchedule` says which task each iteration trains: rounds (the engine's epochs) of task *visits*, each
  visit ``steps`` iterations of one task; with ``reshuffle`` every round visits the tasks in a new order drawn from
  ``(seed, round)`` (MUSCLE's cyclic and reshuffled learning schedule), without it in the given order every round.
  The task of an iteration depends on the iteration number only, so a resumed run continues the schedule exactly.
- :class:`SupervisedTask` is one task: its network (a head on the shared backbone), loss, data and batch
  preparation.
- :class:`MultiTaskTrainer` runs the schedule: a MONAI ``SupervisedTrainer`` whose iteration draws the next batch of
  the scheduled task, and fires :attr:`TaskEvents.TASK_STARTED` at the first iteration of each visit (before the
  forward pass) so that handlers, e.g. :class:`~muscle_ext.handlers.CrossTaskMemorization`, can act on task switches.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import numpy as np
import torch
from monai.data.utils import set_rnd
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim.optimizer import Optimizer

from ..flags import as_flag
from .events import TaskEvents
from .trainer import StepTrainer

__all__ = ["MultiTaskTrainer", "SupervisedTask", "TaskSchedule", "task_loss"]

logger = logging.getLogger(__name__)

TASK = "task"


class TaskSchedule:
    """Rounds of task visits: which task each iteration of a multi-task run trains.

    Args:
        tasks: task names, the order of every round when ``reshuffle`` is off.
        steps: iterations per visit, one number for every task or ``{task: steps}``.
        reshuffle: draw a new task order for every round from ``(seed, round)``.
        seed: seed of the orders.
    """

    def __init__(self, tasks: Sequence[str], steps: int | Mapping[str, int], reshuffle: bool = True,
                 seed: int = 0) -> None:
        self.tasks = list(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct names, at least one; got {self.tasks}")
        if isinstance(steps, Mapping) and set(steps) != set(self.tasks):
            raise ValueError(f"steps name tasks {sorted(steps)}, the schedule has {sorted(self.tasks)}")
        self.steps = {t: int(steps[t] if isinstance(steps, Mapping) else steps) for t in self.tasks}
        if min(self.steps.values()) < 1:
            raise ValueError(f"every task needs at least one step per visit, got {self.steps}")
        self.reshuffle = as_flag(reshuffle, "reshuffle")
        self.seed = int(seed)

    @property
    def steps_per_round(self) -> int:
        return sum(self.steps.values())

    def order(self, round_index: int) -> list[str]:
        """The tasks of round ``round_index`` (0-based) in the order they are visited."""
        if not self.reshuffle:
            return list(self.tasks)
        rng = np.random.default_rng([self.seed, round_index])
        return [self.tasks[i] for i in rng.permutation(len(self.tasks))]

    def task_at(self, iteration: int) -> tuple[str, bool]:
        """``(task, first step of its visit)`` for the 0-based global ``iteration``."""
        task, step = self.visit_step(iteration)
        return task, step == 0

    def visit_step(self, iteration: int) -> tuple[str, int]:
        """``(task, 0-based step within its visit)`` for the 0-based global ``iteration``."""
        round_index, step = divmod(iteration, self.steps_per_round)
        for task in self.order(round_index):
            if step < self.steps[task]:
                return task, step
            step -= self.steps[task]
        raise AssertionError("unreachable: step is below steps_per_round")

    def __repr__(self) -> str:
        return (f"TaskSchedule(tasks={self.tasks}, steps={self.steps}, reshuffle={self.reshuffle}, "
                f"seed={self.seed})")


class SupervisedTask:
    """One task of a multi-task run.

    Args:
        network: the task model; every task's model holds the *same* backbone module.
        loss_function: ``loss_function(network(inputs), targets)``.
        data_loader: the task's training batches (re-iterated as often as its visits need).
        prepare_batch: ``(batch, device, non_blocking, **kwargs) -> (inputs, targets)``, MONAI's signature.
        weight: multiplies the task's loss.
    """

    def __init__(self, network: nn.Module, loss_function: Callable, data_loader: Iterable,
                 prepare_batch: Callable = default_prepare_batch, weight: float = 1.0) -> None:
        self.network = network
        self.loss_function = loss_function
        self.data_loader = data_loader
        self.prepare_batch = prepare_batch
        self.weight = float(weight)


def task_loss(output: Mapping[str, Any]) -> dict[str, float]:
    """``{"<task>_loss": value}`` from a :class:`MultiTaskTrainer` output: one loss curve per task (the
    ``output_transform`` of ``StatsHandler`` and the tracking handler). The loss includes the memorization penalty
    added before backward; that penalty is also given alone as ``memorization`` when a memorization handler ran."""
    losses = {f"{output[TASK]}_loss": float(output[Keys.LOSS])}
    if "memorization" in output:
        losses["memorization"] = float(output["memorization"])
    return losses


def _visit_seed(seed: int, round_index: int, task_index: int) -> int:
    return int(np.random.default_rng([seed, round_index, task_index]).integers(2**62))


class MultiTaskTrainer(StepTrainer):
    """Train ``tasks`` on their shared backbone by ``schedule``; one engine epoch = one round of the schedule.

    Each visit starts a new pass over its task's data loader, seeded from ``(seed, round, task)``: the loader's own
    ``generator`` (as the bundles' ``DataLoader(shuffle=True, generator=...)``; worker processes derive their seeds
    from it) and, without workers, the random transforms of its dataset. A run resumed at a round boundary (the
    bundles checkpoint every round) therefore draws the same batches in the same visits; a run resumed inside a visit
    skips the batches the visit had already drawn. ``engine.state.output``
    holds ``task``, ``loss`` (the task's weighted loss), ``pred`` and ``label``, so MONAI's handlers work as with
    ``SupervisedTrainer``. The backbone's batch-norm statistics are shared too: they follow the task being trained.

    Args:
        device, max_epochs (rounds), optimizer (over every task model's parameters, shared ones once),
        amp / amp_kwargs (autocast on the engine's device), train_handlers: as ``SupervisedTrainer``.
        tasks: ``{name: SupervisedTask}``, the names of ``schedule``.
        schedule: the :class:`TaskSchedule`.
        network: a module holding every task model, e.g. ``nn.ModuleDict`` of them (checkpoints, ``train()``).
        seed: seed of the visits' data order and augmentation.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, tasks: Mapping[str, SupervisedTask],
                 schedule: TaskSchedule, network: nn.Module, optimizer: Optimizer,
                 train_handlers: Sequence | None = None, amp: bool = False, amp_kwargs: dict | None = None,
                 seed: int = 0, non_blocking: bool = False, **kwargs: Any) -> None:
        if set(tasks) != set(schedule.tasks):
            raise ValueError(f"tasks {sorted(tasks)} and schedule tasks {sorted(schedule.tasks)} differ")
        for name, task in tasks.items():  # a visit of an empty loader would wait for a batch forever
            if isinstance(task.data_loader, Sized) and len(task.data_loader) == 0:
                raise ValueError(f"task {name}: its data loader yields no batch (fewer items than one batch with "
                                 "drop_last?)")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("MultiTaskTrainer steps the optimiser at every iteration: accumulation_steps must be 1")
        self.tasks = dict(tasks)
        self.schedule = schedule
        self.seed = int(seed)
        self._batches: Iterator = iter(())
        self._visit: tuple[int, str] | None = None
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=range(schedule.steps_per_round),
                         network=network, optimizer=optimizer, loss_function=None, train_handlers=train_handlers,
                         amp=amp, amp_kwargs=amp_kwargs, non_blocking=non_blocking, event_names=[TaskEvents],
                         decollate=False, **kwargs)

    def _start_visit(self, task_name: str, round_index: int) -> None:
        loader = self.tasks[task_name].data_loader
        seed = _visit_seed(self.seed, round_index, self.schedule.tasks.index(task_name))
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):  # data order; worker processes derive their seeds from it
            generator.manual_seed(seed)
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler: every rank draws its shard of the same order
            sampler.set_epoch(seed)
        if getattr(loader, "num_workers", 0) == 0 and hasattr(loader, "dataset"):  # augmentation in this process
            set_rnd(loader.dataset, seed % 2**32)
        self._batches = itertools.chain.from_iterable(itertools.repeat(loader))
        self._visit = (round_index, task_name)
        self.state.task = task_name
        logger.info(f"round {round_index + 1}: task {task_name} ({self.schedule.steps[task_name]} steps)")
        self.fire_event(TaskEvents.TASK_STARTED)

    def _iteration(self, engine: MultiTaskTrainer, batchdata: Any) -> dict:  # type: ignore[override]
        # batchdata is the step index within the round: the schedule, not the loader, decides the task
        if engine.state.epoch_length != engine.schedule.steps_per_round:  # e.g. resumed with other steps_per_visit
            raise ValueError(f"the run has rounds of {engine.state.epoch_length} iterations (from its checkpoint), "
                             f"the schedule {engine.schedule.steps_per_round}: resume with the same steps per visit")
        index = engine.state.iteration - 1
        task_name, first_step = engine.schedule.task_at(index)
        round_index = index // engine.schedule.steps_per_round
        if first_step or engine._visit != (round_index, task_name):  # also after a resume inside a visit
            engine._start_visit(task_name, round_index)
            for _ in range(engine.schedule.visit_step(index)[1]):  # resumed inside a visit: skip what it trained on
                next(engine._batches)
        task = engine.tasks[task_name]
        inputs, targets, *_ = task.prepare_batch(next(engine._batches), engine.state.device, engine.non_blocking,
                                                 **engine.to_kwargs)

        engine.network.train()
        # always None, never zeros: AdamW would otherwise keep moving (momentum, weight decay) the heads of the
        # tasks that are not being trained
        engine.optimizer.zero_grad(set_to_none=True)
        engine.state.output = {TASK: task_name}
        with engine.autocast():
            pred = task.network(inputs)
            engine.state.output[Keys.PRED] = pred
            engine.state.output[Keys.LABEL] = targets
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = task.weight * task.loss_function(pred, targets).mean()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = engine.state.output[Keys.LOSS]  # a LOSS_COMPLETED handler may have added its penalty
        engine.backward_and_step(loss)
        output = engine.state.output
        output[Keys.LOSS] = loss.detach()
        output[Keys.PRED] = output[Keys.PRED].detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
