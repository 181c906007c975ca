"""Backend ``triton``: the fused SLIM kernels of ``docs/method.md`` §6 and their launchers.

Same interface as :mod:`slim_kernels.ops.backends.torch` (``NAME``, ``unavailable_reason``,
``unsupported_reason``, ``forward``, ``backward``); the op boundary
(:mod:`slim_kernels.ops.op`, torch custom ops ``slim_kernels::slim_fwd`` / ``slim_bwd`` with
autograd and fake implementations) calls them, so ``torch.compile(fullgraph=True)`` sees one
opaque op per direction.

Launches per call (T tokens, K in, N out, ER = E_L·r, E experts):

forward   route_fwd  (T/BLOCK_T programs)   [h | z] = x [A_all; R]ᵀ, clusters, top-k, hg
          fused_linear (T×N tiles)          y = [x | hg] [W | B_all]ᵀ + b
backward  route_bwd  (T/BLOCK_T programs)   dhg = dy B_all -> dhz = [dh | dz], hg
          fused_linear (T×K tiles)          dx = [dy | dh | dz] [W ; A_all ; R]
          fused_linear (N×ER tiles)         dB_all = dyᵀ hg
          fused_linear ((ER+E)×K tiles)     [dA_all; dR] = [dh | dz]ᵀ x
(with x_lora: dx = [dy | dz][W; R], dx_lora = dh A_all, dA = dhᵀ x_lora, dR = dzᵀ x).
The weight gradients run on the same Triton fused-linear kernel with transposed strides.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

NAME = "triton"
MAX_LORA_COLS = 1024  # E_L·r
MAX_EXPERTS = 256

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # the backend is unavailable (not broken) when triton does not import
    import triton

    from . import kernels as _k
    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    _k = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason() -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return f"triton does not import ({_IMPORT_ERROR})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device is available (and TRITON_INTERPRET=1 is not set)"
    return None


def unsupported_reason(x: Tensor, lora_cols: int = 0, num_experts: int = 0) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return f"triton does not import ({_IMPORT_ERROR})"
    if lora_cols > MAX_LORA_COLS:
        return (f"num_lora_experts * rank = {lora_cols} exceeds the triton backend's "
                f"limit of {MAX_LORA_COLS}")
    if num_experts > MAX_EXPERTS:
        return f"{num_experts} experts exceed the triton backend's limit of {MAX_EXPERTS}"
    if x.device.type == "cuda":
        if x.dtype not in _GPU_DTYPES:
            return f"dtype {x.dtype} is not supported on CUDA (use float32, bfloat16 or float16)"
        return None
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 "
                    "before importing slim_kernels")
        if not _INTERPRET:
            return ("TRITON_INTERPRET=1 was set after slim_kernels.ops.backends.triton was imported; "
                    "set it before the import")
        if x.dtype not in _GPU_DTYPES + (torch.float64,):
            return f"dtype {x.dtype} is not supported (use float32, bfloat16, float16 or float64)"
        return None
    return f"device {x.device.type!r} is not supported by the triton backend (CUDA only)"


# ------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pad16(n: int) -> int:
    return max(16, _next_pow2(n))


def route_config(rp: int, interpret: bool = _INTERPRET, backward: bool = False,
                 fp32: bool = False):
    """(BLOCK_T, BLOCK_K, num_warps, num_stages, H_BLOCK) of the route kernels for padded
    E_L·r = rp. H_BLOCK is the width of h columns one program accumulates.

    Forward: h is column-local after routing, so wide h is split over a second grid axis in
    blocks of 128 (each block recomputes the E + C routing columns); at rp = 1024 a single
    16 × 1024 accumulator spilled ~15 KB (ptxas). Backward needs every column of a token for
    dg, so it keeps rp whole and shrinks BLOCK_T instead. With 4 warps at rp = 128 ptxas
    spilled (route_fwd on sm_90, route_bwd everywhere): 8 warps. fp32 inputs use ieee (FMA)
    dots, whose operands live in registers: half the tile (fp32 at 64 × 64 spilled 20 KB)."""
    if interpret:
        return 32, 32, 4, 1, min(rp, 64)
    if not backward:
        return (32, 32, 8, 2, min(rp, 64)) if fp32 else (64, 64, 8, 3, min(rp, 128))
    if fp32:
        return (32, 32, 8, 2, rp) if rp <= 128 else (16, 16, 8, 2, rp)
    if rp <= 128:
        return 64, 64, 8, 3, rp
    if rp <= 256:
        return 32, 64, 4, 3, rp
    if rp <= 512:
        return 16, 64, 8, 2, rp
    return 16, 32, 8, 2, rp


# fused linear: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
LINEAR_CONFIGS_GPU = [  # bf16 / fp16: tensor-core dots (wgmma on sm_90, mma on sm_80)
    (128, 256, 64, 8, 8, 3),
    (128, 128, 32, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),  # the skinny weight-gradient GEMMs (N = E_L·r): more programs
]
LINEAR_CONFIGS_GPU_FP32 = [  # fp32: ieee FMA dots (torch's fp32 matmul default is ieee too)
    (64, 64, 32, 8, 4, 3),
    (128, 64, 16, 8, 8, 3),
]
LINEAR_CONFIG_INTERPRET = (32, 32, 32, 8, 4, 1)

_linear_autotuned = {}


def linear_configs(fp32: bool):
    return LINEAR_CONFIGS_GPU_FP32 if fp32 else LINEAR_CONFIGS_GPU


def _linear_kernel(fp32: bool):
    """The autotuned fused-linear kernel on GPU, one autotuner per config family."""
    if fp32 not in _linear_autotuned:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                          num_warps=w, num_stages=s)
            for bm, bn, bk, gm, w, s in linear_configs(fp32)
        ]
        _linear_autotuned[fp32] = triton.autotune(
            configs=configs, key=["M", "N", "K1", "K2", "K3", "HAS_2", "HAS_3"]
        )(_k.fused_linear_kernel)
    return _linear_autotuned[fp32]


def _flags(dt: torch.dtype) -> Tuple[bool, str]:
    """(UPCAST, DOT_PREC): fp32 tiles under the interpreter for half types; ieee for fp32."""
    half = dt in (torch.bfloat16, torch.float16)
    upcast = _INTERPRET and half
    prec = "ieee" if (_INTERPRET or not half) else "tf32"
    return upcast, prec


def _check_sizes(ER: int, E: int, E_L: int) -> None:
    if ER > MAX_LORA_COLS:
        raise ValueError(f"triton backend: E_L·r = {ER} exceeds {MAX_LORA_COLS}; "
                         "use backend='torch' or fewer/smaller experts")
    if E > MAX_EXPERTS:
        raise ValueError(f"triton backend: {E} experts exceed {MAX_EXPERTS}; use backend='torch'")
    if E_L < 1 or ER % E_L:
        raise ValueError(f"lora_A rows ({ER}) must be num_lora_experts ({E_L}) x rank")


# ------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------
def fused_linear(segments, out: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """out (M, N) = Σ a_i b_i (+ bias) for up to 3 (a_i (M, K_i), b_i (K_i, N)) segments,
    any strides (views such as ``W.t()``, ``dy.t()`` or a bias ``b[::2]`` are read in place)."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    assert 1 <= len(segments) <= 3
    segs = list(segments)
    while len(segs) < 3:
        segs.append(segs[0])
    (a1, b1), (a2, b2), (a3, b3) = segs
    for a, b in segs:
        assert a.shape[0] == M and b.shape[1] == N and a.shape[1] == b.shape[0]
    upcast, prec = _flags(out.dtype)
    args = (
        a1, b1, a2, b2, a3, b3, bias if bias is not None else out, out,
        M, N, a1.shape[1], a2.shape[1], a3.shape[1],
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        a3.stride(0), a3.stride(1), b3.stride(0), b3.stride(1),
        out.stride(0), out.stride(1),
        bias.stride(0) if bias is not None else 1,  # bias is read through its stride (b[::2])
    )
    flags = dict(HAS_2=len(segments) >= 2, HAS_3=len(segments) >= 3,
                 HAS_BIAS=bias is not None, IS_FP64=out.dtype == torch.float64,
                 UPCAST=upcast, DOT_PREC=prec)
    if _INTERPRET:
        bm, bn, bk, gm, w, s = LINEAR_CONFIG_INTERPRET
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _k.fused_linear_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                     GROUP_M=gm, num_warps=w, num_stages=s)
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
        _linear_kernel(out.dtype == torch.float32)[grid](*args, **flags)
    return out


def route_forward(x, x_lora, lora_A, router, centers, inv_std, num_lora_experts, top_k,
                  scaling, yield_strength, distance_reduce):
    """Launch route_fwd: returns gates, topk_idx, distance, assign, h (acc dtype), hg (x dtype)."""
    T, K = x.shape
    ER = lora_A.shape[0]
    E = router.shape[0]
    E_L = num_lora_experts
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    gates = torch.empty((T, E), dtype=acc, device=dev)
    idx = torch.empty((T, top_k), dtype=torch.long, device=dev)
    dist = torch.empty((T,), dtype=acc, device=dev)
    assign = torch.empty((T,), dtype=torch.long, device=dev)
    h = torch.empty((T, ER), dtype=acc, device=dev)
    hg = torch.empty((T, ER), dtype=x.dtype, device=dev)
    if T == 0:
        return gates, idx, dist, assign, h, hg
    reduce_id = {"max": 0, "mean": 1, "rms": 2}.get(distance_reduce)
    if reduce_id is None:
        raise ValueError(f"distance_reduce={distance_reduce!r} is invalid: expected one of "
                         "max, mean, rms")
    C = 0 if centers is None else centers.shape[0]
    if C:
        centers = centers.contiguous()
        inv_std = inv_std.contiguous()
    else:
        centers = inv_std = x  # dummies, never read
    RP, EP = _pad16(ER), _pad16(E)
    CP = _next_pow2(max(C, 1))
    bt, bk, w, s, hb = route_config(RP, fp32=x.dtype == torch.float32)
    upcast, prec = _flags(x.dtype)
    xl = x if x_lora is None else x_lora
    grid = (triton.cdiv(T, bt), RP // hb)
    _k.route_fwd_kernel[grid](
        x, xl, lora_A, router, centers, inv_std,
        gates, idx, dist, assign, h, hg,
        T, K,
        x.stride(0), xl.stride(0), lora_A.stride(0), router.stride(0),
        centers.stride(0), inv_std.stride(0),
        float(scaling), float(yield_strength),
        ER=ER, R=ER // E_L, E=E, E_L=E_L, TOPK=top_k, C=C, RP=hb, EP=EP, CP=CP,
        HAS_XL=x_lora is not None, REDUCE=reduce_id,
        YIELD=bool(C > 0 and yield_strength != 0.0 and E > E_L),
        UPCAST=upcast, DOT_PREC=prec, BLOCK_T=bt, BLOCK_K=bk, num_warps=w, num_stages=s,
    )
    return gates, idx, dist, assign, h, hg


def forward(
    x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, router: Tensor,
    centers: Optional[Tensor], inv_std: Optional[Tensor],
    num_lora_experts: int, top_k: int, scaling: float, yield_strength: float,
    distance_reduce: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y = [x | hg] [W | B_all]ᵀ + b after the route kernel (see the module docstring)."""
    T, K = x.shape
    N = weight.shape[0]
    ER, E = lora_A.shape[0], router.shape[0]
    _check_sizes(ER, E, num_lora_experts)
    x = x.contiguous()
    x_lora = None if x_lora is None else x_lora.contiguous()
    lora_A, router = lora_A.contiguous(), router.contiguous()
    gates, idx, dist, assign, h, hg = route_forward(
        x, x_lora, lora_A, router, centers, inv_std, num_lora_experts, top_k,
        scaling, yield_strength, distance_reduce)
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T > 0:
        fused_linear([(x, weight.t()), (hg, lora_B.t())], y, bias)
    return y, gates, idx, dist, assign, h


def backward(
    dy: Tensor, dgates: Optional[Tensor], x: Tensor, x_lora: Optional[Tensor],
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, router: Tensor,
    gates: Tensor, h: Tensor, num_lora_experts: int, scaling: float,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
    """Chain rule, per token (g: gates, s: scaling, ER = E_L·r, chunk e = columns of expert e):

    forward:  h = x_lora A_allᵀ,  z = x Rᵀ (+ λ d on identity experts, d constant),
              g = softmax over top-k(z),  hg = s g ⊙ h,  y = x Wᵀ + b + hg B_allᵀ
    ∂y/∂hg:   dhg = dy B_all                          dB_all = dyᵀ hg   (Σ over tokens)
    ∂hg/∂g:   dg_e = s Σ_{c ∈ chunk e} dhg_c h_c  (+ dgates_e, the gates' own upstream grad)
    softmax:  dz_i = g_i (dg_i − Σ_j g_j dg_j)  (zero off the top-k: g_i = 0 there; top-k
              selection and d are piecewise constant)
    ∂hg/∂h:   dh = s g ⊙ dhg                          dA_all = dhᵀ x_lora,  dR = dzᵀ x
    inputs:   dx = dy W + dz R + dh A_all   (dh A_all goes to dx_lora when x_lora is given)

    Kernels: route_bwd computes dhg and the epilogue (dh, dz into one (T, ER+E) buffer, and
    hg recomputed from the saved h); the fused-linear kernel computes dx with the K loop
    extended over [dy | dh | dz], and the weight gradients with transposed strides.
    W and b are frozen: no dW, no db.
    """
    T, K = x.shape
    N = weight.shape[0]
    ER, E = lora_A.shape[0], router.shape[0]
    E_L = num_lora_experts
    _check_sizes(ER, E, E_L)
    dt = x.dtype
    dev = x.device
    if T == 0:
        dx = torch.zeros_like(x)
        dxl = None if x_lora is None else torch.zeros_like(x_lora)
        return (dx, dxl, torch.zeros_like(lora_A), torch.zeros_like(lora_B),
                torch.zeros_like(router))
    dy = dy.contiguous()
    x = x.contiguous()
    lora_A, lora_B, router = lora_A.contiguous(), lora_B.contiguous(), router.contiguous()
    h = h.contiguous()
    gates = gates.contiguous()
    if dgates is not None:
        dgates = dgates.contiguous()

    dhz = torch.empty((T, ER + E), dtype=dt, device=dev)
    hg = torch.empty((T, ER), dtype=dt, device=dev)
    RP, EP = _pad16(ER), _pad16(E)
    bt, bk, w, s, _ = route_config(RP, backward=True, fp32=dt == torch.float32)
    upcast, prec = _flags(dt)
    _k.route_bwd_kernel[(triton.cdiv(T, bt),)](
        dy, lora_B, h, gates, dgates if dgates is not None else gates,
        dhz, hg,
        T, N,
        dy.stride(0), lora_B.stride(0), dhz.stride(0),
        dgates.stride(0) if dgates is not None else 0,
        float(scaling),
        ER=ER, R=ER // E_L, E=E, E_L=E_L, RP=RP, EP=EP, HAS_DG=dgates is not None,
        UPCAST=upcast, DOT_PREC=prec, BLOCK_T=bt, BLOCK_K=bk, num_warps=w, num_stages=s,
    )
    dh, dz = dhz[:, :ER], dhz[:, ER:]

    dx = torch.empty((T, K), dtype=dt, device=dev)
    dB = torch.empty_like(lora_B)
    fused_linear([(dy.t(), hg)], dB)  # (N, ER) = dyᵀ hg
    if x_lora is None:
        fused_linear([(dy, weight), (dh, lora_A), (dz, router)], dx)
        dx_lora = None
        dAR = torch.empty((ER + E, K), dtype=dt, device=dev)
        fused_linear([(dhz.t(), x)], dAR)  # [dA; dR] = [dh | dz]ᵀ x
        # the op boundary forbids outputs that alias each other: dR (E×K, small) is copied
        dA, dR = dAR[:ER], dAR[ER:].clone()
    else:
        x_lora = x_lora.contiguous()
        fused_linear([(dy, weight), (dz, router)], dx)
        dx_lora = torch.empty_like(x_lora)
        fused_linear([(dh, lora_A)], dx_lora)
        dA = torch.empty_like(lora_A)
        dR = torch.empty_like(router)
        fused_linear([(dh.t(), x_lora)], dA)
        fused_linear([(dz.t(), x)], dR)
    return dx, dx_lora, dA, dB, dR
