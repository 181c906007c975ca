"""Backend ``cpp``: the CPU kernels of csrc/cpu (extension ``slim_kernels._C``).

Same interface, shapes and dtypes as :mod:`slim_kernels.ops.backends.torch`; it runs the route
step fused per block of tokens (LoRA-A and router products, cluster distances and, when asked
for, the cluster statistics, yielding, top-k, softmax, gating) and writes y once: the base
GEMM, then the gated expand accumulated into the same rows.

Only the experts each token selected are computed (:data:`MODE` ``"sparse"``, the default):
with top-2 of 10 experts that is at most a quarter of the LoRA FLOPs, and gathering the tokens
of an expert inside a cache-resident block costs little on a CPU. ``"dense"`` computes every
LoRA expert for every token (the GPU cut); kept for comparison
(``benchmarks/cpu_backend_ratio.py``). ``h`` of the unselected experts is returned as 0 in
sparse mode; the backward never reads it (their gate, hence every term they enter, is 0).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ext
from ...routing import reduce_code

NAME = "cpp"

_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MODES = {"dense": 0, "sparse": 1}  # bit 0 of the kernels' mode flags: only the selected experts

#: ``"sparse"`` or ``"dense"``, read once from ``SLIM_KERNELS_CPP_MODE`` at import; set this
#: attribute to switch (the tests and the benchmark do).
MODE = os.environ.get("SLIM_KERNELS_CPP_MODE", "sparse").strip().lower() or "sparse"
#: Tokens per block of the kernels' pass, 1..4096; 0 is the kernels' default (128).
BLOCK = 0


def _flags() -> int:
    """The kernels' mode flags: :data:`MODE` in bit 0, :data:`BLOCK` in bits 8 and up."""
    try:
        mode = _MODES[MODE]
    except (KeyError, TypeError):
        raise ValueError(f"cpp backend MODE={MODE!r} (SLIM_KERNELS_CPP_MODE) is invalid: "
                         f"expected one of {', '.join(_MODES)}") from None
    if type(BLOCK) is not int or not 0 <= BLOCK <= 4096:
        raise ValueError(f"cpp backend BLOCK={BLOCK!r} is invalid: expected 1..4096 tokens per "
                         "block, or 0 for the default")
    return mode | (BLOCK << 8)


def unavailable_reason() -> Optional[str]:
    why = _ext.load()
    if why is not None:
        return why
    if not _ext.has_op("forward"):
        return "slim_kernels._C was built without the CPU kernels (torch.ops.slim_kernels_C.forward)"
    return None


def unsupported_reason(x: Tensor, lora_cols: int = 0, num_experts: int = 0) -> Optional[str]:
    if x.device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got a tensor on {x.device}"
    if x.dtype not in _SUPPORTED:
        return f"the cpp backend supports float32/float64/bfloat16/float16, got {x.dtype}"
    return None


def forward(
    x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, router: Tensor,
    centers: Optional[Tensor], inv_std: Optional[Tensor],
    num_lora_experts: int, top_k: int, scaling: float, yield_strength: float,
    distance_reduce: str, distance_shift: Optional[Tensor] = None,
    cluster_stats: bool = False, stats_keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.ops.slim_kernels_C.forward(
        x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std, distance_shift,
        stats_keep, int(num_lora_experts), int(top_k), float(scaling), float(yield_strength),
        reduce_code(distance_reduce), bool(cluster_stats), _flags(),
    ))


def backward(
    dy: Tensor, dgates: Optional[Tensor], x: Tensor, x_lora: Optional[Tensor],
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, router: Tensor,
    gates: Tensor, h: Tensor, num_lora_experts: int, scaling: float,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
    """The chain rule of :func:`slim_kernels.ops.backends.torch.backward`, restricted to the
    selected experts in sparse mode (unselected ones have g = 0, so dh, hg and dz vanish)."""
    dx, dx_lora, dA, dB, dR = torch.ops.slim_kernels_C.backward(
        dy, dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h,
        int(num_lora_experts), float(scaling), _flags(),
    )
    return dx, (dx_lora if x_lora is not None else None), dA, dB, dR
