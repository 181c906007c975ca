"""A tiny adapter in the format of slim_kernels 0.1.0 (format_version 1), for the compat test
in tests/test_save_format.py. ``slim_adapter_v1/`` was written by this script run against that
release's code (``git archive f86a88d slim_kernels``):

    PYTHONPATH=<that checkout> python tests/data/adapter_v1.py tests/data

``slim_adapter_v1_expected.safetensors`` holds the base weights, an input and the output the
saving model gave for it (eval mode)."""
import os
import sys

import torch
from torch import nn

# yield_strength and cluster_momentum were the defaults of the version that wrote this adapter
CONFIG = dict(num_lora_experts=2, num_identity_experts=1, rank=2, alpha=4.0, num_clusters=2,
              yield_strength=1.0, cluster_momentum=0.01,
              target_modules=("q_proj", "down_proj"), backend="torch")


class TinyBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 6)
        self.down_proj = nn.Linear(6, 8, bias=False)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.q_proj(x)))


def main(out: str) -> None:
    import slim_kernels as sk
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = TinyBase()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sk.apply_slim(model, sk.SlimConfig(**CONFIG), verbose=False)
    with torch.no_grad():
        for _, m in sk.slim_modules(model):
            m.lora_B.normal_(0, 0.5)
            m.router.normal_(0, 0.5)
    model.train()
    model(torch.randn(16, 8))  # clusters initialised
    model(torch.randn(16, 8) * 1.5)  # and moved
    model.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = model(x)
    sk.save_slim(model, os.path.join(out, "slim_adapter_v1"))
    save_file({**{f"base.{k}": v for k, v in base.items()}, "x": x, "y": y},
              os.path.join(out, "slim_adapter_v1_expected.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
