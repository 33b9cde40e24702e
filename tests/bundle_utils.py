"""Run bundles the way users do (``python -m monai.bundle run``) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
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


# where bundle runs of the tests track when a test names no store: never the bundles' default (mlflow.db in the
# working folder, which is the repository for most tests)
FALLBACK_STORE = Path(tempfile.gettempdir()) / f"muscle_tests_{os.getuid()}" / "mlflow.db"


def bundle_env(threads: int = 1, extra: Mapping[str, str] | None = None,
               default_store: bool = False) -> dict[str, str]:
    """The environment of a bundle subprocess: this one's, minus a tracking server the developer may have exported
    (tests choose their store: :data:`FALLBACK_STORE` unless ``default_store``), plus ``extra`` (e.g.
    ``MLFLOW_TRACKING_URI``)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    if not default_store:
        FALLBACK_STORE.parent.mkdir(parents=True, exist_ok=True)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{FALLBACK_STORE}"
    env.update(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")
    env.update(extra or {})
    return env


def run_bundle(bundle: str, configs: Sequence[str], overrides: Mapping[str, object], timeout: float = 600,
               run_id: str | None = None, launcher: Sequence[str] = (sys.executable, "-m"),
               cwd: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None, default_store: bool = False) -> subprocess.CompletedProcess:
    """Run a bundle; ``env`` adds environment variables (see :func:`bundle_env`). Raises with the output on failure.

    MLflow goes to ``<output_dir>/mlruns.db`` unless the test names a store (``tracking_uri``, or
    ``MLFLOW_TRACKING_URI`` in ``env``) or asks for the bundles' default (``default_store``: ``mlflow.db`` in
    ``cwd``)."""
    cmd = bundle_command(bundle, configs, overrides, run_id, launcher)
    extra = dict(env or {})
    named = "tracking_uri" in overrides  # the environment would win over it: leave the variable unset
    if "output_dir" in overrides and not (named or default_store or "MLFLOW_TRACKING_URI" in extra):
        # each test's own store in its output folder (the default, mlflow.db in the working folder, would put the
        # runs of all tests in one store in the repository): tests that check the default pass default_store
        extra["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(overrides['output_dir']).absolute()}/mlruns.db"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env=bundle_env(extra=extra, default_store=default_store or named))
    if proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc
