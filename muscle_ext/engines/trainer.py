"""``StepTrainer``: the base of our trainers that write their own iteration (MoCo, detection, multi-task)."""

from __future__ import annotations

import contextlib

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow

from .precision import autocast_on, needs_grad_scaler

__all__ = ["StepTrainer"]


class StepTrainer(SupervisedTrainer):
    """A ``SupervisedTrainer`` for subclasses that override ``_iteration``, with mixed precision on any device.

    ``amp`` autocasts on the engine's own device type with ``amp_kwargs`` (e.g. ``{"dtype": torch.bfloat16}`` on
    a CPU), where MONAI autocasts on CUDA only; a ``GradScaler`` is created only for float16 on CUDA, where MONAI
    creates one for every amp run. Subclasses' iterations end with :meth:`backward_and_step`.
    """

    @property
    def uses_grad_scaler(self) -> bool:
        return needs_grad_scaler(self.state.device, self.amp, self.amp_kwargs.get("dtype"))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for this engine's forward pass (a null context without ``amp``)."""
        return autocast_on(self.state.device, self.amp, **self.amp_kwargs)

    def run(self) -> None:  # type: ignore[override]
        self.scaler = torch.amp.GradScaler("cuda") if self.uses_grad_scaler else None
        Workflow.run(self)

    def _accumulation_flags(self) -> tuple[bool, bool]:
        """(zero the gradients, step the optimiser) for this iteration, by ``SupervisedTrainer``'s rule: every
        ``accumulation_steps`` iterations and at the end of each epoch."""
        acc = self.accumulation_steps
        if acc == 1:
            return True, True
        epoch_length = self.state.epoch_length
        local_iter = (self.state.iteration - 1) % epoch_length if epoch_length else self.state.iteration - 1
        last = epoch_length is not None and (local_iter + 1) == epoch_length
        return local_iter % acc == 0, (local_iter + 1) % acc == 0 or last

    def backward_and_step(self, loss: torch.Tensor, step: bool = True, max_grad_norm: float | None = None) -> None:
        """Back-propagate ``loss`` and, when ``step``, update the weights: the end of a training iteration.

        ``loss`` is divided by ``accumulation_steps`` and scaled by the ``GradScaler`` when there is one;
        ``IterationEvents.BACKWARD_COMPLETED`` fires after backward, before the step (handlers that act on the
        gradients, e.g. :class:`~muscle_ext.handlers.ReplicaSync`). With ``max_grad_norm`` the gradient norm is
        clipped before the step, on the true (unscaled) gradients. The caller zeroes the gradients (before the
        forward pass) and fires ``LOSS_COMPLETED`` before and ``MODEL_COMPLETED`` after this.
        """
        acc = self.accumulation_steps
        loss = loss / acc if acc > 1 else loss
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if not step:
            return
        if max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
