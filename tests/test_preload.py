"""The preloaded launcher (:mod:`muscle_ext.pipeline.preload`): a bundle command forked from the server behaves as
the same command started fresh (output, exit status, environment, folder), without the import wait."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from muscle_ext.pipeline.preload import PreloadServer, preloadable
from muscle_ext.pipeline.runner import run_command

# prints what the process sees; exits 3 when MUSCLE_X is "fail" (MONAI's own CLI turns that into the exit status)
CONFIG = {"x": "$__import__('os').environ.get('MUSCLE_X')", "here": "$__import__('os').getcwd()",
          "stop": "$__import__('sys').exit(3) if __import__('os').environ.get('MUSCLE_X') == 'fail' else 0",
          "run": ["$print('seen:', @x, @here, flush=True)", "@stop"]}


def _seen(log) -> list[str]:
    return [line for line in open(log).read().splitlines() if line.startswith("seen:")]


@pytest.mark.timeout(300)
def test_a_forked_bundle_run_matches_a_fresh_one(tmp_path, monkeypatch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
    assert preloadable(cmd) and not preloadable([sys.executable, "-m", "torch.distributed.run", *cmd[1:]])
    monkeypatch.chdir(tmp_path)
    server = PreloadServer()
    try:
        env = {**os.environ, "MUSCLE_X": "fail"}
        fresh = run_command(cmd, tmp_path / "fresh.log", env)
        forked = run_command(cmd, tmp_path / "forked.log", env, preload=server)
        assert fresh["returncode"] == forked["returncode"] == 3
        assert _seen(tmp_path / "forked.log") == _seen(tmp_path / "fresh.log") == [f"seen: fail {tmp_path}"]
        assert forked["peak_rss_gib"] > 0.1  # the child's own peak memory, as os.wait4 reports it
        began = time.perf_counter()
        again = run_command(cmd, tmp_path / "again.log", {**os.environ, "MUSCLE_X": "ok"}, preload=server)
        assert again["returncode"] == 0 and _seen(tmp_path / "again.log") == [f"seen: ok {tmp_path}"]  # its own env
        # the import (about 15 s on 2 cores) is paid once, by the server; a fresh run pays it every time
        assert time.perf_counter() - began < fresh["wall_s"] / 3, (time.perf_counter() - began, fresh["wall_s"])
    finally:
        server.close()
    assert server._proc is None


def test_log_progress_reads_monai_stats_lines_as_they_are_written(tmp_path):
    from muscle_ext.pipeline.runner import LogProgress

    log = tmp_path / "run.log"
    log.write_text("loading...\n")
    seen: list[float] = []
    follow = LogProgress(log, seen.append)
    assert follow.poll() is None and seen == []  # nothing trained yet
    with open(log, "a") as f:
        f.write("2026-12-01 - INFO - Epoch: 1/2, Iter: 5/10 -- loss: 0.5\n2026-12-01 - INFO - Epoch: 2/2, It")
    assert follow.poll() == 0.25  # the half-written line waits for its end
    with open(log, "a") as f:
        f.write("er: 5/10 -- loss: 0.4\n")
    assert follow.poll() == 0.75 and follow.poll() is None and seen == [0.25, 0.75]
