"""Unit tests of the MoCo v2 module: queue, momentum, InfoNCE, gradients, split batch norm, export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from muscle_ext.networks import (
    MoCo,
    SplitBatchNorm2d,
    build_backbone,
    convert_to_split_batchnorm,
    random_permutation,
    revert_split_batchnorm,
)


def tiny_backbone(width: int = 8) -> nn.Module:
    """Conv-BN-ReLU-pool: pooled features of ``width`` channels, fast enough for unit tests."""
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    options = {"feature_dim": 8, "dim": 4, "queue_size": 10, "bn_splits": 1}
    options.update(kwargs)
    return MoCo(tiny_backbone(), **options)


def test_queue_buffers_are_normalised_and_in_state_dict():
    moco = tiny_moco()
    state = moco.state_dict()
    assert state["queue"].shape == (4, 10) and state["queue_ptr"].dtype == torch.long
    torch.testing.assert_close(moco.queue.norm(dim=0), torch.ones(10))


def test_enqueue_wraps_around_when_queue_size_is_not_a_multiple_of_batch():
    moco = tiny_moco(queue_size=10)
    written = []
    for step in range(4):  # 4 batches of 3 keys into K=10: the fourth batch wraps (9, 0, 1)
        keys = torch.full((3, 4), float(step)) + torch.arange(3.0)[:, None] / 10
        written.append(keys)
        moco.dequeue_and_enqueue(keys)
    assert int(moco.queue_ptr) == 12 % 10
    expected = torch.cat(written)  # 12 keys written sequentially; slot i holds the last key written there
    for slot in range(10):
        last = max(i for i in range(12) if i % 10 == slot)
        torch.testing.assert_close(moco.queue[:, slot], expected[last])


def test_enqueue_larger_than_queue_keeps_the_last_keys_in_sequential_slots():
    moco = tiny_moco(queue_size=4)
    moco.dequeue_and_enqueue(torch.zeros(3, 4))  # ptr = 3
    keys = torch.arange(6.0)[:, None].repeat(1, 4)  # 6 keys > K = 4
    moco.dequeue_and_enqueue(keys)
    assert int(moco.queue_ptr) == (3 + 6) % 4
    # sequential writes from slot 3: keys 0..5 land in slots 3,0,1,2,3,0 -> slots hold 5,2,3,4
    torch.testing.assert_close(moco.queue[0], torch.tensor([5.0, 2.0, 3.0, 4.0]))


def test_momentum_update_is_exact():
    moco = tiny_moco().double()
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(torch.randn_like(p))  # make query and key encoders differ
    q = [p.detach().numpy().copy() for p in moco.encoder_q.parameters()]
    k = [p.detach().numpy().copy() for p in moco.encoder_k.parameters()]
    buffers = {n: b.clone() for n, b in moco.encoder_k.named_buffers()}
    m = 0.7
    moco.update_key_encoder(m)
    for p_k, q0, k0 in zip(moco.encoder_k.parameters(), q, k, strict=True):
        np.testing.assert_allclose(p_k.detach().numpy(), m * k0 + (1 - m) * q0, rtol=0, atol=1e-14)
    for p_q, q0 in zip(moco.encoder_q.parameters(), q, strict=True):
        np.testing.assert_array_equal(p_q.detach().numpy(), q0)  # the query encoder is untouched
    for n, b in moco.encoder_k.named_buffers():
        assert torch.equal(b, buffers[n])  # BN statistics are not averaged


def test_momentum_schedule():
    constant = tiny_moco(momentum=0.99)
    assert constant.momentum_at(0.0) == constant.momentum_at(0.7) == 0.99
    ramp = tiny_moco(momentum=0.99, momentum_cosine=True)
    assert ramp.momentum_at(0.0) == pytest.approx(0.99)
    assert ramp.momentum_at(0.5) == pytest.approx(0.995)
    assert ramp.momentum_at(1.0) == pytest.approx(1.0)
    assert ramp.momentum_at(0.25) < ramp.momentum_at(0.75)


def test_key_encoder_is_a_frozen_copy():
    moco = tiny_moco()
    for (nq, pq), (nk, pk) in zip(moco.encoder_q.named_parameters(), moco.encoder_k.named_parameters(), strict=True):
        assert nq == nk and torch.equal(pq, pk) and pq.data_ptr() != pk.data_ptr()
        assert pq.requires_grad and not pk.requires_grad
    # MoCo v2 head: fc(feature) - ReLU - fc(128 by default)
    assert moco.encoder_q.head.fc1.in_features == moco.encoder_q.head.fc1.out_features == 8
    assert moco.encoder_q.head.fc2.out_features == 4


def test_logits_and_loss_match_numpy_infonce():
    temperature = 0.2
    moco = tiny_moco(temperature=temperature, queue_size=5)
    moco.eval()  # batch-independent BN, so the numpy side can recompute q and k alone
    im_q, im_k = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    logits, labels = moco(im_q, im_k)
    loss = nn.CrossEntropyLoss()(logits, labels)

    with torch.no_grad():
        q = moco.encoder_q(im_q).double().numpy()
        k = moco.encoder_k(im_k).double().numpy()
    queue = moco.queue.double().numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    pos = np.sum(q * k, axis=1)  # (B,)
    neg = q @ queue  # (B, K)
    z = np.concatenate([pos[:, None], neg], axis=1) / temperature
    expected = np.mean(np.log(np.sum(np.exp(z), axis=1)) - z[:, 0])  # -log softmax of the positive

    assert logits.shape == (3, 6) and torch.equal(labels, torch.zeros(3, dtype=torch.long))
    np.testing.assert_allclose(logits.detach().double().numpy(), z, rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_forward_returns_normalised_keys_on_request():
    moco = tiny_moco()
    _, _, keys = moco(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), return_keys=True)
    assert keys.shape == (4, 4) and not keys.requires_grad
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(4))


def test_key_encoder_gets_no_gradient():
    moco = tiny_moco(bn_splits=2)
    logits, labels = moco(torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8))
    nn.CrossEntropyLoss()(logits, labels).backward()
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moco.encoder_q.parameters())
    assert moco.queue.grad is None


def test_split_batchnorm_normalises_each_group_on_its_own():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, num_splits=4)
    x = torch.randn(8, 3, 5, 5)
    y = bn(x)
    for g in range(4):  # group g = samples g and g + 4, normalised with their own mean and biased variance
        xg = x[g::4]
        mean, var = xg.mean(dim=(0, 2, 3), keepdim=True), xg.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(y[g::4], (xg - mean) / torch.sqrt(var + bn.eps), rtol=1e-4, atol=1e-5)
    # a sample's output depends on its own group only
    x2 = x.clone()
    x2[0] = x2[0] * 5 + 3
    y2 = SplitBatchNorm2d(3, num_splits=4)(x2)
    assert not torch.allclose(y2[4], y[4])  # sample 0's group partner
    others = [i for i in range(8) if i % 4 != 0]
    torch.testing.assert_close(y2[others], y[others])
    # plain BN mixes everything: the same change moves every output
    y_plain, y2_plain = nn.BatchNorm2d(3)(x), nn.BatchNorm2d(3)(x2)
    assert not torch.allclose(y_plain[others], y2_plain[others])


def test_split_batchnorm_running_stats_average_the_groups():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 4, 4)
    for splits in (3, 4):  # 6 = 3 groups of 2 (fused path); 4 unequal groups of 2, 2, 1, 1 (chunked path)
        bn = SplitBatchNorm2d(2, num_splits=splits, momentum=0.5)
        xg = x.clone().requires_grad_()
        y = bn(xg)
        y.pow(2).sum().backward()
        assert xg.grad is not None and bn.weight.grad is not None  # differentiable on both paths
        groups = [x[g::splits] for g in range(splits)]
        for g, group in enumerate(groups):
            mean, var = group.mean(dim=(0, 2, 3), keepdim=True), group.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            torch.testing.assert_close(y[g::splits], (group - mean) / torch.sqrt(var + bn.eps), rtol=1e-4, atol=1e-5)
        mean = torch.stack([g.mean(dim=(0, 2, 3)) for g in groups]).mean(0)
        var = torch.stack([g.transpose(0, 1).reshape(2, -1).var(dim=1, unbiased=True) for g in groups]).mean(0)
        torch.testing.assert_close(bn.running_mean, 0.5 * mean)
        torch.testing.assert_close(bn.running_var, 0.5 * torch.ones(2) + 0.5 * var)
        assert int(bn.num_batches_tracked) == 1
    bn.eval()  # evaluation: plain BN with the running statistics
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                              bn.bias, False, 0.0, bn.eps))


def test_split_batchnorm_conversion_keeps_state_and_keys():
    net = build_backbone("resnet18")
    net.bn1.running_mean.fill_(0.25)
    keys = list(net.state_dict())
    convert_to_split_batchnorm(net, 4)
    assert isinstance(net.bn1, SplitBatchNorm2d) and isinstance(net.layer4[1].bn2, SplitBatchNorm2d)
    assert list(net.state_dict()) == keys and float(net.bn1.running_mean[0]) == 0.25
    revert_split_batchnorm(net)
    assert type(net.bn1) is nn.BatchNorm2d and float(net.bn1.running_mean[0]) == 0.25


def test_moco_uses_split_bn_in_both_encoders_and_shuffles_keys_consistently():
    moco = tiny_moco(bn_splits=2)
    assert isinstance(moco.encoder_q.backbone[1], SplitBatchNorm2d)
    assert isinstance(moco.encoder_k.backbone[1], SplitBatchNorm2d)
    im_k = torch.randn(6, 1, 8, 8)
    # eval mode: BN is per-sample, so the shuffle must be exactly undone
    moco.eval()
    _, _, keys = moco(torch.randn(6, 1, 8, 8), im_k, return_keys=True)
    torch.testing.assert_close(keys, nn.functional.normalize(moco.encoder_k(im_k), dim=1))
    # train mode: keys are computed on the shuffled batch (groups of other images), returned in query order
    moco.train()
    torch.manual_seed(3)
    perm = random_permutation(6)
    torch.manual_seed(3)
    keys = moco._encode_keys(im_k)
    with torch.no_grad():
        expected = nn.functional.normalize(moco.encoder_k(im_k[perm]), dim=1)[torch.argsort(perm)]
    torch.testing.assert_close(keys, expected)


def test_backbone_export_loads_into_plain_backbone():
    moco = MoCo(build_backbone("resnet18"), queue_size=16, bn_splits=4)
    assert moco.encoder_q.head.fc1.in_features == 512 and moco.encoder_q.head.fc2.out_features == 128
    plain = build_backbone("resnet18")
    plain.load_state_dict(moco.backbone.state_dict(), strict=True)
    moco.eval()
    plain.eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(plain(x), moco.backbone(x))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        tiny_moco(queue_size=0)
    with pytest.raises(ValueError):
        tiny_moco(temperature=0.0)
    with pytest.raises(ValueError):
        tiny_moco(bn_splits=0)
    assert math.isclose(tiny_moco().temperature, 0.2)
