#!/usr/bin/env bash
# 8-bit AdamW moments (train.optimizer_state = "int8") against f32 ones on one GPU, in one call: the step's
# speed, estimated and measured peak memory at bitnet_b1_58-large 768 x 8 and at 2B4T 2048 x 1 (recompute none
# and blocks), then the loss curves of the large shape over 200 steps of the demo data from two seeds (data
# order and initial weights) with each state, compared as means over 20 steps. Writes under OUT.
#
#   OUT=results tests/reference/optimizer_state_bench.sh bessie-train
set -u
BT=${1:?bessie-train binary} OUT=${OUT:?a folder for the results}
TMP=$(mktemp -d)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
for state in f32 int8; do
  $BT --bench --shape large --seq 768 --batch 8 --steps 6 --device cuda --set train.optimizer_state=$state 2>&1 |
    grep '^{' | tee -a $OUT/bench.jsonl
  for recompute in none blocks; do
    $BT --bench --shape 2b4t --seq 2048 --batch 1 --steps 4 --device cuda --set train.optimizer_state=$state \
      --set train.recompute=$recompute --set train.check_memory=false 2>&1 | grep '^{' | tee -a $OUT/bench.jsonl
  done
done
for state in f32 int8; do
  for seed in 1 2; do
    $BT --config configs/tiny.toml --set model.init=large --set model.init_seed=$seed --set train.seed=$seed \
      --set train.device=cuda --set train.max_steps=200 --set train.lr=3e-4 --set train.optimizer_state=$state \
      --set checkpoint.every=0 --set log.dev_every=0 --set checkpoint.out_dir=$TMP/$state-$seed > $TMP/log 2>&1 ||
      tail -3 $TMP/log
  done
done
python3 - "$TMP" <<'PY' | tee $OUT/curves.txt
import json, math, sys
tmp = sys.argv[1]
def curve(run):
    losses = [json.loads(l)["loss"] for l in open(f"{tmp}/{run}/metrics.jsonl") if '"loss"' in l and '"step"' in l]
    return [sum(losses[i:i + 20]) / 20 for i in range(0, len(losses) - 19, 20)]
c = {r: curve(r) for r in ["f32-1", "f32-2", "int8-1", "int8-2"]}
rms = lambda a, b: math.sqrt(sum((x - y) ** 2 for x, y in zip(c[a], c[b])) / len(c[a]))
print("seeds (f32):", round(rms("f32-1", "f32-2"), 4), " seeds (int8):", round(rms("int8-1", "int8-2"), 4))
print("int8 against f32, seed 1:", round(rms("f32-1", "int8-1"), 4), " seed 2:", round(rms("f32-2", "int8-2"), 4))
for r, v in c.items():
    print(r, [round(x, 4) for x in v])
PY
rm -rf $TMP
