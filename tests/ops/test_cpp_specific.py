"""What only the cpp backend (csrc/cpu) has, each held to the reference by the conformance
harness: its modes (``cpp.MODE``), its token block (``cpp.BLOCK``), its GEMM path without the
raw BLAS symbols, and the cluster statistics summed in per-chunk partials (the same bits at
any thread count)."""
import importlib

import pytest
import torch

from slim_kernels.ops.backends import cpp

from ._harness import (CASES, EPS, Target, bad_rows, conform, conform_rows, make_inputs, require,
                       run_backend, run_op)

CPP = Target("cpp", "cpu")
MODES = ("sparse", "dense")
# more tokens than one block (128), so gathers, partial sums and block tails all run
MANY = CASES["x_lora"].but(T=150, lam=0.5, reduce="rms", seed=3)
MANY_FP64 = CASES["basic"].but(T=150, top_k=3, seed=4)
# the cluster statistics over three blocks (ten chunks of two blocks at BLOCK = 16), a third
# of the tokens left out by stats_keep, centres near tokens so that every cluster has some
STATS = CASES["stats_keep"].but(T=300, seed=31)

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


@pytest.mark.parametrize("block", [0, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_stats_have_the_same_bits_at_any_thread_count(block, dtype, monkeypatch):
    """The statistics are summed per chunk of blocks, chunked by T alone, and the partials
    added in chunk order: at 1 and 2 threads, run after run, every output has the same bits
    (and conforms to the reference)."""
    monkeypatch.setattr(cpp, "BLOCK", block)
    inp = make_inputs(STATS, dtype)
    n = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2, 1, 2):
            torch.set_num_threads(threads)
            runs.append(run_backend(CPP, STATS, inp))
    finally:
        torch.set_num_threads(n)
    conform(runs[0], STATS, inp, f"cpp {dtype} block {block}")
    for i, run in enumerate(runs[1:], 1):
        for k, v in runs[0].items():
            assert torch.equal(run[k], v), f"run {i}: {k} differs from run 0's"


def test_asking_for_stats_changes_no_other_output(monkeypatch):
    """The statistics come out of the distance pass: with and without them, the other
    outputs have the same bits."""
    monkeypatch.setattr(cpp, "BLOCK", 16)
    inp = make_inputs(STATS, torch.float32)
    args = (inp["x"], None, inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
            inp["router"], inp["centers"], inp["inv_std"], STATS.E_L, STATS.top_k,
            STATS.scaling, STATS.lam, STATS.reduce, inp["distance_shift"])
    with_stats = cpp.forward(*args, True, inp["stats_keep"])
    without = cpp.forward(*args)
    assert with_stats[6].shape == (STATS.C, 2 * STATS.K + 3)
    assert without[6].shape == (0, 2 * STATS.K + 3)
    for i, (a, b) in enumerate(zip(with_stats[:6], without[:6])):
        assert torch.equal(a, b), f"output {i} moved when the statistics were asked for"


@pytest.mark.parametrize("block", [0, 16])
@pytest.mark.parametrize("arg", ["centers", "vars"])
def test_a_nan_cluster_poisons_only_its_own_stats_row(arg, block, monkeypatch):
    """A NaN in one cluster's centre (it takes every token) or variance (so its inv_std,
    hence its tokens' r): that cluster's statistics row is non-finite, every other row is
    finite and conforms, through the per-chunk partials too."""
    monkeypatch.setattr(cpp, "BLOCK", block)
    j = 1
    inp = make_inputs(STATS, torch.float32)
    t = inp[arg].clone()
    t[j, 5] = float("nan")
    inp[arg] = t
    inp["inv_std"] = (inp["vars"] + EPS).rsqrt()  # as the reference forms it
    got = run_op(CPP, STATS, inp)
    assert (got["assign"][inp["stats_keep"]] == j).any(), "no kept token in the bad cluster"
    bad = bad_rows(got["stats"])
    assert bad.tolist() == [c == j for c in range(STATS.C)], bad.tolist()
    conform_rows(got, STATS, inp, f"cpp NaN {arg}[{j}] block {block}")
