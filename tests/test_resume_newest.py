"""Resume continues from the newest training state (issue #12 part 4) and restores RNG states wherever the checkpoint
loader mapped them (issue #21).

A finished 2-epoch run leaves ``checkpoint_final_iteration=20.pt``; a rerun with more epochs, killed while writing
``checkpoint_epoch=4.pt``, leaves ``checkpoint_epoch=3.pt`` and a truncated epoch-4 file. File names count
iterations in one case and epochs (or continual rounds) in the other, so only the trainer state inside each file says
which is newest."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from muscle_ext.handlers import MetricHistory, RNGStates, latest_checkpoint
from muscle_ext.networks import build_backbone, save_backbone

from tests.bundle_utils import downstream_configs as configs
from tests.bundle_utils import run_bundle
from tests.bundle_utils import tiny_downstream as tiny


# --------------------------------------------------------------------------------------- folders MONAI's saver writes
def _truncate(path: Path) -> None:
    """Cut a file short, as a kill or a full disk leaves a checkpoint being written."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _train(folder: Path, max_epochs: int, epoch_length: int, stop_after: int | None = None,
           extra: dict | None = None) -> None:
    """Run an ignite engine with the bundles' resume handlers (MONAI's CheckpointLoader on the newest checkpoint,
    CheckpointSaver per epoch with save_final and n_saved=2); ``stop_after``: end it as a kill would after that
    epoch's checkpoint is written."""
    trainer = Engine(lambda engine, batch: None)
    to_save = {"model": nn.Linear(2, 1), "trainer": trainer, **(extra or {})}
    newest = latest_checkpoint(folder)
    if newest is not None:
        CheckpointLoader(newest, to_save, map_location="cpu").attach(trainer)
    # a killed run writes no final checkpoint: stop this one after epoch `stop_after` without one
    CheckpointSaver(str(folder), to_save, save_interval=1, epoch_level=True, save_final=stop_after is None,
                    n_saved=2).attach(trainer)
    if stop_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
    trainer.run(range(epoch_length), max_epochs=max_epochs)


def _state(path: str | Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")["trainer"]


def _killed_rerun_folder(folder: Path, epoch_length: int, extra: dict | None = None) -> None:
    _train(folder, max_epochs=2, epoch_length=epoch_length, extra=extra)  # run 1 finishes
    _train(folder, max_epochs=10, epoch_length=epoch_length, stop_after=4, extra=extra)  # run 2 ...
    _truncate(folder / "checkpoint_epoch=4.pt")  # ... killed while writing epoch 4


def test_newest_state_wins_over_the_biggest_number_in_a_name(tmp_path, caplog):
    _killed_rerun_folder(tmp_path, epoch_length=10)
    assert {p.name for p in tmp_path.glob("*.pt")} == {  # run 1's epoch 1 and 2 are not run 2's to delete
        "checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "checkpoint_final_iteration=20.pt", "checkpoint_epoch=3.pt",
        "checkpoint_epoch=4.pt"}
    assert _state(tmp_path / "checkpoint_final_iteration=20.pt")["iteration"] == 20  # end of epoch 2
    assert _state(tmp_path / "checkpoint_epoch=3.pt")["iteration"] == 30

    with caplog.at_level(logging.WARNING, logger="muscle_ext.handlers.checkpointing"):
        newest = latest_checkpoint(tmp_path)
    assert Path(newest).name == "checkpoint_epoch=3.pt"
    skipped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(skipped) == 1 and "checkpoint_epoch=4.pt" in skipped[0]

    # run 3 resumes there: epochs 4..10 (70 iterations), not epoch 3 again
    epochs = []
    trainer_runs = Engine(lambda engine, batch: None)
    trainer_runs.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    CheckpointLoader(newest, {"trainer": trainer_runs}, map_location="cpu").attach(trainer_runs)
    trainer_runs.run(range(10), max_epochs=10)
    assert epochs == list(range(4, 11))


def test_continual_rounds(tmp_path):
    """The continual bundle's checkpoints: rounds of 3 visits x 2 steps (``checkpoint_epoch=<round>.pt``), the same
    objects as its ``train#checkpoint`` (a task-model ModuleDict, AdamW, LambdaLR, trainer, MetricHistory)."""
    network = nn.ModuleDict({"pneumonia": nn.Linear(2, 2), "lung": nn.Conv2d(1, 2, 1)})
    optimizer = torch.optim.AdamW(network.parameters())
    history = MetricHistory(tmp_path / "task_metrics.json")
    history.rounds = {1: {"pneumonia_auc": 0.5}}
    extra = {"network": network, "optimizer": optimizer,
             "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0), "history": history}
    _killed_rerun_folder(tmp_path, epoch_length=6, extra=extra)
    assert _state(tmp_path / "checkpoint_final_iteration=12.pt")["iteration"] == 12  # two rounds; 12 > 3
    newest = latest_checkpoint(tmp_path)
    assert Path(newest).name == "checkpoint_epoch=3.pt" and _state(newest)["iteration"] == 18


def test_ties_unreadable_files_and_other_states(tmp_path, caplog):
    engine = Engine(lambda e, b: None)
    engine.run(range(5), max_epochs=2)  # iteration 10
    state = engine.state_dict()
    torch.save({"trainer": state}, tmp_path / "checkpoint_epoch=2.pt")
    torch.save({"trainer": state}, tmp_path / "checkpoint_final_iteration=10.pt")
    os.utime(tmp_path / "checkpoint_epoch=2.pt", ns=(2_000_000_000_000_000_000,) * 2)  # the newer of the two
    os.utime(tmp_path / "checkpoint_final_iteration=10.pt", ns=(1_000_000_000_000_000_000,) * 2)
    assert Path(latest_checkpoint(tmp_path)).name == "checkpoint_epoch=2.pt"
    os.utime(tmp_path / "checkpoint_final_iteration=10.pt", ns=(3_000_000_000_000_000_000,) * 2)
    assert Path(latest_checkpoint(tmp_path)).name == "checkpoint_final_iteration=10.pt"

    # ignite's other form of an engine state (epoch + epoch_length) counts too; other keys are honoured
    torch.save({"trainer": {"epoch": 3, "epoch_length": 5, "max_epochs": 9}}, tmp_path / "checkpoint_epoch=3.pt")
    assert Path(latest_checkpoint(tmp_path)).name == "checkpoint_epoch=3.pt"
    torch.save({"engine": {"iteration": 99}}, tmp_path / "checkpoint_other=1.pt")
    assert Path(latest_checkpoint(tmp_path, key="engine")).name == "checkpoint_other=1.pt"

    # a file that needs weights_only=False (pickled code) is never loaded, a stateless one never chosen
    torch.save({"trainer": {"iteration": 1000}, "fn": _truncate}, tmp_path / "checkpoint_epoch=9.pt")
    (tmp_path / "checkpoint_epoch=8.pt").write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="muscle_ext.handlers.checkpointing"):
        assert Path(latest_checkpoint(tmp_path)).name == "checkpoint_epoch=3.pt"
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(name in warned for name in ("checkpoint_epoch=9.pt", "checkpoint_epoch=8.pt", "checkpoint_other=1.pt"))

    assert latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert latest_checkpoint(tmp_path / "empty") is None


# -------------------------------------------------------------------------- the downstream bundle, end to end
def test_downstream_rerun_after_a_kill_continues_with_the_next_epoch(tmp_path, xray_root):
    """Run 1: 2 epochs, finished; run 2: longer, killed while writing epoch 4; run 3 continues after epoch 3.

    The bundle keeps one resumable state, written atomically (ResumableCheckpoint): a kill while writing leaves the
    previous state intact next to a half-written temporary file. A truncated ``checkpoint_*.pt`` (what MONAI's
    in-place CheckpointSaver left, which earlier versions of the bundle used) is skipped as well."""
    settings = tiny(tmp_path, xray_root, image_size=32, batch_size=2, max_items=8, use_tracking=False, amp=False,
                    n_bootstrap=10)  # 4 iterations per epoch
    ckpts = tmp_path / "out" / "checkpoints"
    run_bundle("downstream", configs("pneumonia"), {**settings, "num_epochs": 2}, timeout=300)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint_8.pt"]
    assert _state(ckpts / "checkpoint_8.pt")["iteration"] == 8
    run_bundle("downstream", configs("pneumonia"), {**settings, "num_epochs": 3}, timeout=300)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint_12.pt"]  # the resumed run replaced run 1's
    # the folder a kill while writing epoch 4 leaves: the epoch-3 state, a half-written temporary file of the atomic
    # saver, and (from an in-place saver) a truncated newer checkpoint
    data = (ckpts / "checkpoint_12.pt").read_bytes()
    (ckpts / "tmpk1ll3d").write_bytes(data[: len(data) // 2])
    (ckpts / "checkpoint_16.pt").write_bytes(data[: len(data) // 2])

    proc = run_bundle("downstream", configs("pneumonia"), {**settings, "num_epochs": 5}, timeout=300)
    log = proc.stdout + proc.stderr
    assert re.search(r"Restored all variables from \S*checkpoint_12\.pt", log), log[-3000:]
    assert re.search(r"skipping unreadable checkpoint checkpoint_16\.pt", log)
    trained = sorted({int(e) for e in re.findall(r"Epoch: (\d+)/5, Iter:", log)})
    assert trained == [4, 5]  # epoch 3 is not trained again
    assert _state(ckpts / "checkpoint_20.pt")["iteration"] == 20
    assert not (ckpts / "checkpoint_12.pt").exists()  # one state kept


@pytest.mark.slow  # three bundle runs of ~20 s each here; test_continual_rounds covers the same folder by default
def test_continual_rerun_after_a_kill_continues_with_the_next_round(tmp_path, xray_root):
    """The same for the continual bundle (atomic ``checkpoint_<iteration>.pt`` files, one per round): a kill while
    the round-4 state was being written leaves the round-3 state and a temporary file."""
    start = tmp_path / "md_moco" / "backbone.pt"
    torch.manual_seed(0)
    save_backbone(start, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True}, source={"bundle": "test"})
    settings = {"dataset_dir": xray_root, "output_dir": tmp_path / "out", "model_dir": tmp_path / "models",
                "init_weights": start, "image_size": 32, "batch_size": 4, "steps_per_visit": 1, "max_items": 8,
                "num_workers": 0, "use_tracking": False, "amp": False, "keep_checkpoints": 2}  # rounds of 3 steps
    ckpts = tmp_path / "out" / "checkpoints"
    run_bundle("muscle_continual", ["train.yaml"], {**settings, "rounds": 2}, timeout=300)
    run_bundle("muscle_continual", ["train.yaml"], {**settings, "rounds": 4}, timeout=300)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint_12.pt", "checkpoint_9.pt"]
    (ckpts / "checkpoint_12.pt").rename(ckpts / "tmpk1ll3d")  # the round-4 write never completed

    proc = run_bundle("muscle_continual", ["train.yaml"], {**settings, "rounds": 5}, timeout=300)
    log = proc.stdout + proc.stderr
    assert re.search(r"Restored all variables from \S*checkpoint_9\.pt", log), log[-3000:]
    assert sorted({int(r) for r in re.findall(r"round (\d+): task \w+ \(", log)}) == [4, 5]  # not round 3 again
    assert _state(latest_checkpoint(ckpts))["iteration"] == 15


# --------------------------------------------------------------------------- RNG states mapped to another device
def _moves_to_cpu(*args, **kwargs) -> bool:
    device = kwargs.get("device", args[0] if args and isinstance(args[0], (str, torch.device)) else None)
    return device is not None and torch.device(device).type == "cpu"


class _OnAccelerator(torch.Tensor):
    """A tensor as ``map_location='cuda'`` hands it over: ``.cpu()`` / ``.to('cpu')`` give a plain CPU tensor,
    ``tolist()`` works (as on CUDA); any other use of its data fails, as ``.numpy()`` of a CUDA tensor does."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.cpu or (func is torch.Tensor.to and _moves_to_cpu(*args[1:], **kwargs)):
                return func(*args, **kwargs).as_subclass(torch.Tensor)
            if func in (torch.Tensor.detach, torch.Tensor.to):  # still on the accelerator
                return func(*args, **kwargs).as_subclass(cls)
            if getattr(func, "__name__", "") in ("__get__", "__repr__", "__format__", "tolist"):  # .device, printing
                return func(*args, **kwargs)
        raise RuntimeError(f"{getattr(func, '__name__', func)}: the tensor is on an accelerator; move it to the CPU")


def _mapped(state):
    if isinstance(state, torch.Tensor):
        return state.as_subclass(_OnAccelerator)
    if isinstance(state, dict):
        return {k: _mapped(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_mapped(v) for v in state]
    return state


def _reseed() -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_restore_from_tensors_on_another_device(monkeypatch):
    cuda_states = [torch.Generator().manual_seed(k).get_state() for k in (1, 2)]  # as two GPUs saved them
    saved = {**RNGStates().state_dict(), "cuda": cuda_states}
    expected = _draws()
    mapped = _mapped(saved)
    assert isinstance(mapped["torch"], _OnAccelerator) and isinstance(mapped["numpy"][1], _OnAccelerator)
    with pytest.raises(RuntimeError, match="accelerator"):
        mapped["numpy"][1].numpy()  # the stand-in fails as a CUDA tensor does

    set_cpu, set_cuda = torch.set_rng_state, []

    def checked_set_rng_state(state):
        assert type(state) is torch.Tensor and state.device.type == "cpu" and state.dtype == torch.uint8
        set_cpu(state)

    def fake_set_rng_state_all(states):
        set_cuda.extend(states)

    monkeypatch.setattr(torch, "set_rng_state", checked_set_rng_state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", fake_set_rng_state_all)
    _reseed()
    RNGStates().load_state_dict(mapped)
    assert _draws() == expected
    assert len(set_cuda) == 1 and all(type(s) is torch.Tensor and s.device.type == "cpu" and s.dtype == torch.uint8
                                      for s in set_cuda)
    assert torch.equal(set_cuda[0], cuda_states[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_restore_through_the_checkpoint_loader_on_cuda(tmp_path):
    rng = RNGStates()
    path = tmp_path / "checkpoint_epoch=1.pt"
    torch.save({"rng": rng.state_dict()}, path)
    expected = (*_draws(), float(torch.rand(1, device="cuda")))
    _reseed()
    engine = Engine(lambda e, b: None)
    CheckpointLoader(str(path), {"rng": rng}, map_location=torch.device("cuda:0"))(engine)
    assert (*_draws(), float(torch.rand(1, device="cuda"))) == expected


# --------------------------------------------------------------------------------- atomic resumable checkpoints
def test_resumable_checkpoint_keeps_the_last_state_through_a_failed_save(tmp_path, monkeypatch):
    from ignite.engine import Engine

    from muscle_ext.handlers import ResumableCheckpoint

    net = torch.nn.Linear(3, 2)
    engine = Engine(lambda e, b: None)
    ResumableCheckpoint(tmp_path, {"model": net, "trainer": engine}, keep=1).attach(engine)
    engine.run([0] * 4, max_epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_8.pt"]  # one state kept; final == epoch 2

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # half a file, then the disk is full
        f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    engine2 = Engine(lambda e, b: None)
    ResumableCheckpoint(tmp_path, {"model": net, "trainer": engine2}, keep=1).attach(engine2)
    with pytest.raises(OSError, match="No space"):
        engine2.run([0] * 4, max_epochs=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_8.pt"]  # no half-written file, old one intact
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_8.pt")
    state = torch.load(tmp_path / "checkpoint_8.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 8


def test_resumable_checkpoint_interval_and_keep(tmp_path):
    from ignite.engine import Engine

    from muscle_ext.handlers import ResumableCheckpoint

    engine = Engine(lambda e, b: None)
    ResumableCheckpoint(tmp_path, {"trainer": engine}, keep=2, interval=3, epoch_level=False).attach(engine)
    engine.run([0] * 5, max_epochs=2)  # saves at iterations 3, 6, 9 and the final 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_10.pt", "checkpoint_9.pt"]
    with pytest.raises(ValueError, match="keep"):
        ResumableCheckpoint(tmp_path, {}, keep=0)


def test_resumable_checkpoint_removes_the_state_a_killed_run_left(tmp_path):
    from ignite.engine import Engine

    from muscle_ext.handlers import ResumableCheckpoint

    first = Engine(lambda e, b: None)
    ResumableCheckpoint(tmp_path, {"trainer": first}, keep=1, interval=3, epoch_level=False).attach(first)
    first.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda e: e.terminate())
    first.run([0] * 5, max_epochs=2)  # stopped: checkpoint_3.pt (and the state at 4 on COMPLETED)
    resumed = Engine(lambda e, b: None)
    resumed.load_state_dict(torch.load(latest_checkpoint(tmp_path), weights_only=True))  # a lone object: saved flat
    ResumableCheckpoint(tmp_path, {"trainer": resumed}, keep=1, interval=3, epoch_level=False).attach(resumed)
    resumed.run([0] * 5, max_epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_10.pt"]
