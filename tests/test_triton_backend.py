"""The triton backend against the fp64 reference (spec section 1-2, 6).

On a machine without CUDA these run the kernels under TRITON_INTERPRET=1 (set by conftest.py)
on CPU tensors; with CUDA the same cases run on the GPU (``dev`` parameter). Shapes are small
and odd on purpose (K, N not multiples of 16, rank 5, E not a power of two).

Accuracy rules: fp32 (and fp64) — relative error (Frobenius) < 1e-5 against fp64 truth.
bf16/fp16 — flash-attention's 2x rule: the kernel's error against the fp64 truth (on the
same low-precision inputs) is at most twice the error of the torch backend run in that
low precision, plus a tiny absolute floor.
"""
import os

import pytest
import torch

import slim_kernels
from slim_kernels.reference import slim_reference

tb = pytest.importorskip("slim_kernels.ops.backends.triton.launch")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET,
                                                  reason="CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
EPS = 1e-5


def make_case(T=37, K=45, N=29, E_L=3, r=5, E_I=2, C=4, seed=0, bias=True, x_lora=False,
              router_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    c = dict(
        x=f(T, K), W=f(N, K) / K ** 0.5, b=f(N) if bias else None,
        A=f(E_L * r, K) / K ** 0.5, B=f(N, E_L * r) / r ** 0.5,
        R=f(E_L + E_I, K) * router_scale / K ** 0.5,
        centers=(f(C, K) * 0.5).float() if C else None,
        vars=(torch.rand(C, K, generator=g, dtype=torch.float64) + 0.5).float() if C else None,
        x_lora=f(T, K) if x_lora else None,
        dy=f(T, N), dg=f(T, E_L + E_I),
        E_L=E_L,
    )
    return c


def cast(c, dtype, dev):
    out = {}
    for k, v in c.items():
        if isinstance(v, torch.Tensor) and k not in ("centers", "vars", "dg"):
            out[k] = v.to(dtype).to(dev)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(dev)
        else:
            out[k] = v
    return out


def run_op(c, backend, top_k, scaling=0.7, lam=0.0, reduce="rms", use_gates=True):
    """Forward + backward through slim_linear_op; returns outputs and grads (fp64 copies)."""
    x = c["x"].clone().requires_grad_(True)
    A = c["A"].clone().requires_grad_(True)
    B = c["B"].clone().requires_grad_(True)
    R = c["R"].clone().requires_grad_(True)
    xl = None if c["x_lora"] is None else c["x_lora"].clone().requires_grad_(True)
    inv_std = None if c["vars"] is None else (c["vars"].float() + EPS).rsqrt()
    y, gates, idx, d, assign = slim_kernels.slim_linear_op(
        x, c["W"], c["b"], A, B, R, num_lora_experts=c["E_L"], top_k=top_k, scaling=scaling,
        yield_strength=lam, distance_reduce=reduce, centers=c["centers"], inv_std=inv_std,
        x_lora=xl, backend=backend)
    loss = (y.double() * c["dy"].double()).sum()
    if use_gates:  # else the gates get no upstream gradient (dgates is None in backward)
        loss = loss + (gates.double() * c["dg"].double()).sum()
    loss.backward()
    res = dict(y=y, gates=gates, idx=idx, d=d, assign=assign, dx=x.grad, dA=A.grad, dB=B.grad,
               dR=R.grad)
    if xl is not None:
        res["dxl"] = xl.grad
    return {k: v.detach().cpu() for k, v in res.items()}


def run_truth(c, top_k, scaling=0.7, lam=0.0, reduce="rms", use_gates=True):
    """The per-expert fp64 reference, differentiated by autograd, on c's values."""
    d64 = {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor)
               and k not in ("centers", "vars") else v) for k, v in c.items()}
    E_L = c["E_L"]
    x = d64["x"].clone().requires_grad_(True)
    A = d64["A"].clone().requires_grad_(True)
    B = d64["B"].clone().requires_grad_(True)
    R = d64["R"].clone().requires_grad_(True)
    xl = None if d64["x_lora"] is None else d64["x_lora"].clone().requires_grad_(True)
    K = x.shape[1]
    N = B.shape[0]
    r = A.shape[0] // E_L
    y, gates, d, assign = slim_reference(
        x, d64["W"], d64["b"], A.view(E_L, r, K), B.view(N, E_L, r).permute(1, 0, 2), R,
        top_k=top_k, scaling=scaling, yield_strength=lam, distance_reduce=reduce,
        centers=None if c["centers"] is None else c["centers"].cpu(),
        cluster_vars=None if c["vars"] is None else c["vars"].cpu(), cluster_eps=EPS, x_lora=xl)
    loss = (y * d64["dy"]).sum() + ((gates * d64["dg"]).sum() if use_gates else 0.0)
    if x.shape[0]:
        loss.backward()
    z = x.detach() @ R.detach().t()
    if c["centers"] is not None and lam != 0.0 and R.shape[0] > E_L:
        z[:, E_L:] += lam * d[:, None]
    _, idx = slim_kernels.reference.topk_softmax(z, top_k)
    zero = lambda t: torch.zeros_like(t)
    res = dict(y=y, gates=gates, idx=idx, d=d, assign=assign,
               dx=x.grad if x.grad is not None else zero(x),
               dA=A.grad if A.grad is not None else zero(A),
               dB=B.grad if B.grad is not None else zero(B),
               dR=R.grad if R.grad is not None else zero(R))
    if xl is not None:
        res["dxl"] = xl.grad if xl.grad is not None else zero(xl)
    return {k: v.detach() for k, v in res.items()}


FLOAT_KEYS = ("y", "gates", "d", "dx", "dA", "dB", "dR", "dxl")


def err(a, b):
    return (a.double() - b.double()).norm().item()


def check_fp32(got, truth, tol=1e-5):
    for k in FLOAT_KEYS:
        if k not in truth:
            continue
        scale = truth[k].double().norm().item()
        e = err(got[k], truth[k])
        assert e <= tol * scale, f"{k}: rel err {e / max(scale, 1e-300):.3g}"
        assert got[k].shape == truth[k].shape
    assert torch.equal(got["idx"], truth["idx"]), "topk_idx differs"
    assert torch.equal(got["assign"], truth["assign"]), "assign differs"


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("T", [0, 1, 37])
def test_fp32_basic_yield(dev, T):
    c = make_case(T=T)
    got = run_op(cast(c, torch.float32, dev), "triton", top_k=2, lam=1.0, reduce="rms")
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=2, lam=1.0, reduce="rms")
    check_fp32(got, truth)
    assert got["y"].dtype == torch.float32 and got["gates"].dtype == torch.float32
    assert got["idx"].dtype == torch.int64 and got["assign"].dtype == torch.int64


@pytest.mark.parametrize("dev", DEVICES)
def test_fp32_no_identity_no_clusters_no_bias(dev):
    c = make_case(E_I=0, C=0, bias=False, E_L=2, r=12, seed=1)
    got = run_op(cast(c, torch.float32, dev), "triton", top_k=1)
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=1)
    check_fp32(got, truth)
    assert (got["assign"] == -1).all() and (got["d"] == 0).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_fp32_x_lora(dev):
    c = make_case(x_lora=True, seed=2)
    got = run_op(cast(c, torch.float32, dev), "triton", top_k=2, lam=0.5, reduce="mean")
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=2, lam=0.5, reduce="mean")
    check_fp32(got, truth)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("reduce", ["max", "mean", "rms"])
def test_yielding_reduces(dev, reduce):
    c = make_case(seed=3, T=21, C=3)
    # strong yielding so the distance decides between LoRA and identity experts
    got = run_op(cast(c, torch.float32, dev), "triton", top_k=2, lam=2.0, reduce=reduce)
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=2, lam=2.0, reduce=reduce)
    check_fp32(got, truth)


@pytest.mark.parametrize("dev", DEVICES)
def test_all_identity_equals_base(dev):
    """Identity experts win every token: LoRA gates are 0 and y is the base GEMM exactly."""
    c = make_case(seed=4, C=0)
    c["x"][:, 0] = 1.0
    c["R"][:, 0] = 0.0
    c["R"][c["E_L"]:, 0] = 100.0  # identity logits ~ +100 for every token
    cc = cast(c, torch.float32, dev)
    got = run_op(cc, "triton", top_k=2)
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=2)
    check_fp32(got, truth)
    assert (got["gates"][:, :c["E_L"]] == 0).all()
    base = torch.empty_like(cc["x"][:, :1].expand(-1, cc["W"].shape[0])).contiguous()
    tb.fused_linear([(cc["x"], cc["W"].t())], base, cc["b"])
    assert torch.equal(got["y"], base.cpu()), "all-identity output differs from the base path"
    assert torch.allclose(got["y"].double(), torch.nn.functional.linear(
        c["x"], c["W"], c["b"]), rtol=1e-5, atol=1e-5)
    assert (got["dA"] == 0).all() and (got["dB"] == 0).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_one_hot_top1(dev):
    c = make_case(seed=5, router_scale=3.0)
    got = run_op(cast(c, torch.float32, dev), "triton", top_k=1)
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=1)
    check_fp32(got, truth)
    assert ((got["gates"] > 0).sum(1) == 1).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_uniform_router_ties_lower_index(dev):
    c = make_case(seed=6, C=0)
    c["R"].zero_()
    got = run_op(cast(c, torch.float32, dev), "triton", top_k=3)
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=3)
    check_fp32(got, truth)
    T = c["x"].shape[0]
    assert torch.equal(got["idx"], torch.arange(3).expand(T, 3))
    assert torch.allclose(got["gates"][:, :3], torch.full((T, 3), 1 / 3))
    assert (got["gates"][:, 3:] == 0).all()


@pytest.mark.parametrize("dev", DEVICES)
def test_dense_topk_all(dev):
    c = make_case(seed=7)
    # no upstream gradient on the gates here: backward gets dgates=None
    got = run_op(cast(c, torch.float32, dev), "triton", top_k=5, lam=1.0, reduce="max",
                 use_gates=False)
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=5, lam=1.0, reduce="max",
                      use_gates=False)
    check_fp32(got, truth)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_2x_rule(dev, dtype):
    c = make_case(seed=8)
    cl = cast(c, dtype, dev)
    got = run_op(cl, "triton", top_k=2, lam=1.0)
    ref = run_op(cl, "torch", top_k=2, lam=1.0)
    truth = run_truth(cast(c, dtype, "cpu"), top_k=2, lam=1.0)  # fp64 on the rounded inputs
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    for k in FLOAT_KEYS:
        if k not in truth:
            continue
        e_k, e_t = err(got[k], truth[k]), err(ref[k], truth[k])
        floor = 1e-5 * truth[k].double().norm().item() + 1e-6
        assert e_k <= 2 * e_t + floor, f"{k}: triton err {e_k:.3g} > 2 x torch err {e_t:.3g}"
    assert torch.equal(got["idx"], truth["idx"])


@pytest.mark.parametrize("dev", DEVICES)
def test_fp64_interpreter(dev):
    if dev == "cuda":
        pytest.skip("fp64 runs only under the interpreter")
    c = make_case(seed=9, T=13)
    got = run_op(cast(c, torch.float64, dev), "triton", top_k=2, lam=1.0)
    truth = run_truth(cast(c, torch.float64, "cpu"), top_k=2, lam=1.0)
    check_fp32(got, truth, tol=1e-12)


def test_unsupported_inputs_raise_clearly():
    x = torch.zeros(2, 4)
    if INTERPRET:
        assert tb.unsupported_reason(x) is None
        assert "dtype" in tb.unsupported_reason(x.to(torch.int32))
    else:
        assert "TRITON_INTERPRET" in tb.unsupported_reason(x)
    assert tb.unavailable_reason() is None
    assert "limit of 1024" in tb.unsupported_reason(x, lora_cols=1025, num_experts=10)
    assert "limit of 256" in tb.unsupported_reason(x, lora_cols=64, num_experts=257)
    from slim_kernels.ops.dispatch import resolve_backend
    with pytest.raises(RuntimeError, match="limit of 1024"):  # explicit: a clear error
        resolve_backend("triton", x, 1025, 10)
    ER = 1025
    with pytest.raises(ValueError, match="exceeds 1024"):
        tb.forward(x, None, torch.zeros(3, 4), None, torch.zeros(ER, 4), torch.zeros(3, ER),
                   torch.zeros(2, 4), None, None, 1, 1, 1.0, 0.0, "rms")


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("E_L,r", [(8, 128), (14, 5)])
def test_wide_lora(dev, E_L, r):
    """E_L·r = 1024 (the upper limit) and 70 (an expert straddles the h column blocks the
    forward route kernel splits wide h into) on a tiny token count."""
    c = make_case(T=5, K=20, N=17, E_L=E_L, r=r, E_I=2, C=2, seed=10)
    got = run_op(cast(c, torch.float32, dev), "triton", top_k=2, lam=1.0)
    truth = run_truth(cast(c, torch.float32, "cpu"), top_k=2, lam=1.0)
    check_fp32(got, truth)


@pytest.mark.parametrize("dev", DEVICES)
def test_torch_compile_fullgraph(dev):
    """torch.compile(fullgraph=True) of forward + backward through the op: no graph break."""
    c = cast(make_case(seed=11, T=9), torch.float32, dev)
    inv_std = (c["vars"] + EPS).rsqrt()

    def f(x, A, B, R):
        y, gates, _, _, _ = slim_kernels.slim_linear_op(
            x, c["W"], c["b"], A, B, R, num_lora_experts=c["E_L"], top_k=2, scaling=0.7,
            yield_strength=1.0, centers=c["centers"], inv_std=inv_std, backend="triton")
        return (y * c["dy"]).sum() + (gates * c["dg"].to(gates.dtype)).sum()

    leaves = [c[k].clone().requires_grad_(True) for k in ("x", "A", "B", "R")]
    eager = [t.clone().detach().requires_grad_(True) for t in leaves]
    # the backend is NOT loaded beforehand: dispatch must resolve it inside the trace
    from slim_kernels.ops import dispatch
    dispatch.reset_cache()
    # aot_eager: traces through dynamo + AOTAutograd (fake impls, autograd registration)
    # without inductor codegen, which keeps this test fast on CPU
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    cf(*leaves).backward()
    f(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-6)
