"""The one dispatch point: which backend runs a SLIM op call.

Backends: ``triton`` (fused kernels, CUDA), ``cuda`` (csrc CUDA route kernels + cuBLAS),
``cpp`` (csrc CPU kernels), ``torch`` (stacked PyTorch, any device). Each backend follows
the interface written down in :mod:`slim_kernels.ops.backends`.

``auto`` picks, for CUDA tensors: triton, else cuda, else torch; for CPU tensors: cpp, else
torch. Falling back to ``torch`` under ``auto`` warns once (results are the same op, only
slower). An explicit backend that cannot run raises, saying why and how to fix it.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .backends import NAMES

_MODULES = {name: f"slim_kernels.ops.backends.{name}" for name in NAMES}
_HOW_TO_FIX = {
    "triton": "install triton (pip install triton) and run on a CUDA device",
    "cuda": "build the CUDA extension on a CUDA torch: SLIM_KERNELS_BUILD_CUDA=1 "
            "pip install --no-build-isolation -e .",
    "cpp": "build the C++ extension: install a C++ compiler (then it compiles on first use), "
           "or build it at install: pip install --no-build-isolation .",
    "torch": "",
}
_cache: Dict[str, object] = {}
_warned: set = set()
_resolved: Dict[tuple, str] = {}  # (requested, device, dtype, lora_cols, num_experts) -> name


def _load(name: str):
    """The backend module, or a string saying why it cannot be loaded."""
    if name not in _cache:
        try:
            mod = importlib.import_module(_MODULES[name])
            reason = mod.unavailable_reason()
            _cache[name] = reason if reason else mod
        except Exception as e:  # ImportError, missing extension, broken install
            _cache[name] = f"{type(e).__name__}: {e}"
    return _cache[name]


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend ``name`` can run in this process, else why not."""
    mod = _load(name)
    return mod if isinstance(mod, str) else None


def backend_module(name: str) -> ModuleType:
    mod = _load(name)
    if isinstance(mod, str):
        raise RuntimeError(f"slim_kernels backend {name!r} is not available: {mod}")
    return mod


def available_backends() -> List[str]:
    """Backends that can run in this process (on some device), in order of preference."""
    return [n for n in NAMES if not isinstance(_load(n), str)]


def resolve_backend(requested: str, x: Tensor, lora_cols: int = 0, num_experts: int = 0) -> str:
    """The backend that will run a call on ``x`` (with E_L·r = ``lora_cols`` LoRA columns and
    ``num_experts`` router rows) when ``requested`` was asked for."""
    return _resolve(requested, x.device, x.dtype, int(lora_cols), int(num_experts))


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo (about 1 s,
    which every ``import slim_kernels`` would pay). The decorator only marks the function with
    this attribute, which dynamo reads when it traces a call; tests/test_imports.py checks that
    the mark is the one the public decorator sets. When dynamo is already imported, the public
    decorator itself is used."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


# torch.compile traces the layer's Python; importing a backend (importlib) cannot be traced, so
# dynamo runs this function eagerly at trace time and bakes its (string) answer into the graph.
@_assume_constant_result
def _resolve(requested: str, device: torch.device, dtype: torch.dtype, lora_cols: int,
             num_experts: int) -> str:
    key = (requested, device, dtype, lora_cols, num_experts)
    name = _resolved.get(key)
    if name is None:  # (answers are the same until reset_cache: one lookup per call after)
        name = _resolved[key] = _choose(requested, device, dtype, lora_cols, num_experts)
    return name


def _choose(requested: str, device: torch.device, dtype: torch.dtype, lora_cols: int,
            num_experts: int) -> str:
    if requested not in ("auto",) + tuple(_MODULES):
        raise ValueError(
            f"backend={requested!r} is invalid: expected one of auto, triton, cuda, cpp, torch"
        )
    probe = torch.empty(0, device=device, dtype=dtype)  # what the backends inspect: device, dtype
    if requested != "auto":
        mod = _load(requested)
        if isinstance(mod, str):
            raise RuntimeError(
                f"backend={requested!r} was requested but cannot run: {mod}. "
                f"To use it: {_HOW_TO_FIX[requested]}"
            )
        why = mod.unsupported_reason(probe, lora_cols, num_experts)
        if why:
            raise RuntimeError(f"backend={requested!r} cannot run this input: {why}")
        return requested

    dev_type = probe.device.type
    prefs = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}.get(dev_type, ())
    reasons = []
    for name in prefs:
        mod = _load(name)
        if isinstance(mod, str):
            reasons.append(f"{name}: {mod}")
            continue
        why = mod.unsupported_reason(probe, lora_cols, num_experts)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    key = (dev_type, tuple(reasons))
    if reasons and key not in _warned and dev_type != "meta":  # (meta: shapes only)
        _warned.add(key)
        warnings.warn(
            "slim_kernels: no fused backend for this call ("
            + "; ".join(reasons)
            + "); using the 'torch' backend (same results, slower).",
            RuntimeWarning,
            stacklevel=5,
        )
    return "torch"


def reset_cache() -> None:
    """Forget loaded backends, choices and warnings (for tests)."""
    _cache.clear()
    _warned.clear()
    _resolved.clear()
