"""The frozen base layer under a SLIM layer: which modules can be one, and their (out, in) weight.

A chain of handlers, first match wins (as PEFT's ``_create_new_module`` picks a layer class):

* :class:`PlainLinear`: an ``nn.Linear`` with a floating-point weight, used as it is;
* :class:`Conv1D`: transformers' ``Conv1D`` (GPT-2 family), a linear whose weight is stored
  (in, out), which PEFT calls ``fan_in_fan_out``: the op runs on its transposed view (no copy;
  the backends read the weight through its strides);
* :class:`Bnb4bit`, :class:`Bnb8bit`: bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, whose packed
  weight is dequantized at each forward (recognised only when bitsandbytes is imported: a
  model cannot hold its layers otherwise);
* :class:`Dequantizable`: any linear-like module (``in_features``, ``out_features``, ``bias``)
  with a ``dequantize()`` method that returns the (out, in) weight.

:func:`base_handler` returns the handler of a module (None when none matches) and
:func:`unsupported_base` says why a module cannot be a base. Add a kind of base layer by
adding a handler to :data:`HANDLERS`.
"""
from __future__ import annotations

import copy
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .cluster_sync import full_shape

__all__ = ["BaseHandler", "HANDLERS", "SUPPORTED_BASES", "base_handler", "base_weight",
           "unsupported_base"]


class BaseHandler:
    """What a SLIM layer needs of a base layer kind. Subclasses set ``kind`` and implement
    :meth:`matches` and, for quantized kinds, :meth:`weight`."""

    kind = "base layer"
    quantized = True  # the weight is recomputed (dequantized) at each forward
    fan_in_fan_out = False  # the module stores its weight (in, out): the op takes weight.t()

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def weight(module: nn.Module) -> Tensor:
        """The (out, in) floating-point weight the op runs on (no gradient)."""
        raise NotImplementedError

    @staticmethod
    def shape(module: nn.Module) -> Tuple[int, int]:
        """(out_features, in_features)."""
        return module.out_features, module.in_features

    @staticmethod
    def dtype(module: nn.Module) -> torch.dtype:
        """The dtype the SLIM parameters are created in: the compute dtype."""
        dt = getattr(module, "compute_dtype", None)
        if dt is not None:
            return dt
        return module.bias.dtype if module.bias is not None else torch.float32


class PlainLinear(BaseHandler):
    kind = "torch.nn.Linear (floating-point weight)"
    quantized = False

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return (isinstance(module, nn.Linear) and not _bnb_linear(module)
                and module.weight.is_floating_point())

    @staticmethod
    def weight(module: nn.Module) -> Tensor:
        return module.weight

    @staticmethod
    def shape(module: nn.Module) -> Tuple[int, int]:
        # full_shape: a linear built under deepspeed.zero.Init is already partitioned
        out_f, in_f = full_shape(module.weight)
        return out_f, in_f

    @staticmethod
    def dtype(module: nn.Module) -> torch.dtype:
        return module.weight.dtype


class Conv1D(BaseHandler):
    kind = "transformers Conv1D (GPT-2 family; weight stored (in, out): fan_in_fan_out)"
    quantized = False
    fan_in_fan_out = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        pu = sys.modules.get("transformers.pytorch_utils")  # imported by any model that has one
        return (pu is not None and isinstance(module, pu.Conv1D)
                and module.weight.is_floating_point())

    @staticmethod
    def weight(module: nn.Module) -> Tensor:
        return module.weight.t()

    @staticmethod
    def shape(module: nn.Module) -> Tuple[int, int]:
        in_f, out_f = full_shape(module.weight)
        return out_f, in_f

    @staticmethod
    def dtype(module: nn.Module) -> torch.dtype:
        return module.weight.dtype


def _bnb():
    """bitsandbytes if it was imported (a model holding its layers imported it)."""
    return sys.modules.get("bitsandbytes")


def _bnb_linear(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


class Bnb4bit(BaseHandler):
    kind = "bitsandbytes Linear4bit"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(module, bnb.nn.Linear4bit)

    @staticmethod
    @torch.no_grad()
    def weight(module: nn.Module) -> Tensor:
        import bitsandbytes as bnb
        w = module.weight
        data, state = w.data, w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval
            # forward; unpack a copy (the module keeps its packed weight)
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                data.clone(), copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state)


class Bnb8bit(BaseHandler):
    kind = "bitsandbytes Linear8bitLt"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        bnb = _bnb()
        return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)

    @staticmethod
    @torch.no_grad()
    def weight(module: nn.Module) -> Tensor:
        import bitsandbytes as bnb
        w = module.weight
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))


class Dequantizable(BaseHandler):
    kind = ("a linear-like module with in_features, out_features, bias and a dequantize() "
            "method returning the (out, in) weight")

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return (all(hasattr(module, a) for a in ("in_features", "out_features", "bias"))
                and callable(getattr(module, "dequantize", None)))

    @staticmethod
    @torch.no_grad()
    def weight(module: nn.Module) -> Tensor:
        return module.dequantize()


HANDLERS = (PlainLinear, Conv1D, Bnb4bit, Bnb8bit, Dequantizable)
SUPPORTED_BASES = tuple(h.kind for h in HANDLERS)


def base_handler(module: nn.Module) -> Optional[type]:
    """The first handler of :data:`HANDLERS` that matches ``module``, or None."""
    if not isinstance(module, nn.Module):
        return None
    for h in HANDLERS:
        if h.matches(module):
            return h
    return None


def unsupported_base(module: nn.Module) -> Optional[str]:
    """Why a SLIM layer cannot wrap ``module`` (None when it can)."""
    if not isinstance(module, nn.Module):
        return "it is not an nn.Module"
    if base_handler(module) is not None:
        return None
    if isinstance(module, nn.Linear) and not module.weight.is_floating_point():
        return f"its weight is {module.weight.dtype}, not floating point"
    return "it is not a supported linear layer"


def base_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of a supported base layer: the ``nn.Linear`` weight itself, a
    ``Conv1D``'s transposed view, or the dequantized weight of a quantized one (a new tensor, no
    gradient)."""
    h = base_handler(module)
    if h is None:
        raise TypeError(f"{type(module).__qualname__} is not a supported base layer: "
                        f"{unsupported_base(module)}")
    return h.weight(module)
