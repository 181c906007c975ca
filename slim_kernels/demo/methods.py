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
- ``lora-r128``, ``lora-r16``: LoRA through PEFT's own ``LoraConfig`` (what LoRA users run),
  on the same projections SLIM wraps: rank 128 with alpha 256 (budget-matched: scaling 2.0 and
  as many factor parameters as SLIM's experts) and rank 16 with alpha 32 (a common choice);
  no dropout, PEFT's default initialisation.
- ``full``: full fine-tuning of the same projections.

Every arm is applied to a model by :func:`prepare_arm`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

__all__ = ["DEFAULT_METHODS", "PeftLora", "method_specs", "prepare_arm"]

DEFAULT_METHODS = ("lora", "slim", "slim-spread", "slim-no-identity", "slim-no-yield", "slim+merge",
                   "full")


@dataclass(frozen=True)
class PeftLora:
    """An arm that is PEFT's ``LoraConfig(r, lora_alpha)`` on the projections SLIM wraps."""

    r: int
    lora_alpha: int


def method_specs(slim_overrides: Optional[Dict] = None,
                 backend: Optional[str] = None) -> Dict[str, object]:
    """name -> "full", a :class:`PeftLora` or a SlimConfig. ``slim_overrides`` changes the SLIM arms (not LoRA's).
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
        "lora-r128": PeftLora(r=128, lora_alpha=256),
        "lora-r16": PeftLora(r=16, lora_alpha=32),
        "full": "full",
    }


def prepare_arm(model, spec, slim_config) -> Tuple[object, int]:
    """Apply arm ``spec`` (``"full"``, a :class:`PeftLora` or a SlimConfig) to ``model``:
    ``(the model to train, its trainable parameter count)``. ``slim_config`` (the ``slim``
    arm's) names the projections the full and PEFT-LoRA arms train."""
    from ..integrations.hf import apply_slim, plan_slim
    from .finetune import count_trainable, set_full_finetune

    if isinstance(spec, (str, PeftLora)):
        leaves = tuple(sorted({n.rpartition(".")[2] for n in plan_slim(model, slim_config)}))
        if spec == "full":
            return model, set_full_finetune(model, modules=leaves)
        if isinstance(spec, PeftLora):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha,
                                                     lora_dropout=0.0,
                                                     target_modules=list(leaves)))
            return model, count_trainable(model)
        raise ValueError(f"unknown arm {spec!r}")
    apply_slim(model, spec, verbose=False)
    return model, count_trainable(model)
