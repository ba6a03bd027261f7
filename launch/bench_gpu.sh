#!/usr/bin/env bash
# One prepared accelerator benchmark (medim_jax/bench/accelerator.py), about 5-8 minutes on one GPU:
# matmul peak, demo step, the paper step at the largest batch that fits (MFU), cuDNN vs einsum
# attention, the sampler at the paper shape. Writes $OUT/bench_accelerator.json and .md.
#   OUT=bench_out launch/bench_gpu.sh            # on the GPU machine, from the repository root
#   launch/bench_gpu.sh --dry-run                # print the command only
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
PYTHON=${PYTHON:-python3}
REMAT=${REMAT:-full}        # the paper step's config.model.remat_policy
MU_DTYPE=${MU_DTYPE:-bfloat16}  # Adam's first moment for the paper step
EXTRA=${EXTRA:-}            # e.g. "--shapes tiny" to check the script on a CPU
# Let XLA take what the step needs rather than 75% up front, so the batch search sees the card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
command=("$PYTHON" -m medim_jax.bench.accelerator --out "$OUT" --remat_policy "$REMAT"
         --mu_dtype "$MU_DTYPE" $EXTRA)
if [[ "${1:-}" == "--dry-run" ]]; then
  echo "${command[@]}"
  exit 0
fi
"${command[@]}"
