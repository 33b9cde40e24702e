"""A real ``mlflow server`` for tests: SQLite store and served artifacts in a temporary folder, on 127.0.0.1.

Used through the ``mlflow_server`` fixture of ``tests/conftest.py`` (one server per test module) or directly; start-up
takes 8-30 s on the shared test machines, so start servers side by side (:meth:`MlflowServer.start` does not wait).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store_template(path: Path) -> Path:
    """An empty, migrated MLflow SQLite store at ``path``: creating one costs 3-10 s, copying it 0.1 s."""
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


class MlflowServer:
    """``mlflow server --workers 1`` on a free port with its store (``srv.db``) and artifacts under ``root``.

    :meth:`start` returns at once (several servers can start side by side); :meth:`wait_ready` waits for
    ``/health``. :meth:`stop` terminates the server's whole process group (it runs in its own session).
    """

    def __init__(self, root: Path, template: Path | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "srv.db"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        if template is not None:
            shutil.copy(template, self.db)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> MlflowServer:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{self.db}",
               "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        return self

    def wait_ready(self, timeout: float = 90) -> MlflowServer:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.3)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10) -> None:
        """SIGTERM to the server's process group (its workers too); SIGKILL after ``grace`` seconds."""
        if self.is_running():
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: stops the server's workers too
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
