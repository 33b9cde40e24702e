"""Bundle runs without the import wait: a server process imports torch, MONAI, Ignite and MLflow once and forks a
fresh process for each ``python -m monai.bundle run`` of the main job.

Importing that stack takes about 15 s of CPU on a 2-core machine, which is a third of a small fine-tuning stage; the
quick preset runs two dozen bundle commands. Forking a process that already holds the modules (the way
``torch.utils.data.DataLoader`` starts its workers, and what :mod:`multiprocessing`'s ``forkserver`` does for its
children) keeps what a separate process gives, its own memory, global state and crash, and drops the wait. Each child
runs MONAI's own command-line entry (``runpy`` of ``monai.bundle``) with the command's arguments, environment, working
folder and log file, so a stage run this way is the command the report prints.

Protocol (one JSON line each way, on the server's stdin/stdout): ``{"argv", "env", "cwd", "log"}`` in;
``{"pid"}`` when the child started, then ``{"status", "maxrss_kib"}`` (``os.wait4``) when it ended. The server ends
when its stdin closes (the job ended or was killed), and kills a child still running then.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

__all__ = ["PRELOADED", "PreloadServer", "preloadable"]

PRELOADED = ("torch", "numpy", "monai", "monai.bundle", "monai.apps.detection.networks.retinanet_detector", "ignite",
             "mlflow", "muscle_ext.data", "muscle_ext.networks", "muscle_ext.engines", "muscle_ext.handlers",
             "muscle_ext.metrics")
"""What the server imports before it forks (the modules every bundle config reaches)."""

_ENTRY = ("-m", "monai.bundle")


def preloadable(cmd: Sequence[str]) -> bool:
    """Whether ``cmd`` is ``<this interpreter> -m monai.bundle ...`` (a torchrun launch or any other program is
    started as a plain subprocess)."""
    return len(cmd) > 3 and cmd[0] == sys.executable and tuple(cmd[1:3]) == _ENTRY


class PreloadServer:
    """A client's handle on the server process (started on first use, ended by :meth:`close` or garbage).

    Args:
        env: the server's environment (that of the commands, less what each command sets itself).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self._proc: subprocess.Popen | None = None

    def _server(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            entry = f"from {__name__} import serve; serve()"
            self._proc = subprocess.Popen([sys.executable, "-c", entry], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, env=self.env)
        return self._proc

    def run(self, cmd: Sequence[str], log: str | os.PathLike, env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike | None = None, timeout: float | None = None,
            stderr_log: str | os.PathLike | None = None) -> tuple[int, int]:
        """Run ``cmd`` (:func:`preloadable`) in a fork of the server, its output in ``log`` (its stderr in
        ``stderr_log`` when given, else in ``log`` too); waits for it, at most ``timeout`` seconds.

        Returns:
            ``(status, maxrss_kib)``: the raw wait status (``os.waitstatus_to_exitcode`` reads it) and the child's
            own peak resident memory in KiB.

        Raises:
            subprocess.TimeoutExpired: the command ran past ``timeout`` (it was killed).
            RuntimeError: the server died (its last words went to this process's stderr).
        """
        import threading

        proc = self._server()
        request = {"argv": list(cmd), "env": dict(self.env if env is None else env),
                   "cwd": os.fspath(cwd or os.getcwd()), "log": os.fspath(log),
                   "stderr_log": None if stderr_log is None else os.fspath(stderr_log)}
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        pid, timer, expired = None, None, threading.Event()
        try:
            started = self._reply(proc)
            pid = started["pid"]
            if timeout is not None:
                timer = threading.Timer(timeout, lambda: (expired.set(), _kill(pid)))
                timer.start()
            ended = self._reply(proc)
        except BaseException:  # e.g. Ctrl-C: do not leave the training run behind
            if pid is not None:
                _kill(pid)
            self.close()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():
            raise subprocess.TimeoutExpired(list(cmd), timeout)
        return ended["status"], ended["maxrss_kib"]

    @staticmethod
    def _reply(proc: subprocess.Popen) -> dict[str, Any]:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the bundle-run server ended unexpectedly (its error is above)")
        return json.loads(line)

    def close(self) -> None:
        """End the server (it kills a command still running)."""
        if self._proc is not None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __del__(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended meanwhile
        pass


def _child(request: dict[str, Any]) -> None:  # pragma: no cover - runs in the forked process
    """Become ``python -m monai.bundle <args>``: the command's folder, environment, output and arguments; never
    returns."""
    import runpy

    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores Ctrl-C; a bundle run stops on it
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        errors = request.get("stderr_log")
        err = fd if not errors else os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(err, 2)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own descriptors, for its lifetime
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:  # torch read the variable when the server imported it
            import torch

            torch.set_num_threads(int(threads))
        sys.argv = ["monai.bundle", *request["argv"][3:]]
        try:
            runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(code)


def serve(requests: TextIO = sys.stdin) -> None:
    """The server's loop: import :data:`PRELOADED`, then one fork per request line until stdin closes. Replies go
    to the original stdout; anything else printed (an import's warning) goes to stderr, so it cannot garble them."""
    import importlib

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole job: the client ends the running command
    for module in PRELOADED:
        importlib.import_module(module)
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status, usage = os.wait4(pid, 0)
        replies.write(json.dumps({"status": status, "maxrss_kib": usage.ru_maxrss}) + "\n")
        replies.flush()
