#!/usr/bin/env bash
# The GPU check (issue #19), for a machine with one GPU; about 8 minutes. From the repository root, after the README's
# install with a CUDA build of torch (see the README's GPU note):
#   bash benchmarks/gpu_check.sh [data folder, default ../shared/data/xray]
# 1. training-step throughput of MoCo and fine-tuning, ResNet-18/50 at 224 px, fp32/bf16/fp16, channels_last,
#    torch.compile; the largest MoCo batch that fits  -> benchmarks/results/gpu_check.{json,md}
# 2. the main job's quick preset end to end on the GPU -> benchmarks/results/gpu_check_reproduce.md
# Commit both result files with the device name they record.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/xray}"
PY="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-$(mktemp -d)}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures a GPU')"
timeout 300 "$PY" benchmarks/bench_gpu.py
start=$(date +%s)
status=0
timeout 420 "$PY" -m muscle_ext.cli reproduce --preset quick --data "$DATA" --out "$OUT/reproduce" > "$OUT/reproduce.log" 2>&1 || status=$?
took=$(( $(date +%s) - start ))
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))")
{
  echo "# GPU check: the main job's quick preset on $device"
  echo
  echo "Command: \`muscle reproduce --preset quick --data <data> --out <out>\` (from benchmarks/gpu_check.sh); commit $(git rev-parse --short HEAD)."
  echo "Exit status $status after ${took} s (a limit of 420 s; 124 means it ran out)."
  echo
  if [ -f "$OUT/reproduce/report.md" ]; then sed -n '/^## Stages/,/^Each stage on its own/p' "$OUT/reproduce/report.md"; fi
  echo
  echo "Last lines of its output:"
  echo '```'
  tail -n 15 "$OUT/reproduce.log" | sed "s|$OUT|<out>|g"
  echo '```'
} > benchmarks/results/gpu_check_reproduce.md
cat benchmarks/results/gpu_check.md benchmarks/results/gpu_check_reproduce.md
