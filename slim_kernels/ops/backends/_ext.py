"""Lazy loader of the compiled extension ``slim_kernels._C`` (csrc/).

It is a plain shared library (no Python module init): loading it with
``torch.ops.load_library`` registers the ``torch.ops.slim_kernels_C`` operators. The package imports
without it; :func:`load` returns the reason it is missing instead of raising.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

_state: dict = {}


def load() -> Optional[str]:
    """None when ``slim_kernels._C`` is loaded, else why it is not."""
    if "reason" not in _state:
        try:
            import torch

            spec = importlib.util.find_spec("slim_kernels._C")
            if spec is None or not spec.origin:
                raise ImportError("no compiled slim_kernels/_C*.so (or .pyd) next to the package")
            torch.ops.load_library(spec.origin)
            _state["reason"] = None
        except Exception as e:  # ImportError, undefined symbol from a torch mismatch, ...
            _state["reason"] = (
                f"the C++ extension slim_kernels._C is not built or cannot load "
                f"({type(e).__name__}: {e}); build it with "
                f"`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"
            )
    return _state["reason"]




def has_op(name: str) -> bool:
    import torch

    if load() is not None:
        return False
    return hasattr(torch.ops.slim_kernels_C, name)
