"""``MoCoTrainer``: a MONAI ``SupervisedTrainer`` whose iteration is one MoCo step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents, PrepareBatch, default_metric_cmp_fn
from monai.transforms import Transform
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from ..networks.moco import MoCo
from .trainer import StepTrainer

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = ["ACC_TOP1", "MoCoTrainer", "PrepareTwoViews", "unwrap_moco"]

ACC_TOP1 = "acc_top1"


class PrepareTwoViews(PrepareBatch):
    """``prepare_batch`` for MoCo: the two augmented views of a batch dict, moved to ``device``."""

    def __init__(self, view_keys: Sequence[str] = ("image_q", "image_k")) -> None:
        if len(view_keys) != 2:
            raise ValueError(f"need exactly two view keys, got {view_keys}")
        self.view_keys = tuple(view_keys)

    def __call__(self, batchdata: dict[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [k for k in self.view_keys if k not in batchdata]
        if missing:
            raise KeyError(f"batch has no view(s) {missing}; keys are {sorted(batchdata)}")
        q, k = (batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs) for key in self.view_keys)
        return q, k


def unwrap_moco(network: nn.Module) -> MoCo:
    """The ``MoCo`` inside ``DistributedDataParallel``/``DataParallel`` and ``torch.compile`` wrappers."""
    while not isinstance(network, MoCo):
        if hasattr(network, "module"):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            raise TypeError(f"expected a MoCo network (possibly wrapped), got {type(network).__name__}")
    return network


def _plain(x: torch.Tensor) -> torch.Tensor:
    # MoCo needs no image meta data, and torch.compile wants plain tensors.
    return x.as_tensor() if isinstance(x, MetaTensor) else x


class MoCoTrainer(StepTrainer):
    """One iteration = one MoCo step: forward both views, InfoNCE loss, backward, optimiser step, momentum update
    of the key encoder, enqueue of the keys.

    ``engine.state.output`` holds ``loss`` and ``acc_top1`` (0-d tensors; ``acc_top1`` = fraction of queries whose
    positive has the highest logit, left on the device so that no iteration waits for it), ``pred`` (detached
    logits ``(B, 1 + K)``) and ``label`` (zeros), so MONAI's handlers work as with ``SupervisedTrainer``
    (e.g. ``StatsHandler(output_transform=from_engine(["loss"], first=True))``).

    Args beyond ``SupervisedTrainer``'s:
        network: a :class:`MoCo` (or a DDP/compiled wrapper of one).
        loss_function: applied to ``(logits, labels)``; ``nn.CrossEntropyLoss()`` when ``None``.
        view_keys: batch keys of the query and key views (used when ``prepare_batch`` is not given; a custom
            ``prepare_batch`` must return ``(im_q, im_k)``).
        channels_last: convert the network and the inputs to ``torch.channels_last`` (faster conv on CPU/GPU
            with bf16).
        amp / amp_kwargs: autocast on the device of ``device`` (``amp_kwargs={"dtype": torch.bfloat16}`` on CPU);
            a ``GradScaler`` is used only for float16 on CUDA.
        compile / compile_kwargs: ``torch.compile`` the MoCo forward; ``self.network`` stays the plain module so
            checkpoints keep their keys.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        view_keys: Sequence[str] = ("image_q", "image_k"),
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        accumulation_steps: int = 1,
        channels_last: bool = False,
    ) -> None:
        self.moco = unwrap_moco(network)
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=nn.CrossEntropyLoss() if loss_function is None else loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=PrepareTwoViews(view_keys) if prepare_batch is None else prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_train_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            train_handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            optim_set_to_none=optim_set_to_none,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            compile=False,  # compiled below, keeping self.network unwrapped for checkpoints and handlers
            accumulation_steps=accumulation_steps,
        )
        self.compile = compile
        self.forward_fn: nn.Module | Callable = torch.compile(network, **(compile_kwargs or {})) if compile else network
        self.channels_last = channels_last

    def progress(self) -> float:
        """Fraction of training done before the current iteration (0 when the epoch length is unknown)."""
        total = (self.state.epoch_length or 0) * (self.state.max_epochs or 0)
        return (self.state.iteration - 1) / total if total else 0.0

    def _iteration(self, engine: MoCoTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        im_q, im_k = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        im_q, im_k = _plain(im_q), _plain(im_k)
        if engine.channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)

        should_zero_grad, should_step = engine._accumulation_flags()
        engine.state.output = {}
        engine.network.train()
        if should_zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        with engine.autocast():
            logits, labels, keys = engine.forward_fn(im_q, im_k, return_keys=True)
            engine.state.output[Keys.PRED] = logits
            engine.state.output[Keys.LABEL] = labels
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = engine.loss_function(logits.float(), labels).mean()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        # a LOSS_COMPLETED handler may have replaced the loss
        engine.backward_and_step(engine.state.output[Keys.LOSS], step=should_step)

        # The key encoder follows the query encoder only after it changed; every batch's keys join the queue.
        if should_step:
            engine.moco.update_key_encoder(engine.moco.momentum_at(engine.progress()))
        engine.moco.dequeue_and_enqueue(keys)

        output = engine.state.output
        output[Keys.LOSS] = output[Keys.LOSS].detach()
        output[Keys.PRED] = logits.detach()
        output[ACC_TOP1] = (logits.detach().argmax(dim=1) == labels).float().mean()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
