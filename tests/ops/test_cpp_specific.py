"""What only the cpp backend (csrc/cpu) has, each held to the reference by the conformance
harness: its modes (``cpp.MODE``), its token block (``cpp.BLOCK``) and its GEMM path without
the raw BLAS symbols."""
import importlib

import pytest
import torch

from slim_kernels.ops.backends import cpp

from ._harness import CASES, Target, conform, conform_rows, make_inputs, require, run_op

CPP = Target("cpp", "cpu")
MODES = ("sparse", "dense")
# more tokens than one block (128), so gathers, partial sums and block tails all run
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
    monkeypatch.setattr(cpp, "MODE", mode)
    conforms(MANY, torch.float32)
    conforms(MANY_FP64, torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_modes_hold_the_nonfinite_contract(mode, monkeypatch):
    """docs/method.md §1.5 in every mode: bad tokens in two blocks, and a NaN in the last
    expert's B (sparse mode must then run every expert for every token)."""
    monkeypatch.setattr(cpp, "MODE", mode)
    for arg in ("x", "x_lora", "lora_B"):
        inp = make_inputs(MANY, torch.float32)
        t = inp[arg].clone()
        if arg == "lora_B":
            t[0, -1] = float("nan")
        else:
            t[[3, 140], 5] = float("inf")
        inp[arg] = t
        conform_rows(run_op(CPP, MANY, inp), MANY, inp, f"cpp {mode} {arg}")


@pytest.mark.parametrize("block", [1, 7, 4096])
def test_block_agrees_with_the_reference(block, monkeypatch):
    monkeypatch.setattr(cpp, "BLOCK", block)
    conforms(MANY, torch.float32)


def test_bad_mode_or_block_raises(monkeypatch):
    inp = make_inputs(CASES["T1"], torch.float32)
    for bad in ("bogus", "sparse-fused", "dense-fused", None):
        monkeypatch.setattr(cpp, "MODE", bad)
        with pytest.raises(ValueError, match="SLIM_KERNELS_CPP_MODE"):
            run_op(CPP, CASES["T1"], inp)
    monkeypatch.setattr(cpp, "MODE", "sparse")
    for bad in (-1, 4097, "many", 7.0):
        monkeypatch.setattr(cpp, "BLOCK", bad)
        with pytest.raises(ValueError, match="BLOCK"):
            run_op(CPP, CASES["T1"], inp)


def test_mode_env_is_read_once_at_import(monkeypatch):
    """SLIM_KERNELS_CPP_MODE sets cpp.MODE when the module is imported, and is not read
    again per call."""
    case = CASES["T1"]
    inp = make_inputs(case, torch.float32)
    monkeypatch.setenv("SLIM_KERNELS_CPP_MODE", "bogus")
    conform(run_op(CPP, case, inp), case, inp, "cpp, env changed after import")
    monkeypatch.setenv("SLIM_KERNELS_CPP_MODE", " Dense ")
    try:
        importlib.reload(cpp)
        assert cpp.MODE == "dense"
    finally:
        monkeypatch.undo()
        importlib.reload(cpp)


def test_fallback_without_raw_blas():
    """use_raw_blas(False): the kernels' GEMMs go through at::addmm_ instead of the BLAS
    symbols (the path of a torch without an exported BLAS). Same results."""
    ops = torch.ops.slim_kernels_C
    prev = ops.use_raw_blas(False)
    try:
        assert not ops.raw_blas()
        conforms(MANY, torch.float32)
        conforms(MANY_FP64, torch.float64)
    finally:
        ops.use_raw_blas(prev)
    assert ops.raw_blas() == prev
