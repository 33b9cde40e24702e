"""ReplicaSync keeps the replicas of a network whose tasks share one backbone identical across data-parallel
processes (two gloo processes on the CPU): without it, processes that train on different data drift apart, and its
end-of-run check says so."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

from muscle_ext.handlers import ReplicaSync


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, port: int, sync: bool, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different initial weights on each rank: the sync must broadcast rank 0's
        backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        network = nn.ModuleDict({"a": nn.Sequential(backbone, nn.Linear(8, 2)),
                                 "b": nn.Sequential(backbone, nn.Linear(8, 1))})
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

        def step(engine: Engine, batch: torch.Tensor) -> float:
            task = "a" if engine.state.iteration % 2 else "b"  # one head at a time, as the continual trainer
            optimizer.zero_grad(set_to_none=True)
            network.train()
            loss = network[task](batch + rank).pow(2).mean()  # each rank sees other data
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            optimizer.step()
            return float(loss)

        engine = Engine(step)
        engine.register_events(*IterationEvents)
        handler = ReplicaSync(network, verify=False)
        if sync:
            handler.attach(engine)
        torch.manual_seed(10)
        engine.run([torch.randn(6, 4) for _ in range(4)], max_epochs=1)
        try:
            results[rank] = ("ok", handler.check_in_sync())
        except RuntimeError as exc:
            results[rank] = ("drifted", str(exc))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sync", [True, False])
def test_replicas_stay_identical_only_with_the_sync(sync):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_train, args=(_free_port(), sync, results), nprocs=2, join=True)
        results = dict(results)
    if sync:
        assert results[0] == ("ok", 0.0) and results[1] == ("ok", 0.0)
    else:
        assert results[1][0] == "drifted" and "differ from rank 0's" in results[1][1]


def test_a_single_process_attaches_nothing():
    engine = Engine(lambda e, b: None)
    engine.register_events(*IterationEvents)
    handler = ReplicaSync(nn.Linear(2, 2))
    handler.attach(engine)
    assert not engine.has_event_handler(handler._average_gradients, IterationEvents.BACKWARD_COMPLETED)
    assert not engine.has_event_handler(handler.check_in_sync, Events.COMPLETED)
