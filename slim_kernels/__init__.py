"""slim_kernels: SLIM (Soft LoRA and Identity Mixture) layers with fused kernels.

Public API:
    SlimConfig, SlimLinear            the configuration and the layer
    aux_loss(model)                   summed SLIM auxiliary losses of the last forward
    routing_stats(model)              per-layer identity routing share and distances
    track_routing(model)              context: record the routing statistics
    step_clusters(model)              move the clusters (each torch.optim step does it)
    token_mask(mask)                  context: padding tokens do not move the clusters
    slim_linear_op(...)               the functional op (one dispatch point, all backends)
    slim_reference(...)               the pure-PyTorch truth
    available_backends()              backends that can run here
    apply_slim(model, config)         wrap a (Hugging Face) model's projections in SLIM layers
                                      (through SLIM's PEFT tuner, slim_kernels.peft)
    plan_slim(model, config)          the module names apply_slim would wrap (changes nothing)
    save_slim / load_slim             PEFT's adapter folder (factors, routers, cluster buffers)
                                      with an integrity record, saved atomically
                                      (errors: SlimLoadError, model left unchanged)
    disable_slim(model)               context: run the base model exactly
    SlimAuxLossMixin, with_slim_aux   for trainers that compute their own loss (TRL SFTTrainer)

The names are imported on first use (PEP 562), so ``import slim_kernels`` (and the
``slim-kernels`` command's ``--help``) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# public name -> the submodule that defines it
_LAZY = {
    "SlimConfig": ".config",
    "SlimLinear": ".layer",
    "aux_loss": ".layer",
    "routing_stats": ".layer",
    "slim_modules": ".layer",
    "token_mask": ".layer",
    "track_routing": ".tracking",
    "step_clusters": ".clusters",
    "available_backends": ".ops",
    "slim_linear_op": ".ops",
    "slim_reference": ".reference",
    "SlimAuxLossMixin": ".integrations.hf",
    "SlimSummary": ".integrations.hf",
    "apply_slim": ".integrations.hf",
    "disable_slim": ".integrations.hf",
    "plan_slim": ".integrations.hf",
    "with_slim_aux": ".integrations.hf",
    "SlimLoadError": ".integrations.save_load",
    "load_slim": ".integrations.save_load",
    "save_slim": ".integrations.save_load",
}

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
    "step_clusters",
    "track_routing",
    "__version__",
]


def _require_torch() -> None:
    """torch is not a dependency of the package (see pyproject.toml): say which to install
    when it is missing or too old, instead of failing deep inside an import."""
    from ._build import TORCH_MIN, TORCH_MISSING

    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ModuleNotFoundError(TORCH_MISSING, name="torch") from None
    if torch.torch_version.TorchVersion(torch.__version__) < TORCH_MIN:
        raise ImportError(f"slim_kernels needs torch >= {'.'.join(map(str, TORCH_MIN))}, found "
                          f"torch {torch.__version__}: upgrade torch first")


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if mod != ".config":  # SlimConfig needs no torch (``slim-kernels --help`` reads it)
        _require_torch()
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def _install_peft_hook() -> None:
    """Register SLIM with PEFT when ``peft`` is imported (the .pth file the install adds does
    this at interpreter start; this covers a Python started without site-packages' .pth)."""
    try:
        import _slim_kernels_peft
    except ImportError:  # (run from a source tree without the install)
        return
    _slim_kernels_peft.install()


_install_peft_hook()

if TYPE_CHECKING:  # for type checkers and IDEs: the names as plain imports
    from .config import SlimConfig
    from .integrations.hf import (
        SlimAuxLossMixin, SlimSummary, apply_slim, disable_slim, plan_slim, with_slim_aux,
    )
    from .integrations.save_load import SlimLoadError, load_slim, save_slim
    from .layer import SlimLinear, aux_loss, routing_stats, slim_modules, token_mask
    from .ops import available_backends, slim_linear_op
    from .reference import slim_reference
    from .tracking import track_routing
    from .clusters import step_clusters
