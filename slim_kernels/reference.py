"""The SLIM layer as ``docs/method.md`` writes it: pure PyTorch, per expert, fp64-capable.

This module *defines the truth*. Every backend (torch, cpp, cuda, triton) is tested against
:func:`slim_reference`. It is written for clarity, not speed: a loop over experts exactly as
``docs/method.md`` §1 states the layer, differentiated by autograd.

Conventions (shared with every backend, see :mod:`slim_kernels.ops.backends`):

* ``x`` is (T, K); ``weight`` (N, K); ``bias`` (N,) or None.
* ``lora_A`` (E_L, r, K) and ``lora_B`` (E_L, N, r): the *masked* factors A'_i, B'_i
  (dynamic merging masks are applied by the layer before the op).
* ``router`` (E, K), E = E_L + E_I; experts 0..E_L-1 are LoRA, E_L..E-1 identity.
* ``centers`` (C, K), ``cluster_vars`` (C, K): the sliding clusters (fp32 buffers), or None
  for "no yielding" (d = 0).
* ``x_lora``: the input of the LoRA A products after LoRA dropout (None: x itself).
* ``distance_shift`` (C,) fp32 or None: the distance is ``r - distance_shift[j*]``; None is
  the constant 1 (the paper's ``d = r - 1``). With ``distance_scale="spread"`` the layer
  passes mu/sigma here and folds 1/sigma into the variances (``docs/method.md`` §2).

Returned: ``y`` (T, N) in x's dtype, ``gates`` (T, E) (zero for unselected experts),
``distance`` (T,) and ``assign`` (T,) int64 (-1 when there are no clusters).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["slim_reference", "reference_cluster_stats", "STATS_EXTRA"]

# columns of a cluster-statistics row after the count and the 2 K per-channel sums: the sum of r
# and the sum of r² (see :func:`reference_cluster_stats`)
STATS_EXTRA = 3


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype for routing maths: fp64 stays fp64, everything else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.no_grad()
def cluster_distance(
    x: Tensor, centers: Tensor, inv_std: Tensor, reduce: str,
    shift: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Out-of-domain distance of each token (``docs/method.md`` §2).

    ``j* = argmin_j ||x - c_j||²`` (ties: lower index; a non-finite value first, §1.5), then
    ``d = reduce_k(|x_k - c_{j*,k}| * inv_std_{j*,k}) - shift_{j*}`` with reduce
    max | mean | rms, where ``inv_std = 1/sqrt(var + eps)`` and ``shift`` (C,) is 1 when None.
    No gradient flows through d.
    Returns (d (T,) in the accumulation dtype, assign (T,) int64).
    """
    acc = _acc_dtype(x)
    xf = x.to(acc)
    c = centers.to(acc)
    s = inv_std.to(acc)
    diff = xf[:, None, :] - c[None, :, :]  # (T, C, K)
    sq = (diff * diff).sum(-1)  # (T, C)
    # first minimum wins; a non-finite sq counts as -inf, so the first such one wins
    assign = torch.where(torch.isfinite(sq), sq, float("-inf")).argmin(dim=1)
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
    if shift is None:
        return r - 1.0, assign
    return r - shift.to(acc)[assign], assign


def topk_softmax(z: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k then softmax over the kept logits (``docs/method.md`` §1.3, §1.5).

    The k largest logits are kept, NaN last (below -inf), ties to the lower index: a stable
    descending sort keeps equal logits in index order, and a second stable sort on "is NaN"
    moves the NaNs behind every number (``torch.sort`` alone puts NaN first). A token with a
    non-finite logit gets NaN for every gate. Returns (dense gates (T, E), zero for unselected
    experts; the selected indices (T, k) int64 in that order).
    """
    nan = z.isnan()
    order = torch.sort(z.masked_fill(nan, float("-inf")), dim=-1, descending=True,
                       stable=True).indices
    order = order.gather(-1, torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1,
                                        stable=True).indices)[:, :k]
    keep = torch.zeros_like(z, dtype=torch.bool).scatter_(1, order, True)
    # times the 0/1 mask rather than masked_fill: a NaN upstream gradient on an unselected
    # expert then reaches dz as 0 · NaN, as every backend's chain rule gives it (§1.5)
    gates = torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1) * keep
    # times NaN rather than a NaN constant: the gradient through these gates is NaN too, as
    # the backends' chain rule gives it (and times 1 on the other tokens)
    bad = ~torch.isfinite(z).all(-1, keepdim=True)
    poison = torch.ones_like(bad, dtype=gates.dtype).masked_fill(bad, float("nan"))
    return gates * poison, order


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
    distance_shift: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = x Wᵀ + b + s · Σ_{i<E_L} g_i B'_i A'_i x (per expert, as docs/method.md §1 writes it)."""
    T, K = x.shape
    E_L = lora_A.shape[0]
    E = router.shape[0]
    acc = _acc_dtype(x)

    z = (x @ router.t()).to(acc)  # logits (T, E)
    if centers is not None:
        # the clusters are fp32 buffers; 1/sqrt(v + eps) is formed in fp32, as the layer does
        inv_std = (cluster_vars.float() + cluster_eps).rsqrt()
        d, assign = cluster_distance(x, centers, inv_std, distance_reduce, distance_shift)
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
def reference_cluster_stats(x: Tensor, centers: Tensor, inv_std: Tensor, assign: Tensor,
                            reduce: str, keep: Optional[Tensor] = None) -> Tensor:
    """The per-cluster statistics of a training forward (``docs/method.md`` §2, "Sliding
    update"), one row per cluster j, in the accumulation dtype:

    ``[n_j, Σ (x_t - c_j) (K columns), Σ (x_t - c_j)² (K columns), Σ r_t, Σ r_t²]``

    over the *kept* tokens t assigned to j (``assign``): ``keep[t]`` (all tokens when None)
    and every entry of x_t finite. ``r_t = reduce_k(|x_t,k - c_j,k| inv_std_j,k)`` is the
    reduced distance before any shift. The sums are taken relative to the centre the token
    was assigned to (shifted data: no cancellation when a channel's mean is far from 0).
    Written as a plain loop over clusters, independently of the backends."""
    acc = _acc_dtype(x)
    T, K = x.shape
    C = centers.shape[0]
    out = torch.zeros(C, 2 * K + STATS_EXTRA, dtype=acc, device=x.device)
    ok = torch.isfinite(x).all(1)
    if keep is not None:
        ok = ok & keep.to(torch.bool)
    xf = x.to(acc)
    for j in range(C):
        sel = ok & (assign == j)
        if not bool(sel.any()):
            continue
        diff = xf[sel] - centers[j].to(acc)
        u = diff.abs() * inv_std[j].to(acc)
        if reduce == "max":
            r = u.amax(dim=1)
        elif reduce == "mean":
            r = u.mean(dim=1)
        else:
            r = (u * u).mean(dim=1).sqrt()
        out[j, 0] = float(sel.sum())
        out[j, 1:K + 1] = diff.sum(0)
        out[j, K + 1:2 * K + 1] = (diff * diff).sum(0)
        out[j, 2 * K + 1] = r.sum()
        out[j, 2 * K + 2] = (r * r).sum()
    return out
