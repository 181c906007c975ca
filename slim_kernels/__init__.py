"""slim_kernels: SLIM (Soft LoRA and Identity Mixture) layers with fused kernels.

Public API:
    SlimConfig, SlimLinear            the configuration and the layer
    aux_loss(model)                   summed SLIM auxiliary losses of the last forward
    routing_stats(model)              per-layer identity routing share and distances
    token_mask(mask)                  context: padding tokens do not move the clusters
    slim_linear_op(...)               the functional op (one dispatch point, all backends)
    slim_reference(...)               the pure-PyTorch truth
    available_backends()              backends that can run here
    apply_slim(model, config)         swap a (Hugging Face) model's projections for SlimLinear
    plan_slim(model, config)          the module names apply_slim would swap (changes nothing)
    save_slim / load_slim             adapters + router + cluster buffers, safetensors
                                      (errors: SlimLoadError, model left unchanged)
    disable_slim(model)               context: run the base model exactly
    SlimAuxLossMixin, with_slim_aux   for trainers that compute their own loss (TRL SFTTrainer)
"""
from ._version import __version__

from .config import SlimConfig
from .layer import SlimLinear, aux_loss, routing_stats, slim_modules, token_mask
from .ops import available_backends, slim_linear_op
from .reference import slim_reference
from .integrations.hf import (
    SlimAuxLossMixin, SlimSummary, apply_slim, disable_slim, plan_slim, with_slim_aux,
)
from .integrations.save_load import SlimLoadError, load_slim, save_slim

__all__ = [
    "SlimConfig",
    "SlimLinear",
    "SlimAuxLossMixin",
    "SlimLoadError",
    "SlimSummary",
    "apply_slim",
    "disable_slim",
    "load_slim",
    "plan_slim",
    "save_slim",
    "with_slim_aux",
    "aux_loss",
    "available_backends",
    "routing_stats",
    "slim_linear_op",
    "slim_modules",
    "slim_reference",
    "token_mask",
    "__version__",
]
