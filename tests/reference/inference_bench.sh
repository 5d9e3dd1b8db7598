#!/usr/bin/env bash
# Inference speed on one GPU, in one call, of one or more builds side by side (each BIN a folder of the bessie
# binaries; they alternate, two rounds):
# - bessie-prompt's prompt and decode speed at batch 1, bitnet_b1_58-large and 2B4T shapes, a short prompt
#   (183 tokens, 256 new) and a long one (1,973 tokens, 64 new), in each of MODES: "default", or environment
#   settings such as BESSIE_PDL=0, BESSIE_CUDA_GRAPHS=0, BESSIE_UNFUSED=1 (default MODES: "default");
# - with KPROF=dir (libkprof.so built from tests/reference/kernel_profile.c, and libcupti beside it), each
#   build's 2B4T decoding step by kernel under CUPTI (1,536 new tokens);
# - bessie-eval on tests/reference/hf_generate_bench.py's synthetic dev file, batch 32, 50 new tokens, each
#   build in each mode, how many guesses equal the first run's, and transformers' `generate` on the same
#   prompts (ternary weights quantized once) for the ratio, unless HF=0 (builds against each other only);
# - with MIXED=1, bessie-eval's continuous batching on answers of different lengths (the tiny demo trained
#   here on the GPU, tests/reference/mixed_dev.py's questions).
# Random weights of the shipped 1,002-token vocabulary: the device machine has only the checkout. Writes under
# OUT.
#
#   OUT=results [MODES="default BESSIE_PDL=0"] [KPROF=dir] [MIXED=1] [HF=0] tests/reference/inference_bench.sh BIN...
set -u
OUT=${OUT:?a folder for the results} MODES=${MODES:-default}
[ $# -ge 1 ] || { echo "usage: OUT=dir tests/reference/inference_bench.sh BIN..." >&2; exit 2; }
builds=("$@") BIN=$1
TMP=$(mktemp -d)
trap 'rm -rf $TMP' EXIT
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
$BIN/bessie-init-model --out $TMP/large --shape large --dtype bf16 > /dev/null
$BIN/bessie-init-model --out $TMP/2b4t --shape 2b4t --dtype bf16 > /dev/null
short="What is the capital of France?"
# About 2,000 tokens in the chat template, 64 new tokens within the context of 2,048.
long=$(python3 -c "print(' '.join(['The cows graze in the green field beside the old red barn.'] * 100))")
# `run MODE COMMAND...`: COMMAND under MODE's environment setting.
run() { local mode=$1; shift; if [ "$mode" = default ]; then "$@"; else env "$mode" "$@"; fi; }
for round in 1 2; do
  for b in "${builds[@]}"; do
    for mode in $MODES; do
      for model in large 2b4t; do
        for case in "256 $short" "64 $long"; do
          n=${case%% *}
          # Speeds go to stderr after each answer.
          run $mode timeout 120 $b/bessie-prompt -m $TMP/$model --device cuda --max-new-tokens $n -p "${case#* }" \
            2>&1 >/dev/null | tail -1 | sed "s|^|$round $b $mode $model $n: |" | tee -a $OUT/prompt.txt
        done
      done
    done
  done
done
if [ -n "${KPROF:-}" ]; then
  for b in "${builds[@]}"; do
    name=$(basename $b)
    LD_LIBRARY_PATH=$KPROF:${LD_LIBRARY_PATH:-} CUDA_INJECTION64_PATH=$KPROF/libkprof.so KPROF_TOP=16 KPROF_SKIP_S=1.0 \
      $b/bessie-prompt -m $TMP/2b4t --device cuda --max-new-tokens 1536 -p "$short" > /dev/null 2> $OUT/profile-$name.txt
    echo "== $b" && grep -v "^kprof: idle\|host call" $OUT/profile-$name.txt | head -16 | cut -c1-160
  done
fi
python3 tests/reference/hf_generate_bench.py --write-dev $TMP/dev.jsonl > /dev/null
i=0
for b in "${builds[@]}"; do
  for mode in $MODES; do
    i=$((i + 1))
    run $mode $b/bessie-eval -m $TMP/large -d $TMP/dev.jsonl -o $TMP/eval$i.jsonl --batch-size 32 --max-new-tokens 50 \
      --device cuda > /dev/null 2> $OUT/eval$i.log || tail -3 $OUT/eval$i.log
    python3 - "$b $mode" $TMP/eval1.jsonl $TMP/eval$i.jsonl $TMP/eval${i}_summary.json <<'PY' | tee -a $OUT/eval.txt
import json, sys
first, this = ([json.loads(l)["guess"] for l in open(p)] for p in sys.argv[2:4])
s = json.load(open(sys.argv[4]))["speed"]
same = sum(a == b for a, b in zip(first, this))
print(f"{sys.argv[1]}: {s['generated_tokens']} tokens in {s['seconds']:.2f} s, {s['generated_tokens_per_sec']:.1f} tok/s; "
      f"guesses equal to the first run's: {same} of {len(first)}")
PY
  done
done
[ "${HF:-1}" = 0 ] || timeout 600 python3 tests/reference/hf_generate_bench.py --dev $TMP/dev.jsonl --quantize-once 2>&1 |
  grep '^{' | tee -a $OUT/hf.jsonl
if [ -n "${MIXED:-}" ]; then
  # Answers of different lengths: the demo trained on the GPU, asked the mixed questions.
  $BIN/bessie-train --config configs/tiny.toml --set train.device=cuda --set train.max_steps=600 \
    --set checkpoint.out_dir=$TMP/demo --set checkpoint.every=0 --set log.dev_every=0 > $TMP/train.log 2>&1 ||
    tail -3 $TMP/train.log
  python3 tests/reference/mixed_dev.py --out $TMP/mixed.jsonl --lines 2000
  for round in 1 2; do
    for b in "${builds[@]}"; do
      for bs in 32 128; do
        $b/bessie-eval -m $TMP/demo/final_checkpoint -d $TMP/mixed.jsonl -o $TMP/m$round$bs.jsonl --batch-size $bs \
          --device cuda 2>&1 | grep "examples in" | sed "s|^|$round $b $bs |" | tee -a $OUT/mixed.txt
        rm -f $TMP/m$round$bs.jsonl $TMP/m${round}${bs}_summary.json
      done
    done
  done
fi
