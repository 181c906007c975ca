"""Backend ``cuda``: csrc/cuda route kernels (torch-free .cu) + cuBLAS GEMMs through ATen.

Forward: ``[h | z] = x [A_all; R]ᵀ`` in one GEMM, the route kernel (cluster distance,
yielding, top-k, softmax, gating) writes gates/indices/distance and ``hg``; then
``y = x Wᵀ + b`` and ``y += hg B_allᵀ`` into the same output. With ``cluster_stats`` the route
kernel also writes each kept token's cluster and r, and a statistics kernel
(``csrc/common/cluster_stats.h``) makes the second pass over x, per token group, with no
atomics; the group partials are summed in order. Backward: ``dhg = dy B_all``,
the route-backward kernel (``dg``, softmax/top-k backward to ``dz``, ``dh``), then the weight
and input GEMMs. Same interface as :mod:`slim_kernels.ops.backends.torch`.

Available only when ``slim_kernels._C`` was built on a CUDA torch
(``SLIM_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ext
from ...routing import reduce_code

NAME = "cuda"

_SUPPORTED = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_EXPERTS = 64  # csrc/cuda/slim_cuda.h kMaxExperts


def unavailable_reason() -> Optional[str]:
    why = _ext.load()
    if why is not None:
        return why
    if not _ext.has_op("cuda_built"):
        return ("slim_kernels._C was built without its CUDA kernels (torch is a CPU build, or "
                "SLIM_KERNELS_BUILD_CUDA=0); rebuild on a CUDA torch with "
                "SLIM_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .")
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def unsupported_reason(x: Tensor, lora_cols: int = 0, num_experts: int = 0) -> Optional[str]:
    if x.device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a tensor on {x.device}"
    if num_experts > MAX_EXPERTS:
        return f"the cuda backend handles at most {MAX_EXPERTS} experts, got {num_experts}"
    if x.dtype not in _SUPPORTED:
        return f"the cuda backend supports float32/float64/bfloat16/float16, got {x.dtype}"
    return None


def forward(
    x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, router: Tensor,
    centers: Optional[Tensor], inv_std: Optional[Tensor],
    num_lora_experts: int, top_k: int, scaling: float, yield_strength: float,
    distance_reduce: str, distance_shift: Optional[Tensor] = None,
    cluster_stats: bool = False, stats_keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if router.shape[0] > MAX_EXPERTS:
        raise ValueError(f"the cuda backend handles at most {MAX_EXPERTS} experts, "
                         f"got {router.shape[0]}; use backend='torch' or 'triton'")
    y, gates, idx, d, assign, h, stats = torch.ops.slim_kernels_C.cuda_forward(
        x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std,
        distance_shift, int(num_lora_experts), int(top_k), float(scaling),
        float(yield_strength), reduce_code(distance_reduce), 0, stats_keep,
        bool(cluster_stats),
    )
    return y, gates, idx, d, assign, h, stats


def backward(
    dy: Tensor, dgates: Optional[Tensor], x: Tensor, x_lora: Optional[Tensor],
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, router: Tensor,
    gates: Tensor, h: Tensor, num_lora_experts: int, scaling: float,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
    """Chain rule of :func:`slim_kernels.ops.backends.torch.backward`; the per-token epilogue
    (dg, dz, dh, hg) runs in the route-backward kernel."""
    dx, dx_lora, dA, dB, dR = torch.ops.slim_kernels_C.cuda_backward(
        dy, dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h,
        int(num_lora_experts), float(scaling), 0,
    )
    return dx, (dx_lora if x_lora is not None else None), dA, dB, dR
