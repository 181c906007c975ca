"""slim_kernels: SLIM (Soft LoRA and Identity Mixture) layers with fused kernels.

Public API:
    SlimConfig, SlimLinear            the configuration and the layer
    aux_loss(model)                   summed SLIM auxiliary losses of the last forward
    routing_stats(model)              per-layer identity routing share and distances
    token_mask(mask)                  context: padding tokens do not move the clusters
    slim_linear_op(...)               the functional op (one dispatch point, all backends)
    slim_reference(...)               the pure-PyTorch truth
    available_backends()              backends that can run here
"""
__version__ = "0.1.0"

from .config import SlimConfig
from .layer import SlimLinear, aux_loss, routing_stats, slim_modules, token_mask
from .ops import available_backends, slim_linear_op
from .reference import slim_reference

__all__ = [
    "SlimConfig",
    "SlimLinear",
    "aux_loss",
    "available_backends",
    "routing_stats",
    "slim_linear_op",
    "slim_modules",
    "slim_reference",
    "token_mask",
    "__version__",
]
