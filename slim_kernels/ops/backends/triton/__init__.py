"""Backend ``triton``: the fused SLIM kernels (``docs/method.md`` §6) and their launchers.

``kernels`` holds the ``@triton.jit`` kernels, ``launch`` the launchers and the backend
interface (:mod:`slim_kernels.ops.backends`); nothing model-specific here."""
from .launch import NAME, backward, forward, unavailable_reason, unsupported_reason

__all__ = ["NAME", "backward", "forward", "unavailable_reason", "unsupported_reason"]
