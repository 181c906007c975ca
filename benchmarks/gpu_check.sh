#!/usr/bin/env bash
# The device check (docs/benchmarks.md, "On a GPU"): one command, offline, under 8 minutes
# including compilation and autotuning. A thin wrapper of benchmarks/gpu_check.py, a plain
# Python script (no pytest, no install, no build: the triton backend compiles just in time).
#   bash benchmarks/gpu_check.sh            # writes to $OUT if set, else benchmarks/gpu_out/
#   bash benchmarks/gpu_check.sh --dry      # the same script on CPU (interpreter, tiny shapes)
# Everything goes to $OUT: gpu_check.log (all output, autotuning included), results.csv (one
# row per check: PASS/FAIL/INFO/SKIP/ERROR), env.json, tuned_configs.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_PRINT_AUTOTUNING="${TRITON_PRINT_AUTOTUNING:-1}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee "$OUT/nvidia-smi.txt"
# 470 s: the script's own budget is 450 s; the margin is for the interpreter's start-up
timeout 470 python benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "gpu_check exit: $rc (0: every check ran; 1: some check raised; 124: timed out)"
exit "$rc"
