"""Multi-task continual learning engine: the cyclic reshuffled schedule, task dispatch, exact resume and the cross-task
memorization pull (synthetic tensors: these check the mechanics; the bundle test trains on real X-rays)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import Dataset
from monai.transforms import RandGaussianNoised
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from muscle_ext.engines import (
    JointSchedule,
    MultiTaskTrainer,
    SupervisedTask,
    TaskEvents,
    TaskSchedule,
    task_loss,
    task_schedule,
)
from muscle_ext.handlers import CrossTaskMemorization, EWCMemorization


def test_schedule_reshuffles_each_round_and_keeps_every_task_once():
    schedule = TaskSchedule(["pneumonia", "knee", "lung", "tb"], steps=3, seed=7)
    orders = [schedule.order(r) for r in range(8)]
    assert all(sorted(o) == sorted(schedule.tasks) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert orders == [TaskSchedule(["pneumonia", "knee", "lung", "tb"], steps=3, seed=7).order(r) for r in range(8)]
    assert orders != [TaskSchedule(["pneumonia", "knee", "lung", "tb"], steps=3, seed=8).order(r) for r in range(8)]
    fixed = TaskSchedule(["pneumonia", "knee"], steps=1, reshuffle=False)
    assert [fixed.order(r) for r in range(3)] == [["pneumonia", "knee"]] * 3


def test_schedule_maps_iterations_to_visits():
    schedule = TaskSchedule(["a", "b"], steps={"a": 2, "b": 1}, reshuffle=False)
    assert schedule.steps_per_round == 3
    assert [schedule.task_at(i) for i in range(6)] == [("a", True), ("a", False), ("b", True)] * 2
    with pytest.raises(ValueError, match="distinct"):
        TaskSchedule(["a", "a"], steps=1)
    with pytest.raises(ValueError, match="steps name tasks"):
        TaskSchedule(["a", "b"], steps={"a": 1})
    with pytest.raises(ValueError, match="at least one step"):
        TaskSchedule(["a"], steps=0)


def _tasks(seed: int = 0) -> tuple[nn.Module, nn.ModuleDict, dict[str, SupervisedTask]]:
    g = torch.Generator().manual_seed(0)  # the same data whatever the weights' seed
    noise = RandGaussianNoised("x", prob=1.0, std=0.3)  # random augmentation: resume must reproduce it too
    data = {name: Dataset([{"x": torch.randn(4, generator=g), "y": int(torch.randint(0, k, (), generator=g))}
                           for _ in range(n)], transform=noise) for name, n, k in (("a", 12, 2), ("b", 10, 3))}
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    networks = nn.ModuleDict({"a": nn.Sequential(backbone, nn.Linear(8, 2)),
                              "b": nn.Sequential(backbone, nn.Linear(8, 3))})
    tasks = {name: SupervisedTask(networks[name], nn.CrossEntropyLoss(),
                                  DataLoader(data[name], batch_size=4, shuffle=True, generator=torch.Generator()),
                                  prepare_batch=lambda batch, device, non_blocking, **kw: (batch["x"], batch["y"]))
             for name in networks}
    return backbone, networks, tasks


def _trainer(networks: nn.ModuleDict, tasks: dict, rounds: int, handlers: list | None = None,
             steps: dict | None = None, optimizer: type = torch.optim.AdamW,
             mixing: str = "cyclic") -> MultiTaskTrainer:
    schedule = task_schedule(mixing, ["a", "b"], steps=steps or {"a": 2, "b": 3}, seed=3)
    optimizer = optimizer(networks.parameters(), lr=0.1)  # AdamW: a zero gradient would still move a head
    return MultiTaskTrainer("cpu", rounds, tasks, schedule, networks, optimizer, train_handlers=handlers, seed=5)


def test_each_iteration_trains_the_scheduled_task_only():
    _, networks, tasks = _tasks()
    trainer = _trainer(networks, tasks, rounds=3)
    seen, started = [], []
    trainer.add_event_handler(TaskEvents.TASK_STARTED, lambda e: started.append(e.state.task))
    heads = {name: net[1] for name, net in networks.items()}
    before = {}

    @trainer.on(Events.ITERATION_STARTED)
    def snapshot(engine):
        before.update({name: head.weight.detach().clone() for name, head in heads.items()})

    @trainer.on(Events.ITERATION_COMPLETED)
    def check(engine):
        task = engine.state.output["task"]
        seen.append(task)
        for name, head in heads.items():
            assert torch.equal(head.weight, before[name]) == (name != task), (engine.state.iteration, name)

    trainer.run()
    expected = [trainer.schedule.task_at(i)[0] for i in range(15)]
    assert seen == expected and started == [t for i, t in enumerate(expected) if trainer.schedule.task_at(i)[1]]
    assert len(started) == 6


def test_resumed_run_ends_with_the_same_weights():
    _, reference_nets, reference_tasks = _tasks()
    reference = _trainer(reference_nets, reference_tasks, rounds=3)
    reference.run()

    _, first_nets, first_tasks = _tasks()
    first = _trainer(first_nets, first_tasks, rounds=3)
    first.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())
    first.run()
    state = {"net": first_nets.state_dict(), "opt": first.optimizer.state_dict(), "trainer": first.state_dict()}

    _, resumed_nets, resumed_tasks = _tasks(seed=99)  # other initial weights: everything must come from the state
    resumed = _trainer(resumed_nets, resumed_tasks, rounds=3)
    resumed_nets.load_state_dict(state["net"])
    resumed.optimizer.load_state_dict(state["opt"])
    resumed.load_state_dict(state["trainer"])
    resumed.run()
    assert resumed.state.iteration == reference.state.iteration == 15
    for (name, a), b in zip(reference_nets.state_dict().items(), resumed_nets.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_joint_schedule_gives_each_task_its_batches_per_round_in_fewer_steps():
    joint = JointSchedule(["a", "b"], steps={"a": 2, "b": 3})
    assert joint.steps_per_round == 3 and joint.order(0) == ["joint"]
    assert [joint.tasks_at(i) for i in range(6)] == [["a", "b"], ["a", "b"], ["b"]] * 2
    assert [joint.task_at(i) for i in range(4)] == [("joint", True), ("joint", False), ("joint", False),
                                                    ("joint", True)]
    with pytest.raises(ValueError, match="no task order to reshuffle"):
        JointSchedule(["a", "b"], steps=1, reshuffle=True)
    with pytest.raises(ValueError, match="task_mixing must be one of cyclic, joint"):
        task_schedule("mixed", ["a"], steps=1)


def test_joint_step_trains_every_task_and_resumes_exactly():
    _, networks, tasks = _tasks()
    trainer = _trainer(networks, tasks, rounds=2, mixing="joint")
    heads = {name: net[1] for name, net in networks.items()}
    moved, logged = [], []

    @trainer.on(Events.ITERATION_STARTED)
    def snapshot(engine):
        engine.state.before = {name: head.weight.detach().clone() for name, head in heads.items()}

    @trainer.on(Events.ITERATION_COMPLETED)
    def check(engine):
        moved.append(sorted(n for n, h in heads.items() if not torch.equal(h.weight, engine.state.before[n])))
        logged.append(task_loss(engine.state.output))

    trainer.run()
    assert moved == [["a", "b"], ["a", "b"], ["b"]] * 2  # a takes its 2 batches per round, b its 3
    losses = logged[0]
    assert set(losses) == {"joint_loss", "a_loss", "b_loss"}
    assert losses["joint_loss"] == pytest.approx(losses["a_loss"] + losses["b_loss"], rel=1e-5)

    _, first_nets, first_tasks = _tasks()
    first = _trainer(first_nets, first_tasks, rounds=2, mixing="joint")
    first.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda e: e.terminate())  # inside round 2
    first.run()
    state = {"net": first_nets.state_dict(), "opt": first.optimizer.state_dict(), "trainer": first.state_dict()}
    _, resumed_nets, resumed_tasks = _tasks(seed=99)
    resumed = _trainer(resumed_nets, resumed_tasks, rounds=2, mixing="joint")
    resumed_nets.load_state_dict(state["net"])
    resumed.optimizer.load_state_dict(state["opt"])
    resumed.load_state_dict(state["trainer"])
    resumed.run()
    for (name, a), b in zip(networks.state_dict().items(), resumed_nets.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", [CrossTaskMemorization, EWCMemorization])
def test_memorization_refuses_the_joint_schedule(method):
    backbone, networks, tasks = _tasks()
    with pytest.raises(ValueError, match="no task visits to remember across"):
        _trainer(networks, tasks, rounds=1, handlers=[method(backbone, weight=0.1)], mixing="joint")


def test_each_penalty_is_zero_at_its_anchor_and_grows_as_weights_move():
    from muscle_ext.networks import regularizers as reg

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    params = reg.named_trainable(net)
    anchor = reg.snapshot(params)
    batches = [(torch.randn(6, 4), torch.randint(0, 2, (6,))) for _ in range(3)]
    fisher = reg.diagonal_fisher(params, lambda b: nn.functional.cross_entropy(net(b[0]), b[1]), batches)
    assert fisher.keys() == params.keys()
    assert all(f.shape == params[n].shape and (f >= 0).all() and f.sum() > 0 for n, f in fisher.items())
    values = {"l2sp": [], "ewc": []}
    for step in (0.0, 0.05, 0.1):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(anchor[name] + step)
        values["l2sp"].append(float(reg.l2sp_penalty(params, anchor).detach()))
        values["ewc"].append(float(reg.ewc_penalty(params, anchor, fisher).detach()))
    for name, (at_anchor, small, larger) in values.items():
        assert at_anchor == 0.0 and 0 < small < larger, name
    features = torch.randn(2, 3, 4, 4)
    assert float(reg.feature_distillation(features, features)) == 0.0
    near, far = (float(reg.feature_distillation(features + d, features)) for d in (0.1, 0.2))
    assert 0 < near < far
    # keyed by name: an anchor of another network is refused, never paired by position
    with pytest.raises(ValueError, match="by name"):
        reg.l2sp_penalty(params, {f"other.{n}": t for n, t in anchor.items()})


def test_l2sp_penalty_is_in_the_loss_before_backward():
    backbone = nn.Linear(3, 2)
    memory = CrossTaskMemorization(backbone, weight=0.5)
    memory.remember()
    start = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    engine = type("E", (), {})()
    engine.state = type("S", (), {"output": {"loss": (backbone.weight * 0).sum()}})()
    memory._add_penalty(engine)
    engine.state.output["loss"].backward()
    for name, p in backbone.named_parameters():  # d/dw of 0.5/2 * ||w - w0||^2 = 0.5 (w - w0)
        assert torch.allclose(p.grad, 0.5 * (p.detach() - start[name])), name
    assert engine.state.output["memorization"] == pytest.approx(0.5 * 0.5 * 8)  # 8 parameters moved by 1
    engine.state.output["task"] = "pneumonia"  # what StatsHandler and the tracking handler log of the step
    assert task_loss(engine.state.output) == {"pneumonia_loss": pytest.approx(2.0), "memorization": pytest.approx(2.0)}


@pytest.mark.parametrize("method", ["l2sp", "ewc", "distillation"])
def test_memorization_shows_in_the_logged_loss_and_resumes_exactly(method):
    """A run stopped in the middle of a task visit and resumed from its state (network, optimiser, trainer and the
    handler's anchors) ends bit-identical to an unbroken run, and the penalty was part of the logged loss."""
    from muscle_ext.handlers import EWCMemorization, FeatureDistillation
    from muscle_ext.networks import BackboneClassifier, build_backbone

    def setup(seed: int):
        g = torch.Generator().manual_seed(0)
        data = {name: [{"x": torch.randn(1, 32, 32, generator=g), "y": int(torch.randint(0, 2, (), generator=g))}
                       for _ in range(8)] for name in ("a", "b")}
        torch.manual_seed(seed)
        backbone = build_backbone("resnet18", widen_factor=0.25)  # a quarter of the channels: fast
        networks = nn.ModuleDict({n: BackboneClassifier(backbone, 2) for n in ("a", "b")})
        tasks = {n: SupervisedTask(networks[n], nn.CrossEntropyLoss(),
                                   DataLoader(Dataset(data[n]), batch_size=4, shuffle=True,
                                              generator=torch.Generator()),
                                   prepare_batch=lambda b, device, non_blocking, **kw: (b["x"], b["y"]))
                 for n in networks}
        memory = {"l2sp": lambda: CrossTaskMemorization(backbone, weight=1.0),
                  "ewc": lambda: EWCMemorization(backbone, weight=10.0, fisher_batches=2),
                  "distillation": lambda: FeatureDistillation(backbone, weight=1.0)}[method]()
        schedule = TaskSchedule(["a", "b"], steps={"a": 2, "b": 3}, seed=3)
        optimizer = torch.optim.SGD(networks.parameters(), lr=0.01)
        trainer = MultiTaskTrainer("cpu", 3, tasks, schedule, networks, optimizer, train_handlers=[memory], seed=5)
        return networks, trainer, memory

    reference_nets, reference, _ = setup(0)
    penalties = []
    reference.add_event_handler(Events.ITERATION_COMPLETED, lambda e: penalties.append(
        e.state.output.get("memorization", 0.0)))
    reference.run()
    assert max(penalties) > 0  # the penalty joined the loss (after the first visit for EWC)

    first_nets, first, first_memory = setup(0)
    first.add_event_handler(Events.ITERATION_COMPLETED(once=8), lambda e: e.terminate())  # inside round 2's 2nd visit
    first.run()
    assert not reference.schedule.task_at(8)[1]  # iteration 9 continues a visit: its anchor must come from the state
    state = {"net": first_nets.state_dict(), "opt": first.optimizer.state_dict(), "trainer": first.state_dict(),
             "memory": first_memory.state_dict()}
    resumed_nets, resumed, resumed_memory = setup(99)
    resumed_nets.load_state_dict(state["net"])
    resumed.optimizer.load_state_dict(state["opt"])
    resumed.load_state_dict(state["trainer"])
    resumed_memory.load_state_dict(state["memory"])
    resumed.run()
    assert resumed.state.iteration == reference.state.iteration == 15
    for (name, a), b in zip(reference_nets.state_dict().items(), resumed_nets.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_memorization_keeps_the_backbone_nearer_its_start_of_visit():
    drift = {}
    for weight in (0.0, 5.0):
        backbone, networks, tasks = _tasks()
        memory = CrossTaskMemorization(backbone, weight=weight)
        trainer = _trainer(networks, tasks, rounds=1, handlers=[memory], steps={"a": 12, "b": 12},
                           optimizer=torch.optim.SGD)
        starts: list[list[torch.Tensor]] = []
        trainer.add_event_handler(TaskEvents.TASK_STARTED, lambda e, b=backbone, s=starts: s.append(
            [p.detach().clone() for p in b.parameters()]))
        trainer.run()
        end = list(backbone.parameters())
        drift[weight] = sum(float((p.detach() - s).norm()) for p, s in zip(end, starts[-1], strict=True))
    assert drift[5.0] < 0.5 * drift[0.0]
    with pytest.raises(ValueError, match="weight"):
        CrossTaskMemorization(nn.Linear(1, 1), weight=-1)


def test_trainer_refuses_what_it_cannot_run():
    _, networks, tasks = _tasks()
    tasks["b"].data_loader = DataLoader(TensorDataset(torch.randn(3, 4), torch.zeros(3).long()), batch_size=4,
                                        drop_last=True)
    with pytest.raises(ValueError, match="task b: its data loader yields no batch"):
        _trainer(networks, tasks, rounds=1)
    _, networks, tasks = _tasks()
    with pytest.raises(ValueError, match="accumulation_steps"):
        MultiTaskTrainer("cpu", 1, tasks, TaskSchedule(["a", "b"], steps=1), networks,
                         torch.optim.SGD(networks.parameters(), lr=0.1), accumulation_steps=2)
    finished = _trainer(networks, tasks, rounds=1)
    finished.run()
    _, networks, tasks = _tasks()
    resumed = _trainer(networks, tasks, rounds=2, steps={"a": 1, "b": 1})  # rounds of 2 iterations, not 5
    resumed.load_state_dict(finished.state_dict())
    resumed.state.max_epochs = 2  # as MONAI's CheckpointLoader keeps the engine's own max_epochs
    with pytest.raises(ValueError, match="resume with the same steps per visit"):
        resumed.run()
