#!/usr/bin/env bash
# Issue #19 in one command: every measurement of the performance issue, one after another on this machine
# (about 70 minutes on 2 quiet cores). From the repository root, after the README's install:
#   bash benchmarks/bench_performance.sh [data folder, default ../shared/data/xray]
# (PYTHON=/path/to/python to use another interpreter than .venv/bin/python)
# 1. each bundle's trainer against its plain-PyTorch loop            -> benchmarks/results/trainers.{json,md}
# 2. each bundle's training data pipeline against its training step -> benchmarks/results/data_path.{json,md}
#    (and MONAI's percentile scaling against ours on the same images)
# 3. peak memory of the quick and full presets, MD-MoCo on 1x/2x/4x the pool (memory and disk cache), the continual
#    stage with 2/3/4 tasks, DDP with 1 and 2 torchrun processes     -> benchmarks/results/scaling.{json,md}
# Run it alone on the machine: the scripts time alternating rounds, and scaling.md flags runs that shared the CPU.
# On a GPU machine, benchmarks/gpu_check.sh measures the device.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/xray}"
PY="${PYTHON:-.venv/bin/python}"
"$PY" benchmarks/bench_trainers.py
"$PY" benchmarks/bench_data_path.py --data "$DATA"
"$PY" benchmarks/bench_scaling.py --data "$DATA" --parts pool,ddp,continual,memory
