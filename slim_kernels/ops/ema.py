"""The sliding update of the clusters (``docs/method.md`` §2) as one in-place op.

:func:`cluster_ema_` applies a training forward's cluster statistics (the SLIM op's ``stats``,
all-reduced under data parallelism) to the cluster buffers and the routing tensors derived
from them. :func:`cluster_ema_torch` is the definition, in whole-tensor PyTorch ops; on CPU
tensors the C++ extension's ``cluster_ema_`` does the same in one call, since a dozen small
ops cost more than the layer's kernels at small shapes; on CUDA tensors the triton backend's
``cluster_ema_kernel`` does, in one launch, when triton is available (else the torch version).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import _ext

__all__ = ["cluster_ema_", "cluster_ema_torch", "refresh_routing_"]


@torch.no_grad()
def refresh_routing_(variances: Tensor, initialized: Optional[Tensor],
                     distance_mean: Optional[Tensor],
                     distance_var: Optional[Tensor], inv_std: Tensor, shift: Tensor,
                     eps: float) -> None:
    """The routing tensors the op takes, from the cluster state, in place: ``inv_std =
    1/sqrt(v + eps)`` and ``shift = 1`` (the paper's d = r - 1), with a distance scale divided
    by and ``mu`` over ``sigma = sqrt(distance_var + eps)`` (d = (r - mu)/sigma); zeros while
    ``initialized`` is false (d = 0: no yielding; None: the clusters exist)."""
    inv = (variances + eps).rsqrt()
    sh = torch.ones_like(shift)
    if distance_mean is not None:
        sigma = (distance_var + eps).sqrt()
        inv = inv / sigma
        sh = (distance_mean / sigma).expand_as(shift)
    if initialized is not None:
        inv, sh = torch.where(initialized, inv, 0.0), torch.where(initialized, sh, 0.0)
    inv_std.copy_(inv)
    shift.copy_(sh)


@torch.no_grad()
def cluster_ema_torch(centers: Tensor, variances: Tensor, rejected: Tensor, stats: Tensor,
                      momentum: float, distance_mean: Optional[Tensor],
                      distance_var: Optional[Tensor], inv_std: Tensor, shift: Tensor,
                      eps: float) -> None:
    """``stats`` (C, 2K + 3): per cluster j, ``[n, S1 = Σ(x - c_j), S2 = Σ(x - c_j)², R1 = Σr,
    R2 = Σr²]`` (shifted by the centre the tokens were routed to). If every entry is finite,
    for each cluster with n > 0: δ = S1/n, var = max(S2/n - δ², 0), ``c += mom·δ`` (that is
    (1 - mom)·c + mom·mean) and ``v += mom·(var - v)``; with the distance statistics (the
    op's r is r/sigma, sigma² = distance_var + eps; N = Σn, m = R1/N, s = max(R2/N - m², 0)):
    ``mu += mom·(m·sigma - mu)``, ``distance_var += mom·(s·sigma² - distance_var)`` when
    N > 0; then the routing tensors (:func:`refresh_routing_`). Otherwise nothing changes
    and ``rejected`` (an int64 counter) goes up by one. The clusters exist (initialised)."""
    K = centers.shape[1]
    ok = torch.isfinite(stats).all()
    s = torch.where(ok, stats, 0.0)
    n = s[:, :1]
    m = s[:, 1:2 * K + 1] * n.clamp_min(1.0).reciprocal()  # δ | S2/n
    w = ((n > 0) & ok).to(m.dtype) * momentum  # (C, 1)
    delta = m[:, :K]
    var = torch.addcmul(m[:, K:], delta, delta, value=-1.0).clamp_min_(0.0)
    if distance_mean is not None:
        count = n.sum()
        r = s[:, 2 * K + 1:].sum(0) / count.clamp_min(1.0)  # m, R2/N
        var_r = (r[1] - r[0] * r[0]).clamp_min(0.0)
        sigma2 = distance_var + eps
        wr = ((count > 0) & ok).float() * momentum
        distance_mean.lerp_((r[0] * sigma2.sqrt()).float(), wr)
        distance_var.lerp_((var_r * sigma2).float(), wr)
    centers.addcmul_(delta.float(), w.float())
    variances.lerp_(var.float(), w.float())
    rejected.add_(~ok)
    refresh_routing_(variances, None, distance_mean, distance_var, inv_std, shift, eps)


_HAS_CPP: list = []  # whether the extension has cluster_ema_ (looked up once)
_TRITON: list = []  # the triton launcher module, or None when triton cannot run (looked up once)


def _triton_launch():
    if not _TRITON:
        from .dispatch import unavailable_reason
        mod = None
        if unavailable_reason("triton") is None:
            from .backends.triton import launch as mod
        _TRITON.append(mod)
    return _TRITON[0]


def cluster_ema_(centers: Tensor, variances: Tensor, rejected: Tensor, stats: Tensor,
                 momentum: float, distance_mean: Optional[Tensor],
                 distance_var: Optional[Tensor], inv_std: Tensor, shift: Tensor,
                 eps: float) -> None:
    """:func:`cluster_ema_torch`, in one C++ call on CPU tensors when the extension is built,
    in one Triton launch on CUDA tensors when triton runs here."""
    if stats.device.type == "cuda" and _triton_launch() is not None:
        _triton_launch().cluster_ema(centers, variances, rejected, stats.contiguous(), momentum,
                                     distance_mean, distance_var, inv_std, shift, eps)
        return
    if not _HAS_CPP:
        _HAS_CPP.append(_ext.has_op("cluster_ema_"))
    if stats.device.type == "cpu" and _HAS_CPP[0]:
        torch.ops.slim_kernels_C.cluster_ema_(centers, variances, rejected, stats.contiguous(),
                                              float(momentum), distance_mean, distance_var,
                                              inv_std, shift, float(eps))
        return
    cluster_ema_torch(centers, variances, rejected, stats, momentum, distance_mean,
                      distance_var, inv_std, shift, eps)
