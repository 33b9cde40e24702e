"""benchmarks/bench_scaling.py: the pools it builds, what it reads from bundle logs, how it judges growth, the process
tree it samples and the report it writes; one tiny end-to-end run is marked slow."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their `common` module as a top-level one
    import bench_scaling

    return bench_scaling


def _entries() -> list[dict]:
    """A pool shaped like pretrain_datalist.json: grouped by dataset, uneven sizes."""
    sizes = {"chest": 50, "knee": 30, "hand": 4}
    return [{"image": f"{name}/{i}.png", "dataset": name, "body_part": name}
            for name, n in sizes.items() for i in range(n)]


def test_pools_are_nested_keep_the_mix_and_repeat_under_distinct_keys(bench):
    entries = _entries()
    pools = {n: bench.build_pool(entries, n) for n in (21, 42, 84, 168)}
    assert pools[42][:21] == pools[21] and pools[84][:42] == pools[42]  # 1x inside 2x inside 4x
    for n in (21, 42, 84):
        counts = bench.pool_summary(pools[n])["by_dataset"]
        for name, total in {"chest": 50, "knee": 30, "hand": 4}.items():
            assert abs(counts.get(name, 0) - n * total / 84) <= 1, (n, name, counts)
    whole = bench.pool_summary(pools[84])
    assert whole["distinct_images"] == 84 and whole["repeated_entries"] == 0
    doubled = pools[168]
    assert bench.pool_summary(doubled)["repeated_entries"] == 84
    assert {e["pool_copy"] for e in doubled[:84]} == {0} and {e["pool_copy"] for e in doubled[84:]} == {1}
    keys = {json.dumps(e, sort_keys=True) for e in doubled}
    assert len(keys) == 168  # every entry distinct (PersistentDataset names its files by a hash of the entry)
    assert all(set(e) == {"image", "dataset", "body_part", "pool_copy"} for e in doubled)  # one key set: collatable
    with pytest.raises(ValueError):
        bench.build_pool(entries, 0)


def test_the_real_pool_quarter_has_every_dataset(bench, xray_root):
    entries = json.loads((xray_root / "pretrain_datalist.json").read_text())["training"]
    quarter = bench.build_pool(entries, len(entries) // 4)
    by_dataset = bench.pool_summary(quarter)["by_dataset"]
    full = bench.pool_summary(entries)["by_dataset"]
    assert set(by_dataset) == set(full)
    assert bench.pool_summary(bench.build_pool(entries, 4 * (len(entries) // 4)))["repeated_entries"] == 0


LOG = """\
2026-12-01 10:00:00,000 - ignite.engine.engine.MoCoTrainer - INFO - Engine run resuming from iteration 0
2026-12-01 10:00:05,000 - INFO - Epoch: 1/2, Iter: 1/5 -- train_loss: 1.0
2026-12-01 10:00:06,000 - INFO - Epoch: 1/2, Iter: 2/5 -- train_loss: 1.0
2026-12-01 10:00:07,000 - INFO - Epoch: 1/2, Iter: 3/5 -- train_loss: 1.0
2026-12-01 10:00:07,500 - INFO - Epoch: 1/2, Iter: 4/5 -- train_loss: 1.0
2026-12-01 10:00:08,000 - INFO - Epoch: 1/2, Iter: 5/5 -- train_loss: 1.0
2026-12-01 10:00:08,000 - ignite.engine.engine.SupervisedEvaluator - INFO - Engine run finished. Time taken: 00:00:30
2026-12-01 10:00:40,000 - INFO - Epoch: 2/2, Iter: 1/5 -- train_loss: 1.0
2026-12-01 10:00:49,000 - INFO - Epoch: 2/2, Iter: 2/5 -- train_loss: 1.0
2026-12-01 10:00:50,000 - INFO - Epoch: 2/2, Iter: 3/5 -- train_loss: 1.0
2026-12-01 10:00:51,000 - INFO - Epoch: 2/2, Iter: 5/5 -- train_loss: 1.0
2026-12-01 10:00:52,000 - ignite.engine.engine.MoCoTrainer - INFO - Engine run finished. Time taken: 00:01:02.250
"""


def test_throughput_counts_only_iterations_past_the_start_of_each_epoch(bench):
    # epoch 1: iterations 3 -> 5, 2 intervals in 1.0 s; epoch 2: 3 -> 5 in 1.0 s; the slow starts and the 32 s
    # between epochs are left out
    t = bench.iteration_throughput(LOG, samples_per_iteration=64, skip=2)
    assert t["iterations"] == 4 and t["seconds"] == pytest.approx(2.0)
    assert t["samples_per_s"] == pytest.approx(4 * 64 / 2.0)
    every = bench.iteration_throughput(LOG, 64, skip=0)
    assert every["iterations"] == 8 and every["samples_per_s"] < t["samples_per_s"]  # the slow first steps count
    assert bench.iteration_throughput(LOG, 64, skip=4)["samples_per_s"] is None  # one line left per epoch
    assert bench.iteration_throughput("no iteration lines", 64)["samples_per_s"] is None


def test_trainer_time_is_the_trainers_not_an_evaluators(bench):
    assert bench.trainer_seconds(LOG) == pytest.approx(62.25)
    assert bench.trainer_seconds("Engine run finished. Time taken: 00:00:01.000") is None


def _rows(times, rss, sizes=(100, 200, 400)):
    return [{"pool_size": n, "wall_s": t, "peak_rss_gib": r} for n, t, r in zip(sizes, times, rss, strict=True)]


def test_growth_tells_linear_from_faster_and_flat_from_growing_memory(bench):
    linear = bench.growth(_rows([10.0, 20.0, 40.0], [1.0, 1.0, 1.005]))
    assert linear["exponent"] == pytest.approx(1.0) and linear["at_most_linear"]
    assert linear["per_item_ratio"] == [1.0, 1.0, 1.0] and linear["per_1000_s"][0] == pytest.approx(100.0)
    assert linear["memory_flat"]
    quadratic = bench.growth(_rows([10.0, 40.0, 160.0], [1.0, 1.1, 1.3]))
    assert quadratic["exponent"] == pytest.approx(2.0) and not quadratic["at_most_linear"]
    assert quadratic["per_item_ratio"][-1] == pytest.approx(4.0)
    assert not quadratic["memory_flat"]
    assert quadratic["rss_rise_mib"] == pytest.approx(0.3 * 1024, abs=0.1)
    assert quadratic["rss_mib_per_1000"] == pytest.approx(0.3 * 1024 * 1000 / 300, abs=0.01)
    # failed runs are left out; with one run left there is nothing to compare
    failed = _rows([10.0, 3.0, None], [1.0, None, None])
    failed[1]["ok"] = False
    assert bench.growth(failed) == {"rows": 1}


def test_ddp_efficiency(bench):
    assert bench.ddp_efficiency(40.0, 44.0) == {"speedup": 1.1, "efficiency": 0.55}
    assert bench.ddp_efficiency(None, 44.0) == {"speedup": None, "efficiency": None}
    assert bench.cached_tensor_mib(1000, 64) == pytest.approx(15.625)


def test_tree_memory_sees_a_child_and_its_grandchild(bench):
    hold = "import time; x = bytearray(150 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(2.5)"
    parent = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {hold!r}]); "
              f"exec({hold!r}); p.wait()")
    with bench.OtherLoad() as load, bench.TreeMemory(interval=0.2) as tree:
        subprocess.run([sys.executable, "-c", parent], check=True, timeout=60)
    result = tree.result()
    assert result["max_processes"] >= 2
    assert result["tree_rss_gib"] >= 0.25 and result["tree_pss_gib"] >= 0.25  # two processes of 150 MiB each
    assert 0.0 <= load.share <= 1.0


def test_arguments_and_runner_paths(bench, tmp_path):
    args = bench.arguments(["--work", str(tmp_path), "--parts", "pool,ddp", "--pool-multiples", "1,3"])
    assert args.parts == ["pool", "ddp"] and args.pool_multiples == [1, 3]
    assert (args.data / "pretrain_datalist.json").is_file()  # the default: ../shared/data/xray from the repo root
    with pytest.raises(SystemExit):
        bench.arguments(["--parts", "pool,speed"])
    runner = bench.Runner(args)
    shown = runner.show(f"{bench.REPO}/bundles/x {args.data}/a.json {tmp_path}/pool")
    assert shown == "bundles/x <data>/a.json <work>/pool"
    one = bench.torchrun_command("muscle_pretrain", ["train.yaml"], {"seed": 0}, 1)
    assert "--nproc_per_node=1" in one and one[1:3] == ["-m", "torch.distributed.run"]


def test_full_presets_are_bounded_only_by_their_length(bench, tmp_path):
    """The full runs keep every bundle default except the settings that bound their length, and never merge quick.yaml;
    the bounds named in the report are the configs' own defaults."""
    args = bench.arguments(["--work", str(tmp_path), "--parts", "memory"])
    runs = {r["name"]: r for r in bench.memory_runs(args)}
    assert set(runs) == {f"{b}_{p}" for b in ("pretrain", "continual", "classification", "segmentation")
                         for p in ("quick", "full")}
    length = {"num_epochs", "warmup_epochs", "knn_interval", "train#sampler#num_samples", "rounds", "steps_per_visit"}
    for name, run in runs.items():
        extra = set(run["overrides"]) - {"dataset_dir", "tracking_uri", "init"}
        if run["preset"] == "full":
            assert "quick.yaml" not in run["configs"] and extra <= length, (name, extra)
        else:
            assert run["configs"][-1] == "quick.yaml" and not extra, (name, extra)
    assert "instead of 100 epochs" in runs["pretrain_full"]["bounded"]
    # what the bound says of the cache follows the config's default (disk: nothing accumulates in memory)
    assert "`cache: disk` keeps pre-processed items in files" in runs["pretrain_full"]["bounded"]
    assert "grows with the pool" not in runs["pretrain_full"]["bounded"]
    assert "instead of 10 rounds of 50" in runs["continual_full"]["bounded"]
    assert "instead of 30" in runs["classification_full"]["bounded"]


def _result(bench) -> dict:
    run = {"ok": True, "wall_s": 50.0, "train_s": 40.0, "peak_rss_gib": 1.0, "tree_rss_gib": 2.0, "tree_pss_gib": 1.2,
           "max_processes": 3, "gpu_gib": None, "other_cpu_share": 0.01, "command": "python -m monai.bundle run"}
    pool_rows = [{**run, "name": f"memory_x{m}", "cache": "memory", "multiple": m, "pool_size": 100 * m,
                  "pool": {"entries": 100 * m, "distinct_images": 100 * m, "repeated_entries": 0},
                  "draws_per_epoch": 100 * m, "epochs": 2, "wall_s": 20.0 * m, "train_s": 15.0 * m,
                  "peak_rss_gib": 1.0 + 0.1 * m, "disk_cache_mib": None} for m in (1, 2, 4)]
    pool_growth = {"wall": bench.growth(pool_rows), "train": bench.growth(pool_rows, time_key="train_s")}
    continual = [{**run, "name": f"tasks_{n}", "tasks": ["pneumonia", "knee", "lung", "tb"][:n], "task_count": n,
                  "wall_s": 30.0 * n * n} for n in (2, 3, 4)]
    ddp = [{**run, "name": f"nproc_{n}", "processes": n, "torch_threads": 2 // n, "batch_per_process": 32,
            "global_batch": 32 * n, "dataloader_workers_per_process": 2,
            "throughput": {"samples_per_s": 40.0 + 4 * (n - 1), "iterations": 30, "seconds": 10.0}} for n in (1, 2)]
    return {"command": "python benchmarks/bench_scaling.py", "when": "now", "commit": "abc",
            "machine": {"cpu": "test cpu", "cores": 2, "torch": "2", "torch_threads": 2},
            "settings": {"tiny": False, "ddp_epochs": 2, "ddp_draws": 640, "skip_iterations": 2},
            "parts": {
                "memory": {"runs": [{**run, "name": "pretrain_full", "bundle": "muscle_pretrain", "preset": "full",
                                     "bounded": "1 epoch", "settings": {"image_size": 224, "batch_size": 64,
                                                                         "cache": "memory", "num_workers": 2}}]},
                "pool": {"base": 100, "available": 400, "draws": "pool", "epochs": 2, "image_size": 64,
                         "quick": {"image_size": 64, "batch_size": 32}, "cached_pixels_mib_per_1000": 15.62,
                         "runs": pool_rows, "growth": {"memory": pool_growth}},
                "continual": {"runs": continual, "quick": {"image_size": 64},
                              "growth": {"wall": bench.growth(continual, "task_count"),
                                         "train": bench.growth(continual, "task_count", "train_s")}},
                "ddp": {"runs": ddp, "cores": 2, "quick": {"batch_size": 32}, **bench.ddp_efficiency(40.0, 44.0)},
            }}


def test_report_has_every_table_and_says_when_memory_grows_with_the_pool(bench):
    md = bench.markdown(_result(bench))
    for heading in ("## 1. Peak memory", "## 2. Pre-training cost", "## 3. The continual stage", "## 4. DDP"):
        assert heading in md
    assert "| muscle_pretrain | full | 224 | 64 | memory | 2 | 50.0 | 1.00 | 2.00 / 1.20 | 3 |" in md
    assert "| memory | 4x | 400 (400, 0) | 400 x 2 | 80.0 | 60.0 | 200.0 | 1.00 |" in md
    assert "at most linearly" in md and "**peak memory grows with the pool**" in md  # 0.3 GiB over 300 images
    assert "efficiency = samples/s with 2 / (2 x samples/s with 1): **0.55**" in md
    assert "T^2" in md and "a quiet machine" in md
    assert "/tmp" not in md and str(bench.REPO) not in md
    tables = re.findall(r"(?m)(?:^\|.*\n)+", md)
    assert len(tables) == 5  # memory, pool, pool growth, continual, ddp
    for table in tables:  # every row has as many cells as the table's header
        rows = table.splitlines()
        assert rows[1].startswith("|---") and {row.count("|") for row in rows} == {rows[0].count("|")}, table


def test_a_noisy_machine_is_flagged(bench):
    result = _result(bench)
    result["parts"]["ddp"]["runs"][1]["other_cpu_share"] = 0.4
    assert "the machine was not quiet" in bench.markdown(result)


@pytest.mark.slow
def test_tiny_pool_run_end_to_end(bench, monkeypatch, tmp_path, xray_root):
    """Two real MD-MoCo runs (32 and 64 pool images, disk cache, 1 epoch) through main(): the result files, the disk
    cache written, the tables filled."""
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    bench.main(["--data", str(xray_root), "--work", str(tmp_path / "work"), "--parts", "pool", "--pool-base", "32",
                "--pool-multiples", "1,2", "--pool-epochs", "1", "--pool-caches", "disk", "--out", "scaling_test"])
    result = json.loads((tmp_path / "results" / "scaling_test.json").read_text())
    runs = result["parts"]["pool"]["runs"]
    assert [r["pool_size"] for r in runs] == [32, 64] and all(r["ok"] for r in runs)
    assert all(r["disk_cache_mib"] > 0 and r["train_s"] > 0 and r["peak_rss_gib"] > 0.3 for r in runs)
    assert not math.isnan(result["parts"]["pool"]["growth"]["disk"]["wall"]["exponent"])
    md = (tmp_path / "results" / "scaling_test.md").read_text()
    assert "Tiny run" in md and "| disk | 2x | 64 (64, 0) |" in md
