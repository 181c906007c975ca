"""Ahead-of-time compilation of every SLIM Triton kernel for sm_80 and sm_90, without a GPU.

The interpreter (TRITON_INTERPRET=1, set by conftest.py) turns @triton.jit functions into
interpreted ones that cannot be compiled, so the compile runs in a subprocess without it:
``python benchmarks/triton_aot.py`` compiles the route kernels and the first two
fused-linear autotune configs at the benchmark shape (bf16, T=8192, K=N=4096, E_L·r=128) for
both targets (8 compiles). The full table (every config and variant, E_L·r = 1024, fp32) is
written by ``benchmarks/triton_resources.py`` to ``benchmarks/triton_resources.csv``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _ptxas_available():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is not available")
def test_aot_compile_sm80_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_aot.py")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    kernels = {(row["kernel"], row["arch"]) for row in rows}
    for name in ("route_fwd_kernel", "route_bwd_kernel", "fused_linear_kernel"):
        for arch in ("sm_80", "sm_90"):
            assert (name, arch) in kernels, f"{name} not compiled for {arch}"
    for row in rows:
        assert row["n_regs"] > 0, row
        assert row["shared"] <= row["smem_limit"], f"shared memory over the limit: {row}"
        if row["kernel"] == "fused_linear_kernel":
            # bf16 tl.dot on Hopper must lower to warpgroup MMA; Ampere has none
            assert row["wgmma"] == (1 if row["arch"] == "sm_90" else 0), row
    # the benchmark-shape route kernels fit in registers (this once spilled; see route_config)
    for row in rows:
        if row["kernel"].startswith("route") and row["arch"] == "sm_90":
            assert row["n_spills"] == 0, row
