#!/usr/bin/env bash
# The cuda backend on a GPU (docs/backends.md, "On a machine with a GPU"): builds the extension
# slim_kernels._C in place (CPU and CUDA kernels, offline, against the torch the image has:
# no pip, no network) and runs the conformance suite's CUDA cases, the cuda backend's and the
# torch backend's on CUDA tensors, held to the same fp64 reference as every backend
# (tests/ops). The triton backend's CUDA cases (every design) join with --with-triton; they
# compile many small kernels (a few minutes cold), so benchmarks/gpu_check.py covers triton in
# the first run instead.
#   bash benchmarks/gpu_cuda_backend.sh [--with-triton]      # writes to $OUT if set
# Writes $OUT/cuda_build.log, $OUT/cuda_conformance.log and $OUT/cuda_conformance.xml (JUnit).
# pytest is on this project's GPU image; elsewhere carry it (.whl, see the device README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the GPU's own architecture (sm_90 for an H100/H200) unless given: one cubin, a faster build
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  export TORCH_CUDA_ARCH_LIST
fi
export SLIM_KERNELS_BUILD_CUDA=1   # demand the CUDA kernels: fail loudly when they cannot build
export SLIM_KERNELS_JIT=0          # only what this build produced counts
export SLIM_KERNELS_REQUIRE_EXT=1  # the cpp/cuda tests fail (not skip) without the extension
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  | tee "$OUT/nvidia-smi.txt"
command -v nvcc >/dev/null && nvcc --version | tail -n 2
t0=$SECONDS
python setup.py build_ext --inplace > "$OUT/cuda_build.log" 2>&1
rc=$?
echo "build: exit $rc in $((SECONDS - t0)) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; log: $OUT/cuda_build.log)"
if [ "$rc" -ne 0 ]; then
  tail -n 40 "$OUT/cuda_build.log"
  exit "$rc"
fi
python - <<'EOF' || exit 4
from slim_kernels.ops.dispatch import unavailable_reason
why = unavailable_reason("cuda")
print("cuda backend:", why or "available")
raise SystemExit(1 if why else 0)
EOF
python -c "import pytest" 2>/dev/null || { echo "pytest is not importable here: carry it as wheels"; exit 3; }
select="cuda-cuda or torch-cuda"
[ "${1:-}" = "--with-triton" ] && select="cuda"
t0=$SECONDS
python -m pytest -q -p no:cacheprovider tests/ops -k "$select" -ra \
  --junitxml="$OUT/cuda_conformance.xml" 2>&1 | tee "$OUT/cuda_conformance.log"
rc=${PIPESTATUS[0]}
echo "conformance ($select): exit $rc in $((SECONDS - t0)) s"
exit "$rc"
