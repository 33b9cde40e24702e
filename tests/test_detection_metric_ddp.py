"""DetectionCOCOMetric under torch.distributed (two gloo processes on the CPU): each rank validates half of the images,
and both report the mAP of the whole set, as one process on all images does."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine

from muscle_ext.metrics import DetectionCOCOMetric

CLASSES = ["a", "b"]
WORLD = 2
N_IMAGES = 8  # rank 0 validates images 0-3, rank 1 images 4-7 (batches of two)


def _outputs() -> list[dict]:
    """Per-image evaluator outputs (``{"pred", "label"}``) with imperfect detections: jittered and missed boxes, false
    positives and wrong classes, so that the mAP of any subset differs from the whole set's."""
    g = torch.Generator().manual_seed(3)
    outputs = []
    for _ in range(N_IMAGES):
        n = int(torch.randint(1, 4, (1,), generator=g))
        corner = torch.rand(n, 2, generator=g) * 60
        gt = torch.cat([corner, corner + 10 + torch.rand(n, 2, generator=g) * 20], dim=1)
        labels = torch.randint(0, 2, (n,), generator=g)
        keep = torch.rand(n, generator=g) > 0.2
        pred = gt[keep] + torch.randn(int(keep.sum()), 4, generator=g) * 3
        pred_labels = torch.where(torch.rand(len(pred), generator=g) > 0.15, labels[keep], 1 - labels[keep])
        extra = torch.rand(2, 2, generator=g) * 60
        pred = torch.cat([pred, torch.cat([extra, extra + 15], dim=1)])
        pred_labels = torch.cat([pred_labels, torch.randint(0, 2, (2,), generator=g)])
        scores = torch.rand(len(pred), generator=g)
        outputs.append({"pred": {"box": pred, "label": pred_labels, "label_scores": scores},
                        "label": {"box": gt, "label": labels}})
    return outputs


def _validate(outputs: list[dict]) -> dict[str, float]:
    """``engine.state.metrics`` of an evaluator whose iterations output ``outputs``, two images per iteration."""
    engine = Engine(lambda e, batch: batch)
    DetectionCOCOMetric(CLASSES).attach(engine, "val_map")
    engine.run([outputs[i:i + 2] for i in range(0, len(outputs), 2)], max_epochs=1)
    return dict(engine.state.metrics)


def _worker(rank: int, init_file: str, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        half = N_IMAGES // WORLD
        results[rank] = _validate(_outputs()[rank * half:(rank + 1) * half])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # as tests/test_moco_ddp.py: skip the interpreter's teardown, where gloo's threads intermittently abort the child
    os._exit(0)


@pytest.mark.timeout(120)
def test_both_ranks_score_the_whole_validation_set(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    whole = _validate(_outputs())
    shards = [_validate(_outputs()[:N_IMAGES // 2]), _validate(_outputs()[N_IMAGES // 2:])]
    assert 0.0 < whole["val_map"] < 1.0
    assert all(s["val_map"] != pytest.approx(whole["val_map"]) for s in shards)  # a per-rank mAP would be wrong

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
        results = dict(results)
    assert set(whole) >= {"val_map", "val_map_ap50", "val_map_ap75", "val_map_ap_a", "val_map_ap_b"}
    for rank in range(WORLD):
        assert results[rank] == pytest.approx(whole, nan_ok=True), rank
