#!/usr/bin/env bash
# Scaling benchmark of issues 4 and 9, for one machine with 4 GPUs, in one call: bitnet_b1_58-large at seq 768
# (1 x 4 = configs/large.toml, and 8 x 1) on 1, 2 and 4 GPUs, the 3B shape at seq 2048 with ZeRO-1 off and on,
# then torch_bitnet.py --mode compiled at 1 x 4 alone and under torchrun on 2 and 4 GPUs. One JSON line per run.
#
#   tests/reference/scaling_bench.sh bessie-train torch_bitnet.py
set -u
BT=${1:?bessie-train binary} TORCH=${2:?torch_bitnet.py}
export NCCL_NVLS_ENABLE=0
MPI="mpirun --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE -n"
nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c
run() { timeout 150 "$@" 2>&1 | grep '^{'; }
for ba in "1 4" "8 1"; do set -- $ba; for n in 1 2 4; do
  run $MPI $n $BT --bench --shape large --seq 768 --batch $1 --accum $2 --steps 8 --device cuda
done; done
run $BT --bench --shape 3b --seq 2048 --batch 1 --steps 4 --device cuda
for z in false true; do run $MPI 4 $BT --bench --shape 3b --seq 2048 --batch 1 --steps 4 --device cuda --set train.zero1=$z; done
T="--mode compiled --seq 768 --batch 1 --accum 4 --steps 6"
timeout 200 python3 $TORCH $T 2>&1 | grep '^{'
for n in 2 4; do timeout 200 torchrun --nproc_per_node $n $TORCH $T 2>&1 | grep '^{' | tail -1; done
