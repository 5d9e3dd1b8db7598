#!/usr/bin/env bash
# The memory savings (train.optimizer_state = "int8", train.step_weights = "per_block", train.grad_buffer =
# "bf16", with train.recompute) against the full-precision step on one GPU, in one call:
# - speed, estimated and measured peak at bitnet_b1_58-large 768 x 8, each saving alone;
# - 2B4T at 2048 tokens, micro-batch 1 x 4 accumulation (configs/2b4t-24gb.toml's step): no saving, then
#   whole-block recomputation and each saving added to the last (the last is the 24 GB configuration);
# - the loss curves of the large shape over 200 steps of the demo data from two seeds (data order and initial
#   weights), f32 state against every saving, compared as means over 20 steps.
# PARTS picks among "large 2b4t curves" (default: all three). Writes under OUT, each curve's log with the
# seconds since its start on every line: on an H100 (2026-12-05) a curve's run wrote its random base model and
# loaded it in 25 s, then took 8 s for its 200 steps. SEEDS="1" and SEEDS="2" split the curves over calls;
# the comparison is made of the metrics files present in OUT (copy the other call's there to compare all four).
#
#   OUT=results [PARTS=curves] [SEEDS="1 2"] tests/reference/memory_savings_bench.sh bessie-train
set -u
BT=${1:?bessie-train binary} OUT=${OUT:?a folder for the results} PARTS=${PARTS:-large 2b4t curves}
part() { [[ " $PARTS " == *" $1 "* ]]; }
# The runs' checkpoints (a random large model written before each run, the final one after it) go to memory
# where there is a tmpfs: the device machine's disk is for the user's files.
TMP=$(mktemp -d -p "$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")")
trap 'rm -rf $TMP' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
bench() { $BT --bench --device cuda --set train.check_memory=false "$@" 2>&1 | grep '^{' | tee -a $OUT/bench.jsonl; }
if part large; then
  for saving in "" train.optimizer_state=int8 train.step_weights=per_block train.grad_buffer=bf16; do
    bench --shape large --seq 768 --batch 8 --steps 6 ${saving:+--set $saving}
  done
fi
if part 2b4t; then
  two_b=(--shape 2b4t --seq 2048 --batch 1 --accum 4 --steps 3)
  bench "${two_b[@]}"
  savings=(--set train.recompute=blocks)
  bench "${two_b[@]}" "${savings[@]}"
  for saving in train.optimizer_state=int8 train.step_weights=per_block train.grad_buffer=bf16 train.loss_chunk=512; do
    savings+=(--set $saving)
    bench "${two_b[@]}" "${savings[@]}"
  done
fi
part curves || exit 0
# Each line of a run's output after the seconds since the run started (bash's clock: awk buffers its input).
stamped() {
  local t0=${EPOCHREALTIME/./} line now
  while IFS= read -r line; do
    now=${EPOCHREALTIME/./}
    printf '%7.1f s  %s\n' "$(((now - t0) / 100000))e-1" "$line"
  done
}
all=(--set train.optimizer_state=int8 --set train.step_weights=per_block --set train.grad_buffer=bf16)
for seed in ${SEEDS:-1 2}; do
  for name in full savings; do
    extra=()
    [ $name = savings ] && extra=("${all[@]}")
    $BT --config configs/tiny.toml --set model.init=large --set model.init_seed=$seed --set train.seed=$seed \
      --set train.device=cuda --set train.max_steps=200 --set train.lr=3e-4 --set train.grad_accum=2 \
      "${extra[@]}" --set checkpoint.every=0 --set log.dev_every=0 --set checkpoint.out_dir=$TMP/$name-$seed 2>&1 |
      stamped > $OUT/log-$name-$seed.txt
    [ "${PIPESTATUS[0]}" = 0 ] || tail -3 $OUT/log-$name-$seed.txt
    # Each run's metrics kept as it ends (a run cut short by a time limit leaves the others'), its checkpoint not.
    cp $TMP/$name-$seed/metrics.jsonl $OUT/metrics-$name-$seed.jsonl && rm -rf $TMP/$name-$seed
    echo "$name seed $seed done at ${SECONDS} s"
  done
done
python3 - "$OUT" <<'PY' | tee $OUT/curves.txt
import json, math, sys
out = sys.argv[1]
def curve(run):
    losses = [json.loads(l)["loss"] for l in open(f"{out}/metrics-{run}.jsonl") if '"loss"' in l and '"step"' in l]
    return [sum(losses[i:i + 20]) / 20 for i in range(0, len(losses) - 19, 20)]
import os
runs = ["full-1", "full-2", "savings-1", "savings-2"]
c = {r: curve(r) for r in runs if os.path.exists(f"{out}/metrics-{r}.jsonl")}
rms = lambda a, b: math.sqrt(sum((x - y) ** 2 for x, y in zip(c[a], c[b])) / len(c[a]))
for what, a, b in [("seeds (full)", "full-1", "full-2"), ("seeds (savings)", "savings-1", "savings-2"),
                   ("savings against full, seed 1", "full-1", "savings-1"),
                   ("savings against full, seed 2", "full-2", "savings-2")]:
    print(f"{what}:", round(rms(a, b), 4) if a in c and b in c else "not both run")
for r, v in c.items():
    print(r, [round(x, 4) for x in v])
PY
