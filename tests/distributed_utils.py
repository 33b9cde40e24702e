"""Run a test function in several CPU processes joined by a gloo process group (torch.multiprocessing spawn)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, fn: Callable[..., Any], init_file: str, world: int, results: Any, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: under pytest, gloo's threads intermittently abort the finished child there
    # ("terminate called without an active exception"), after every check has passed.
    os._exit(0)


def run_on_ranks(fn: Callable[..., Any], tmp_path: Path, *args: Any, world: int = 2) -> dict[int, Any]:
    """``{rank: fn(rank, *args)}`` from ``world`` processes in one gloo group (``fn`` at module level: it is pickled
    by name). An assertion in ``fn`` fails the calling test; no ``torch.distributed``: the test is skipped."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(fn, str(tmp_path / "init"), world, results, args), nprocs=world, join=True)
        return dict(results)
