"""A tiny adapter in the own format 2 of slim_kernels before the PEFT layout (format_version 2:
a digested manifest naming ``slim_adapter.<digest16>.safetensors``), for the compat test in
tests/test_save_format.py. ``slim_adapter_v2/`` was written by this script run against that
code (``git archive a0f23eb slim_kernels tests/data``, the clusters moving at each step):

    PYTHONPATH=<that checkout> python tests/data/adapter_v2.py tests/data

``slim_adapter_v2_expected.safetensors`` holds the base weights, an input and the output the
saving model gave for it (eval mode)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapter_v1 import CONFIG, TinyBase  # noqa: E402


def main(out: str) -> None:
    import slim_kernels as sk
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = TinyBase()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sk.apply_slim(model, sk.SlimConfig(**CONFIG), verbose=False)
    with torch.no_grad():
        for _, m in sk.slim_modules(model):
            m.lora_B.normal_(0, 0.5)
            m.router.normal_(0, 0.5)
    model.train()
    model(torch.randn(16, 8))
    sk.step_clusters(model)  # clusters initialised
    model(torch.randn(16, 8) * 1.5)
    sk.step_clusters(model)  # and moved
    model.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = model(x)
    sk.save_slim(model, os.path.join(out, "slim_adapter_v2"))
    save_file({**{f"base.{k}": v for k, v in base.items()}, "x": x, "y": y},
              os.path.join(out, "slim_adapter_v2_expected.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
