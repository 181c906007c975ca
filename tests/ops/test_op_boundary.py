"""The op boundary (``slim_kernels/ops/op.py``) on every backend: the fake (meta)
implementations agree with the real ones, ``torch.compile(fullgraph=True)`` traces forward and
backward without a graph break, and bad inputs raise clear errors before any backend runs."""
import pytest
import torch

import slim_kernels
from slim_kernels.ops import dispatch

from ._harness import CASES, Case, make_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fake_matches_real(target):
    """opcheck compares the fake and the real outputs (shapes, dtypes, strides): the real
    slim_fwd once returned non-contiguous top-k indices (a column slice of an argsort) where
    the fake promises contiguous ones, and inductor's stride check failed under compile."""
    case = Case(T=7, K=6, N=5, E_L=2, r=3, E_I=2, C=3, scaling=1.5, seed=17)
    inp = make_inputs(case, torch.float32, target.device)
    args = (inp["x"], None, inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
            inp["router"], inp["centers"], inp["inv_std"], case.E_L, case.top_k, case.scaling,
            case.lam, case.reduce, target.backend)
    out = torch.ops.slim_kernels.slim_fwd(*args)
    assert all(t.is_contiguous() for t in out)
    torch.library.opcheck(torch.ops.slim_kernels.slim_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    _, gates, _, _, _, h = out
    bargs = (inp["dy"], inp["dgates"], inp["x"], None, inp["weight"], inp["lora_A"],
             inp["lora_B"], inp["router"], gates, h, case.E_L, case.scaling, target.backend)
    assert all(t.is_contiguous() for t in torch.ops.slim_kernels.slim_bwd(*bargs))
    torch.library.opcheck(torch.ops.slim_kernels.slim_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(target):
    """torch.compile(fullgraph=True) of forward + backward through the op: no graph break,
    the same gradients as eager."""
    case = CASES["basic"].but(T=9, seed=11)
    inp = make_inputs(case, torch.float32, target.device)

    def f(x, A, B, R):
        y, gates, _, _, _ = slim_kernels.slim_linear_op(
            x, inp["weight"], inp["bias"], A, B, R, num_lora_experts=case.E_L,
            top_k=case.top_k, scaling=case.scaling, yield_strength=case.lam,
            centers=inp["centers"], inv_std=inp["inv_std"], backend=target.backend)
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
