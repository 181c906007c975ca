"""The cpp backend (csrc/cpu, extension slim_kernels._C) against the fp64 reference.

The extension must be built first (`pip install --no-build-isolation -e .` or
`python setup.py build_ext --inplace`). Without it these tests skip, saying so; with
SLIM_KERNELS_REQUIRE_EXT=1 (CI) they fail instead.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from slim_kernels.ops import slim_linear_op
from slim_kernels.ops.backends import cpp as cpp_backend
from slim_kernels.ops.dispatch import resolve_backend
from slim_kernels.reference import slim_reference

EPS = 1e-5  # cluster variance epsilon, as the layer uses
MODES = ("sparse", "dense", "sparse-fused", "dense-fused")


@pytest.fixture(autouse=True)
def _need_ext():
    why = cpp_backend.unavailable_reason()
    if why is not None:
        msg = f"cpp backend unavailable: {why}"
        if os.environ.get("SLIM_KERNELS_REQUIRE_EXT", "") == "1":
            pytest.fail(msg + " (SLIM_KERNELS_REQUIRE_EXT=1)")
        pytest.skip(msg)


def make(T, K=45, N=29, EL=3, r=5, EI=2, C=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    E = EL + EI
    p = dict(
        x=torch.randn(T, K, generator=g),
        x_lora=torch.randn(T, K, generator=g),
        weight=torch.randn(N, K, generator=g) / K ** 0.5,
        bias=torch.randn(N, generator=g) * 0.1,
        lora_A=torch.randn(EL, r, K, generator=g) / K ** 0.5,
        lora_B=torch.randn(EL, N, r, generator=g) * 0.3,
        router=torch.randn(E, K, generator=g) * 0.3,
        dy=torch.randn(T, N, generator=g),
        dg=torch.randn(T, E, generator=g),
    )
    p = {k: v.to(dtype) for k, v in p.items()}
    p["centers"] = torch.randn(C, K, generator=g) if C else None
    p["vars"] = (torch.rand(C, K, generator=g) + 0.5) if C else None
    p["EL"], p["r"] = EL, r
    return p


def stacked(p):
    EL, r = p["EL"], p["r"]
    A = p["lora_A"].reshape(EL * r, -1)
    B = p["lora_B"].permute(1, 0, 2).reshape(p["lora_B"].shape[1], EL * r)
    return A, B


def run_op(p, backend, *, top_k, scaling=0.7, yield_strength=0.0, reduce="rms",
           use_clusters=True, use_x_lora=False, dtype=None, grad=True):
    """The op's (y, gates, idx, d, assign) and grads of x, x_lora, A_all, B_all, router."""
    dtype = dtype or p["x"].dtype
    A, B = stacked(p)
    leaves = dict(x=p["x"], x_lora=p["x_lora"], A=A, B=B, R=p["router"])
    leaves = {k: v.detach().to(dtype).requires_grad_(grad) for k, v in leaves.items()}
    centers = inv_std = None
    if use_clusters and p["centers"] is not None:
        centers = p["centers"].float()
        inv_std = (p["vars"].float() + EPS).rsqrt()
    with torch.set_grad_enabled(grad):
        y, gates, idx, d, assign = slim_linear_op(
            leaves["x"], p["weight"].to(dtype), p["bias"].to(dtype), leaves["A"], leaves["B"],
            leaves["R"], num_lora_experts=p["EL"], top_k=top_k, scaling=scaling,
            yield_strength=yield_strength, distance_reduce=reduce, centers=centers,
            inv_std=inv_std, x_lora=leaves["x_lora"] if use_x_lora else None, backend=backend,
        )
        grads = None
        if grad:
            loss = (y.double() * p["dy"].double()).sum() + (gates.double() * p["dg"].double()).sum()
            names = ["x", "A", "B", "R"] + (["x_lora"] if use_x_lora else [])
            gs = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
            grads = dict(zip(names, gs))
    return (y.detach(), gates.detach(), idx, d, assign), grads


def run_ref(p, *, top_k, scaling=0.7, yield_strength=0.0, reduce="rms", use_clusters=True,
            use_x_lora=False, from_dtype=None):
    """fp64 truth (on the inputs rounded to from_dtype, when given) with autograd grads in
    the stacked layout."""
    def cast(t):
        return t if from_dtype is None else t.to(from_dtype)
    x = cast(p["x"]).double().requires_grad_(True)
    xl = cast(p["x_lora"]).double().requires_grad_(True)
    A = cast(p["lora_A"]).double().requires_grad_(True)
    B = cast(p["lora_B"]).double().requires_grad_(True)
    R = cast(p["router"]).double().requires_grad_(True)
    y, gates, d, assign = slim_reference(
        x, cast(p["weight"]).double(), cast(p["bias"]).double(), A, B, R, top_k=top_k,
        scaling=scaling, yield_strength=yield_strength, distance_reduce=reduce,
        centers=p["centers"] if use_clusters else None,
        cluster_vars=p["vars"] if use_clusters else None, cluster_eps=EPS,
        x_lora=xl if use_x_lora else None,
    )
    loss = (y * p["dy"].double()).sum() + (gates * p["dg"].double()).sum()
    names = ["x", "A", "B", "R"] + (["x_lora"] if use_x_lora else [])
    leaves = dict(x=x, A=A, B=B, R=R, x_lora=xl)
    gs = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    grads = dict(zip(names, gs))
    EL, r = p["EL"], p["r"]
    grads["A"] = grads["A"].reshape(EL * r, -1)
    grads["B"] = grads["B"].permute(1, 0, 2).reshape(B.shape[1], EL * r)
    return (y.detach(), gates.detach(), d, assign), grads


def rel(a, b):
    if b is None:  # autograd's "no path" (e.g. T = 0): a zero gradient
        b = torch.zeros_like(a)
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(p, tol, *, top_k, **kw):
    (y, g, idx, d, assign), grads = run_op(p, "cpp", top_k=top_k, **kw)
    (yr, gr, dr, ar), gref = run_ref(p, top_k=top_k, **kw)
    assert y.dtype == p["x"].dtype and y.shape == yr.shape
    acc = torch.float64 if p["x"].dtype == torch.float64 else torch.float32
    assert g.dtype == acc and d.dtype == acc and idx.dtype == torch.long
    assert rel(y, yr) < tol, rel(y, yr)
    assert rel(g, gr) < tol
    assert torch.equal(assign, ar)
    if kw.get("use_clusters", True) and p["centers"] is not None:
        assert rel(d, dr) < tol
    # selected indices in decreasing-gate order, ties lower index
    if y.shape[0]:
        assert torch.equal(g.gather(1, idx), gr.gather(1, idx).to(g.dtype)) or \
            rel(g.gather(1, idx), gr.gather(1, idx)) < tol
        gi = g.gather(1, idx)
        assert (gi[:, :-1] >= gi[:, 1:]).all()
    for n, gv in grads.items():
        assert gv is not None, n
        assert gv.dtype == p["x"].dtype
        assert rel(gv, gref[n]) < tol, (n, rel(gv, gref[n]))


@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("EI", [2, 0])
@pytest.mark.parametrize("x_lora", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_forward_backward_vs_reference(T, EI, x_lora, dtype, tol):
    p = make(T, EI=EI, dtype=dtype)
    check(p, tol, top_k=2, yield_strength=0.8 if EI else 0.0, use_x_lora=x_lora)


@pytest.mark.parametrize("mode", MODES)
def test_modes_agree(mode, monkeypatch):
    monkeypatch.setenv("SLIM_KERNELS_CPP_MODE", mode)
    # more tokens than one block (64), so gathers, partial sums and block tails all run
    p = make(150, dtype=torch.float32, seed=3)
    check(p, 1e-5, top_k=2, yield_strength=0.5, use_x_lora=True)
    check(make(150, dtype=torch.float64, seed=4), 1e-10, top_k=3)


@pytest.mark.parametrize("reduce", ["max", "mean", "rms"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_yielding_all_reduces(reduce, dtype, tol):
    p = make(37, dtype=dtype, seed=1)
    # centres near the data for some tokens, far for others: d of both signs
    p["centers"] = p["x"][:4].float() + 0.1 * torch.randn(4, p["x"].shape[1])
    check(p, tol, top_k=2, yield_strength=1.5, reduce=reduce)
    (_, _, _, d, _), _ = run_op(p, "cpp", top_k=2, yield_strength=1.5, reduce=reduce, grad=False)
    assert d.shape == (37,)


def test_no_clusters_gives_zero_distance():
    p = make(37, dtype=torch.float32)
    (_, _, _, d, assign), _ = run_op(p, "cpp", top_k=2, use_clusters=False, grad=False)
    assert torch.equal(d, torch.zeros(37)) and torch.equal(assign, torch.full((37,), -1))


def test_all_to_identity_is_exactly_the_base():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        p = make(37, dtype=dtype, seed=5)
        p["x"][:, 0] = 1.0  # a constant feature the router can key on
        EL = p["EL"]
        R = torch.zeros_like(p["router"])
        R[EL:, 0] = 50.0  # identity experts win every token
        p["router"] = R
        (y, g, idx, _, _), grads = run_op(p, "cpp", top_k=2, use_clusters=False)
        base = F.linear(p["x"], p["weight"], p["bias"])
        assert torch.equal(y, base), dtype
        assert (idx >= EL).all() and (g[:, :EL] == 0).all()
        assert (grads["A"] == 0).all() and (grads["B"] == 0).all()
        if dtype != torch.bfloat16:
            check(p, 1e-10 if dtype == torch.float64 else 1e-5, top_k=2, use_clusters=False)


def test_one_hot_top1():
    p = make(37, dtype=torch.float64, seed=6)
    (_, g, idx, _, _), grads = run_op(p, "cpp", top_k=1)
    assert ((g > 0).sum(1) == 1).all() and torch.allclose(g.sum(1), torch.ones(37, dtype=g.dtype))
    assert (grads["R"] == 0).all()  # a single kept logit: softmax is constant 1
    check(p, 1e-10, top_k=1)


def test_uniform_router_ties_lower_index_wins():
    p = make(37, dtype=torch.float64, seed=7)
    p["router"] = torch.zeros_like(p["router"])
    (_, g, idx, _, _), _ = run_op(p, "cpp", top_k=2, use_clusters=False, grad=False)
    assert torch.equal(idx, torch.tensor([[0, 1]]).expand(37, 2))
    assert torch.equal(g[:, :2], torch.full((37, 2), 0.5, dtype=g.dtype))
    assert (g[:, 2:] == 0).all()
    check(p, 1e-10, top_k=2, use_clusters=False)


def test_dense_topk_equals_E():
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        p = make(37, dtype=dtype, seed=8)
        E = p["router"].shape[0]
        check(p, tol, top_k=E, yield_strength=0.7)


@pytest.mark.parametrize("x_lora", [False, True])
def test_bf16_within_twice_the_torch_backend_error(x_lora):
    """flash-attention's rule: error vs the fp64 truth <= 2x the torch backend's error in
    the same low precision (+ a tiny floor)."""
    p = make(37, dtype=torch.float32, seed=9)
    kw = dict(top_k=2, yield_strength=0.8, use_x_lora=x_lora)
    (yt, gt, _, _), grt = run_ref(p, from_dtype=torch.bfloat16, **kw)
    (yc, gc, _, _, _), grc = run_op(p, "cpp", dtype=torch.bfloat16, **kw)
    (yo, go, _, _, _), gro = run_op(p, "torch", dtype=torch.bfloat16, **kw)
    assert yc.dtype == torch.bfloat16 and gc.dtype == torch.float32
    floor = 1e-3
    assert rel(yc, yt) <= 2 * rel(yo, yt) + floor, (rel(yc, yt), rel(yo, yt))
    assert rel(gc, gt) <= 2 * rel(go, gt) + floor
    for n in grt:
        assert grc[n].dtype == torch.bfloat16
        assert rel(grc[n], grt[n]) <= 2 * rel(gro[n], grt[n]) + floor, (n, rel(grc[n], grt[n]), rel(gro[n], grt[n]))


def test_fp16_runs_and_is_close():
    p = make(37, dtype=torch.float32, seed=10)
    (yc, _, _, _, _), grc = run_op(p, "cpp", dtype=torch.float16, top_k=2)
    (yt, _, _, _), grt = run_ref(p, from_dtype=torch.float16, top_k=2)
    assert yc.dtype == torch.float16
    assert rel(yc, yt) < 5e-3
    for n in grt:
        assert rel(grc[n], grt[n]) < 5e-3, n


@pytest.mark.parametrize("x_lora", [False, True])
def test_gradcheck_fp64(x_lora):
    """d is a constant in backward (spec), so gradcheck runs with yielding off."""
    p = make(6, K=7, N=5, EL=3, r=2, EI=2, dtype=torch.float64, seed=11)
    A, B = stacked(p)
    centers = p["centers"][:, :7].float().contiguous()
    inv_std = (p["vars"][:, :7].float() + EPS).rsqrt()

    def f(x, xl, A, B, R):
        y, gates, _, _, _ = slim_linear_op(
            x, p["weight"], p["bias"], A, B, R, num_lora_experts=3, top_k=2, scaling=0.7,
            yield_strength=0.0, centers=centers, inv_std=inv_std,
            x_lora=xl if x_lora else None, backend="cpp",
        )
        return y, gates

    ins = [t.detach().clone().requires_grad_(True) for t in (p["x"], p["x_lora"], A, B, p["router"])]
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7)


def test_dispatch_picks_cpp_for_cpu():
    x = torch.randn(3, 4)
    assert resolve_backend("auto", x) == "cpp"
    assert resolve_backend("cpp", x) == "cpp"
    assert cpp_backend.unsupported_reason(torch.empty(2, 2, device="meta")) is not None
    assert cpp_backend.unsupported_reason(torch.empty(2, 2, dtype=torch.int32)) is not None


def test_bad_mode_env_raises(monkeypatch):
    monkeypatch.setenv("SLIM_KERNELS_CPP_MODE", "bogus")
    p = make(3, dtype=torch.float32)
    with pytest.raises(ValueError, match="SLIM_KERNELS_CPP_MODE"):
        run_op(p, "cpp", top_k=2, grad=False)


def test_fallback_without_raw_blas():
    """SLIM_KERNELS_CPP_NO_RAW_BLAS=1: the kernels' GEMMs go through at::addmm_ instead of the
    BLAS symbols (the path of a torch without an exported BLAS). Same results."""
    import subprocess
    import sys
    code = (
        "import sys, torch; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "import test_cpp_backend as t\n"
        "assert t.cpp_backend.unavailable_reason() is None\n"
        "assert not torch.ops.slim_kernels_C.raw_blas()\n"
        "t.check(t.make(150, dtype=torch.float32, seed=3), 1e-5, top_k=2, yield_strength=0.5, use_x_lora=True)\n"
        "t.check(t.make(37, dtype=torch.float64, seed=4), 1e-10, top_k=3)\n"
        "print('ok')\n"
    ) % (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, SLIM_KERNELS_CPP_NO_RAW_BLAS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
