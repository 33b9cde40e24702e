"""Shared helpers for benchmarks: running a bundle as users do, machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from muscle_ext.metrics import json_safe, read_case_scores
from muscle_ext.pipeline import bundle_command, printable, run_command  # noqa: F401 (printable: for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
               "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(json_safe(payload), indent=2, default=str) + "\n")  # NaN (undefined) as null
    print(json.dumps(payload, indent=2, default=str))
    return path


def monai_run(bundle: Path, configs: list[str], overrides: dict, log: Path) -> dict:
    """Run the bundle as users do (:func:`muscle_ext.pipeline.bundle_command`), output to ``log``. Returns the
    command, wall time and the run's own peak RSS; raises ``CalledProcessError`` when it fails."""
    cmd = bundle_command(bundle, configs, overrides)
    result = run_command(cmd, log)
    if result.pop("returncode"):
        raise subprocess.CalledProcessError(1, cmd, output=f"see {log}")
    return result


def plain_moco_step(network, optimizer, im_q, im_k, amp: bool) -> None:
    """One MoCo step written by hand, as a user would without MONAI/Ignite: the reference the benchmarks time."""
    import torch

    from muscle_ext.engines import unwrap_moco

    moco = unwrap_moco(network)
    optimizer.zero_grad(set_to_none=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits, labels, keys = network(im_q, im_k, return_keys=True)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    moco.update_key_encoder()
    moco.dequeue_and_enqueue(keys)


def load_labelled_images(datalist: Path, split: str, size: int):
    """A labelled datalist split pre-processed as evaluate.yaml does: images ``(N, 1, size, size)`` and labels."""
    import torch
    from monai.transforms import Compose

    from muscle_ext.data import load_datalist, xray_preprocessing

    preprocess = Compose(xray_preprocessing("image", size=size))
    items = load_datalist(datalist, split)
    return (torch.stack([torch.as_tensor(preprocess(item)["image"]) for item in items]),
            torch.tensor([int(item["label"]) for item in items]))


def case_scores(evaluation: dict) -> dict[str, np.ndarray]:
    """An evaluation's per-case labels and scores: stored in the result, or (results written before they were) in
    the CSV file it names, which lived in the benchmark's work folder."""
    if "case_scores" in evaluation:
        return {k: np.asarray(v) for k, v in evaluation["case_scores"].items()}
    return read_case_scores(evaluation["scores_csv"])
