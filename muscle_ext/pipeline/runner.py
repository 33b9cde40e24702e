"""Stages of the main job: bundle runs, each as users run it (``python -m monai.bundle run``), reused when finished.

A :class:`Stage` is one or more bundle commands (e.g. fine-tune, then evaluate) with an output folder. Its
``fingerprint`` is a SHA-256 of everything that decides its result: the bundle config files' bytes, the overrides,
the fingerprints of the stages it reads from, the bytes of the datalists it names and the ``muscle_ext`` version.
:class:`StageRunner` keeps a ``stage.json`` beside each output folder:

- finished with the same fingerprint: the stage is reused, nothing runs;
- started with the same fingerprint but not finished (a killed run): its commands run again into the same folder,
  and each bundle resumes from its newest checkpoint (a bundle whose run finished says so and does nothing); a stage
  whose commands finished without leaving its outputs runs again from the start instead;
- any other fingerprint (a changed setting, datalist, upstream stage or ``muscle_ext`` code): the old folder moves
  to ``<root>/superseded/<stage>-<old fingerprint>-<time>`` (nothing is deleted) and the stage runs from the start.

Each command runs in its own process (MONAI's CLI is the bundle API users have; a process per stage also isolates
global state, memory and a crash), with its output in ``<stage>/logs/<n>.log``; wall time and the process's own peak
RSS (``os.wait4``: the largest single process of the stage, the bundle or one of its DataLoader workers, not their
sum) are recorded in ``stage.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..handlers.tracking.run import STAGE_ENV
from .preload import PreloadServer, preloadable

__all__ = ["BundleCommand", "LogProgress", "Stage", "StageFailed", "StageRunner", "bundle_command", "code_fingerprint",
           "file_digest", "printable", "run_command", "with_placeholders"]

REPO_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


class StageFailed(RuntimeError):
    """A bundle command of a stage exited with an error; the message names the stage and its log file."""


TORCHRUN = ("-m", "torch.distributed.run")  # torchrun, run by this interpreter


def bundle_command(bundle: str | os.PathLike, configs: Sequence[str], overrides: Mapping[str, Any],
                   nproc_per_node: int = 1) -> list[str]:
    """``python -m monai.bundle run`` of ``bundle``'s ``configs`` (file names in its ``configs/``, merged in order)
    with ``--key value`` overrides, as a list of arguments; with ``nproc_per_node > 1`` under ``torchrun
    --standalone --nproc_per_node=N`` (one process per GPU; gloo processes on a CPU), the configs then naming the
    bundle's ``multi_gpu_train.yaml``."""
    root = Path(bundle)
    files = [str(root / "configs" / c) for c in configs]
    config_file = json.dumps(files) if len(files) > 1 else files[0]  # a list python-fire reads, easy to quote
    launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={int(nproc_per_node)}"] if nproc_per_node > 1 else []
    cmd = [sys.executable, *launcher, "-m", "monai.bundle", "run", "--config_file", config_file,
           "--bundle_root", str(root), "--logging_file", str(root / "configs" / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return cmd


def printable(cmd: Sequence[str], placeholders: Mapping[str, str] | None = None) -> str:
    """The command as reports show it: ``python`` for whichever interpreter ran it, arguments shell-quoted, and each
    path prefix in ``placeholders`` (e.g. ``{"/data/xray": "<data>"}``) written as its placeholder, so that a report
    names no folder of this machine."""
    import shlex

    head, rest = ("torchrun", cmd[3:]) if tuple(cmd[1:3]) == TORCHRUN else ("python", cmd[1:])
    return with_placeholders(" ".join([head, *(shlex.quote(str(c)) for c in rest)]), placeholders)


def with_placeholders(text: str, placeholders: Mapping[str, str] | None = None) -> str:
    """``text`` with each path prefix in ``placeholders`` (e.g. ``{"/data/xray": "<data>"}``) written as its
    placeholder, longest prefix first."""
    for prefix, placeholder in sorted((placeholders or {}).items(), key=lambda kv: -len(kv[0])):
        text = text.replace(prefix, placeholder)
    return text


def run_command(cmd: Sequence[str], log: str | os.PathLike, env: Mapping[str, str] | None = None,
                preload: PreloadServer | None = None) -> dict[str, Any]:
    """Run ``cmd`` with its output in ``log``. Returns ``{"command", "wall_s", "peak_rss_gib", "returncode"}``:
    the run's own peak resident memory (``os.wait4``), not the maximum over every child of this process. With
    ``preload``, a ``python -m monai.bundle`` command runs in a fork of that server (:mod:`.preload`: the same
    command without the import wait); anything else as a plain subprocess.

    Raises:
        OSError: ``log`` cannot be written, or ``cmd`` cannot be started.
    """
    start = time.perf_counter()
    if preload is not None and preloadable(cmd):
        status, maxrss_kib = preload.run(cmd, log, env)
    else:
        with open(log, "w") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                    env=None if env is None else dict(env))
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:  # e.g. Ctrl-C: do not leave the training run behind
                proc.kill()
                proc.wait()
                raise
        maxrss_kib = usage.ru_maxrss
    return {"command": printable(cmd), "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(maxrss_kib / 2**20, 2), "returncode": os.waitstatus_to_exitcode(status)}


class LogProgress:
    """While a bundle command runs, follow its log for MONAI's ``StatsHandler`` lines (``Epoch: 2/3, Iter: 5/20``)
    and report the fraction of training done (0-1) to ``callback``, about once per ``interval`` seconds. A context
    manager: a thread that reads only what the log gained since the last look, and stops on exit."""

    PATTERN = re.compile(rb"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+)")

    def __init__(self, log: str | os.PathLike, callback: Callable[[float], None], interval: float = 1.0) -> None:
        self.log, self.callback, self.interval = Path(log), callback, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._offset, self._last = 0, -1.0

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> float | None:
        """Read what the log gained; report and return the newest fraction, or ``None`` when there is none yet."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return None
        cut = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self._offset += cut
        found = self.PATTERN.findall(chunk[:cut])
        if not found:
            return None
        epoch, epochs, iteration, iterations = map(int, found[-1])
        fraction = min(1.0, (epoch - 1 + iteration / max(iterations, 1)) / max(epochs, 1))
        if fraction != self._last:
            self._last = fraction
            self.callback(fraction)
        return fraction

    def __enter__(self) -> LogProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class BundleCommand:
    """One ``python -m monai.bundle run`` of a stage: a bundle of this repository, its config files, overrides."""

    bundle: str                     # folder name under bundles/: muscle_pretrain, muscle_continual, downstream
    configs: tuple[str, ...]
    overrides: Mapping[str, Any]
    nproc_per_node: int = 1         # > 1: under torchrun, one process per GPU

    def argv(self) -> list[str]:
        """The command line (``python -m monai.bundle run ...``) of this bundle run.

        Raises:
            FileNotFoundError: the bundle folders are not there (the main job runs from a source checkout).
        """
        root = REPO_BUNDLES / self.bundle
        if not (root / "configs").is_dir():
            raise FileNotFoundError(f"bundle {self.bundle} not found at {root}: the main job runs the bundles of a "
                                    "source checkout (pip install -e . in a clone of the repository)")
        return bundle_command(root, self.configs, self.overrides, self.nproc_per_node)

    def setting_problems(self) -> list[str]:
        """The overrides no config file of this run has (one line each, with did-you-mean), as the bundle's own
        ``check_overrides`` would refuse them once the stage started: a preset's typo stops the job before any
        stage runs instead of after the stages before it."""
        from ..bundle_args import load_configs
        from ..bundle_checks import check_override_ids

        files = [str(REPO_BUNDLES / self.bundle / "configs" / c) for c in self.configs]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            return [f"config file not found: {', '.join(missing)}"]
        return check_override_ids(self.overrides, load_configs({"config_file": files}))


@dataclass
class Stage:
    """A step of the main job. ``needs``: names of the stages whose outputs it reads; ``inputs``: files whose bytes
    decide its result (datalists); ``outputs``: files, relative to ``output_dir``, that it must leave behind."""

    name: str
    output_dir: Path
    commands: list[BundleCommand]
    needs: tuple[str, ...] = ()
    inputs: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def code_fingerprint() -> str:
    """SHA-256 of the ``muscle_ext`` sources (``*.py``, presets): a finished stage is reused only with the same code."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*package.rglob("*.py"), *package.rglob("*.yaml")]):
        if "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class StageRunner:
    """Run :class:`Stage` objects in order under ``root``, reusing finished ones (see the module docstring).

    Args:
        root: the main job's folder (stages in ``<root>/<stage name>``).
        env: environment of the bundle processes (e.g. ``MLFLOW_TRACKING_URI``); default: this process's.
        progress: called with ``(index, total, stage, state)`` as each stage starts (``state``: ``run``, ``resume``,
            ``rerun`` or ``reuse``) and with ``state`` ``done`` as it ends.
        placeholders: path prefixes written as placeholders in the recorded commands (:func:`printable`).
        preload: run each single-process bundle command in a fork of a process that has imported the stack once
            (:mod:`.preload`; about 15 s less per command on 2 cores); ``False``: a fresh interpreter per command.
        step_progress: called with ``(stage, command number, fraction done)`` while a command trains (read from
            its log, :class:`LogProgress`), for a progress bar inside long stages.
    """

    def __init__(self, root: str | os.PathLike, env: Mapping[str, str] | None = None,
                 progress: Callable[[int, int, Stage, str], None] | None = None,
                 placeholders: Mapping[str, str] | None = None, preload: bool = True,
                 step_progress: Callable[[Stage, int, float], None] | None = None) -> None:
        self.root = Path(root)
        self.step_progress = step_progress
        self.env = env
        self.preload = preload
        self.placeholders = dict(placeholders or {})
        self.progress = progress or (lambda *args: None)
        self.fingerprints: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ fingerprints
    def fingerprint(self, stage: Stage) -> str:
        """SHA-256 of what decides the stage's result (see the module docstring)."""
        digest = hashlib.sha256(json.dumps({"code": code_fingerprint(), "name": stage.name}).encode())
        for command in stage.commands:
            described = [command.bundle, list(command.configs),  # overrides: their order means nothing
                         {k: str(v) for k, v in command.overrides.items()}]
            if command.nproc_per_node > 1:  # sharded data: another result (single-process fingerprints unchanged)
                described.append(command.nproc_per_node)
            digest.update(json.dumps(described, sort_keys=True).encode())
            for config in command.configs:
                digest.update((REPO_BUNDLES / command.bundle / "configs" / config).read_bytes())
        for need in stage.needs:
            digest.update(self.fingerprints[need].encode())
        for path in sorted(Path(p) for p in stage.inputs):  # the order they were named in means nothing
            digest.update(file_digest(path).encode())
        return digest.hexdigest()

    @staticmethod
    def state_file(stage: Stage) -> Path:
        """``<stage output>/stage.json``: fingerprint, status, commands with wall time and peak RSS."""
        return stage.output_dir / "stage.json"

    @classmethod
    def read_state(cls, stage: Stage) -> dict[str, Any] | None:
        """The stage's ``stage.json``, or ``None`` when it has none (never started, or unreadable)."""
        path = cls.state_file(stage)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _write_state(self, stage: Stage, state: dict[str, Any]) -> None:
        path = self.state_file(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)

    # ------------------------------------------------------------------------------------------ running
    @staticmethod
    def check(stages: Sequence[Stage]) -> None:
        """Refuse a job whose stages name settings their bundles do not have, before anything runs.

        Raises:
            SettingsError: every problem, one line each, named by stage and bundle.
        """
        from ..settings import SettingsError

        where: dict[str, list[str]] = {}  # problem -> the stages that have it (one line per problem)
        for stage in stages:
            for command in stage.commands:
                for problem in command.setting_problems():
                    where.setdefault(f"{command.bundle}: {problem}", []).append(stage.name)
        if where:
            lines = [f"{problem} (stage{'s' if len(names) > 1 else ''} {', '.join(dict.fromkeys(names))})"
                     for problem, names in where.items()]
            raise SettingsError("the preset gives settings its bundles do not have:\n  " + "\n  ".join(lines))

    def plan(self, stages: Sequence[Stage]) -> list[tuple[Stage, str]]:
        """``[(stage, what will happen)]`` without running anything: ``reuse``, ``resume``, ``rerun`` or ``run``."""
        out = []
        for stage in stages:
            self.fingerprints[stage.name] = fingerprint = self.fingerprint(stage)
            state = self.read_state(stage)
            if state is None:
                action = "rerun" if stage.output_dir.exists() and any(stage.output_dir.iterdir()) else "run"
            elif state.get("fingerprint") != fingerprint:
                action = "rerun"
            elif state.get("status") == "done" and all((stage.output_dir / o).exists() for o in stage.outputs):
                action = "reuse"
            elif state.get("missing_outputs"):  # its bundles finished without them: resuming would do the same
                action = "rerun"
            else:
                action = "resume"
            out.append((stage, action))
        return out

    def run(self, stages: Sequence[Stage]) -> dict[str, dict[str, Any]]:
        """Run (or reuse) every stage in order; returns ``{stage: its stage.json content}``.

        Raises:
            StageFailed: a command exited with an error (the stage stays resumable: run again to continue).
        """
        results = {}
        planned = self.plan(stages)
        server = PreloadServer(self.env) if self.preload and any(a != "reuse" for _, a in planned) else None
        try:
            for index, (stage, action) in enumerate(planned, 1):
                results[stage.name] = self._stage(index, len(planned), stage, action, server)
        finally:
            if server is not None:
                server.close()
        return results

    def _stage(self, index: int, total: int, stage: Stage, action: str,
               server: PreloadServer | None) -> dict[str, Any]:
        self.progress(index, total, stage, action)
        if action == "rerun" and stage.output_dir.exists():
            old = (self.read_state(stage) or {}).get("fingerprint", "unknown")[:12]
            target = self.root / "superseded" / f"{stage.name}-{old}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(stage.output_dir), str(target))
        if action != "reuse":
            self._run_stage(stage, server)
        self.progress(index, total, stage, "done")
        return self.read_state(stage) or {}

    def _run_stage(self, stage: Stage, server: PreloadServer | None = None) -> None:
        logs = stage.output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"stage": stage.name, "description": stage.description,
                                 "fingerprint": self.fingerprints[stage.name], "code": code_fingerprint(),
                                 "status": "running",
                                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "needs": list(stage.needs), "commands": [], **stage.extra}
        self._write_state(stage, state)
        for n, command in enumerate(stage.commands, 1):
            log = logs / f"{n}_{command.bundle}.log"
            # the stage's runs are tagged with its name (muscle.stage): the report finds their curves
            env = {**(self.env if self.env is not None else os.environ), STAGE_ENV: stage.name}
            # a thread that follows the log only when someone shows its progress
            follow = (LogProgress(log, lambda fraction, n=n: self.step_progress(stage, n, fraction))
                      if self.step_progress else contextlib.nullcontext())
            with follow:
                result = run_command(command.argv(), log, env, preload=server)
            result["command"] = printable(command.argv(), self.placeholders)
            result["log"] = str(log.relative_to(stage.output_dir))
            state["commands"].append(result)
            if result["returncode"] != 0:
                state["status"] = "failed"
                self._write_state(stage, state)
                raise StageFailed(f"stage {stage.name}: {command.bundle} exited with {result['returncode']}; the "
                                  f"last lines of {log} say why. Run the same command again to resume.")
        missing = [o for o in stage.outputs if not (stage.output_dir / o).exists()]
        if missing:
            state.update(status="failed", missing_outputs=missing)
            self._write_state(stage, state)
            raise StageFailed(f"stage {stage.name} finished without {', '.join(missing)} (see {logs})")
        state.update(status="done", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     wall_s=round(sum(c["wall_s"] for c in state["commands"]), 1),
                     peak_rss_gib=max(c["peak_rss_gib"] for c in state["commands"]))
        self._write_state(stage, state)
