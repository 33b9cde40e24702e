"""MoCo v2 (He et al. 2020; Chen et al. 2020): query/key encoders, momentum update and a queue of negatives.

One MoCo step is split into calls that the trainer orders (see ``muscle_ext.engines.MoCoTrainer``):
``forward`` (logits and labels of the InfoNCE loss), backward and optimiser step, ``update_key_encoder``,
``dequeue_and_enqueue``. The queue lives in registered buffers so that checkpoints restore it.

Batch norm must not let the key encoder see which sample is the query's positive (the "BN cheat"):
with ``torch.distributed`` (world > 1) the key batch is shuffled across processes before the key encoder
(shuffle-BN); in one process every ``BatchNorm2d`` becomes a :class:`SplitBatchNorm2d` that normalises
``bn_splits`` sub-batches independently, and the key batch is shuffled so that a query and its key fall in
groups of different images.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import ignite.distributed as idist
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .resnet_utils import backbone_feature_dim

__all__ = ["MoCo", "SplitBatchNorm2d", "concat_all_gather", "convert_to_split_batchnorm", "random_permutation",
           "revert_split_batchnorm"]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are computed over ``num_splits`` sub-batches separately.

    Emulates per-GPU BN of multi-GPU training in one process. Group ``g`` holds samples ``g, g + S, g + 2S, ...``
    (``S = num_splits``; strided so that the groups are a reshape, not a copy; MoCo shuffles the key batch
    anyway). The running statistics are the mean over the
    groups of what each group's BN would have tracked; evaluation is plain ``BatchNorm2d``. The state-dict
    keys are those of ``BatchNorm2d``, so the weights load into an ordinary network.
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        splits = min(self.num_splits, n)
        if not self.training or splits == 1:
            return super().forward(x)
        if self.momentum is None:
            raise ValueError("SplitBatchNorm2d needs a float momentum (cumulative averaging is not supported)")
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if n % splits == 0:
            return self._forward_fused(x, splits)
        return self._forward_chunked(x, splits)

    def _forward_fused(self, x: torch.Tensor, splits: int) -> torch.Tensor:
        # Fold the groups into channels (a free view): one batch_norm call normalises each (group, channel) pair.
        n, c, h, w = x.shape
        running_mean = self.running_mean.repeat(splits) if self.track_running_stats else None
        running_var = self.running_var.repeat(splits) if self.track_running_stats else None
        weight = self.weight.repeat(splits) if self.affine else None
        bias = self.bias.repeat(splits) if self.affine else None
        out = F.batch_norm(x.reshape(n // splits, c * splits, h, w), running_mean, running_var, weight, bias,
                           True, self.momentum, self.eps).reshape(n, c, h, w)
        if self.track_running_stats:
            self.running_mean.copy_(running_mean.view(splits, c).mean(0))
            self.running_var.copy_(running_var.view(splits, c).mean(0))
        return out

    def _forward_chunked(self, x: torch.Tensor, splits: int) -> torch.Tensor:
        # Batch not divisible by num_splits: the same strided groups, one call each, same averaging of stats.
        out = torch.empty_like(x)
        means, variances = [], []
        for g in range(splits):
            rm = self.running_mean.clone() if self.track_running_stats else None
            rv = self.running_var.clone() if self.track_running_stats else None
            out[g::splits] = F.batch_norm(x[g::splits], rm, rv, self.weight, self.bias, True, self.momentum, self.eps)
            means.append(rm)
            variances.append(rv)
        if self.track_running_stats:
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def _swap_batchnorm(module: nn.Module, make: type, **kwargs) -> nn.Module:
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm2d, SplitBatchNorm2d) and type(child) is not make:
            new = make(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                       track_running_stats=child.track_running_stats, **kwargs)
            ref = next((t for t in child.state_dict().values() if t.is_floating_point()), None)
            if ref is not None:
                new.to(device=ref.device, dtype=ref.dtype)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            _swap_batchnorm(child, make, **kwargs)
    return module


def convert_to_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place) by a :class:`SplitBatchNorm2d` with the same state."""
    if isinstance(module, nn.BatchNorm2d) and type(module) is nn.BatchNorm2d:
        raise TypeError("pass the network that contains the BatchNorm2d, not the layer itself")
    return _swap_batchnorm(module, SplitBatchNorm2d, num_splits=num_splits)


def revert_split_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`SplitBatchNorm2d` (in place) by a plain ``nn.BatchNorm2d`` with the same state."""
    return _swap_batchnorm(module, nn.BatchNorm2d)


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``all_gather`` of equally-shaped tensors from every process, concatenated along dim 0 (no gradient).

    ``tensor`` itself in one process. Ignite's ``all_gather`` does the collective; the world size is read from
    ``torch.distributed`` first, because ignite keeps the context it found at its first call, after a process group
    is destroyed as well.
    """
    if _distributed_world() == 1:
        return tensor
    return idist.all_gather(tensor.contiguous())


def random_permutation(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A uniform random permutation of ``range(n)``.

    ``argsort`` of uniform noise rather than ``randperm``: inductor (torch 2.11-2.13) crashes on its
    ``x[randperm(n)]`` rewrite pattern, which would break ``MoCoTrainer(compile=True)``.
    """
    return torch.argsort(torch.rand(n, device=device))


def _projection_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    # MoCo v2: fc-ReLU-fc, no BN in the head.
    return nn.Sequential(OrderedDict(fc1=nn.Linear(in_dim, hidden_dim), act=nn.ReLU(inplace=True),
                                     fc2=nn.Linear(hidden_dim, out_dim)))


class MoCo(nn.Module):
    """MoCo v2 around a backbone that maps images to pooled features ``(B, feature_dim)``.

    Args:
        backbone: the query backbone (e.g. ``build_backbone("resnet18")``); the key encoder is a deep copy.
        feature_dim: width of the backbone output; inferred for ``build_backbone`` ResNets when ``None``.
        dim: width of the projected, L2-normalised embedding (128 in MoCo v2).
        hidden_dim: width of the projection head's hidden layer (``feature_dim`` when ``None``).
        queue_size: number of negatives ``K`` kept in the queue.
        momentum: key-encoder momentum ``m`` at the start of training.
        momentum_cosine: if True, ``momentum_at`` ramps ``m`` to 1 along a half cosine (BYOL schedule).
        temperature: InfoNCE temperature (0.2 in MoCo v2).
        bn_splits: sub-batches of the single-process split-BN emulation; 1 keeps plain batch norm. Under
            DDP the key batch is shuffled across processes anyway: use 1 there (per-process BN is the split).
            Do not convert the encoders to ``SyncBatchNorm``: global statistics undo the shuffle.

    ``forward`` needs the same batch size on every process under DDP (as the reference implementation).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int | None = None,
        dim: int = 128,
        hidden_dim: int | None = None,
        queue_size: int = 65536,
        momentum: float = 0.999,
        momentum_cosine: bool = False,
        temperature: float = 0.2,
        bn_splits: int = 8,
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
        feature_dim = backbone_feature_dim(backbone) if feature_dim is None else feature_dim
        self.dim, self.queue_size = dim, queue_size
        self.momentum, self.momentum_cosine = momentum, momentum_cosine
        self.temperature, self.bn_splits = temperature, bn_splits

        if bn_splits > 1:
            convert_to_split_batchnorm(backbone, bn_splits)
        self.encoder_q = nn.Sequential(OrderedDict(
            backbone=backbone, head=_projection_head(feature_dim, hidden_dim or feature_dim, dim)))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        """The query backbone: the network to export (its state-dict keys match ``build_backbone``)."""
        return self.encoder_q.backbone

    def momentum_at(self, progress: float) -> float:
        """Key-encoder momentum at ``progress`` = fraction of training done, in [0, 1]."""
        if not self.momentum_cosine:
            return self.momentum
        progress = min(max(float(progress), 0.0), 1.0)
        return 1.0 - (1.0 - self.momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0

    @torch.no_grad()
    def update_key_encoder(self, m: float | None = None) -> None:
        """``k <- m * k + (1 - m) * q`` for every parameter (buffers such as BN statistics are the key's own)."""
        m = self.momentum if m is None else float(m)
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(k_params, m)
        torch._foreach_add_(k_params, q_params, alpha=1.0 - m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Write the (gathered) keys ``(B, dim)`` into the queue from ``queue_ptr`` on, wrapping around at ``K``."""
        keys = concat_all_gather(keys.detach())
        n, size = keys.shape[0], self.queue_size
        if n == 0:
            return
        ptr = int(self.queue_ptr)
        if n > size:
            # Only the last K keys survive a sequential write; place them where that write would leave them.
            ptr, keys = (ptr + n - size) % size, keys[-size:]
        first = min(keys.shape[0], size - ptr)
        self.queue[:, ptr:ptr + first] = keys[:first].T.to(self.queue.dtype)
        if first < keys.shape[0]:
            self.queue[:, :keys.shape[0] - first] = keys[first:].T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + keys.shape[0]) % size

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle the global batch across processes; returns this process's share and the inverse order."""
        local = x.shape[0]
        x_all = concat_all_gather(x)
        perm = random_permutation(x_all.shape[0], x.device)
        dist.broadcast(perm, src=0)  # every process must use rank 0's permutation
        unshuffle = torch.argsort(perm)
        rank = dist.get_rank()
        return x_all[perm.view(-1, local)[rank]], unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_batch_shuffle_ddp``: this process's keys, back in the order of its queries."""
        local = x.shape[0]
        x_all = concat_all_gather(x)
        return x_all[unshuffle.view(-1, local)[dist.get_rank()]]

    @torch.no_grad()
    def _encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        if _distributed_world() > 1:
            im_k, unshuffle = self._batch_shuffle_ddp(im_k)
            k = F.normalize(self.encoder_k(im_k).float(), dim=1)
            return self._batch_unshuffle_ddp(k, unshuffle)
        if self.bn_splits > 1:
            perm = random_permutation(im_k.shape[0], im_k.device)
            k = F.normalize(self.encoder_k(im_k[perm]).float(), dim=1)
            return k[torch.argsort(perm)]
        return F.normalize(self.encoder_k(im_k).float(), dim=1)

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, return_keys: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """InfoNCE logits ``(B, 1 + K)`` (positive first, divided by the temperature) and labels (zeros).

        With ``return_keys=True`` also returns the normalised keys ``(B, dim)`` to pass to ``dequeue_and_enqueue``.
        """
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        k = self._encode_keys(im_k)
        # Similarities in fp32 even under autocast: at temperature 0.2, bf16 logits lose the ranking.
        with torch.autocast(device_type=q.device.type, enabled=False):
            l_pos = (q * k).sum(dim=1, keepdim=True)
            l_neg = q @ self.queue.detach().float()
            logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return (logits, labels, k) if return_keys else (logits, labels)
