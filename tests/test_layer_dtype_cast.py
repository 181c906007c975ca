"""Layer fix: casting a SLIM model (``model.to(torch.bfloat16)``, ``.half()``) turned the fp32
cluster buffers into bf16/fp16 and the next forward failed ("centers has dtype
torch.bfloat16, expected torch.float32"). The buffers now stay fp32, unrounded."""
import torch
from torch import nn

import slim_kernels as sk


def test_cast_keeps_cluster_buffers_fp32():
    torch.manual_seed(0)
    layer = sk.SlimLinear.from_linear(nn.Linear(8, 6), sk.SlimConfig(num_lora_experts=2, rank=2,
                                                                     backend="torch")).train()
    layer(torch.randn(10, 8))  # initialise the clusters
    layer.eval()  # (a training forward would move the clusters)
    cen = layer.cluster_centers.clone()
    for dt in (torch.bfloat16, torch.float16):
        m = layer.to(dt)
        assert m is layer
        assert layer.weight.dtype == dt and layer.lora_A.dtype == dt
        assert layer.cluster_centers.dtype == torch.float32 and layer.cluster_vars.dtype == torch.float32
        assert torch.equal(layer.cluster_centers, cen)
        y = layer(torch.randn(4, 8, dtype=dt))
        y.float().sum().backward()
    layer.float()
    assert layer.lora_B.dtype == torch.float32 and torch.equal(layer.cluster_centers, cen)
