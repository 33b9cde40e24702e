"""benchmarks/bench_data_path.py on a tiny setting: the downstream classifier's real training loader (built from the
bundle configs with the quick preset, on 16 real X-rays) and its trainer's step, in one run; the result holds the
loader's settings, per-epoch numbers that add up, a positive step rate and ratios computed from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their `common` module as a top-level one
    import bench_data_path

    return bench_data_path


def test_rates_and_ratios_come_from_the_measured_numbers(bench):
    epochs = [{"images": 64, "seconds": 2.0}, {"images": 64, "seconds": 0.5}, {"images": 64, "seconds": 0.3}]
    rates = bench.loader_rates(epochs, fill_s=6.0)
    assert rates == {"first_epoch": 8.0, "first_epoch_without_fill": 32.0, "cached": 160.0}
    assert bench.ratios(rates, 100.0) == {"first_epoch": 0.08, "cached": 1.6}
    assert bench.serial_estimate(160.0, 100.0) == pytest.approx(61.5, abs=0.05)
    assert bench.relative(bench.REPO.parent / "shared" / "data" / "xray") == "../shared/data/xray"


def test_classification_loader_and_step_on_real_images(bench, xray_root, tmp_path):
    args = bench.arguments(["--data", str(xray_root), "--bundles", "classification", "--epochs", "2", "--steps", "1",
                            "--rounds", "1", "--profile", "all", "--profile-items", "4", "--threshold", "1e9",
                            "--override", "max_items=16", "image_size=32", "batch_size=4", "--decode-items", "2",
                            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    saved = bench.run(args)
    on_disk = json.loads((tmp_path / "out" / "data_path.json").read_text())
    assert on_disk["results"] == saved["results"]
    assert on_disk["benchmark"] == "data_path" and on_disk["settings"]["epochs"] == 2

    bundle = saved["results"]["classification"]
    assert "error" not in bundle, bundle.get("error")
    assert bundle["bundle"] == "downstream"
    assert bundle["configs"] == ["common.yaml", "classification.yaml", "quick.yaml"]
    entry = bundle["loaders"]["classification"]
    settings = entry["settings"]
    # the overrides reach the loader; the rest is the preset's (quick.yaml: memory cache; the workers of the configs)
    config = bench.bundle_parser(bench.bundles()["classification"], xray_root, tmp_path / "unused", {})
    assert (settings["image_size"], settings["batch_size"]) == (32, 4)
    assert config.get_parsed_content("cache") == "memory"
    assert settings["cache"] == "CacheDataset" and settings["items"] == settings["cached_items"] == 16
    assert settings["num_workers"] == config.get_parsed_content("num_workers")
    assert settings["persistent_workers"] is bool(config.get("train#dataloader#persistent_workers", False))
    assert settings["batches_per_epoch"] == 4

    assert len(entry["epochs"]) == 2
    for epoch in entry["epochs"]:
        assert epoch["images"] == 16 and epoch["seconds"] > 0 and epoch["img_s"] > 0
    assert entry["build"]["cache_fill_s"] > 0
    loader = entry["loader_img_s"]
    first, cached = entry["epochs"]
    assert loader["first_epoch"] == pytest.approx(16 / (first["seconds"] + entry["build"]["cache_fill_s"]), rel=0.02)
    assert loader["cached"] == pytest.approx(16 / cached["seconds"], rel=0.02)
    assert loader["first_epoch"] < loader["first_epoch_without_fill"]

    step = entry["step"]
    assert step["engine"] == "SupervisedTrainer" and step["img_s"] > 0 and len(step["per_round_img_s"]) == 1
    assert entry["ratio"]["cached"] == pytest.approx(loader["cached"] / step["img_s"], rel=0.01)
    assert entry["ratio"]["first_epoch"] == pytest.approx(loader["first_epoch"] / step["img_s"], rel=0.01)
    assert entry["below_threshold"] is True  # every ratio is below a threshold of 1e9

    profile = entry["profile"]  # workers run with one torch thread: so does the profile
    assert profile["items"] == 4 and profile["torch_threads"] == 1
    labels = [label for label, _ in profile["ms_per_item"]]
    assert labels[0] == "copy out of the cache" and "RandAffined(image)" in labels and labels[-1].startswith("collate")
    assert profile["total_ms_per_item"] == pytest.approx(sum(ms for _, ms in profile["ms_per_item"]), abs=0.01)

    text = (tmp_path / "out" / "data_path.md").read_text()
    assert "## classification (downstream: common.yaml, classification.yaml, quick.yaml)" in text
    assert f"| {step['img_s']} | {entry['ratio']['first_epoch']} | {entry['ratio']['cached']} **below** |" in text
    # the reading names the flagged loader and the heaviest steps of its profile
    assert "- classification is below 1000000000.0x in cached epochs" in text
    assert f"`{profile['top'][0][0]}` {profile['top'][0][1]} ms" in text

    decoding = saved["decoding"]  # MONAI's percentile scaling against ours, on the same real images
    assert set(decoding["datasets"]) == {"pneumonia_nih", "pretrain pool"} and decoding["items"] == 2
    for d in decoding["datasets"].values():
        assert d["monai_ms_per_item"] > 0 and d["ours_ms_per_item"] > 0
        assert d["speedup"] == pytest.approx(d["monai_ms_per_item"] / d["ours_ms_per_item"], rel=0.02)
    assert "## Decoding: MONAI's percentile scaling against ours" in text
