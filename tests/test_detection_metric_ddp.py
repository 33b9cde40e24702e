"""DetectionCOCOMetric under torch.distributed (two gloo processes on the CPU): each rank validates half of the images,
and both report the mAP of the whole set, as one process on all images does."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from muscle_ext.metrics import DetectionCOCOMetric

from tests.distributed_utils import run_on_ranks

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


def _validate_half(rank: int) -> dict[str, float]:
    half = N_IMAGES // WORLD
    return _validate(_outputs()[rank * half:(rank + 1) * half])


@pytest.mark.timeout(120)
def test_both_ranks_score_the_whole_validation_set(tmp_path):
    whole = _validate(_outputs())
    shards = [_validate(_outputs()[:N_IMAGES // 2]), _validate(_outputs()[N_IMAGES // 2:])]
    assert 0.0 < whole["val_map"] < 1.0
    assert all(s["val_map"] != pytest.approx(whole["val_map"]) for s in shards)  # a per-rank mAP would be wrong

    results = run_on_ranks(_validate_half, tmp_path, world=WORLD)
    assert set(whole) >= {"val_map", "val_map_ap50", "val_map_ap75", "val_map_ap_a", "val_map_ap_b"}
    for rank in range(WORLD):
        assert results[rank] == pytest.approx(whole, nan_ok=True), rank
