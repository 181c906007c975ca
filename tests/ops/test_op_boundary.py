"""The op boundary (``slim_kernels/ops/op.py``) on every backend: the fake (meta)
implementations agree with the real ones, ``torch.compile(fullgraph=True)`` traces forward and
backward without a graph break, and bad inputs raise clear errors before any backend runs."""
import pytest
import torch

import slim_kernels
from slim_kernels.ops import dispatch

from ._harness import CASES, INTERPRET, Case, Target, make_inputs, require

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fake_matches_real(target):
    """opcheck compares the fake and the real outputs (shapes, dtypes, strides): the real
    slim_fwd once returned non-contiguous top-k indices (a column slice of an argsort) where
    the fake promises contiguous ones, and inductor's stride check failed under compile."""
    case = Case(T=7, K=6, N=5, E_L=2, r=3, E_I=2, C=3, scaling=1.5, shift=True, keep=True,
                seed=17)
    inp = make_inputs(case, torch.float32, target.device)
    args = (inp["x"], None, inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
            inp["router"], inp["centers"], inp["inv_std"], inp["distance_shift"],
            inp["stats_keep"], case.E_L, case.top_k, case.scaling, case.lam, case.reduce, True,
            target.backend)
    out = torch.ops.slim_kernels.slim_fwd(*args)
    assert len(out) == 7 and all(t.is_contiguous() for t in out)
    torch.library.opcheck(torch.ops.slim_kernels.slim_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    _, gates, _, _, _, h, stats = out
    assert stats.shape == (case.C, 2 * case.K + 3)
    bargs = (inp["dy"], inp["dgates"], inp["x"], None, inp["weight"], inp["lora_A"],
             inp["lora_B"], inp["router"], gates, h, case.E_L, case.scaling, target.backend)
    assert all(t.is_contiguous() for t in torch.ops.slim_kernels.slim_bwd(*bargs))
    torch.library.opcheck(torch.ops.slim_kernels.slim_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(target):
    """torch.compile(fullgraph=True) of forward + backward through the op: no graph break,
    the same gradients as eager."""
    case = CASES["basic"].but(T=9, shift=True, seed=11)
    inp = make_inputs(case, torch.float32, target.device)

    def f(x, A, B, R):
        y, gates, _, _, _ = slim_kernels.slim_linear_op(
            x, inp["weight"], inp["bias"], A, B, R, num_lora_experts=case.E_L,
            top_k=case.top_k, scaling=case.scaling, yield_strength=case.lam,
            centers=inp["centers"], inv_std=inp["inv_std"],
            distance_shift=inp["distance_shift"], backend=target.backend)
        return (y * inp["dy"]).sum() + (gates * inp["dgates"]).sum()

    leaves = [inp[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B", "router")]
    eager = [t.clone().detach().requires_grad_(True) for t in leaves]
    # the backend is NOT loaded beforehand: dispatch must resolve it inside the trace
    dispatch.reset_cache()
    # aot_eager: traces through dynamo + AOTAutograd (fake impls, autograd registration)
    # without inductor codegen, which keeps this test fast on CPU
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    cf(*leaves).backward()
    f(*eager).backward()
    for a, b in zip(leaves, eager):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    case = CASES["basic"].but(T=4)
    c = make_inputs(case, torch.float32)
    x, W, b, A, B, R = (c[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "router"))
    kw = dict(num_lora_experts=3, top_k=2, scaling=1.0, backend="torch")
    op = slim_kernels.slim_linear_op
    with pytest.raises(TypeError, match="floating"):
        op(x.long(), W, b, A, B, R, **kw)
    with pytest.raises(ValueError, match="weight has shape"):
        op(x, W[:, :3], b, A, B, R, **kw)
    with pytest.raises(TypeError, match="lora_B has dtype"):
        op(x, W, b, A, B.double(), R, **kw)
    with pytest.raises(ValueError, match="top_k"):
        op(x, W, b, A, B, R, **{**kw, "top_k": 9})
    with pytest.raises(ValueError, match="backend='nope' is invalid"):
        op(x, W, b, A, B, R, **{**kw, "backend": "nope"})
    with pytest.raises(ValueError, match="frozen"):
        op(x, W.requires_grad_(), b, A, B, R, **kw)
    with pytest.raises(ValueError, match="distance_reduce='foo' is invalid"):
        op(x, W.detach(), b, A, B, R, **{**kw, "distance_reduce": "foo"})


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_bad_arguments_are_named_before_any_backend_runs(backend, monkeypatch):
    """Arguments a kernel could misread are rejected at the op, on every backend, with the
    argument's name: the backend is never called (each is replaced by a trap here)."""
    import numpy as np

    case = CASES["basic"].but(T=4)
    c = make_inputs(case, torch.float32)
    x, W, b, A, B, R = (c[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "router"))
    kw = dict(num_lora_experts=3, top_k=2, scaling=1.0, centers=c["centers"],
              inv_std=c["inv_std"], backend=backend)

    def trap(*a, **k):
        raise AssertionError("the backend ran on invalid arguments")

    monkeypatch.setattr(slim_kernels.ops.op, "resolve_backend", trap)
    op = slim_kernels.slim_linear_op
    bad = [
        (dict(distance_reduce="foo"), ValueError, "distance_reduce='foo' is invalid"),
        (dict(distance_reduce=None), TypeError, "distance_reduce must be a str"),
        (dict(scaling=float("nan")), ValueError, "scaling=nan is invalid"),
        (dict(scaling=float("inf")), ValueError, "scaling=inf is invalid"),
        (dict(scaling="1.0"), TypeError, "scaling must be a float"),
        (dict(scaling=torch.tensor(1.0)), TypeError, "scaling must be a float"),
        (dict(yield_strength=float("-inf")), ValueError, "yield_strength=-inf is invalid"),
        (dict(yield_strength=True), TypeError, "yield_strength must be a float"),
        (dict(top_k=2.0), TypeError, "top_k must be an int"),
        (dict(top_k=True), TypeError, "top_k must be an int"),
        (dict(top_k=0), ValueError, "top_k=0 must be in"),
        (dict(num_lora_experts=3.0), TypeError, "num_lora_experts must be an int"),
        (dict(num_lora_experts=0), ValueError, "num_lora_experts"),
    ]
    for extra, exc, msg in bad:
        with pytest.raises(exc, match=msg.replace("(", r"\(").replace("[", r"\[")):
            op(x, W, b, A, B, R, **{**kw, **extra})
    shift = torch.zeros(case.C)
    bad_shift = [
        (dict(distance_shift=shift[:2]), ValueError, r"distance_shift has shape \(2,\), "
         r"expected \(4,\)"),
        (dict(distance_shift=shift[None]), ValueError, "distance_shift must be 1-D"),
        (dict(distance_shift=shift.double()), TypeError, "distance_shift has dtype "
         "torch.float64, expected torch.float32"),
        (dict(distance_shift=shift.to("meta")), ValueError, "distance_shift is on meta"),
        (dict(distance_shift=[0.0] * case.C), TypeError, "distance_shift must be a "
         "torch.Tensor"),
        (dict(distance_shift=shift, centers=None, inv_std=None), ValueError,
         "distance_shift was given without centers"),
    ]
    for extra, exc, msg in bad_shift:
        with pytest.raises(exc, match=msg):
            op(x, W, b, A, B, R, **{**kw, **extra})
    with pytest.raises(ValueError, match="router must be 2-D"):
        op(x, W, b, A, B, R[0], **kw)
    with pytest.raises(ValueError, match="centers must be 2-D"):
        op(x, W, b, A, B, R, **{**kw, "centers": c["centers"][0]})
    with pytest.raises(ValueError, match="rank >= 1"):
        op(x, W, b, A[:0], B[:, :0], R, **kw)
    with pytest.raises(ValueError, match="0 features"):
        op(x[:, :0], W[:, :0], b, A[:, :0], B, R[:, :0], **kw)
    # numpy scalars are numbers like Python's: they reach the backend
    monkeypatch.undo()
    if backend == "triton" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    if backend == "cpp":
        require(Target("cpp", "cpu"))
    y = op(x, W, b, A, B, R, **{**kw, "top_k": np.int64(2), "num_lora_experts": np.int32(3),
                                "scaling": np.float32(1.0), "yield_strength": np.float64(0.5)})[0]
    assert torch.isfinite(y).all()
