#!/usr/bin/env bash
# Speed benchmark of bitnet_b1_58-large for a one-GPU machine, in one call: the GPU kernel tests, the tiny config's loss
# curve fused / unfused (BESSIE_UNFUSED=1) / CPU f32 over 200 steps, bessie-train --bench on the
# bitnet_b1_58-large shape beside torch_bitnet.py --mode compiled and --mode seed, and the CUPTI kernel profile
# of the 768 x 8 and 1 x 4 steps (tests/reference/kernel_profile.c, built as libkprof.so beside libcupti.so.13
# in KPROF). The 8192-token row checks the memory estimate at long context.
# Writes what it measured under OUT.
#
#   OUT=results KPROF=dir [TINY64=dir] tests/reference/speed_bench.sh bessie-train gpu-test-binary torch_bitnet.py
set -u
BT=${1:?bessie-train binary} GT=${2:?the tests/gpu.rs binary} TORCH=${3:?torch_bitnet.py}
OUT=${OUT:?a folder for the results} KPROF=${KPROF:-}
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/card.txt
$GT --nocapture --test-threads=1 > $OUT/tests.txt 2>&1; grep -E "^test |test result|panicked" $OUT/tests.txt | grep -v " ok$"
# Loss curves of the tiny config (heads of 16: the blocked attention), and with TINY64 (a tiny checkpoint whose
# config.json says one head of 64: the flash kernel) of that model too.
curves() {
  local TINY="--overwrite --config configs/tiny.toml --set log.dev_every=0 --set checkpoint.every=0 --set train.epochs=100 --set train.max_steps=200 $*"
  $BT $TINY --set train.device=cuda --set checkpoint.out_dir=/tmp/fused > /tmp/f.log 2>&1 || tail -3 /tmp/f.log
  BESSIE_UNFUSED=1 $BT $TINY --set train.device=cuda --set checkpoint.out_dir=/tmp/unfused > /tmp/u.log 2>&1 || tail -3 /tmp/u.log
  $BT $TINY --set train.device=cpu --set checkpoint.out_dir=/tmp/cpu > /tmp/c.log 2>&1 || tail -3 /tmp/c.log
  python3 - <<'PY'
import json
L={r:[json.loads(l)['loss'] for l in open(f'/tmp/{r}/metrics.jsonl') if '"loss"' in l and '"step"' in l] for r in ['fused','unfused','cpu']}
def gap(a,b): d=[abs(x-y) for x,y in zip(L[a],L[b])]; return f'max {max(d):.4f} mean {sum(d)/len(d):.4f} (n={len(d)})'
print('fused vs unfused:', gap('fused','unfused')); print('unfused bf16 vs cpu f32:', gap('unfused','cpu')); print('fused vs cpu f32:', gap('fused','cpu'))
for i in [0,49,99,149,199]: print(i+1, *(round(L[r][i],4) for r in L))
PY
}
curves | tee $OUT/loss.txt
if [ -n "${TINY64:-}" ]; then curves --set model.init= --set model.path=$TINY64 | tee $OUT/loss64.txt; fi
for sba in "768 8 1" "2048 4 1" "768 1 4"; do set -- $sba
  $BT --bench --shape large --seq $1 --batch $2 --accum $3 --steps 8 --device cuda | tee -a $OUT/bench.jsonl
done
# Past the model's 2048 positions: linear RoPE scaling.
$BT --bench --shape large --seq 8192 --batch 1 --steps 3 --device cuda --set model.rope_scaling=linear \
  --set model.rope_scaling_factor=4 | tee -a $OUT/bench.jsonl
for sb in "768 8" "2048 4"; do set -- $sb
  timeout 200 python3 $TORCH --mode compiled --seq $1 --batch $2 --accum 1 --steps 6 2>&1 | grep '^{' | tee -a $OUT/torch.jsonl
  timeout 120 python3 $TORCH --mode seed --seq $1 --batch $2 --accum 1 --steps 3 2>&1 | grep '^{' | tee -a $OUT/torch.jsonl
done
$BT --bench --shape large --seq 768 --batch 8 --steps 3 --device cuda --profile | grep -o '"phases_ms.*' | tee $OUT/phases.txt
if [ -n "$KPROF" ]; then
  LD_LIBRARY_PATH=$KPROF:${LD_LIBRARY_PATH:-} CUDA_INJECTION64_PATH=$KPROF/libkprof.so KPROF_TOP=40 \
    $BT --bench --shape large --seq 768 --batch 8 --steps 20 --device cuda 2>&1 | grep '^kprof' | tee $OUT/kprof_b8.txt
  LD_LIBRARY_PATH=$KPROF:${LD_LIBRARY_PATH:-} CUDA_INJECTION64_PATH=$KPROF/libkprof.so KPROF_TOP=40 \
    $BT --bench --shape large --seq 768 --batch 1 --accum 4 --steps 12 --device cuda 2>&1 | grep '^kprof' > $OUT/kprof_1x4.txt
fi
