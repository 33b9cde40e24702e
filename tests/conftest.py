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
