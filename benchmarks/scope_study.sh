#!/usr/bin/env bash
# The ablation behind the out-of-scope/confounder numbers in the README: six training variants on the
# four-class slices (128 px, from scratch), each exported, evaluated on its validation blocks and run
# through benchmarks/scope.py (out-of-scope sets and calculus pairs on ct-volumes). Training uses a
# CUDA GPU when one is there (--device auto); everything after training runs on ONNX Runtime's CPU.
# usage: benchmarks/scope_study.sh DATA VOLUMES OUT [EPOCHS]
set -uo pipefail
D=$1; V=$2; OUT=$3; EPOCHS=${4:-12}
mkdir -p "$OUT"
py() { python3 -m edgekidney.cli "$@"; }
declare -A VARIANT=(
  [default]=""
  [default_seed1]="--seed 1"
  [default_24_epochs]="--epochs 24 --patience 6"
  [calculus_half_24_epochs]="--calculus-fraction 0.5 --epochs 24 --patience 6"
  [no_body_crop]="--no-body-crop"
  [old_augment]="--augment geometry,intensity"
  [no_calculus]="--augment geometry,scale,intensity,window,noise,resolution"
  [no_balanced]="--no-balanced"
  [calculus_half]="--calculus-fraction 0.5"
  [no_body_level]="--body-level 0"
  [no_resolution]="--augment geometry,scale,intensity,window,noise,calculus"
  [binary_like_before]="--classes Normal,Stone --no-body-crop --body-level 0 --augment geometry,intensity --no-balanced"
)
for v in "${!VARIANT[@]}"; do
  ( OMP_NUM_THREADS=${THREADS:-2} py train "$D" --out "runs/$v" --weights none --image-size 128 --epochs "$EPOCHS" \
        ${VARIANT[$v]} > "$OUT/train-$v.log" 2>&1
    OMP_NUM_THREADS=2 py export "runs/$v" --out "runs/$v/model.onnx" >> "$OUT/train-$v.log" 2>&1
    OMP_NUM_THREADS=2 py evaluate "runs/$v/model.onnx" "runs/$v/split.csv" --split val --json "$OUT/eval-$v.json" \
        > "$OUT/eval-$v.txt" 2>&1
    OMP_NUM_THREADS=2 python3 benchmarks/scope.py "runs/$v/model.onnx" --val "runs/$v/split.csv" --volumes "$V" \
        --json "$OUT/scope-$v.json" > "$OUT/scope-$v.txt" 2>&1
    cp "runs/$v/metrics.json" "$OUT/metrics-$v.json" 2>/dev/null
    echo "variant $v done" ) &
done
wait
# one archive: the device tool brings back at most 8 files
[ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE" -C "$OUT" .
