"""MoCoTrainer on random 1x32x32 images: one iteration = one MoCo step, AMP, compile, stock MONAI handlers."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from ignite.engine import Events
from ignite.metrics import Average
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.handlers import (
    CheckpointLoader,
    CheckpointSaver,
    EarlyStopHandler,
    LrScheduleHandler,
    StatsHandler,
    ValidationHandler,
    from_engine,
    stopping_fn_from_metric,
)
from torch import nn

from muscle_ext.engines import MoCoTrainer, cosine_with_warmup, cosine_with_warmup_factor
from muscle_ext.networks import MoCo, build_backbone

BATCH, QUEUE = 4, 10  # K = 10 is not a multiple of the batch: the pointer wraps mid-batch


def make_moco(resnet: bool = True, **kwargs) -> MoCo:
    torch.manual_seed(0)
    if resnet:
        return MoCo(build_backbone("resnet18"), queue_size=QUEUE, bn_splits=2, **kwargs)
    tiny = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())
    return MoCo(tiny, feature_dim=8, dim=4, queue_size=QUEUE, bn_splits=2, **kwargs)


def make_data(n: int = 3, q: str = "image_q", k: str = "image_k") -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{q: torch.rand(BATCH, 1, 32, 32, generator=g), k: torch.rand(BATCH, 1, 32, 32, generator=g)}
            for _ in range(n)]


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_three_iterations_update_query_queue_and_key_by_momentum():
    moco = make_moco(momentum=0.9)
    q0 = params(moco.encoder_q)
    opt = torch.optim.SGD(moco.parameters(), lr=0.05, momentum=0.9)
    trainer = MoCoTrainer("cpu", 1, make_data(3), moco, opt)
    # check the momentum rule on a sample of tensors (stem, a BN, last block, head) to keep the test light
    names = ["backbone.conv1.weight", "backbone.bn1.weight", "backbone.layer4.1.conv2.weight", "head.fc2.bias"]
    q_params, k_params = dict(moco.encoder_q.named_parameters()), dict(moco.encoder_k.named_parameters())
    checks = []

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        engine.state.key_before = {n: k_params[n].detach().clone() for n in names}
        engine.state.queue_before = moco.queue.clone()

    @trainer.on(IterationEvents.MODEL_COMPLETED)
    def _after(engine):  # the optimiser step, momentum update and enqueue are done
        for n in names:
            expected = 0.9 * engine.state.key_before[n] + 0.1 * q_params[n]
            checks.append(torch.allclose(k_params[n], expected, rtol=1e-6, atol=1e-7))

    trainer.run()
    assert len(checks) == 3 * len(names) and all(checks)
    assert not torch.equal(k_params["backbone.conv1.weight"], q0[0])  # the key encoder moved (k0 = q0)
    assert any(not torch.equal(a, b) for a, b in zip(q0, params(moco.encoder_q), strict=True))
    assert int(moco.queue_ptr) == (3 * BATCH) % QUEUE
    assert not torch.equal(moco.queue, trainer.state.queue_before)
    torch.testing.assert_close(moco.queue.norm(dim=0), torch.ones(QUEUE))
    assert all(p.grad is None for p in moco.encoder_k.parameters())

    out = trainer.state.output  # decollated: one dict per sample, scalars replicated
    assert len(out) == BATCH
    assert math.isfinite(out[0]["loss"]) and 0.0 <= out[0]["acc_top1"] <= 1.0
    assert out[0]["pred"].shape == (1 + QUEUE,) and int(out[0]["label"]) == 0


def test_view_keys_and_undecollated_output():
    moco = make_moco(resnet=False)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1)
    trainer = MoCoTrainer("cpu", 1, make_data(2, "a", "b"), moco, opt, view_keys=("a", "b"), decollate=False)
    trainer.run()
    out = trainer.state.output
    assert out["pred"].shape == (BATCH, 1 + QUEUE) and not out["pred"].requires_grad
    assert out["loss"].ndim == 0 and not out["loss"].requires_grad and out["acc_top1"].ndim == 0
    with pytest.raises(KeyError, match="image_q"):
        MoCoTrainer("cpu", 1, make_data(1, "a", "b"), make_moco(resnet=False), opt).run()


def test_bf16_autocast_on_cpu_with_channels_last():
    moco = make_moco()
    q0 = params(moco.encoder_q)
    opt = torch.optim.SGD(moco.parameters(), lr=0.05)
    trainer = MoCoTrainer("cpu", 1, make_data(2), moco, opt, amp=True, amp_kwargs={"dtype": torch.bfloat16},
                          channels_last=True, decollate=False)
    seen = {}
    moco.encoder_q.backbone.conv1.register_forward_hook(
        lambda m, i, o: seen.update(dtype=o.dtype, channels_last=i[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.run()
    assert trainer.scaler is None  # no GradScaler for bf16 (nor on CPU)
    assert seen == {"dtype": torch.bfloat16, "channels_last": True}
    assert trainer.state.output["pred"].dtype == torch.float32  # logits are computed in fp32
    assert math.isfinite(trainer.state.output["loss"].item())
    assert moco.encoder_q.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(not torch.equal(a, b) for a, b in zip(q0, params(moco.encoder_q), strict=True))
    assert int(moco.queue_ptr) == (2 * BATCH) % QUEUE


def test_compile_keeps_network_unwrapped():
    moco = make_moco(resnet=False)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1)
    trainer = MoCoTrainer("cpu", 1, make_data(2), moco, opt, compile=True, compile_kwargs={"backend": "eager"})
    trainer.run()
    assert trainer.network is moco and trainer.forward_fn is not moco
    assert "queue" in trainer.network.state_dict()
    assert int(moco.queue_ptr) == (2 * BATCH) % QUEUE


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compile_with_inductor_and_split_bn():
    # inductor's x[randperm(n)] rewrite used to crash on the split-BN key shuffle (~30 s of C++ compilation)
    moco = make_moco(resnet=False)
    trainer = MoCoTrainer("cpu", 1, make_data(2), moco, torch.optim.SGD(moco.parameters(), lr=0.1), compile=True,
                          amp=True, amp_kwargs={"dtype": torch.bfloat16}, decollate=False)
    trainer.run()
    assert math.isfinite(trainer.state.output["loss"].item()) and int(moco.queue_ptr) == (2 * BATCH) % QUEUE


def test_gradient_accumulation_steps_and_momentum_only_after_steps():
    moco = make_moco(resnet=False, momentum=0.5)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1)
    trainer = MoCoTrainer("cpu", 1, make_data(4), moco, opt, accumulation_steps=2)
    steps, key_moves = [], []

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        engine.state.key_before = params(moco.encoder_k)

    @trainer.on(IterationEvents.MODEL_COMPLETED)
    def _after(engine):
        steps.append(engine.state.iteration)
        key_moves.append(any(not torch.equal(a, b) for a, b in zip(engine.state.key_before,
                                                                    moco.encoder_k.parameters(), strict=True)))

    trainer.run()
    assert key_moves == [False, True, False, True]
    assert int(moco.queue_ptr) == (4 * BATCH) % QUEUE  # every batch is enqueued


def test_cosine_momentum_follows_training_progress():
    moco = make_moco(resnet=False, momentum=0.5, momentum_cosine=True)
    used = []
    moco.update_key_encoder = lambda m=None, _orig=moco.update_key_encoder: (used.append(m), _orig(m))
    trainer = MoCoTrainer("cpu", 2, make_data(2), moco, torch.optim.SGD(moco.parameters(), lr=0.1))
    trainer.run()
    assert used == pytest.approx([moco.momentum_at(i / 4) for i in range(4)])
    assert used[0] == pytest.approx(0.5) and used[-1] > used[0]


def test_cosine_with_warmup_schedule():
    assert [cosine_with_warmup_factor(s, 2, 6) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine_with_warmup_factor(4, 2, 6) == pytest.approx(0.5)
    assert cosine_with_warmup_factor(6, 2, 6, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert cosine_with_warmup_factor(99, 2, 6, min_lr_ratio=0.1) == pytest.approx(0.1)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, 2, 6)
    for _ in range(6):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    # a finished run extended to 12 iterations resumes on the new schedule, not at the old run's final rate
    extended = cosine_with_warmup(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 2, 12)
    extended.load_state_dict(sched.state_dict())
    assert extended.get_last_lr()[0] == 0.0  # restored as it was saved...
    extended.optimizer.step()
    extended.step()
    assert extended.get_last_lr()[0] == pytest.approx(cosine_with_warmup_factor(7, 2, 12))  # ...then the new one
    with pytest.raises(ValueError):
        cosine_with_warmup(opt, 7, 6)


def test_checkpoint_round_trip_restores_queue_pointer_and_iteration(tmp_path):
    moco = make_moco(resnet=False)
    opt = torch.optim.SGD(moco.parameters(), lr=0.1, momentum=0.9)
    trainer = MoCoTrainer("cpu", 1, make_data(3), moco, opt)
    saver = CheckpointSaver(str(tmp_path), {"network": moco, "optimizer": opt, "trainer": trainer},
                            save_final=True, final_filename="final.pt")
    saver.attach(trainer)
    trainer.run()
    saved_queue, saved_ptr = moco.queue.clone(), int(moco.queue_ptr)
    saved_key = params(moco.encoder_k)
    assert saved_ptr == (3 * BATCH) % QUEUE

    moco2 = make_moco(resnet=False)
    torch.manual_seed(123)
    moco2.queue.copy_(nn.functional.normalize(torch.randn_like(moco2.queue), dim=0))
    opt2 = torch.optim.SGD(moco2.parameters(), lr=0.1, momentum=0.9)
    trainer2 = MoCoTrainer("cpu", 2, make_data(3), moco2, opt2)
    CheckpointLoader(str(tmp_path / "final.pt"), {"network": moco2, "optimizer": opt2, "trainer": trainer2},
                     map_location="cpu").attach(trainer2)
    restored = {}

    @trainer2.on(Events.STARTED)
    def _snapshot(engine):  # runs after the loader (attached first)
        restored.update(queue=moco2.queue.clone(), ptr=int(moco2.queue_ptr), key=params(moco2.encoder_k),
                        iteration=engine.state.iteration)

    trainer2.run()
    assert torch.equal(restored["queue"], saved_queue) and restored["ptr"] == saved_ptr
    assert all(torch.equal(a, b) for a, b in zip(restored["key"], saved_key, strict=True))
    assert restored["iteration"] == 3 and trainer2.state.iteration == 6  # resumed for the second epoch only
    assert int(moco2.queue_ptr) == (6 * BATCH) % QUEUE


def test_stock_handlers():
    moco = make_moco(resnet=False)
    opt = torch.optim.SGD(moco.parameters(), lr=1.0)
    sched = cosine_with_warmup(opt, warmup_iters=1, total_iters=6)
    # a validator with a constant score: early stopping (patience 1) ends training after the second epoch
    evaluator = SupervisedEvaluator(
        "cpu", [{"image": torch.rand(2, 1, 32, 32), "label": torch.zeros(2)}], network=moco.backbone,
        key_val_metric={"score": Average(output_transform=lambda _: torch.tensor(0.5))})
    early_stop = EarlyStopHandler(patience=1, score_function=stopping_fn_from_metric("score"))
    early_stop.attach(evaluator)
    lrs = []
    trainer = MoCoTrainer(
        "cpu", 5, make_data(2), moco, opt,
        train_handlers=[
            LrScheduleHandler(sched, epoch_level=False, print_lr=False),
            ValidationHandler(interval=1, validator=evaluator),
            StatsHandler(name="moco_test", tag_name="loss",
                         output_transform=lambda out: {k: out[0][k] for k in ("loss", "acc_top1")}),
            StatsHandler(name="moco_test_loss", output_transform=from_engine(["loss"], first=True)),
        ])
    early_stop.set_trainer(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(opt.param_groups[0]["lr"]))
    messages: list[str] = []
    collect = logging.Handler(logging.INFO)
    collect.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("moco_test")
    logger.setLevel(logging.INFO)
    logger.addHandler(collect)
    try:
        trainer.run()
    finally:
        logger.removeHandler(collect)
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4  # stopped early, not after 5 epochs
    assert lrs == pytest.approx([cosine_with_warmup_factor(i, 1, 6) for i in range(1, 5)])
    assert any("acc_top1: " in m and "loss: " in m for m in messages)


def test_knn_monitor_records_metrics_and_leaves_the_global_rng_alone():
    from ignite.engine import Engine
    from torch.utils.data import DataLoader

    from muscle_ext.handlers import KNNMonitor

    # two classes told apart by which half is bright: their pooled 2x2 embeddings point in different directions
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(16):
        image = 0.1 * torch.rand(1, 8, 8, generator=g)
        image[:, :4] += 1.0 if i % 2 else 0.0
        image[:, 4:] += 0.0 if i % 2 else 1.0
        data.append({"image": image, "label": i % 2})
    embed = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
    monitor = KNNMonitor(embed, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4), k=3,
                         device="cpu")
    engine = Engine(lambda e, b: None)
    before = torch.get_rng_state()
    monitor(engine)
    # loaders draw their base seed from the global RNG; training draws shuffle-BN permutations from it too
    assert torch.equal(torch.get_rng_state(), before)
    assert engine.state.metrics["knn_auc"] == pytest.approx(1.0)
    assert engine.state.metrics["knn_accuracy"] == pytest.approx(1.0)
