#!/usr/bin/env bash
# GPU check for a session that is lent a CUDA GPU: one command, no network, < 8 minutes
# (timeouts: install 40 s, tests 200 s, benchmark 220 s).
#   bash benchmarks/gpu_check.sh          (writes to $OUT if set, else benchmarks/gpu_out/)
# 1. install in place without network or build isolation;
# 2. run the triton backend tests on CUDA (the cuda-parametrised cases; CPU ones skip);
# 3. time forward and forward+backward of SLIM triton vs the frozen base linear (cuBLAS),
#    the stacked torch backend and the eager per-expert loop at the Llama-3-8B shapes, T=8192,
#    bf16, with each provider's forward error against the fp64 reference: `slim-kernels
#    bench`, the same harness as every benchmark, writing bench_shape_cuda_bfloat16.{csv,png}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/gpu_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "== $(date -u) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

echo "== pip install -e . (no deps, no build isolation)"
timeout 40 pip install --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 \
  || echo "pip install failed (see pip.log); continuing from the source tree (PYTHONPATH)"

echo "== tests on CUDA"
timeout 200 python -m pytest -q -x -p no:cacheprovider tests/test_triton_backend.py \
  2>&1 | tee "$OUT/tests.log" | tail -15
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"

echo "== benchmark"
timeout 220 python -m slim_kernels.cli bench --device cuda --sweep shape --tokens 8192 \
  --providers slim_triton,slim_torch,eager_loop --modes forward,forward+backward \
  --reps 30 --warmup 3 --check --no-progress --out "$OUT" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}"
ls -l "$OUT"
