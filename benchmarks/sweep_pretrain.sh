#!/bin/bash
# One MD-MoCo training run of a validation sweep: bench_pretrain.py's 15-epoch setting (96 px, batch 64, lr 0.075
# unless LR is set, fp32) plus the bundle overrides given after NAME; score the result with stage_knn.py.
#   DATA=../shared/data/xray WORK=/tmp/sweep bash benchmarks/sweep_pretrain.sh no_intensity_aug \
#       --view_augmentation "{'gamma_prob': 0.0, 'intensity_prob': 0.0}"
set -euo pipefail
NAME=$1; shift
DATA=${DATA:-$(dirname "$0")/../../shared/data/xray}
OUT=${WORK:-/tmp/sweep}/$NAME
rm -rf "$OUT"; mkdir -p "$OUT"   # a leftover checkpoint would make the bundle resume
python -m monai.bundle run --config_file "$(dirname "$0")/../bundles/muscle_pretrain/configs/train.yaml" \
  --dataset_dir "$DATA" --output_dir "$OUT" --model_dir "$OUT/models" --image_size 96 --batch_size 64 \
  --num_epochs 15 --warmup_epochs 1 --learning_rate "${LR:-0.075}" --amp False --num_workers 2 --knn_interval 5 \
  --seed 0 "$@" > "$OUT/train.log" 2>&1
echo "$OUT/models/backbone.pt"
