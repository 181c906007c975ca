"""The arms of the forgetting benchmark (embedded and real-model demo alike).

- ``lora``: plain LoRA built with slim_kernels itself (``SlimConfig(num_lora_experts=1,
  num_identity_experts=0, top_k=1, num_clusters=0)``), rank ``E_L * r`` of the SLIM
  defaults (8 * 16 = 128), alpha = 2 * rank (same scaling 2.0 as SLIM). Budget match: LoRA's
  A/B factors have exactly as many parameters as SLIM's eight experts; SLIM additionally has
  its router (10 x in_features per projection), which is not matched.
- ``slim``: ``SlimConfig()`` defaults.
- ``slim-spread``: the defaults with ``distance_scale="spread"`` (the distance in units of the
  in-domain spread, docs/method.md §2).
- ablations: ``slim-no-identity``, ``slim-no-yield`` (no clusters), ``slim+merge``
  (merge_drop=0.3).
- ``full``: full fine-tuning of the same projections.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional

__all__ = ["DEFAULT_METHODS", "method_specs"]

DEFAULT_METHODS = ("lora", "slim", "slim-spread", "slim-no-identity", "slim-no-yield", "slim+merge",
                   "full")


def method_specs(slim_overrides: Optional[Dict] = None,
                 backend: Optional[str] = None) -> Dict[str, object]:
    """name -> "full" or a SlimConfig. ``slim_overrides`` changes the SLIM arms (not LoRA's).
    ``backend``: every arm's; by default ``torch`` without a CUDA device, else ``auto``
    (given, nothing here imports torch: the command line checks its arguments this way)."""
    from ..config import SlimConfig

    if backend is None:
        import torch

        backend = "torch" if not torch.cuda.is_available() else "auto"
    base = SlimConfig(backend=backend)
    slim = replace(base, **(slim_overrides or {}))
    rank = base.num_lora_experts * base.rank
    lora = replace(base, num_lora_experts=1, num_identity_experts=0, top_k=1, num_clusters=0,
                   rank=rank, alpha=base.scaling * rank, merge_drop=0.0, l1_coef=0.0,
                   balance_coef=0.0)
    return {
        "lora": lora,
        "slim": slim,
        "slim-spread": replace(slim, distance_scale="spread"),
        "slim-no-identity": replace(slim, num_identity_experts=0,
                                    top_k=min(slim.top_k, slim.num_lora_experts)),
        "slim-no-yield": replace(slim, num_clusters=0),
        "slim+merge": replace(slim, merge_drop=0.3),
        "full": "full",
    }
