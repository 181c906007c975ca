"""What only the cpp backend (csrc/cpu) has: its modes (SLIM_KERNELS_CPP_MODE), its token
block (SLIM_KERNELS_CPP_BLOCK) and its GEMM path without the raw BLAS symbols, each held to
the reference by the conformance harness."""
import os
import subprocess
import sys

import pytest
import torch

from ._harness import CASES, Target, conform, conform_rows, make_inputs, require, run_op

CPP = Target("cpp", "cpu")
MODES = ("sparse", "dense", "sparse-fused", "dense-fused")
# more tokens than one block (64), so gathers, partial sums and block tails all run
MANY = CASES["x_lora"].but(T=150, lam=0.5, reduce="rms", seed=3)
MANY_FP64 = CASES["basic"].but(T=150, top_k=3, seed=4)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _need_cpp():
    require(CPP)


def conforms(case, dtype):
    inp = make_inputs(case, dtype)
    conform(run_op(CPP, case, inp), case, inp, f"cpp {dtype}")


@pytest.mark.parametrize("mode", MODES)
def test_modes_agree_with_the_reference(mode, monkeypatch):
    monkeypatch.setenv("SLIM_KERNELS_CPP_MODE", mode)
    conforms(MANY, torch.float32)
    conforms(MANY_FP64, torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_modes_hold_the_nonfinite_contract(mode, monkeypatch):
    """docs/method.md §1.5 in every mode: bad tokens in two blocks, and a NaN in the last
    expert's B (sparse mode must then run every expert for every token)."""
    monkeypatch.setenv("SLIM_KERNELS_CPP_MODE", mode)
    for arg in ("x", "x_lora", "lora_B"):
        inp = make_inputs(MANY, torch.float32)
        t = inp[arg].clone()
        if arg == "lora_B":
            t[0, -1] = float("nan")
        else:
            t[[3, 140], 5] = float("inf")
        inp[arg] = t
        conform_rows(run_op(CPP, MANY, inp), MANY, inp, f"cpp {mode} {arg}")


@pytest.mark.parametrize("block", ["1", "7", "4096"])
def test_block_env_agrees_with_the_reference(block, monkeypatch):
    monkeypatch.setenv("SLIM_KERNELS_CPP_BLOCK", block)
    conforms(MANY, torch.float32)


def test_bad_env_raises(monkeypatch):
    inp = make_inputs(CASES["T1"], torch.float32)
    monkeypatch.setenv("SLIM_KERNELS_CPP_MODE", "bogus")
    with pytest.raises(ValueError, match="SLIM_KERNELS_CPP_MODE"):
        run_op(CPP, CASES["T1"], inp)
    monkeypatch.setenv("SLIM_KERNELS_CPP_MODE", "sparse")
    for bad in ("-1", "4097", "many"):
        monkeypatch.setenv("SLIM_KERNELS_CPP_BLOCK", bad)
        with pytest.raises(ValueError, match="SLIM_KERNELS_CPP_BLOCK"):
            run_op(CPP, CASES["T1"], inp)


def test_fallback_without_raw_blas():
    """SLIM_KERNELS_CPP_NO_RAW_BLAS=1: the kernels' GEMMs go through at::addmm_ instead of the
    BLAS symbols (the path of a torch without an exported BLAS). Same results."""
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys, torch; sys.path[:0] = [%r, %r]\n"
        "from ops import test_cpp_specific as t\n"
        "assert t.CPP.module().unavailable_reason() is None\n"
        "assert not torch.ops.slim_kernels_C.raw_blas()\n"
        "t.conforms(t.MANY, torch.float32)\n"
        "t.conforms(t.MANY_FP64, torch.float64)\n"
        "print('ok')\n"
    ) % (os.path.dirname(tests), tests)
    env = dict(os.environ, SLIM_KERNELS_CPP_NO_RAW_BLAS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
