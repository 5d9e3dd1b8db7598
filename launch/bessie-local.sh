#!/usr/bin/env bash
# Data-parallel training on this machine, one rank per visible GPU, started by Open MPI's mpirun:
#
#   launch/bessie-local.sh --config configs/large.toml [--set key=value ...] [--resume]
#
# The arguments go to bessie-train unchanged. The GPUs are those CUDA_VISIBLE_DEVICES lists, else all that
# `nvidia-smi -L` shows; rank r takes the r-th of them (train.device = auto or cuda). The binary is $BESSIE_TRAIN,
# else bessie-train on PATH, else target/release/bessie-train of this checkout, built with
#   cargo build --release --features cuda,mpi
# Rank 0 alone prints progress and writes metrics and checkpoints. NCCL's NVLink multicast (NVLS) stays off,
# as on the machines Bessie is measured on.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${BESSIE_TRAIN:-$(command -v bessie-train || echo "$here/target/release/bessie-train")}
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
else
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -lt 1 ]; then
    echo "bessie-local.sh: no GPU visible (nvidia-smi -L, CUDA_VISIBLE_DEVICES); for one CPU process run $bin" >&2
    exit 1
fi
export NCCL_NVLS_ENABLE=0
# --bind-to none: mpirun would otherwise pin each of 2 ranks to a single core, starving its host-side threads.
exec mpirun -n "$gpus" --allow-run-as-root --bind-to none -x NCCL_NVLS_ENABLE=0 "$bin" "$@"
