"""Multi-task continual learning (MUSCLE stage 2): one shared backbone trained on several supervised X-ray tasks in
turn, by a cyclic and reshuffled task schedule.

- :class:`TaskSchedule` says which task each iteration trains: rounds (the engine's epochs) of task *visits*, each
  visit ``steps`` iterations of one task; with ``reshuffle`` every round visits the tasks in a new order drawn from
  ``(seed, round)`` (MUSCLE's cyclic and reshuffled learning schedule), without it in the given order every round.
  The task of an iteration depends on the iteration number only, so a resumed run continues the schedule exactly.
- :class:`JointSchedule` is the joint multi-task baseline: every iteration trains every task at once (the sum of
  their losses), with the same batches per task and round as the cyclic schedule; each round is one "visit" of all
  tasks, named :data:`JOINT`.
- :class:`SupervisedTask` is one task: its network (a head on the shared backbone), loss, data and batch
  preparation; :class:`DetectionTask` one whose network is a detector (list batches, the detector's own losses).
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
from .detection import DetectionLoss, DetectionPrepareBatch, plain_images
from .events import TaskEvents
from .trainer import StepTrainer

__all__ = ["JOINT", "MIXINGS", "DetectionTask", "JointSchedule", "MultiTaskTrainer", "SupervisedTask", "TaskSchedule",
           "task_loss", "task_schedule"]

logger = logging.getLogger(__name__)

TASK = "task"
TASK_LOSSES = "task_losses"
JOINT = "joint"  # the visit name of a joint round: every task at once


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

    def visit_tasks(self, visit: str) -> list[str]:
        """The tasks a visit trains: the visited task itself."""
        return [visit]

    def tasks_at(self, iteration: int) -> list[str]:
        """The tasks trained at the 0-based global ``iteration``: one."""
        return [self.visit_step(iteration)[0]]

    def __repr__(self) -> str:
        return (f"TaskSchedule(tasks={self.tasks}, steps={self.steps}, reshuffle={self.reshuffle}, "
                f"seed={self.seed})")


class JointSchedule(TaskSchedule):
    """The joint multi-task baseline: every iteration trains all tasks together (one batch of each, the sum of their
    weighted losses, one optimiser step).

    A round is ``max(steps)`` iterations, and task ``t`` takes part in the first ``steps[t]`` of them: each task
    trains on exactly as many batches per round as in a :class:`TaskSchedule` with the same ``steps``, in fewer
    optimiser steps of larger mixed batches (the same data budget). A round is one visit, named :data:`JOINT`.

    Args: as :class:`TaskSchedule`; ``reshuffle`` must be off (there is no order to reshuffle).
    """

    def __init__(self, tasks: Sequence[str], steps: int | Mapping[str, int], reshuffle: bool = False,
                 seed: int = 0) -> None:
        super().__init__(tasks, steps, reshuffle=False, seed=seed)
        if as_flag(reshuffle, "reshuffle"):
            raise ValueError("the joint schedule trains every task at every step: there is no task order to "
                             "reshuffle; set reshuffle false")

    @property
    def steps_per_round(self) -> int:
        return max(self.steps.values())

    def order(self, round_index: int) -> list[str]:
        return [JOINT]

    def visit_step(self, iteration: int) -> tuple[str, int]:
        return JOINT, iteration % self.steps_per_round

    def visit_tasks(self, visit: str) -> list[str]:
        return list(self.tasks)

    def tasks_at(self, iteration: int) -> list[str]:
        step = iteration % self.steps_per_round
        return [t for t in self.tasks if step < self.steps[t]]

    def __repr__(self) -> str:
        return f"JointSchedule(tasks={self.tasks}, steps={self.steps}, seed={self.seed})"


MIXINGS = ("cyclic", "joint")


def task_schedule(mixing: str, tasks: Sequence[str], steps: int | Mapping[str, int], reshuffle: bool = True,
                  seed: int = 0) -> TaskSchedule:
    """The schedule a continual bundle's ``task_mixing`` names: ``cyclic`` (one task per visit, MUSCLE and MUSCLE--)
    or ``joint`` (every task in every step, the multi-task baseline; ``reshuffle`` is not read).

    Raises:
        ValueError: an unknown ``mixing``.
    """
    if mixing == "cyclic":
        return TaskSchedule(tasks, steps, reshuffle=reshuffle, seed=seed)
    if mixing == "joint":
        return JointSchedule(tasks, steps, seed=seed)
    raise ValueError(f"task_mixing must be one of {', '.join(MIXINGS)}, got {mixing!r}")


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

    def forward_loss(self, inputs: Any, targets: Any) -> tuple[Any, torch.Tensor]:
        """``(prediction, weighted loss)`` of one training batch (the network in its current mode)."""
        pred = self.network(inputs)
        return pred, self.weight * self.loss_function(pred, targets).mean()


class DetectionTask(SupervisedTask):
    """A detection task: ``network`` is a MONAI ``RetinaNetDetector`` (e.g.
    :func:`~muscle_ext.networks.build_retinanet_detector` on the shared backbone) that takes a list of images and a
    list of target dicts and returns its classification and box-regression losses in train mode. Batches are lists
    of item dicts (``collate_fn=no_collation``); the prediction kept in the trainer's output is the loss pair
    ``{"loss_cls", "loss_box"}``.

    Args: as :class:`SupervisedTask`; ``loss_function`` maps the detector's loss dict to one loss
    (:class:`~muscle_ext.engines.detection.DetectionLoss` by default), ``prepare_batch`` is
    :class:`~muscle_ext.engines.detection.DetectionPrepareBatch` by default.
    """

    def __init__(self, network: nn.Module, data_loader: Iterable, loss_function: Callable | None = None,
                 prepare_batch: Callable | None = None, weight: float = 1.0) -> None:
        super().__init__(network, DetectionLoss() if loss_function is None else loss_function, data_loader,
                         DetectionPrepareBatch() if prepare_batch is None else prepare_batch, weight)

    def forward_loss(self, inputs: Any, targets: Any) -> tuple[Any, torch.Tensor]:
        if targets is None:
            raise ValueError("detection training items need boxes and labels")
        losses = self.network(plain_images(inputs), targets)
        pred = {"loss_cls": losses[self.network.cls_key].float(), "loss_box": losses[self.network.box_reg_key].float()}
        return pred, self.weight * self.loss_function(losses).float()


def task_loss(output: Mapping[str, Any]) -> dict[str, float]:
    """``{"<task>_loss": value}`` from a :class:`MultiTaskTrainer` output: one loss curve per task (the
    ``output_transform`` of ``StatsHandler`` and the tracking handler); a joint step gives every task's loss and
    their sum as ``joint_loss``. The loss includes the memorization penalty added before backward; that penalty is
    also given alone as ``memorization`` when a memorization handler ran."""
    losses = {f"{output[TASK]}_loss": float(output[Keys.LOSS])}
    if output[TASK] == JOINT:
        losses.update({f"{task}_loss": float(value) for task, value in output[TASK_LOSSES].items()})
    if "memorization" in output:
        losses["memorization"] = float(output["memorization"])
    return losses


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


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

    def _start_visit(self, visit: str, round_index: int) -> None:
        self._batches = {}
        for task_name in self.schedule.visit_tasks(visit):
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
            self._batches[task_name] = itertools.chain.from_iterable(itertools.repeat(loader))
        self._visit = (round_index, visit)
        self.state.task = visit
        steps = self.schedule.steps_per_round if visit == JOINT else self.schedule.steps[visit]
        logger.info(f"round {round_index + 1}: task {visit} ({steps} steps)")
        self.fire_event(TaskEvents.TASK_STARTED)

    def _iteration(self, engine: MultiTaskTrainer, batchdata: Any) -> dict:  # type: ignore[override]
        # batchdata is the step index within the round: the schedule, not the loader, decides the task
        if engine.state.epoch_length != engine.schedule.steps_per_round:  # e.g. resumed with other steps_per_visit
            raise ValueError(f"the run has rounds of {engine.state.epoch_length} iterations (from its checkpoint), "
                             f"the schedule {engine.schedule.steps_per_round}: resume with the same steps per visit")
        index = engine.state.iteration - 1
        visit, step = engine.schedule.visit_step(index)
        round_index = index // engine.schedule.steps_per_round
        if step == 0 or engine._visit != (round_index, visit):  # also after a resume inside a visit
            engine._start_visit(visit, round_index)
            for name, batches in engine._batches.items():  # resumed inside a visit: skip what it trained on
                for _ in range(min(step, engine.schedule.steps[name])):
                    next(batches)
        names = engine.schedule.tasks_at(index)
        batches = {}
        for name in names:
            task = engine.tasks[name]
            batches[name] = task.prepare_batch(next(engine._batches[name]), engine.state.device, engine.non_blocking,
                                               **engine.to_kwargs)[:2]

        engine.network.train()
        # always None, never zeros: AdamW would otherwise keep moving (momentum, weight decay) the heads of the
        # tasks that are not being trained
        engine.optimizer.zero_grad(set_to_none=True)
        engine.state.output = {TASK: visit}
        with engine.autocast():
            preds, losses = {}, {}
            for name, (inputs, targets) in batches.items():
                preds[name], losses[name] = engine.tasks[name].forward_loss(inputs, targets)
            if visit == JOINT:
                engine.state.output[Keys.PRED] = preds
                engine.state.output[Keys.LABEL] = {name: batch[1] for name, batch in batches.items()}
                engine.state.output[TASK_LOSSES] = {name: loss.detach() for name, loss in losses.items()}
            else:
                engine.state.output[Keys.PRED] = preds[visit]
                engine.state.output[Keys.LABEL] = batches[visit][1]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = sum(losses.values())
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = engine.state.output[Keys.LOSS]  # a LOSS_COMPLETED handler may have added its penalty
        engine.backward_and_step(loss)
        output = engine.state.output
        output[Keys.LOSS] = loss.detach()
        output[Keys.PRED] = _detached(output[Keys.PRED])
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
