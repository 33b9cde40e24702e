"""MoCo under torch.distributed (2 CPU processes, gloo): shuffle-BN round trip, gathered enqueue, DDP training."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.distributed_utils import run_on_ranks

WORLD, BATCH, QUEUE = 2, 4, 10


def _tiny_moco():
    from muscle_ext.networks import MoCo

    torch.manual_seed(0)  # the same initial weights and queue on every rank
    tiny = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
    return MoCo(tiny, feature_dim=8, dim=4, queue_size=QUEUE, bn_splits=1)


def _worker(rank: int) -> None:
    from muscle_ext.engines import MoCoTrainer

    moco = _tiny_moco()
    # shuffle then unshuffle is the identity, and the shuffle really mixes samples across processes
    x = (torch.arange(BATCH, dtype=torch.float32) + rank * BATCH)[:, None]
    torch.manual_seed(100 + rank)  # rank 0's permutation must win whatever the local seeds
    shuffled, unshuffle = moco._batch_shuffle_ddp(x)
    assert torch.equal(moco._batch_unshuffle_ddp(shuffled, unshuffle), x)
    everything = [torch.empty_like(shuffled) for _ in range(WORLD)]
    dist.all_gather(everything, shuffled)
    everything = torch.cat(everything).flatten()
    assert sorted(everything.tolist()) == list(range(WORLD * BATCH))
    assert not torch.equal(everything, torch.arange(WORLD * BATCH, dtype=torch.float32))

    # keys come back in the order of this process's queries (eval mode: BN does not depend on the batch)
    moco.eval()
    im_k = torch.rand(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
    keys = moco._encode_keys(im_k)
    with torch.no_grad():
        torch.testing.assert_close(keys, nn.functional.normalize(moco.encoder_k(im_k), dim=1))

    # enqueue gathers every process's keys, in rank order; the queues stay identical
    moco.dequeue_and_enqueue(torch.full((3, 4), float(rank)))
    assert int(moco.queue_ptr) == WORLD * 3
    assert moco.queue[0, :6].tolist() == [0.0] * 3 + [1.0] * 3

    # two DDP training iterations through the trainer
    moco = _tiny_moco()
    model = DistributedDataParallel(moco)
    g = torch.Generator().manual_seed(rank)
    data = [{"image_q": torch.rand(BATCH, 1, 8, 8, generator=g), "image_k": torch.rand(BATCH, 1, 8, 8, generator=g)}
            for _ in range(2)]
    trainer = MoCoTrainer("cpu", 1, data, model, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.run()
    assert trainer.moco is moco and int(moco.queue_ptr) == (2 * WORLD * BATCH) % QUEUE
    queues = [torch.empty_like(moco.queue) for _ in range(WORLD)]
    dist.all_gather(queues, moco.queue)
    assert torch.equal(queues[0], queues[1])
    for p in moco.encoder_k.parameters():
        gathered = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(gathered, p.detach().contiguous())
        assert torch.equal(gathered[0], gathered[1])  # the momentum update keeps the key encoders in sync


@pytest.mark.timeout(120)
def test_moco_under_two_process_gloo(tmp_path):
    run_on_ranks(_worker, tmp_path, world=WORLD)
