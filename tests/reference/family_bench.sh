#!/usr/bin/env bash
# Training speed and memory of the model families on one GPU: bessie-train --bench at the 2B4T and
# Falcon3-1B shapes (and bitnet_b1_58-large, the known point) beside tests/reference/torch_bitnet.py
# --mode compiled at the same shape, batch and accumulation, in one call; then the estimated and measured
# peaks of the shipped configs' steps (configs/2b4t.toml, configs/falcon3-1b.toml). torch.compile takes a
# minute or two per shape: ROWS="shape seq batch accum;..." picks rows, CONFIGS=0 skips the configs' steps.
# Writes under OUT.
#
#   OUT=results [ROWS=...] [CONFIGS=0] tests/reference/family_bench.sh bessie-train tests/reference/torch_bitnet.py
set -u
BT=${1:?bessie-train binary} TORCH=${2:?torch_bitnet.py} OUT=${OUT:?a folder for the results}
IFS=';' read -ra ROWS <<< "${ROWS:-2b4t 2048 4 1;2b4t 2048 1 4;falcon3-1b 2048 4 1;falcon3-1b 2048 1 4;large 768 8 1}"
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
for row in "${ROWS[@]}"; do
  set -- $row
  $BT --bench --shape $1 --seq $2 --batch $3 --accum $4 --steps 6 --device cuda 2>&1 | grep '^{' | tee -a $OUT/bench.jsonl
  timeout 240 python3 $TORCH --model $1 --mode compiled --seq $2 --batch $3 --accum $4 --steps 4 2>&1 | grep '^{' |
    tee -a $OUT/torch.jsonl
done
if [ "${CONFIGS:-1}" != 0 ]; then
  # configs/2b4t.toml's step (2048 x 2 x 2) and configs/falcon3-1b.toml's (2048 x 1 x 4).
  $BT --bench --shape 2b4t --seq 2048 --batch 2 --accum 2 --steps 4 --device cuda 2>&1 | grep '^{' | tee -a $OUT/configs.jsonl
  $BT --bench --shape falcon3-1b --seq 2048 --batch 1 --accum 4 --steps 4 --device cuda 2>&1 | grep '^{' |
    tee -a $OUT/configs.jsonl
fi
