"""MLflow tracking: what arrives on a real server, privacy, outages, lineage, bundle integration."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointSaver, MeanSquaredError, ValidationHandler, from_engine

from muscle_ext.handlers import (
    TRACKING_SETTINGS_PATH,
    PrivacyFilter,
    ResilientMlflowWriter,
    TrackingHandler,
    TrackingRun,
    checkpoint_lineage,
    datalist_fingerprint,
    flatten_config,
    resolve_tracking_uri,
    tracking_settings,
)

from tests.mlflow_server import free_port

mlflow = pytest.importorskip("mlflow")

MARKER = "PATIENT_MARKER_12345"
WRITER_LOG = "muscle_ext.handlers.tracking.writer"


# --------------------------------------------------------------------------- fixtures and helpers
# `store_template` and `mlflow_server` (a real server shared by this module's tests) are in tests/conftest.py;
# `test_server_dies_mid_run` stops the server, so it is the last test here to use it.


@pytest.fixture
def local_store(store_template, monkeypatch):
    """``local_store(folder)`` makes ``folder`` the working folder with a fresh store where TrackingHandler's default
    URI points (``mlflow.db`` there); returns the URI."""

    def make(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(store_template, folder / "mlflow.db")
        monkeypatch.chdir(folder)
        return resolve_tracking_uri()

    return make


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _data(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(4, generator=g), "label": torch.rand(2, generator=g)} for _ in range(n)]


def _trainer(train_handlers, val_handlers=(), max_epochs: int = 2, n: int = 8, before=lambda net: []):
    """A trainer validated every epoch; ``before(net)`` gives handlers attached before ``train_handlers`` (whose
    outputs a tracker uploads at the end)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    loader = torch.utils.data.DataLoader(_data(n), batch_size=2)
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=loader, network=net,
        key_val_metric={"val_mse": MeanSquaredError(output_transform=from_engine(["pred", "label"]))},
        val_handlers=list(val_handlers),
    )
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=loader, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
        train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True), *before(net),
                        *train_handlers],
    )
    return trainer, net, evaluator


def _writer_warnings(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == WRITER_LOG and r.levelno == logging.WARNING and text in r.message]


# --------------------------------------------------------------------------- pure helpers
def test_flatten_config_keys_values_and_limits():
    cfg = {"train": {"trainer": {"max_epochs": 3, "bad#key": True}}, "l": [1, {"a": None}], "e": [], "d": {},
           "long": "x" * 700, "k" * 300: 1}
    flat = flatten_config(cfg, privacy=False)
    assert flat["train.trainer.max_epochs"] == "3"
    assert flat["train.trainer.bad_key"] == "True"
    assert flat["l.0"] == "1" and flat["l.1.a"] == "None" and flat["e"] == "[]" and flat["d"] == "{}"
    assert len(flat["long"]) == 500 and flat["long"].endswith("]") and "sha256:" in flat["long"]
    assert all(len(k) <= 250 for k in flat)
    assert all(isinstance(v, str) for v in flat.values())


@pytest.mark.parametrize(
    "key,value,redacted",
    [
        ("dataset_dir", "anything", True),
        ("train_datalist", "@x", True),
        ("PatientName", "Doe^Jane", True),
        ("filename_or_obj", "x", True),
        ("image", f"/data/{MARKER}/a.dcm", True),
        ("image", f"{MARKER}/a.png", True),
        ("image", f"{MARKER}.dcm", True),
        ("files", f"$glob.glob(@dataset_dir + '/{MARKER}*')", True),
        ("files", f"$@some_dir + '/{MARKER}/x.png'", True),
        ("uri", "http://user:pw@host:5000", True),
        ("uri", f"sqlite:////data/{MARKER}/x.db", True),
        ("ckpt", "$@bundle_root + '/models/model.pt'", False),
        ("uri", "http://tracking:5000", False),
        ("net", "monai.networks.nets.ResNet", False),
        ("device", "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')", False),
        ("ref", "@network_def", False),
        ("lr", 0.1, False),
    ],
)
def test_privacy_rule(key, value, redacted):
    out = PrivacyFilter(allowed_roots=["/bundle"]).redact({key: value})[key]
    assert (out != value) is redacted
    if redacted:
        assert out.startswith("sha256:") and len(out) == len("sha256:") + 12


def test_privacy_allows_paths_inside_allowed_roots(tmp_path):
    p = PrivacyFilter(allowed_roots=[tmp_path])
    assert p.redact({"out": str(tmp_path / "models" / "m.pt")})["out"] == str(tmp_path / "models" / "m.pt")
    assert p.redact({"out": "/elsewhere/m.pt"})["out"].startswith("sha256:")
    # a nested datalist is hashed as one value, not item by item
    assert p.redact({"datalist": [{"image": "a"}, {"image": "b"}]})["datalist"].startswith("sha256:")


def test_datalist_fingerprint(tmp_path):
    items = [{"image": f"/d/{MARKER}/{i}.png", "label": i} for i in range(5)]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items, "validation": items[:2]}, indent=4))
    fp_file = datalist_fingerprint(path)
    assert fp_file["count"] == 7 and len(fp_file["sha256"]) == 64
    assert datalist_fingerprint(path, key="training") == datalist_fingerprint(items)
    assert datalist_fingerprint(items)["count"] == 5
    assert datalist_fingerprint(items[:4]) != datalist_fingerprint(items)
    assert MARKER not in json.dumps(fp_file)
    csv = tmp_path / "list.csv"
    csv.write_text("image,label\na.png,1\nb.png,0\n")
    assert datalist_fingerprint(csv)["count"] == 2


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    # the default is MLflow's own: mlflow.db in the working folder, one store for every bundle run from there
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri(workdir=tmp_path / "ws") == f"sqlite:///{tmp_path}/ws/mlflow.db"
    assert (tmp_path / "ws").is_dir()  # SQLite makes the file, not the folder
    assert resolve_tracking_uri("http://h:5000") == "http://h:5000"
    assert resolve_tracking_uri("runs/x.db") == f"sqlite:///{tmp_path}/runs/x.db" and (tmp_path / "runs").is_dir()
    for refused in ("file:///tmp/mlruns", "runs/mlruns"):
        with pytest.raises(ValueError, match="refuses the file store"):
            resolve_tracking_uri(refused)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://shared:5000")
    assert resolve_tracking_uri("http://h:5000") == "http://shared:5000"


def test_shipped_settings_file_is_current():
    assert json.loads(TRACKING_SETTINGS_PATH.read_text()) == tracking_settings()


# --------------------------------------------------------------------------- a real server
def test_server_receives_run(mlflow_server, tmp_path):
    client = mlflow.MlflowClient(mlflow_server.uri)
    parent = client.create_run(client.create_experiment("parents")).info.run_id
    assert mlflow_server.is_running(), "the server was stopped by an earlier test"
    ckpt = tmp_path / "pretrained.pt"
    torch.save({"format": "muscle-backbone/1", "state_dict": {"w": torch.zeros(2)},
                "source": {"bundle": "muscle_pretrain", "mlflow_run_id": "abc123", "epoch": 7}}, ckpt)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": f"{i}.png"} for i in range(6)]}))
    config = {"seed": 11, "max_epochs": 2, "optimizer": {"lr": 0.1}, "train_datalist": str(datalist)}
    out = tmp_path / "out"
    extra_file = tmp_path / "metrics.json"
    extra_file.write_text('{"auc": 0.5}')
    seen = {}

    shared = TrackingRun(tracking_uri=mlflow_server.uri, experiment_name="t", parent_run_id=parent)
    train_h = TrackingHandler(shared, output_dir=out, config=config, datalists={"train": str(datalist)},
                              parent_checkpoint=ckpt, artifacts=[str(out / "ckpt"), str(extra_file)])
    val_h = TrackingHandler(shared, output_dir=out, iteration_log=False, close_on_complete=False)
    trainer, net, _ = _trainer([train_h], [val_h], before=lambda net: [
        CheckpointSaver(str(out / "ckpt"), {"net": net}, save_final=True)])
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: seen.update(state=e.state.mlflow_run_id))
    trainer.run()

    run = client.get_run(train_h.run_id)
    assert run.info.status == "FINISHED" and seen == {"state": run.info.run_id} and not shared.active
    assert val_h.run_id == train_h.run_id  # the validator logged into the trainer's run
    p, t = run.data.params, run.data.tags
    assert p["config.optimizer.lr"] == "0.1" and p["seed"] == "11" and p["max_epochs"] == "2"
    assert p["config.train_datalist"].startswith("sha256:")
    assert p["datalist.train.sha256"] == datalist_fingerprint(datalist)["sha256"] and p["datalist.train.count"] == "6"
    assert {"version.muscle_ext", "version.monai", "version.torch", "torch_initial_seed"} <= set(p)
    assert t["muscle.parent_run_id"] == "abc123" and t["muscle.parent_bundle"] == "muscle_pretrain"
    assert t["muscle.parent_checkpoint_sha256"] == checkpoint_lineage(ckpt)["muscle.parent_checkpoint_sha256"]
    assert t["mlflow.parentRunId"] == parent and t["muscle.workflow"] == "train"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 8  # 4 iterations x 2 epochs
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mse")] == [1, 2]
    assert "lr_group_0" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "summary", "ckpt", "metrics.json"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "summary")} == {"summary/metrics.json",
                                                                                   "summary/metrics.png"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "ckpt")] == ["ckpt/net_final_iteration=8.pt"]
    assert train_h.last_summary == {"params": 0, "tags": 0, "metrics": 0, "artifacts": 0}


def test_server_dies_mid_run(mlflow_server, tmp_path, caplog):  # keep it the last test using mlflow_server
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    handler = TrackingHandler(output_dir=out, tracking_uri=mlflow_server.uri, config={"lr": 0.1},
                              artifacts=[str(out / "ckpt")])
    trainer, net, _ = _trainer([handler], max_epochs=3)
    CheckpointSaver(str(out / "ckpt"), {"net": net}, save_interval=1).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: mlflow_server.stop())
    t0 = time.monotonic()
    trainer.run()
    assert time.monotonic() - t0 < 30  # a dead server costs seconds, not minutes
    assert trainer.state.epoch == 3 and trainer.state.iteration == 12
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [f"net_epoch={i}.pt" for i in (1, 2, 3)]
    assert len(_writer_warnings(caplog, "tracking store unavailable (")) == 1
    summary = handler.last_summary
    assert summary["metrics"] > 0 and summary["artifacts"] >= 5  # 3 checkpoints + metrics.json + plot
    end = _writer_warnings(caplog, "tracking incomplete")
    assert len(end) == 1 and f"{summary['metrics']} metrics" in end[0].message


def test_server_down_from_the_start(tmp_path, caplog):
    handler = TrackingHandler(output_dir=tmp_path, tracking_uri=f"http://127.0.0.1:{free_port()}",
                              config={"lr": 0.1})
    trainer, _, _ = _trainer([handler])
    t0 = time.monotonic()
    trainer.run()
    assert time.monotonic() - t0 < 20 and trainer.state.epoch == 2
    assert len(_writer_warnings(caplog, "tracking store unavailable (")) == 1
    assert handler.run_id is None and handler.last_summary["params"] > 0 and handler.last_summary["metrics"] > 0


def test_writer_buffers_through_an_outage(caplog):
    class FlakyClient:  # stands in for MlflowClient: refuses connections while `down`
        down, batches = True, []

        def log_batch(self, run_id, metrics=(), params=(), tags=()):
            if self.down:
                raise mlflow.exceptions.MlflowException("connection refused")
            self.batches.append((list(metrics), list(params), list(tags)))

        def set_terminated(self, run_id, status):
            pass

    client = FlakyClient()
    writer = ResilientMlflowWriter(lambda: client, lambda c: "run1", retry_interval=0.0, metrics_flush_interval=0.0)
    writer.log_params({"a": 1})
    for step in range(5):
        writer.log_metrics({"loss": step}, step=step)
    assert not writer.available and len(_writer_warnings(caplog, "tracking store unavailable (")) == 1
    client.down = False
    writer.log_metrics({"loss": 5}, step=5)
    assert writer.available and writer.sent == {"params": 1, "tags": 0, "metrics": 6, "artifacts": 0}
    assert [m.step for batch in client.batches for m in batch[0]] == list(range(6))
    assert writer.close() == {"params": 0, "tags": 0, "metrics": 0, "artifacts": 0}


# --------------------------------------------------------------------------- local SQLite store
def test_rejected_param_is_dropped_not_an_outage(tmp_path, caplog, local_store):
    uri = local_store(tmp_path)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    writer = ResilientMlflowWriter(lambda: client, lambda c: run_id)
    writer.log_params({"a": "1", "b": "2"})
    writer.log_params({"a": "changed", "c": "3"})
    assert writer.available and writer.dropped["params"] == 1 and writer.sent["params"] == 3
    assert writer.close() == {"params": 1, "tags": 0, "metrics": 0, "artifacts": 0}
    assert "changed" not in caplog.text and not _writer_warnings(caplog, "unavailable")
    assert client.get_run(run_id).data.tags["muscle.tracking.not_logged_params"] == "1"


def test_nothing_patient_related_is_logged(tmp_path, caplog, capsys, local_store):
    caplog.set_level(logging.DEBUG)
    data_root = tmp_path / "data" / MARKER
    data_root.mkdir(parents=True)
    datalist = data_root / f"{MARKER}_datalist.json"
    items = [{"image": str(data_root / f"{MARKER}_{i}.dcm"), "label": 0} for i in range(4)]
    datalist.write_text(json.dumps({"training": items}))
    out = tmp_path / "out"
    local_store(out)
    config = {
        "bundle_root": str(tmp_path / "bundle"),
        "dataset_dir": str(data_root),
        "datalist": str(datalist),
        "train": {"dataset": {"data": items, "cache_dir": str(data_root / "cache")}},
        "glob": f"$glob.glob(@dataset_dir + '/{MARKER}*.dcm')",
        "other": f"$@bundle_root + '/../{MARKER}/x.png'",
        "PatientName": MARKER,
        "note": f"{MARKER}.png",
        "tags_file": f"/mnt/{MARKER}",
    }
    handler = TrackingHandler(output_dir=out, config=config, tags={"source_dir": str(data_root)},
                              artifacts=[str(out / "ckpt")])
    trainer, net, _ = _trainer([handler], before=lambda net: [
        CheckpointSaver(str(out / "ckpt"), {"net": net}, save_final=True)])
    per_case = {f"/data/{MARKER}/0.dcm": 0.5, f"{MARKER}.png": 0.1, "filename_or_obj": 1.0, "mean": 0.3}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(per_case=per_case))
    trainer.run()
    assert handler.last_summary == {"params": 0, "tags": 0, "metrics": 0, "artifacts": 0}
    params = mlflow.MlflowClient(handler.tracking_uri).get_run(handler.run_id).data.params
    assert params["datalist.datalist.count"] == "4"  # found in the config and fingerprinted
    metrics = mlflow.MlflowClient(handler.tracking_uri).get_run(handler.run_id).data.metrics
    assert [k for k in metrics if k.startswith("per_case")] == ["per_case.mean"]
    stored = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in stored) and any(p.name == "config.json" for p in stored)
    for path in stored:
        assert MARKER.encode() not in path.read_bytes(), path.name
        assert MARKER not in str(path.relative_to(tmp_path))
    captured = capsys.readouterr()
    assert MARKER not in caplog.text and MARKER not in captured.out and MARKER not in captured.err


def test_evaluator_run_and_handler_errors_never_stop_the_engine(tmp_path, caplog, local_store):
    uri = local_store(tmp_path)
    ok = TrackingHandler(output_dir=tmp_path, experiment_name="eval", iteration_log=False)
    broken = TrackingHandler(output_dir=tmp_path, experiment_name="broken", output_transform=lambda out: 1 / 0)
    trainer, _, evaluator = _trainer([broken], [ok], max_epochs=1)
    evaluator.run()  # an evaluate workflow: the evaluator's handler opens (and ends) its own run
    trainer.run()
    run = mlflow.MlflowClient(uri).get_run(ok.run_id)
    assert run.data.tags["muscle.workflow"] == "evaluate" and "val_mse" in run.data.metrics
    assert trainer.state.epoch == 1 and broken.last_summary == {"params": 0, "tags": 0, "metrics": 0, "artifacts": 0}
    failures = [r for r in caplog.records if "iteration_completed failed (ZeroDivisionError)" in r.message]
    assert len(failures) == 1  # once, not once per iteration; and the run itself says so
    tags = mlflow.MlflowClient(uri).get_run(broken.run_id).data.tags
    assert tags["muscle.tracking.handler_errors"] == "iteration_completed:ZeroDivisionError"


def test_lineage_from_exported_backbone(tmp_path, local_store):
    from muscle_ext.handlers import BackboneExporter

    uri = local_store(tmp_path)
    backbone = tmp_path / "models" / "backbone.pt"
    first = TrackingHandler(output_dir=tmp_path, config={"stage": 1}, artifacts=[str(backbone)])
    trainer, net, _ = _trainer([first], max_epochs=1, before=lambda net: [
        BackboneExporter(backbone, net, arch="resnet18", source={"bundle": "muscle_pretrain"})])
    trainer.run()  # the exporter runs at COMPLETED while the run is open; the upload comes after it
    assert torch.load(backbone, weights_only=True)["source"]["mlflow_run_id"] == first.run_id
    client = mlflow.MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(first.run_id) if a.path.endswith(".pt")] == ["backbone.pt"]

    second = TrackingHandler(output_dir=tmp_path, config={"stage": 2}, parent_checkpoint=backbone)
    trainer, _, _ = _trainer([second], max_epochs=1)
    trainer.run()
    tags = client.get_run(second.run_id).data.tags
    assert tags["muscle.parent_run_id"] == first.run_id and tags["muscle.parent_bundle"] == "muscle_pretrain"
    assert tags["muscle.parent_checkpoint_sha256"] == checkpoint_lineage(backbone)["muscle.parent_checkpoint_sha256"]


def test_only_rank_zero_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    handler = TrackingHandler(output_dir=tmp_path / "out", config={"lr": 0.1})
    trainer, _, _ = _trainer([handler])
    trainer.run()
    assert not handler.enabled and handler.run_id is None and not (tmp_path / "out").exists()


BUNDLE_TRAIN = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/out'",
    "dataset_dir": f"/nonexistent/{MARKER}",
    "seed": 5,
    "max_epochs": 2,
    "network": {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 2},
    "train": {
        "data": "$[{'image': torch.rand(4), 'label': torch.rand(2)} for _ in range(6)]",
        "dataloader": {"_target_": "DataLoader", "dataset": "@train#data", "batch_size": 2},
        "handlers": [],
        "trainer": {
            "_target_": "SupervisedTrainer", "device": "$torch.device('cpu')", "max_epochs": "@max_epochs",
            "train_data_loader": "@train#dataloader", "network": "@network",
            "optimizer": "$torch.optim.SGD(@network.parameters(), lr=0.05)", "loss_function": "$torch.nn.MSELoss()",
            "train_handlers": "@train#handlers",
        },
    },
    "run": ["$@train#trainer.run()"],
}


@pytest.mark.parametrize("mode", ["tracking_settings", "handler_in_config"])
def test_bundle_run(tmp_path, monkeypatch, mode, local_store):
    from monai.bundle import ConfigWorkflow

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    uri = local_store(bundle)
    config = json.loads(json.dumps(BUNDLE_TRAIN))
    if mode == "handler_in_config":
        config["train"]["handlers"] = [{"_target_": "muscle_ext.handlers.TrackingHandler",
                                        "output_dir": "@output_dir", "experiment_name": "b"}]
    (bundle / "configs" / "train.json").write_text(json.dumps(config))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "tiny_bundle", "version": "0.1.0"}))
    monkeypatch.chdir(bundle)
    tracking = str(TRACKING_SETTINGS_PATH) if mode == "tracking_settings" else None
    # the config logged is the one `python -m monai.bundle run` is running, read from its command line
    main = Path(ConfigWorkflow.__module__.replace(".", "/")).parent / "__main__.py"
    monkeypatch.setattr(sys, "argv", [str(main), "run", "--config_file", "configs/train.json", "--max_epochs", "1",
                                      *(["--tracking", tracking] if tracking else [])])
    workflow = ConfigWorkflow(config_file="configs/train.json", logging_file=False, workflow_type=None,
                              tracking=tracking, max_epochs=1)  # an override must show up in the params
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["config.max_epochs"] == "1" and p["max_epochs"] == "1" and p["seed"] == "5"
    assert p["config.dataset_dir"].startswith("sha256:")
    assert run.data.tags["muscle.bundle"] == "tiny_bundle" and run.info.run_name.startswith("tiny_bundle_")
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3
    assert MARKER.encode() not in (bundle / "mlflow.db").read_bytes()


# --------------------------------------------------------------------------- no MONAI privates, no globals
def test_tracks_whatever_monai_mlflow_handler_looks_like(tmp_path, monkeypatch, local_store):
    """A MONAI release that renames, adds or removes MLFlowHandler's internals must not touch tracking."""
    from monai.handlers import MLFlowHandler

    uri = local_store(tmp_path)
    for private in [name for name in vars(MLFlowHandler) if name.startswith("_") and not name.startswith("__")]:
        monkeypatch.delattr(MLFlowHandler, private)
    monkeypatch.setattr(MLFlowHandler, "__init__", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("new")))
    monkeypatch.setattr(MLFlowHandler, "a_new_attribute", object(), raising=False)
    handler = TrackingHandler(output_dir=tmp_path, config={"lr": 0.1})
    trainer, _, _ = _trainer([handler])
    trainer.run()
    run = mlflow.MlflowClient(uri).get_run(handler.run_id)
    assert run.info.status == "FINISHED" and run.data.params["config.lr"] == "0.1" and "train_loss" in run.data.metrics
    assert not handler.errors


def test_run_ends_cleanly_and_leaves_nothing_behind(tmp_path, local_store):
    uri = local_store(tmp_path)
    client = mlflow.MlflowClient(uri)
    run = TrackingRun()
    handler = TrackingHandler(run, output_dir=tmp_path, config={"lr": 0.1})
    trainer, _, _ = _trainer([handler], max_epochs=1)
    trainer.run()
    run_id, tmpdir = run.run_id, run._tmpdir
    assert client.get_run(run_id).info.status == "FINISHED" and not run.active and not Path(tmpdir).exists()
    del trainer, handler, run
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, TrackingRun)]  # no registry keeps runs alive

    # an engine that raises ends its run FAILED, and the exception goes on
    crashed = TrackingHandler(output_dir=tmp_path, config={"lr": 0.1})
    trainer, _, _ = _trainer([crashed], max_epochs=1)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.run()
    assert client.get_run(crashed.run_id).info.status == "FAILED" and not crashed.run.active

    # a run nobody ended (a crash outside any engine) ends FAILED when it is collected, not RUNNING forever
    abandoned = TrackingRun()
    abandoned.start("abandoned")
    abandoned_id = abandoned.run_id
    assert client.get_run(abandoned_id).info.status == "RUNNING"
    del abandoned
    gc.collect()
    assert client.get_run(abandoned_id).info.status == "FAILED"


def test_http_limits_are_scoped_to_the_writer(monkeypatch):
    from muscle_ext.handlers.tracking import http_limits

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # the user's own value wins
    TrackingHandler(output_dir="out", config={})  # building a handler changes no environment variable
    import os

    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    with http_limits(timeout_s=5, max_retries=0):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
