"""Run bundles the way users do (``python -m monai.bundle run``) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


def bundle_command(bundle: str, configs: Sequence[str], overrides: Mapping[str, object], run_id: str | None = None,
                   launcher: Sequence[str] = (sys.executable, "-m")) -> list[str]:
    root = BUNDLES / bundle
    files = [str(root / "configs" / c) for c in configs]
    cmd = [*launcher, "monai.bundle", "run"] + ([run_id] if run_id else [])
    cmd += ["--config_file", repr(files) if len(files) > 1 else files[0], "--bundle_root", str(root)]
    cmd += ["--logging_file", str(root / "configs" / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def bundle_env(threads: int = 1, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bundle subprocess: this one's, minus a tracking server the developer may have exported
    (tests choose their store), plus ``extra`` (e.g. ``MLFLOW_TRACKING_URI``)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    env.update(extra or {})
    return env


def run_bundle(bundle: str, configs: Sequence[str], overrides: Mapping[str, object], timeout: float = 600,
               run_id: str | None = None, launcher: Sequence[str] = (sys.executable, "-m"),
               cwd: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a bundle; ``env`` adds environment variables (see :func:`bundle_env`). Raises with the output on failure."""
    cmd = bundle_command(bundle, configs, overrides, run_id, launcher)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=bundle_env(extra=env),
                          cwd=cwd or REPO)
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc
