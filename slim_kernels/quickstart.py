"""Quickstart: wrap one nn.Linear with SLIM, train a few steps, inspect the routing.

    slim-kernels example      (or: python -m slim_kernels.quickstart)
"""
import torch
from torch import nn

from .config import SlimConfig
from .layer import SlimLinear, aux_loss, track_routing
from .ops import available_backends


def main(steps: int = 30, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    base = nn.Linear(64, 48)
    layer = SlimLinear.from_linear(base, SlimConfig(num_lora_experts=4, rank=8, l1_coef=1e-3))
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    target = nn.Linear(64, 48)  # a new "task": map x to another linear function
    x_task = torch.randn(256, 64)
    y_task = target(x_task).detach()
    layer.train()
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(layer(x_task), y_task) + aux_loss(layer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    layer.eval()
    x_ood = torch.randn(256, 64) * 6.0  # tokens unlike the training data
    with torch.no_grad(), track_routing(layer):
        layer(x_task)
        in_domain = layer.routing_stats(reset=True)
        layer(x_ood)
        out_domain = layer.routing_stats(reset=True)
    print(f"backend(s) here: {available_backends()}")
    print(f"task loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {steps} steps")
    print(f"identity routing mass  in-domain: {in_domain['identity_mass']:.3f}  "
          f"(mean distance {in_domain['mean_distance']:+.2f})")
    print(f"identity routing mass out-domain: {out_domain['identity_mass']:.3f}  "
          f"(mean distance {out_domain['mean_distance']:+.2f})")
    return dict(losses=losses, in_domain=in_domain, out_domain=out_domain)


if __name__ == "__main__":
    main()
