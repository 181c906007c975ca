#!/usr/bin/env bash
# The device check (docs/benchmarks.md, "On a GPU"): one command, offline, <= 5 minutes cold,
# compilation and autotuning included. A thin wrapper of benchmarks/gpu_check.py, a plain Python
# script (no pytest, no install, no build: the triton backend compiles just in time; the cuda
# backend is benchmarks/gpu_cuda_backend.sh's).
#   bash benchmarks/gpu_check.sh            # writes to $OUT if set, else benchmarks/gpu_out/
#   bash benchmarks/gpu_check.sh --dry      # the same script on CPU (interpreter, tiny shapes)
# Everything goes to $OUT: gpu_check.log (all output, autotuning included), results.csv (one
# row per check), summary.json (the verdict so far, rewritten after every section), env.json,
# configs/<device>.json (tuned configurations and measured designs: commit it to
# slim_kernels/ops/backends/triton/configs/). The Triton and inductor caches go to
# $OUT/cache (--cache-dir DIR elsewhere), so a rerun on the same machine compiles nothing.
# The last line printed is: VERDICT correctness=PASS|FAIL fwd=<ratio>/1.10 fwd+bwd=<ratio>/1.16 best=<provider>
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_PRINT_AUTOTUNING="${TRITON_PRINT_AUTOTUNING:-1}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee "$OUT/nvidia-smi.txt"
# 320 s: the script's own budget is 280 s (it skips, saying so, what no longer fits); the
# margin is for the start-up and the section in flight
timeout 320 python benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check exit: $rc (0: it ran to the end; 124: timed out)"
exit "$rc"
