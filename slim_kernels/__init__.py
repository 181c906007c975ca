"""slim_kernels: SLIM (Soft LoRA and Identity Mixture) layers with fused kernels."""
__version__ = "0.1.0"

from .config import SlimConfig
from .ops import available_backends, slim_linear_op
from .reference import slim_reference

__all__ = ["SlimConfig", "available_backends", "slim_linear_op", "slim_reference", "__version__"]
