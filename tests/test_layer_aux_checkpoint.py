"""Layer fix: aux losses under gradient checkpointing.

Before the fix, SlimLinear built its L1 and load-balance terms only in the first forward:
non-reentrant checkpointing then failed ("A different number of tensors was saved during the
original forward and recomputation") and under reentrant checkpointing (first forward in
no_grad) the L1 term had no gradient."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import slim_kernels as sk


def run(reentrant, **kw):
    torch.manual_seed(0)
    lin = nn.Linear(12, 9, dtype=torch.float64)
    layer = sk.SlimLinear.from_linear(lin, sk.SlimConfig(num_lora_experts=3, rank=2, backend="torch", **kw))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    layer.train()
    x = torch.randn(4, 5, 12, dtype=torch.float64, requires_grad=True)
    out = []
    for step in range(2):  # cluster init, then one EMA update
        layer.zero_grad()
        y = layer(x) if reentrant is None else checkpoint(layer, x, use_reentrant=reentrant)
        loss = y.pow(2).mean() + sk.aux_loss(layer)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router)],
                    layer.cluster_centers.clone(), layer.cluster_vars.clone()))
    return out


@pytest.mark.parametrize("reentrant", [False, True])
def test_l1_and_balance_under_checkpointing(reentrant):
    kw = dict(l1_coef=0.1, balance_coef=0.0 if reentrant else 0.05)
    ref = run(None, **kw)
    got = run(reentrant, **kw)
    for (l0, g0, c0, v0), (l1, g1, c1, v1) in zip(ref, got):
        assert torch.equal(l0, l1)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(c0, c1) and torch.equal(v0, v1)  # clusters moved exactly once


def test_l1_has_gradient_when_forward_ran_in_no_grad():
    layer = sk.SlimLinear.from_linear(nn.Linear(6, 4), sk.SlimConfig(num_lora_experts=2, rank=2,
                                                                     l1_coef=0.1, backend="torch"))
    assert layer.slim_aux_loss() is None
    with torch.no_grad():
        layer(torch.randn(3, 6))
    aux = layer.slim_aux_loss()
    assert aux.requires_grad
    aux.backward()
    assert layer.lora_A.grad.abs().sum() > 0
    layer.reset_aux_loss()
    assert layer.slim_aux_loss() is None and not layer.has_aux_loss()
