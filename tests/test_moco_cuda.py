"""MoCo on CUDA (skipped without a GPU): fp16 with GradScaler, bf16 without, channels_last, split BN, compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from muscle_ext.engines import MoCoTrainer
from muscle_ext.networks import MoCo, SplitBatchNorm2d, build_backbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BATCH, QUEUE = 8, 20


def make_moco(resnet: bool = True) -> MoCo:
    torch.manual_seed(0)
    if resnet:
        return MoCo(build_backbone("resnet18"), queue_size=QUEUE, bn_splits=4).cuda()
    tiny = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
    return MoCo(tiny, feature_dim=8, dim=4, queue_size=QUEUE, bn_splits=4).cuda()


def make_data(n: int = 3, size: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"image_q": torch.rand(BATCH, 1, size, size, generator=g),
             "image_k": torch.rand(BATCH, 1, size, size, generator=g)} for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_on_cuda(dtype):
    moco = make_moco()
    w0 = moco.encoder_q.backbone.conv1.weight.detach().clone()
    opt = torch.optim.SGD(moco.parameters(), lr=0.05, momentum=0.9)
    # fp16: GradScaler starts at 2**16 and skips the first steps whose scaled gradients overflow
    trainer = MoCoTrainer("cuda", 1, make_data(12), moco, opt, amp=True, amp_kwargs={"dtype": dtype},
                          channels_last=True, decollate=False)
    seen = {}
    moco.encoder_q.backbone.conv1.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    trainer.run()
    assert (trainer.scaler is not None) == (dtype == torch.float16)
    if trainer.scaler is not None:
        assert trainer.scaler.get_scale() < 2.0**16
    assert seen["dtype"] == dtype
    assert trainer.state.output["pred"].dtype == torch.float32
    assert math.isfinite(trainer.state.output["loss"].item())
    assert not torch.equal(w0, moco.encoder_q.backbone.conv1.weight)
    assert int(moco.queue_ptr) == (12 * BATCH) % QUEUE
    assert moco.queue.dtype == torch.float32 and moco.queue.is_cuda


def test_split_batchnorm_on_cuda_matches_cpu():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 5, 5)
    for splits in (4, 5):  # fused and chunked paths
        cpu, gpu = SplitBatchNorm2d(3, num_splits=splits), SplitBatchNorm2d(3, num_splits=splits).cuda()
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_compile_with_inductor_on_cuda():
    moco = make_moco(resnet=False)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1)
    trainer = MoCoTrainer("cuda", 1, make_data(3), moco, opt, compile=True, amp=True,
                          amp_kwargs={"dtype": torch.bfloat16}, decollate=False)
    trainer.run()
    assert trainer.network is moco and math.isfinite(trainer.state.output["loss"].item())
    assert int(moco.queue_ptr) == (3 * BATCH) % QUEUE
