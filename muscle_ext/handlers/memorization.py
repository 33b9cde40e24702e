"""Cross-task memorization for multi-task continual learning, as Ignite handlers of a
:class:`~muscle_ext.engines.MultiTaskTrainer`: each adds its penalty to the task loss *before* backward
(``IterationEvents.LOSS_COMPLETED``), keyed by parameter name, so it shows in the logged loss and scales with the
loss under AMP. Choose any combination per run; each has its own weight (0: off).

- :class:`CrossTaskMemorization` - L2-SP pull towards the backbone at the start of the current task visit (the state
  the earlier tasks left), MUSCLE's cross-task memorization (Li et al., ICML 2018).
- :class:`EWCMemorization` - online EWC: the diagonal Fisher of each task's data at the end of its visit,
  accumulated across visits, weighting a pull towards the end-of-visit weights (Kirkpatrick et al. 2017; Schwarz
  et al. 2018).
- :class:`FeatureDistillation` - the backbone's last feature map kept near a frozen copy of the start-of-visit
  backbone on the current batch (LwF/DELTA-style).

Each holds its anchors in ``state_dict``/``load_state_dict`` (put it in the checkpoint): a run resumed in the middle
of a visit keeps the start-of-visit anchor instead of taking a new one. The penalty of the last iteration is in
``engine.state.output["memorization"]`` (summed over the handlers).
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from ..engines.continual import JointSchedule
from ..engines.events import TaskEvents
from ..networks import backbone_feature_maps
from ..networks.regularizers import (
    diagonal_fisher,
    ewc_penalty,
    feature_distillation,
    l2sp_penalty,
    named_trainable,
    snapshot,
)

__all__ = ["CrossTaskMemorization", "EWCMemorization", "FeatureDistillation"]

MEMORIZATION = "memorization"


class _Memorization:
    """Shared mechanics: the backbone by name, the visit boundaries, adding a penalty to the loss."""

    def __init__(self, backbone: nn.Module | Callable[[], nn.Module], weight: float) -> None:
        if float(weight) < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.backbone = backbone
        self.weight = float(weight)
        self.logger = logging.getLogger(type(self).__module__)

    def module(self) -> nn.Module:
        return self.backbone() if callable(self.backbone) and not isinstance(self.backbone, nn.Module) \
            else self.backbone

    def params(self) -> dict[str, nn.Parameter]:
        return named_trainable(self.module())

    def attach(self, engine: Engine) -> None:
        if self.weight == 0:
            return
        if isinstance(getattr(engine, "schedule", None), JointSchedule):
            raise ValueError(f"{type(self).__name__}: the joint schedule trains every task in every step, there are "
                             "no task visits to remember across; set its weight to 0 (task_mixing joint is the "
                             "baseline without memorization)")
        engine.add_event_handler(TaskEvents.TASK_STARTED, self._visit_started)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._add_penalty)

    @staticmethod
    def _first_step(engine: Engine) -> bool:
        """True at a visit's first iteration; False when a resumed run re-enters a visit in its middle."""
        schedule = getattr(engine, "schedule", None)
        return True if schedule is None else bool(schedule.task_at(engine.state.iteration - 1)[1])

    def _visit_started(self, engine: Engine) -> None:
        self.visit_started(engine, fresh=self._first_step(engine) or not self.has_anchor())

    def _add_penalty(self, engine: Engine) -> None:
        penalty = self.penalty(engine)
        if penalty is None:
            return
        output = engine.state.output
        output[Keys.LOSS] = output[Keys.LOSS] + self.weight * penalty
        output[MEMORIZATION] = float(output.get(MEMORIZATION, 0.0)) + float(self.weight * penalty.detach())

    # the three things a method defines
    def has_anchor(self) -> bool:
        raise NotImplementedError

    def visit_started(self, engine: Engine, fresh: bool) -> None:
        raise NotImplementedError

    def penalty(self, engine: Engine) -> torch.Tensor | None:
        raise NotImplementedError


class CrossTaskMemorization(_Memorization):
    """L2-SP: ``weight / 2 * ||w - w_start||^2`` over the backbone's parameters, ``w_start`` the weights at the start
    of the current task visit. Task heads and batch-norm statistics are not pulled. Under AdamW the term is
    rescaled with the rest of the gradient: ``weight`` is the penalty's strength relative to the task loss.

    Args:
        backbone: the shared backbone, or a zero-argument callable returning it.
        weight: strength of the pull (0 disables it: plain sequential training).
    """

    def __init__(self, backbone: nn.Module | Callable[[], nn.Module], weight: float = 0.01) -> None:
        super().__init__(backbone, weight)
        self.anchor: dict[str, torch.Tensor] = {}

    def has_anchor(self) -> bool:
        return bool(self.anchor)

    def remember(self, engine: Engine | None = None) -> None:
        """Take the current backbone weights as the anchor."""
        self.anchor = snapshot(self.params())

    def visit_started(self, engine: Engine, fresh: bool) -> None:
        if fresh:
            self.remember()

    def penalty(self, engine: Engine | None = None) -> torch.Tensor:
        if not self.anchor:
            raise RuntimeError("no anchor for the backbone: remember() must run at the start of each task visit")
        return l2sp_penalty(self.params(), self.anchor)

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = {name: t.detach().clone() for name, t in state["anchor"].items()}


class EWCMemorization(_Memorization):
    """Online EWC: at the end of each task visit (when the next starts, and when the run completes) the diagonal
    Fisher of that task's loss is estimated on ``fisher_batches`` of its training batches and accumulated,
    ``F = decay * F + F_task``; the anchor becomes the weights at that moment. Penalty ``weight / 2 * sum F (w -
    w_anchor)^2``; none before the first visit has ended.

    The Fisher batches come from a fresh iterator over the task's loader, drawn after the visit ended: the loader is
    reseeded at every visit, so training order and augmentation stay the same with or without EWC's draws.

    Args:
        backbone: the shared backbone (or a callable returning it).
        weight: strength (0: off).
        fisher_batches: batches per Fisher estimate.
        decay: how much of the earlier tasks' Fisher is kept at each visit (1: plain accumulation).
    """

    def __init__(self, backbone: nn.Module | Callable[[], nn.Module], weight: float = 1.0, fisher_batches: int = 4,
                 decay: float = 1.0) -> None:
        super().__init__(backbone, weight)
        if int(fisher_batches) < 1 or not 0 <= float(decay) <= 1:
            raise ValueError(f"fisher_batches must be >= 1 and decay in [0, 1], got {fisher_batches}, {decay}")
        self.fisher_batches = int(fisher_batches)
        self.decay = float(decay)
        self.anchor: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.task: str | None = None  # the task of the current visit

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.weight:
            engine.add_event_handler(Events.COMPLETED, self._run_completed)

    def _run_completed(self, engine: Engine) -> None:
        # Ignite fires COMPLETED after terminate() too: only a finished run's last visit has ended
        if engine.state.iteration >= engine.state.max_epochs * engine.state.epoch_length:
            self._visit_ended(engine)

    def has_anchor(self) -> bool:
        return self.task is not None

    def visit_started(self, engine: Engine, fresh: bool) -> None:
        if fresh:
            self._visit_ended(engine)
            self.task = engine.schedule.task_at(engine.state.iteration - 1)[0]

    def _visit_ended(self, engine: Engine) -> None:
        if self.task is None:
            return
        task = engine.tasks[self.task]
        network = task.network
        was_training = network.training
        network.train()  # the loss the task trains on (dropout, batch statistics) as in its visit

        def loss_of_batch(batch: Any) -> torch.Tensor:
            inputs, targets, *_ = task.prepare_batch(batch, engine.state.device, engine.non_blocking)
            return task.forward_loss(inputs, targets)[1]

        with torch.enable_grad():
            fisher = diagonal_fisher(self.params(), loss_of_batch,
                                     itertools.islice(iter(task.data_loader), self.fisher_batches))
        network.train(was_training)
        self.fisher = {name: self.decay * self.fisher[name] + f if name in self.fisher else f
                       for name, f in fisher.items()}
        self.anchor = snapshot(self.params())

    def penalty(self, engine: Engine | None = None) -> torch.Tensor | None:
        return ewc_penalty(self.params(), self.anchor, self.fisher) if self.fisher else None

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": dict(self.anchor), "fisher": dict(self.fisher), "task": self.task or ""}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = {name: t.detach().clone() for name, t in state["anchor"].items()}
        self.fisher = {name: t.detach().clone() for name, t in state["fisher"].items()}
        self.task = state["task"] or None


class FeatureDistillation(_Memorization):
    """Keep the backbone's last feature map (``layer4``) near that of a frozen copy of the start-of-visit backbone
    on the current batch: ``weight * mean((f - f_start)^2)``. The copy runs in eval mode (its batch-norm statistics
    frozen); the current features are caught by forward hooks, so every task head (classifier, segmenter) works.

    Args:
        backbone: the shared MONAI ResNet backbone (or a callable returning it).
        weight: strength (0: off).
    """

    def __init__(self, backbone: nn.Module | Callable[[], nn.Module], weight: float = 1.0) -> None:
        super().__init__(backbone, weight)
        self.reference: nn.Module | None = None
        self._inputs: torch.Tensor | None = None
        self._features: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.weight:
            module = self.module()
            module.conv1.register_forward_pre_hook(self._catch_inputs)
            module.layer4.register_forward_hook(self._catch_features)

    def _catch_inputs(self, module: nn.Module, args: tuple) -> None:
        self._inputs = args[0] if torch.is_grad_enabled() else None

    def _catch_features(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._features = output if torch.is_grad_enabled() else None

    def has_anchor(self) -> bool:
        return self.reference is not None

    def _frozen_copy(self) -> nn.Module:
        """A copy of the backbone without this handler's hooks (they must see the training forward only)."""
        self._inputs = self._features = None
        reference = copy.deepcopy(self.module(), memo={id(self): self})
        for module in reference.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        return reference.eval().requires_grad_(False)

    def visit_started(self, engine: Engine, fresh: bool) -> None:
        if fresh:
            self.reference = self._frozen_copy()

    def penalty(self, engine: Engine | None = None) -> torch.Tensor | None:
        if self.reference is None or self._inputs is None or self._features is None:
            return None
        with torch.no_grad():
            reference = backbone_feature_maps(self.reference, self._inputs)[-1]
        penalty = feature_distillation(self._features, reference)
        self._inputs = self._features = None
        return penalty

    def state_dict(self) -> dict[str, Any]:
        reference = self.reference.state_dict() if self.reference is not None else {}
        return {"reference": {name: t.as_subclass(torch.Tensor) for name, t in reference.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["reference"]:
            self.reference = self._frozen_copy()
            self.reference.load_state_dict(state["reference"])
