"""Routing and clustering helpers shared by the layer and the backends (production code).

* :func:`topk_softmax`: top-k then softmax over the kept logits (``docs/method.md`` §1.3).
* :func:`cluster_distance`: nearest centre and the out-of-domain distance (§2), with the
  squared distances from one GEMM (``||x||² − 2 x·c + ||c||²``), no (T, C, K) temporary.
* :func:`cluster_batch_stats`: per-cluster count, sum and sum of squares (what data parallel
  all-reduces before the sliding update, §2).
* :func:`merge_masks`: the dynamic-merging row/column keep-masks (§3).

:mod:`slim_kernels.reference` does not use any of these: it is written independently, so that
the tests compare two implementations rather than one with itself.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import DISTANCE_REDUCES

__all__ = ["acc_dtype", "cluster_batch_stats", "cluster_distance", "merge_masks", "topk_softmax"]

def acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype of the routing maths: fp64 stays fp64, everything else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reduce_code(reduce: str) -> int:
    """The integer code of ``distance_reduce`` that the C++, CUDA and Triton kernels take
    (0 max, 1 mean, 2 rms: its index in :data:`slim_kernels.config.DISTANCE_REDUCES`); a
    clear error for an unknown name."""
    if reduce not in DISTANCE_REDUCES:
        raise ValueError(f"distance_reduce={reduce!r} is invalid: expected one of "
                         f"{', '.join(DISTANCE_REDUCES)}")
    return DISTANCE_REDUCES.index(reduce)


def topk_softmax(z: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k then softmax over the kept logits (``docs/method.md`` §1.3, §1.5).

    Order: larger first, NaN last (below -inf), ties (and two NaNs) to the lower index; expert
    i is kept iff ``#{j ranked before i} < k``, so the ranks are a permutation and the k index
    slots a valid prefix of it. A token with any non-finite logit gets NaN for all its gates.
    Returns (dense gates (T, E) with zeros for unselected experts, indices (T, k) int64 of the
    selected experts in rank order).
    """
    T, E = z.shape
    nan = z.isnan()
    zf = z.masked_fill(nan, float("-inf"))
    zi, zj = zf[:, :, None], zf[:, None, :]  # [t, i, j]
    ni, nj = nan[:, :, None], nan[:, None, :]
    lower = torch.ones(E, E, dtype=torch.bool, device=z.device).tril(-1)  # [i, j]: j < i
    # j ranks before i: a number before NaN; else larger first, equal (or both NaN) by index
    before = (ni & ~nj) | ((ni == nj) & ((zj > zi) | ((zj == zi) & lower)))
    rank = before.sum(-1)  # (T, E), a permutation of 0..E-1 per token
    keep = rank < k
    neg_inf = torch.full_like(z, float("-inf"))
    zk = torch.where(keep, z, neg_inf)
    gates = torch.softmax(zk, dim=-1) if T > 0 else torch.zeros_like(z)
    gates = torch.where(keep, gates, torch.zeros_like(gates))
    gates = gates.masked_fill(~torch.isfinite(z).all(-1, keepdim=True), float("nan"))
    order = torch.argsort(rank, dim=-1)[:, :k]
    return gates, order


@torch.no_grad()
def cluster_distance(x: Tensor, centers: Tensor, inv_std: Tensor, reduce: str,
                     shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``j* = argmin_j ||x - c_j||²`` (first minimum wins, a non-finite one first), then
    ``d = reduce_k(|x_k - c_{j*,k}| * inv_std_{j*,k}) - shift_{j*}``, reduce max | mean | rms;
    ``shift`` (C,) is the constant 1 when None (the paper's ``d = r - 1``).
    Returns (d (T,) in the accumulation dtype, assign (T,) int64). No gradient flows."""
    reduce_code(reduce)
    acc = acc_dtype(x)
    xf = x.to(acc)
    c = centers.to(acc)
    sq = (xf * xf).sum(1, keepdim=True) - 2.0 * (xf @ c.t()) + (c * c).sum(1)[None, :]
    # a non-finite squared distance counts as -inf: the first one wins (§1.5)
    assign = sq.masked_fill(~torch.isfinite(sq), float("-inf")).argmin(dim=1)
    u = (xf - c[assign]).abs_().mul_(inv_std.to(acc)[assign])
    if reduce == "max":
        r = u.amax(dim=1) if u.shape[1] > 0 else u.sum(dim=1)
    elif reduce == "mean":
        r = u.mean(dim=1)
    else:
        r = u.square_().mean(dim=1).sqrt_()
    if shift is None:
        return r - 1.0, assign
    return r - shift.to(acc)[assign], assign


@torch.no_grad()
def cluster_batch_stats(x: Tensor, assign: Tensor, num_clusters: int
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-cluster (count, sum, sum of squares) of the tokens assigned to it, in fp64."""
    K = x.shape[-1]
    xd = x.detach().to(torch.float64)
    counts = torch.zeros(num_clusters, dtype=torch.float64, device=x.device)
    sums = torch.zeros(num_clusters, K, dtype=torch.float64, device=x.device)
    sumsq = torch.zeros(num_clusters, K, dtype=torch.float64, device=x.device)
    if x.shape[0] > 0:
        counts.index_add_(0, assign, torch.ones_like(assign, dtype=torch.float64))
        sums.index_add_(0, assign, xd)
        sumsq.index_add_(0, assign, xd * xd)
    return counts, sums, sumsq


def merge_masks(
    num_experts: int, out_features: int, in_features: int, drop: float,
    generator: Optional[torch.Generator] = None, device=None,
) -> Tuple[Tensor, Tensor]:
    """Dynamic-merging masks: per expert, keep-masks of B's rows (E_L, N) and A's columns
    (E_L, K), each dropped independently at ``1 - sqrt(1 - drop)`` so that an entry of B'A'
    survives with probability ``1 - drop``. Returned as float 0/1 tensors."""
    q = 1.0 - (1.0 - drop) ** 0.5
    rows = (torch.rand(num_experts, out_features, generator=generator, device=device) >= q).float()
    cols = (torch.rand(num_experts, in_features, generator=generator, device=device) >= q).float()
    return rows, cols
