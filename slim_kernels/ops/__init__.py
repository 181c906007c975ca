"""Op boundary and dispatch. ``slim_linear_op`` is the only entry the layer uses."""
from .dispatch import available_backends, resolve_backend
from .op import slim_linear_op

__all__ = ["available_backends", "resolve_backend", "slim_linear_op"]
