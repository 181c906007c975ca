"""The SLIM layer as the spec writes it: pure PyTorch, per expert, fp64-capable.

This module *defines the truth*. Every backend (torch, cpp, cuda, triton) is tested against
:func:`slim_reference`. It is written for clarity, not speed: a loop over experts exactly as
SLIM_SPEC.md section 1 states the layer, differentiated by autograd.

Conventions (shared with every backend, see :mod:`slim_kernels.ops`):

* ``x`` is (T, K); ``weight`` (N, K); ``bias`` (N,) or None.
* ``lora_A`` (E_L, r, K) and ``lora_B`` (E_L, N, r): the *masked* factors A'_i, B'_i
  (dynamic merging masks are applied by the layer before the op).
* ``router`` (E, K), E = E_L + E_I; experts 0..E_L-1 are LoRA, E_L..E-1 identity.
* ``centers`` (C, K), ``cluster_vars`` (C, K): the sliding clusters (fp32 buffers), or None
  for "no yielding" (d = 0).
* ``x_lora``: the input of the LoRA A products after LoRA dropout (None: x itself).

Returned: ``y`` (T, N) in x's dtype, ``gates`` (T, E) (zero for unselected experts),
``distance`` (T,) and ``assign`` (T,) int64 (-1 when there are no clusters).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "cluster_distance",
    "topk_softmax",
    "slim_reference",
    "cluster_batch_stats",
    "merge_masks",
]


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype for routing maths: fp64 stays fp64, everything else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def cluster_distance(
    x: Tensor, centers: Tensor, inv_std: Tensor, reduce: str
) -> Tuple[Tensor, Tensor]:
    """Out-of-domain distance of each token (spec section 2).

    ``j* = argmin_j ||x - c_j||²`` (ties: lower index), then
    ``d = reduce_k(|x_k - c_{j*,k}| * inv_std_{j*,k}) - 1`` with reduce max | mean | rms,
    where ``inv_std = 1/sqrt(var + eps)``. No gradient flows through d.
    Returns (d (T,) in the accumulation dtype, assign (T,) int64).
    """
    acc = _acc_dtype(x)
    xf = x.to(acc)
    c = centers.to(acc)
    s = inv_std.to(acc)
    diff = xf[:, None, :] - c[None, :, :]  # (T, C, K)
    sq = (diff * diff).sum(-1)  # (T, C)
    assign = sq.argmin(dim=1)  # first minimum wins
    u = diff.gather(1, assign[:, None, None].expand(-1, 1, x.shape[1])).squeeze(1).abs()
    u = u * s[assign]
    if reduce == "max":
        r = u.amax(dim=1) if u.shape[1] > 0 else u.sum(dim=1)
    elif reduce == "mean":
        r = u.mean(dim=1)
    elif reduce == "rms":
        r = (u * u).mean(dim=1).sqrt()
    else:
        raise ValueError(f"distance_reduce={reduce!r} is invalid: expected one of max, mean, rms")
    return r - 1.0, assign


def topk_softmax(z: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k then softmax over the kept logits (spec section 1, step 3).

    Ties: the lower index wins. Expert i is kept iff
    ``#{j: z_j > z_i} + #{j < i: z_j == z_i} < k``.
    Returns (dense gates (T, E) with zeros for unselected experts, indices (T, k) int64 of the
    selected experts in decreasing gate order, ties by lower index).
    """
    T, E = z.shape
    zi = z[:, :, None]  # i
    zj = z[:, None, :]  # j
    lower = torch.ones(E, E, dtype=torch.bool, device=z.device).tril(-1)  # [i, j]: j < i
    rank = (zj > zi).sum(-1) + ((zj == zi) & lower).sum(-1)  # (T, E)
    keep = rank < k
    neg_inf = torch.full_like(z, float("-inf"))
    zk = torch.where(keep, z, neg_inf)
    gates = torch.softmax(zk, dim=-1) if T > 0 else torch.zeros_like(z)
    gates = torch.where(keep, gates, torch.zeros_like(gates))
    # selected indices ordered by rank (rank is a permutation of 0..E-1 per token)
    order = torch.argsort(rank, dim=-1)[:, :k]
    return gates, order


def slim_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    router: Tensor,
    *,
    top_k: int,
    scaling: float,
    yield_strength: float = 0.0,
    distance_reduce: str = "rms",
    centers: Optional[Tensor] = None,
    cluster_vars: Optional[Tensor] = None,
    cluster_eps: float = 1e-5,
    x_lora: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = x Wᵀ + b + s · Σ_{i<E_L} g_i B'_i A'_i x (per expert, as the spec writes it)."""
    T, K = x.shape
    E_L = lora_A.shape[0]
    E = router.shape[0]
    acc = _acc_dtype(x)

    z = (x @ router.t()).to(acc)  # logits (T, E)
    if centers is not None:
        # the clusters are fp32 buffers; 1/sqrt(v + eps) is formed in fp32, as the layer does
        inv_std = (cluster_vars.float() + cluster_eps).rsqrt()
        d, assign = cluster_distance(x, centers, inv_std, distance_reduce)
        if yield_strength != 0.0 and E > E_L:
            bump = torch.zeros(E, dtype=acc, device=x.device)
            bump[E_L:] = 1.0
            z = z + yield_strength * d[:, None] * bump  # identity experts only, d is a constant
    else:
        d = torch.zeros(T, dtype=acc, device=x.device)
        assign = torch.full((T,), -1, dtype=torch.long, device=x.device)

    gates, _ = topk_softmax(z, top_k)

    y = torch.nn.functional.linear(x, weight, bias)
    xa = x if x_lora is None else x_lora
    for i in range(E_L):
        delta = (xa @ lora_A[i].t()) @ lora_B[i].t()  # B'_i A'_i x
        y = y + (scaling * gates[:, i : i + 1] * delta.to(acc)).to(x.dtype)
    return y, gates, d, assign


@torch.no_grad()
def cluster_batch_stats(x: Tensor, assign: Tensor, num_clusters: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-cluster (count, sum, sum of squares) of the tokens assigned to it, in fp64.

    These are what data parallel all-reduces before the EMA update (spec section 2).
    """
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
    """Dynamic-merging masks (spec section 3): per expert, keep-masks of B's rows (E_L, N)
    and A's columns (E_L, K), each dropped independently at ``1 - sqrt(1 - drop)`` so that
    an entry of B'A' survives with probability ``1 - drop``. Returned as float 0/1 tensors.
    """
    q = 1.0 - (1.0 - drop) ** 0.5
    rows = (torch.rand(num_experts, out_features, generator=generator, device=device) >= q).float()
    cols = (torch.rand(num_experts, in_features, generator=generator, device=device) >= q).float()
    return rows, cols
