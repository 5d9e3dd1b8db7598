#!/usr/bin/env bash
# Inference speed on one GPU, in one call: bessie-prompt's prompt and decode speed at batch 1 (bitnet_b1_58-large
# and 2B4T shapes, a short and a long prompt; decoding with CUDA graphs, without them (BESSIE_CUDA_GRAPHS=0),
# and by candle ops alone (BESSIE_UNFUSED=1, no fused kernel at all)), bessie-eval on tests/reference/hf_generate_bench.py's synthetic
# dev file beside transformers' `generate` on the same prompts (quantizing on every call and once), and
# bessie-eval's continuous batching on a model whose answers differ in length (the tiny demo trained here on
# the GPU, tests/reference/mixed_dev.py's questions). BEFORE=dir (another build's binaries) times those
# binaries beside, alternating. Random weights of the shipped 1,002-token vocabulary: the device machine has
# only the checkout. Writes under OUT.
#
#   OUT=results [BEFORE=dir] tests/reference/inference_bench.sh BIN
set -u
BIN=${1:?the folder of the bessie binaries} OUT=${OUT:?a folder for the results}
TMP=$(mktemp -d)
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
builds=("$BIN") && [ -n "${BEFORE:-}" ] && builds+=("$BEFORE")
$BIN/bessie-init-model --out $TMP/large --shape large --dtype bf16 > /dev/null
$BIN/bessie-init-model --out $TMP/2b4t --shape 2b4t --dtype bf16 > /dev/null
short="What is the capital of France?"
# About 2,000 tokens in the chat template, 64 new tokens within the context of 2,048.
long=$(python3 -c "print(' '.join(['The cows graze in the green field beside the old red barn.'] * 100))")
for round in 1 2; do
  for b in "${builds[@]}"; do
    for mode in graphs BESSIE_CUDA_GRAPHS=0 BESSIE_UNFUSED=1; do
      for model in large 2b4t; do
        for run in "256 $short" "64 $long"; do
          set -- $run
          # Speeds go to stderr after each answer.
          env $([ $mode = graphs ] || echo $mode) $b/bessie-prompt -m $TMP/$model --device cuda --max-new-tokens $1 \
            -p "${run#* }" 2>&1 >/dev/null | tail -1 | sed "s|^|$round $b $mode $model: |" | tee -a $OUT/prompt.txt
        done
      done
    done
  done
done
python3 tests/reference/hf_generate_bench.py --write-dev $TMP/dev.jsonl
for b in "${builds[@]}"; do
  $b/bessie-eval -m $TMP/large -d $TMP/dev.jsonl -o $TMP/eval.jsonl --batch-size 32 --max-new-tokens 50 \
    --device cuda > /dev/null 2>&1
  python3 -c "import json,sys; print(sys.argv[1], json.load(open('$TMP/eval_summary.json'))['speed'])" $b |
    tee -a $OUT/eval.txt
done
for once in "" --quantize-once; do
  timeout 600 python3 tests/reference/hf_generate_bench.py --dev $TMP/dev.jsonl $once 2>&1 | grep '^{' |
    tee -a $OUT/hf.jsonl
done
# Answers of different lengths: the demo trained on the GPU, asked the mixed questions.
$BIN/bessie-train --config configs/tiny.toml --set train.device=cuda --set train.max_steps=600 \
  --set checkpoint.out_dir=$TMP/demo --set checkpoint.every=0 --set log.dev_every=0 > $TMP/train.log 2>&1 ||
  tail -3 $TMP/train.log
python3 tests/reference/mixed_dev.py --out $TMP/mixed.jsonl --lines 2000
for round in 1 2; do
  for b in "${builds[@]}"; do
    for bs in 32 128; do
      $b/bessie-eval -m $TMP/demo/final_checkpoint -d $TMP/mixed.jsonl -o $TMP/m.jsonl --batch-size $bs \
        --device cuda 2>&1 | grep "examples in" | sed "s|^|$round $b |" | tee -a $OUT/mixed.txt
    done
  done
done
rm -rf $TMP
