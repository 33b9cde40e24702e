"""The GPU check (issue #19): training-step throughput of MoCo and of fine-tuning for ResNet-18 and ResNet-50 at
224 px under each precision and memory format, with and without ``torch.compile``; the largest MoCo batch that fits;
peak GPU memory. Random inputs (no data loading): what the device itself can do. Run by ``benchmarks/gpu_check.sh``
(which adds the main job's quick preset end to end); on a machine without a GPU it runs on the CPU with
``--device cpu`` (a smoke test of the script, not a GPU number).

    python benchmarks/bench_gpu.py                     # cuda:0, both architectures, every setting
    python benchmarks/bench_gpu.py --device cpu --size 64 --batch 8 --steps 2 --archs resnet18 --no-compile

Median of ``--steps`` timed steps after ``--warmup`` steps (compilation happens in the warm-up), synchronised on the
device. Writes benchmarks/results/<--name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from muscle_ext.networks import BackboneClassifier, MoCo, build_backbone

from common import RESULTS, write_result

SETTINGS = (  # (name, autocast dtype or None, channels_last, compile)
    ("fp32", None, False, False),
    ("fp32 channels_last", None, True, False),
    ("bf16", torch.bfloat16, False, False),
    ("bf16 channels_last", torch.bfloat16, True, False),
    ("fp16 channels_last", torch.float16, True, False),
    ("bf16 channels_last compile", torch.bfloat16, True, True),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of one step."""
    for _ in range(warmup):
        step()
    _sync(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _trained_step(compute_loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
                  dtype: torch.dtype | None, device: torch.device) -> Callable[[], torch.Tensor]:
    """zero_grad, forward under autocast (``dtype``; none for fp32), backward and step; a GradScaler for fp16 on
    CUDA. Returns the step, which returns the loss."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = compute_loss()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def moco_step(arch: str, batch: int, size: int, dtype: torch.dtype | None, channels_last: bool, compile_: bool,
              device: torch.device) -> Callable[[], None]:
    """One MoCo v2 step (both views, queue update), as the pre-training bundle's trainer does it."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    moco = MoCo(build_backbone(arch, imagenet_stem=True), queue_size=4096).to(device, memory_format=fmt)
    forward = torch.compile(moco) if compile_ else moco
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.03, momentum=0.9)
    views = [torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    keys: list[torch.Tensor] = []

    def loss() -> torch.Tensor:
        logits, labels, new_keys = forward(*views, return_keys=True)
        keys[:] = [new_keys]
        return F.cross_entropy(logits.float(), labels)

    trained = _trained_step(loss, optimizer, dtype, device)

    def step() -> None:
        trained()
        moco.update_key_encoder()
        moco.dequeue_and_enqueue(keys[0])

    return step


def finetune_step(arch: str, batch: int, size: int, dtype: torch.dtype | None, channels_last: bool, compile_: bool,
                  device: torch.device) -> Callable[[], None]:
    """One fine-tuning step of a two-class classifier on the backbone (the downstream bundle's classification)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = BackboneClassifier(build_backbone(arch, imagenet_stem=True), num_outputs=2).to(device, memory_format=fmt)
    forward = torch.compile(model) if compile_ else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 2, (batch,), device=device)
    return _trained_step(lambda: F.cross_entropy(forward(images).float(), labels), optimizer, dtype, device)


def largest_batch(arch: str, size: int, device: torch.device, start: int, limit: int) -> int | None:
    """The largest power-of-two MoCo batch (bf16, channels_last) whose step runs without running out of memory;
    ``None`` on a CPU (no device memory limit to find)."""
    if device.type != "cuda":
        return None
    best, batch = None, start
    while batch <= limit:
        try:
            step = moco_step(arch, batch, size, torch.bfloat16, True, False, device)
            step()
            _sync(device)
            best = batch
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        batch *= 2
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings")
    parser.add_argument("--batch-limit", type=int, default=2048, help="largest batch the memory search tries")
    parser.add_argument("--name", default="gpu_check")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu for a smoke run")

    rows = []
    for arch in args.archs:
        for name, dtype, channels_last, compile_ in SETTINGS:
            if compile_ and args.no_compile or dtype == torch.float16 and device.type != "cuda":
                continue
            for kind, build in (("moco", moco_step), ("finetune", finetune_step)):
                if compile_ and kind == "finetune":  # one compiled step per architecture keeps the check short
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    seconds = _timed(build(arch, args.batch, args.size, dtype, channels_last, compile_, device),
                                     device, args.warmup, args.steps)
                    row = {"arch": arch, "step": kind, "setting": name, "img_s": round(args.batch / seconds, 1)}
                except torch.cuda.OutOfMemoryError:
                    row = {"arch": arch, "step": kind, "setting": name, "img_s": None, "note": "out of memory"}
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                    torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    largest = {arch: largest_batch(arch, args.size, device, args.batch, args.batch_limit) for arch in args.archs}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path = write_result(args.name, {"device": name, "image_size": args.size, "batch_size": args.batch,
                                    "steps": args.steps, "rows": rows, "largest_moco_batch_bf16": largest})
    result = json.loads(path.read_text())
    (RESULTS / f"{args.name}.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    lines = [f"# GPU check: training-step throughput on {result['device']}", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}. Commit {result['commit']}.", f"Command: `{result['command']}`", "",
             f"Random inputs at {result['image_size']} px, batch {result['batch_size']}, median of {result['steps']} "
             "steps after the warm-up (which includes compilation). MoCo: one MoCo v2 step (queue 4096); fine-tune: "
             "a two-class classifier step with AdamW.", "",
             "| arch | step | setting | img/s | vs fp32 | peak GiB |", "|---|---|---|---|---|---|"]
    base = {(r["arch"], r["step"]): r["img_s"] for r in result["rows"] if r["setting"] == "fp32"}
    for r in result["rows"]:
        ref = base.get((r["arch"], r["step"]))
        ratio = f"{r['img_s'] / ref:.2f}" if r["img_s"] and ref else ""
        lines.append(f"| {r['arch']} | {r['step']} | {r['setting']} | {r['img_s'] or r.get('note', '')} | {ratio} | "
                     f"{r.get('peak_gib', '')} |")
    lines += ["", "Largest MoCo batch that fits (bf16, channels_last, powers of two from the batch above): "
              + ", ".join(f"{a} {b}" for a, b in result["largest_moco_batch_bf16"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
