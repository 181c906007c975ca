"""Lazy loader of the compiled extension ``slim_kernels._C`` (csrc/).

It is a plain shared library (no Python module init): loading it with
``torch.ops.load_library`` registers the ``torch.ops.slim_kernels_C`` operators. The one built
at install time is used when it loads; otherwise (a plain ``pip install .`` builds none, or it
was built for another torch) the CPU kernels are compiled on first use into a cache
(:func:`slim_kernels._build.compile_on_first_use`). The package imports without it; :func:`load`
returns the reason it is missing instead of raising.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

from ... import _build

_state: dict = {}


def load() -> Optional[str]:
    """None when ``slim_kernels._C`` is loaded, else why it is not (and how to get it)."""
    if "reason" not in _state:
        _state["reason"], _state["origin"] = _load()
    return _state["reason"]


def origin() -> Optional[str]:
    """Where the loaded library came from (for ``slim-kernels info``), None when not loaded."""
    load()
    return _state["origin"]


def _load():
    import torch

    spec = importlib.util.find_spec("slim_kernels._C")
    if spec is None or not spec.origin:
        why = "slim_kernels._C was not built at install time"
    else:
        try:
            torch.ops.load_library(spec.origin)
            return None, f"built at install time: {spec.origin}"
        except Exception as e:  # OSError: undefined symbol, from a build for another torch
            why = (f"the installed slim_kernels._C does not load with torch {torch.__version__} "
                   f"({type(e).__name__}: {e})")
    try:
        return None, f"compiled on first use: {_build.compile_on_first_use(why)}"
    except _build.Unavailable as e:
        return str(e), None


def has_op(name: str) -> bool:
    import torch

    if load() is not None:
        return False
    return hasattr(torch.ops.slim_kernels_C, name)
