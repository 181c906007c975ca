"""Compile check of every csrc/**/*.cu for sm_80 and sm_90 with the flags torch passes to
nvcc. The .cu files include no torch header, so this runs without a CUDA torch or a GPU.
Skipped only where nvcc is absent (and says so)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-D__CUDA_NO_BFLOAT16_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-std=c++17",
]


def _nvcc():
    cand = [shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"]
    if os.environ.get("CUDA_HOME"):
        cand.insert(0, os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    for c in cand:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


NVCC = _nvcc()


def test_there_are_cu_files():
    assert CU_FILES, "no .cu files under csrc/"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): "
                    "the .cu compile check needs the CUDA toolkit")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cu_compiles(cu, arch, tmp_path):
    out = tmp_path / "k.cubin"
    cmd = [NVCC, "-cubin", cu, "-o", str(out), f"-arch=sm_{arch}", "-O3",
           "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-warn-spills", *TORCH_NVCC_FLAGS]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"nvcc failed for sm_{arch}:\n{res.stdout}\n{res.stderr}"
    assert out.stat().st_size > 0
    # no torch header may leak into the CUDA sources (they must build without a CUDA torch)
    with open(cu) as f:
        src = f.read()
    for bad in ("<torch/", "<ATen/", "<c10/"):
        assert bad not in src, f"{cu} includes a torch header ({bad})"


def _cuda_include():
    """The toolkit's include folder (cuda_runtime.h): the nvcc's own, else CUDA_HOME's, else
    /usr/local/cuda's (``/usr/local/bin/nvcc`` may be a wrapper script)."""
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if NVCC:
        roots.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    for root in roots:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


CPP_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
CXX = shutil.which("g++") or shutil.which("c++")


@pytest.mark.skipif(CXX is None or _cuda_include() is None,
                    reason="needs a host C++ compiler and the CUDA toolkit's headers")
@pytest.mark.parametrize("cpp", CPP_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cuda_binding_compiles_on_the_host(cpp, tmp_path):
    """The host binding of the CUDA kernels (csrc/cuda/*.cpp: the op schema, ATen GEMMs, the
    launches declared in slim_cuda.h) builds only into a CUDA extension, which a CPU torch
    cannot build. Type-check it with the host compiler against the installed torch's headers
    (the CPU wheel ships c10/cuda/*.h) and the toolkit's: a call that no longer matches a
    launcher's declaration, or a wrong ATen call, fails here. The one header only torch's own
    CUDA build generates (c10/cuda/impl/cuda_cmake_macros.h) is stubbed."""
    from torch.utils.cpp_extension import include_paths
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    # warnings are errors in our sources; torch's and the toolkit's headers are system ones
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror",
           "-isystem", str(tmp_path / "stub"), *[f"-isystem{p}" for p in include_paths()],
           "-isystem", _cuda_include(), "-I", os.path.join(ROOT, "csrc"),
           "-I", os.path.join(ROOT, "csrc", "cuda"), cpp]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{os.path.basename(cpp)} does not compile:\n{res.stderr[-6000:]}"
