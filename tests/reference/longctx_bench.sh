#!/usr/bin/env bash
# Long-context benchmark for a GPU machine: bessie-train --bench on the bitnet_b1_58-large shape at
# micro-batch 1 for each sequence length and recompute level, beside torch_bitnet.py --mode tuned --ckpt
# (PyTorch with whole-block activation checkpointing) at the same lengths. One JSON line per run on stdout:
# bessie-train's own line (tok/s, estimated_peak_gib, measured_peak_gib, ...) or the PyTorch script's (peak_gib is
# torch.cuda.max_memory_allocated), each with `smi_peak_gib`
# (nvidia-smi's peak memory.used during the run, sampled every 50 ms, CUDA context included, less what the
# card used before the run) and `card`. A run that fails (out of memory, or Bessie's estimate refusing it)
# prints {"error": ...} with its exit status instead.
#
#   tests/reference/longctx_bench.sh target/release/bessie-train [../shared/anchors/torch_bitnet.py]
#
# The binary must be a CUDA build (cargo build --release --features cuda). Environment: SEQS (default
# "768 2048 4096 8192"), LEVELS ("none attention blocks"), STEPS (timed steps per run, default 3, after
# bessie's 2 and PyTorch's 1 warm-up steps), GPU (the nvidia-smi index watched, default 0), TORCH=0 skips
# PyTorch. Lengths beyond the shape's 2048 positions run with linear RoPE scaling (factor seq / 2048), which
# costs nothing per step. Expected to take about 5 minutes on one H200 with the defaults (not yet run on a GPU;
# the JSON plumbing was checked on CPU with a stand-in nvidia-smi).
set -uo pipefail
bin=${1:?usage: longctx_bench.sh BESSIE_TRAIN [TORCH_BITNET_PY]}
here=$(cd "$(dirname "$0")/../.." && pwd)
torch_py=${2:-$here/../shared/anchors/torch_bitnet.py}
seqs=${SEQS:-768 2048 4096 8192}
levels=${LEVELS:-none attention blocks}
steps=${STEPS:-3}
gpu=${GPU:-0}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$gpu")

# Runs "$@" while sampling the card's memory; prints the command's JSON line with smi_peak_gib and card added.
measure() {
    local log base peak out rc
    log=$(mktemp)
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu")
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu" -lms 50 >"$log" &
    local sampler=$!
    out=$(timeout ${RUN_TIMEOUT:-300} "$@" 2>/tmp/longctx_bench.err)
    rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    peak=$(sort -n "$log" | tail -1)
    rm -f "$log"
    local smi
    smi=$(awk -v p="${peak:-0}" -v b="$base" 'BEGIN { printf "%.2f", (p - b) / 1024 }')
    local json
    json=$(grep '^{' <<<"$out" | tail -1)
    if [ "$rc" -ne 0 ] || [ -z "$json" ]; then
        local err
        err=$(tail -c 400 /tmp/longctx_bench.err | tr '\n"\\' '   ')
        echo "{\"error\": \"$err\", \"rc\": $rc, \"command\": \"$*\", \"smi_peak_gib\": $smi, \"card\": \"$card\"}"
    else
        echo "${json%\}}, \"smi_peak_gib\": $smi, \"card\": \"$card\"}"
    fi
}

for seq in $seqs; do
    rope=()
    if [ "$seq" -gt 2048 ]; then
        rope=(--set model.rope_scaling=linear --set "model.rope_scaling_factor=$(awk -v s="$seq" 'BEGIN { print s / 2048 }')")
    fi
    for level in $levels; do
        measure "$bin" --bench --shape large --seq "$seq" --batch 1 --steps "$steps" --device cuda \
            --set "train.recompute=$level" "${rope[@]}"
    done
    if [ "${TORCH:-1}" != 0 ]; then
        measure python3 "$torch_py" --model large --mode tuned --ckpt --seq "$seq" --batch 1 --accum 1 \
            --steps "$steps" --warmup 1
    fi
done
