"""Routing and clustering helpers shared by the layer and the backends (production code).

* :func:`topk_softmax`: top-k then softmax over the kept logits (``docs/method.md`` §1.3).
* :func:`cluster_route`: nearest centre and the out-of-domain distance (§2), with the
  squared distances from one GEMM (``||c||² − 2 x·c``), no (T, C, K) temporary, and the
  per-cluster statistics of the sliding update (what data parallel all-reduces, §2).
* :func:`merge_masks`: the dynamic-merging row/column keep-masks (§3).

:mod:`slim_kernels.reference` does not use any of these: it is written independently, so that
the tests compare two implementations rather than one with itself.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import DISTANCE_REDUCES

__all__ = ["acc_dtype", "cluster_distance", "cluster_route", "cluster_sums", "merge_masks",
           "reduce_code", "topk_softmax"]

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

    Order: larger first, NaN last (below -inf), ties (and two NaNs) to the lower index: one
    stable ascending sort of ``-z`` gives exactly that (an ascending sort puts NaN last, and
    ``-(-inf)`` after every number). A token with any non-finite logit gets NaN for all its
    gates. Returns (dense gates (T, E) with zeros for unselected experts, indices (T, k) int64
    of the selected experts in rank order)."""
    order = torch.sort(z.neg(), dim=1, stable=True).indices[:, :k]
    kept = torch.softmax(z.gather(1, order), dim=1)
    # + 0 on a finite row, + NaN on a row with a non-finite logit (NaN * 0 and inf * 0)
    poison = z.mul(0.0).sum(1, keepdim=True)
    gates = torch.zeros_like(z).scatter_(1, order, kept).add_(poison)
    return gates, order


@torch.no_grad()
def cluster_route(x: Tensor, centers: Tensor, inv_std: Tensor, reduce: str,
                  shift: Optional[Tensor] = None, stats: bool = False,
                  keep: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``j* = argmin_j ||x - c_j||²`` (first minimum wins, a non-finite one first), then
    ``d = reduce_k(|x_k - c_{j*,k}| * inv_std_{j*,k}) - shift_{j*}``, reduce max | mean | rms;
    ``shift`` (C,) is the constant 1 when None (the paper's ``d = r - 1``).

    With ``stats``, also the per-cluster statistics of the sliding update
    (:func:`slim_kernels.reference.reference_cluster_stats` defines them): counts, sums and
    sums of squares of ``x - c_{j*}`` and of r over the kept tokens (``keep`` and finite),
    summed into their clusters' rows by :func:`cluster_sums` (deterministic on every device).
    Returns (d (T,) in the accumulation
    dtype, assign (T,) int64, stats (C, 2K + 3) or None). No gradient flows."""
    code = reduce_code(reduce)
    acc = acc_dtype(x)
    xf = x.to(acc)
    c = centers.to(acc)
    # ||x - c_j||² - ||x||²: the argmin needs no ||x||² (a non-finite x is non-finite for all j)
    sq = torch.addmm(c.square().sum(1)[None, :], xf, c.t(), alpha=-2.0)
    assign = sq.nan_to_num_(nan=float("-inf"), posinf=float("-inf"),
                                neginf=float("-inf")).argmin(dim=1)
    diff = xf - c[assign]
    u = diff * inv_std.to(acc)[assign]
    if code == 0:
        r = u.abs_().amax(dim=1) if u.shape[1] > 0 else u.sum(dim=1)
    elif code == 1:
        r = u.abs_().mean(dim=1)
    else:
        r = u.square_().mean(dim=1).sqrt_()
    d = r - (1.0 if shift is None else shift.to(acc)[assign])
    if not stats:
        return d, assign, None
    ok = torch.isfinite(xf).all(1)
    if keep is not None:
        ok = ok & keep
    feats = torch.cat([torch.ones_like(r)[:, None], diff, diff.square(), r[:, None],
                       r.square()[:, None]], dim=1)
    rows = assign.masked_fill(~ok, centers.shape[0])  # the tokens left out: a spare row
    return d, assign, cluster_sums(feats, rows, centers.shape[0], x.device.type == "cpu")


def cluster_sums(feats: Tensor, rows: Tensor, C: int, scatter: bool) -> Tensor:
    """(C, F): row j is the sum of the rows of ``feats`` (T, F) with ``rows == j``; rows equal
    to C are left out. A non-finite entry reaches only its own cluster's row (never the
    others through 0 · NaN). ``scatter``: an ``index_add_`` (deterministic on the CPU);
    else a one-hot GEMM over the finite part, with the rows that received a non-finite entry
    set to NaN afterwards (deterministic on every device, no atomics)."""
    if scatter:
        return feats.new_zeros(C + 1, feats.shape[1]).index_add_(0, rows, feats)[:C]
    fin = torch.isfinite(feats)
    onehot = torch.nn.functional.one_hot(rows, C + 1)[:, :C].to(feats.dtype).t()  # (C, T)
    out = onehot @ torch.where(fin, feats, 0.0)
    bad = (onehot @ (~fin.all(1, keepdim=True)).to(feats.dtype)) > 0  # (C, 1)
    return out.masked_fill(bad, float("nan"))


def cluster_distance(x: Tensor, centers: Tensor, inv_std: Tensor, reduce: str,
                     shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(d, assign) of :func:`cluster_route` (no statistics)."""
    d, assign, _ = cluster_route(x, centers, inv_std, reduce, shift)
    return d, assign


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
