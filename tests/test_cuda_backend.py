"""The cuda backend (csrc/cuda) against the fp64 reference. Runs only on a CUDA machine with
slim_kernels._C built on a CUDA torch; skipped otherwise, saying why."""
from __future__ import annotations

import pytest
import torch

from slim_kernels.ops import slim_linear_op
from slim_kernels.ops.backends import cuda as cuda_backend
from slim_kernels.reference import slim_reference

_why = cuda_backend.unavailable_reason()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"cuda backend unavailable: {_why}")


@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("x_lora", [False, True])
@pytest.mark.parametrize("reduce", ["max", "mean", "rms"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cuda_vs_reference(T, x_lora, reduce, dtype, tol):
    g = torch.Generator().manual_seed(0)
    K, N, EL, r, EI = 45, 29, 3, 5, 2
    E = EL + EI
    x = torch.randn(T, K, generator=g, dtype=torch.float64)
    xl = torch.randn(T, K, generator=g, dtype=torch.float64)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5
    b = torch.randn(N, generator=g, dtype=torch.float64)
    A = torch.randn(EL, r, K, generator=g, dtype=torch.float64) / K ** 0.5
    B = torch.randn(EL, N, r, generator=g, dtype=torch.float64)
    R = torch.randn(E, K, generator=g, dtype=torch.float64) * 0.3
    C = torch.randn(4, K, generator=g)
    V = torch.rand(4, K, generator=g) + 0.5
    dy = torch.randn(T, N, generator=g, dtype=torch.float64)
    kw = dict(top_k=2, scaling=0.7, yield_strength=0.8, distance_reduce=reduce)

    leaves = [t.clone().requires_grad_(True) for t in (x, xl, A, B, R)]
    yr, gr, dr, ar = slim_reference(leaves[0], W, b, leaves[2], leaves[3], leaves[4],
                                    centers=C, cluster_vars=V, x_lora=leaves[1] if x_lora else None, **kw)
    gref = torch.autograd.grad((yr * dy).sum(), leaves, allow_unused=True)

    dev = "cuda"
    As = A.reshape(EL * r, K)
    Bs = B.permute(1, 0, 2).reshape(N, EL * r)
    ins = [t.to(dev, dtype).requires_grad_(True) for t in (x, xl, As, Bs, R)]
    y, gates, idx, d, assign = slim_linear_op(
        ins[0], W.to(dev, dtype), b.to(dev, dtype), ins[2], ins[3], ins[4], num_lora_experts=EL,
        centers=C.to(dev), inv_std=(V + 1e-5).rsqrt().to(dev), x_lora=ins[1] if x_lora else None,
        backend="cuda", **kw)
    gs = torch.autograd.grad((y.double() * dy.to(dev)).sum(), ins, allow_unused=True)

    def rel(a, b):
        b = torch.zeros_like(a.double().cpu()) if b is None else b
        if b.numel() == 0:
            return 0.0
        return ((a.double().cpu() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    assert rel(y, yr) < tol and rel(gates, gr) < tol and rel(d, dr) < tol
    assert torch.equal(assign.cpu(), ar)
    names = ["x", "x_lora", "A", "B", "R"]
    ref = [gref[0], gref[1], None if gref[2] is None else gref[2].reshape(EL * r, K),
           None if gref[3] is None else gref[3].permute(1, 0, 2).reshape(N, EL * r), gref[4]]
    for n, a, bb in zip(names, gs, ref):
        if n == "x_lora" and not x_lora:
            continue
        assert rel(a, bb) < tol, n
