"""The arms of the forgetting benchmark (embedded and real-model demo alike).

- ``lora``: plain LoRA built with slim_kernels itself (``SlimConfig(num_lora_experts=1,
  num_identity_experts=0, top_k=1, num_clusters=0)``), rank ``E_L * r`` of the SLIM
  defaults (8 * 16 = 128), alpha = 2 * rank (same scaling 2.0 as SLIM). Budget match: LoRA's
  A/B factors have exactly as many parameters as SLIM's eight experts; SLIM additionally has
  its router (10 x in_features per projection), which is not matched.
- ``slim``: ``SlimConfig()`` defaults.
- ``slim-tuned``: the defaults with :data:`TUNED_SLIM`.
- ablations: ``slim-no-identity``, ``slim-no-yield`` (no clusters), ``slim+merge``
  (merge_drop=0.3).
- ``full``: full fine-tuning of the same projections.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional

import torch

__all__ = ["DEFAULT_METHODS", "TUNED_SLIM", "method_specs"]

DEFAULT_METHODS = ("lora", "slim", "slim-tuned", "slim-no-identity", "slim-no-yield", "slim+merge",
                   "full")

# The demo's own SLIM settings, picked (on seed 0, task symbols) after the defaults failed to
# separate the tasks: 16 clusters tracking the fine-tuning inputs 10x faster (momentum 0.1), so
# that in-domain tokens sit near a centre (d ~ 0), and a 4x stronger yield. The same for every
# seed and task; the defaults are always run beside them.
TUNED_SLIM = {"yield_strength": 4.0, "cluster_momentum": 0.1, "num_clusters": 16}


def method_specs(slim_overrides: Optional[Dict] = None) -> Dict[str, object]:
    """name -> "full" or a SlimConfig. ``slim_overrides`` changes the SLIM arms (not LoRA's)."""
    from ..config import SlimConfig

    base = SlimConfig(backend="torch" if not torch.cuda.is_available() else "auto")
    slim = replace(base, **(slim_overrides or {}))
    rank = base.num_lora_experts * base.rank
    lora = replace(base, num_lora_experts=1, num_identity_experts=0, top_k=1, num_clusters=0,
                   rank=rank, alpha=base.scaling * rank, merge_drop=0.0, l1_coef=0.0,
                   balance_coef=0.0)
    return {
        "lora": lora,
        "slim": slim,
        "slim-tuned": replace(slim, **TUNED_SLIM),
        "slim-no-identity": replace(slim, num_identity_experts=0,
                                    top_k=min(slim.top_k, slim.num_lora_experts)),
        "slim-no-yield": replace(slim, num_clusters=0),
        "slim+merge": replace(slim, merge_drop=0.3),
        "full": "full",
    }
