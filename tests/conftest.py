import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
XRAY = Path(os.environ.get("MUSCLE_XRAY_DATA", REPO.parent / "shared" / "data" / "xray"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def xray_root() -> Path:
    if not (XRAY / "SOURCES.md").is_file():
        pytest.fail(f"real X-ray corpus not found at {XRAY} (set MUSCLE_XRAY_DATA)")
    return XRAY


# ------------------------------------------------------------------------------------- a real MLflow server
@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite store to copy (creating one costs 3-10 s here, copying it 0.1 s)."""
    pytest.importorskip("mlflow")
    from tests.mlflow_server import make_store_template

    return make_store_template(tmp_path_factory.mktemp("mlflow_template") / "mlruns.db")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, store_template):
    """A real ``mlflow server`` (SQLite store, served artifacts, ``--workers 1``) on 127.0.0.1, shared by the tests
    of one module (see ``tests/mlflow_server.py``: ``.uri``, ``.root``, ``.db``, ``.artifacts``, ``.stop()``)."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), store_template).start()
    try:
        server.wait_ready()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop(grace=3)  # the `mlflow server` parent can take 8 s to follow its uvicorn child: kill it sooner



# --------------------------------------------------------------------------- a backbone for the continual bundle
@pytest.fixture
def start(tmp_path) -> Path:
    """A random-init MD-MoCo-format backbone with lineage: where a continual run starts."""
    from muscle_ext.networks import build_backbone, save_backbone

    path = tmp_path / "md_moco" / "backbone.pt"
    torch.manual_seed(0)
    save_backbone(path, build_backbone("resnet18"), "resnet18", {"imagenet_stem": True},
                  source={"bundle": "muscle_pretrain", "mlflow_run_id": "mdmocorun7", "epoch": 3})
    return path
