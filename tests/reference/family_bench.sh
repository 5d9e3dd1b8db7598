#!/usr/bin/env bash
# Training speed and memory of the model families on one GPU: bessie-train --bench at the 2B4T and
# Falcon3-1B shapes (and bitnet_b1_58-large, the known point) and tests/reference/torch_bitnet.py
# --mode compiled at the same shape, batch and accumulation; the estimated and measured peaks of the shipped
# configs' steps (configs/2b4t.toml, configs/falcon3-1b.toml). WHAT=bessie or WHAT=torch runs one side only
# (torch.compile takes a minute or two per shape: the sides may need separate calls). Writes under OUT.
#
#   OUT=results [WHAT=both] tests/reference/family_bench.sh bessie-train tests/reference/torch_bitnet.py
set -u
BT=${1:?bessie-train binary} TORCH=${2:?torch_bitnet.py} OUT=${OUT:?a folder for the results} WHAT=${WHAT:-both}
ROWS=("2b4t 2048 4 1" "2b4t 2048 1 4" "falcon3-1b 2048 4 1" "falcon3-1b 2048 1 4" "large 768 8 1")
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
if [ "$WHAT" != torch ]; then
  for row in "${ROWS[@]}"; do
    set -- $row
    $BT --bench --shape $1 --seq $2 --batch $3 --accum $4 --steps 6 --device cuda 2>&1 | grep '^{' | tee -a $OUT/bench.jsonl
  done
  # The shipped configs' steps: 2B4T at 2048 x 2 x 2 (80 GB), Falcon3-1B at 1024 x 1 x 4 with recompute (24 GB).
  $BT --bench --shape 2b4t --seq 2048 --batch 2 --accum 2 --steps 4 --device cuda 2>&1 | grep '^{' | tee -a $OUT/configs.jsonl
  $BT --bench --shape falcon3-1b --seq 1024 --batch 1 --accum 4 --steps 4 --device cuda \
    --set train.recompute=attention 2>&1 | grep '^{' | tee -a $OUT/configs.jsonl
fi
if [ "$WHAT" != bessie ]; then
  for row in "${ROWS[@]}"; do
    set -- $row
    timeout 240 python3 $TORCH --model $1 --mode compiled --seq $2 --batch $3 --accum $4 --steps 4 2>&1 | grep '^{' |
      tee -a $OUT/torch.jsonl
  done
fi
