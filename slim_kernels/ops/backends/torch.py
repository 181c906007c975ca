"""Backend ``torch``: the stacked (kernel-cut) SLIM op in plain PyTorch, with the backward
written out by hand. It is the fallback on any device and the template every other backend
follows: same arguments, same outputs, same saved tensors (see :mod:`slim_kernels.ops.op`).

Forward (``docs/method.md`` §6), with A_all (E_L·r, K), B_all (N, E_L·r):
    h  = x_lora A_allᵀ                       (T, E_L·r)
    z  = x Rᵀ (+ lam·d on identity experts)   (T, E), d = r − shift[j*] (shift None: 1)
    g  = softmax over top-k(z)                (T, E), zero off the top-k
    hg = s · g ⊙ h   (each r-chunk e scaled by g_e)
    y  = x Wᵀ + b + hg B_allᵀ                 (accumulated into the same output)

Every line is a few whole-tensor ops (no per-expert loop, no host sync): a small layer's call
costs the launches, so the op count is kept low (``docs/method.md`` §6, "Cost of a call").
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...routing import acc_dtype, cluster_route, topk_softmax
from ..op import stats_shape

NAME = "torch"


def unavailable_reason() -> Optional[str]:
    return None


def unsupported_reason(x: Tensor, lora_cols: int = 0, num_experts: int = 0) -> Optional[str]:
    return None


def route(
    x: Tensor, x_lora: Optional[Tensor], lora_A: Tensor, router: Tensor,
    centers: Optional[Tensor], inv_std: Optional[Tensor],
    num_lora_experts: int, top_k: int, yield_strength: float, distance_reduce: str,
    distance_shift: Optional[Tensor] = None, cluster_stats: bool = False,
    stats_keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """h, gates, top-k indices, distance, assign, stats (all but the indices in the
    accumulation dtype)."""
    T, K = x.shape
    acc = acc_dtype(x)
    xa = x if x_lora is None else x_lora
    h = (xa @ lora_A.t()).to(acc)
    z = (x @ router.t()).to(acc)
    stats = None
    if centers is not None:
        d, assign, stats = cluster_route(x, centers, inv_std, distance_reduce, distance_shift,
                                         cluster_stats, stats_keep)
        if yield_strength != 0.0 and router.shape[0] > num_lora_experts:
            z[:, num_lora_experts:].add_(d[:, None], alpha=yield_strength)
    else:
        d = x.new_zeros(T, dtype=acc)
        assign = x.new_full((T,), -1, dtype=torch.long)
    if stats is None:
        stats = x.new_zeros(stats_shape(0, K), dtype=acc)
    gates, idx = topk_softmax(z, top_k)
    return h, gates, idx, d, assign, stats


def forward(
    x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, router: Tensor,
    centers: Optional[Tensor], inv_std: Optional[Tensor],
    num_lora_experts: int, top_k: int, scaling: float, yield_strength: float,
    distance_reduce: str, distance_shift: Optional[Tensor] = None,
    cluster_stats: bool = False, stats_keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T = x.shape[0]
    E_L = num_lora_experts
    r = lora_A.shape[0] // E_L
    h, gates, idx, d, assign, stats = route(
        x, x_lora, lora_A, router, centers, inv_std, E_L, top_k, yield_strength,
        distance_reduce, distance_shift, cluster_stats, stats_keep,
    )
    # hg = s g ⊙ h, each expert's r columns times its gate
    hg = (h.view(T, E_L, r) * (gates[:, :E_L, None] * scaling)).view(T, E_L * r).to(x.dtype)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y.addmm_(hg, lora_B.t())
    return y, gates, idx, d, assign, h, stats


def backward(
    dy: Tensor, dgates: Optional[Tensor], x: Tensor, x_lora: Optional[Tensor],
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, router: Tensor,
    gates: Tensor, h: Tensor, num_lora_experts: int, scaling: float,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
    """Chain rule (g: gates, s: scaling, all per token):

    dhg = dy B_all                      dB_all = dyᵀ hg
    dg_e = s Σ_{j in chunk e} dhg_j h_j  (+ dgates_e, the gates' own upstream grad)
    dz_i = g_i (dg_i − Σ_j g_j dg_j)     (softmax over the kept experts; 0 off the top-k)
    dh = s g ⊙ dhg                      dA_all = dhᵀ x_lora      dR = dzᵀ x
    dx = dy W + dz R + dh A_all          (dh A_all goes to x_lora when dropout split it)
    """
    dt = x.dtype
    T = x.shape[0]
    E_L = num_lora_experts
    r = lora_A.shape[0] // E_L
    acc = acc_dtype(x)
    g = gates.to(acc)
    gs = g[:, :E_L, None] * scaling  # (T, E_L, 1): s g_e
    h3 = h.to(acc).view(T, E_L, r)
    dhg = (dy @ lora_B).to(acc).view(T, E_L, r)
    dB = dy.t() @ (h3 * gs).view(T, E_L * r).to(dt)
    dg = torch.zeros_like(g) if dgates is None else dgates.to(acc, copy=True)
    dg[:, :E_L].add_((dhg * h3).sum(-1), alpha=scaling)
    dz = (dg - (g * dg).sum(-1, keepdim=True)).mul_(g).to(dt)
    dh = (dhg * gs).view(T, E_L * r).to(dt)
    xa = x if x_lora is None else x_lora
    dA = dh.t() @ xa
    dR = dz.t() @ x
    dx = dy @ weight
    dx.addmm_(dz, router)
    if x_lora is None:
        dx.addmm_(dh, lora_A)
        dx_lora = None
    else:
        dx_lora = dh @ lora_A
    return dx, dx_lora, dA, dB, dR
