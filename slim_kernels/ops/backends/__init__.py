"""The backends of the SLIM op, as peers: ``torch``, ``cpp``, ``cuda`` and ``triton``.

Every backend is a module (or package) with this interface, the one the op boundary
(:mod:`slim_kernels.ops.op`) and the dispatch point (:mod:`slim_kernels.ops.dispatch`) use:

``NAME: str``
    The backend's name, as ``SlimConfig(backend=...)`` spells it.
``unavailable_reason() -> Optional[str]``
    None when the backend can run in this process (on some device), else why not.
``unsupported_reason(x, lora_cols, num_experts) -> Optional[str]``
    None when it can run a call on a tensor like ``x`` (its device and dtype matter, not its
    values) with E_L·r = ``lora_cols`` and E = ``num_experts``, else why not.
``forward(x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std,
num_lora_experts, top_k, scaling, yield_strength, distance_reduce, distance_shift=None,
cluster_stats=False, stats_keep=None)``
    -> ``(y, gates, topk_idx, distance, assign, h, stats)``. The distance of a token assigned
    to cluster j* is ``reduce_k(|x_k - c_{j*,k}| inv_std_{j*,k}) - distance_shift[j*]``, with
    the constant 1 for ``distance_shift=None`` (``docs/method.md`` §2). ``stats``: with
    ``cluster_stats`` and clusters, the (C, 2K + 3) statistics of the sliding update in the
    accumulation dtype, row j = ``[n_j, Σ(x_t - c_j), Σ(x_t - c_j)², Σ r_t, Σ r_t²]`` over
    the tokens t with ``assign[t] == j`` that are kept (``stats_keep[t]``, all when None, and
    every entry of x_t finite), where ``r_t = reduce_k(|x_t,k - c_j,k| inv_std_j,k)`` is the
    distance before the shift; else an empty (0, 2K + 3) tensor. Computed in the route pass, summed in an order that
    does not depend on the thread count or schedule (the same bits every run), no host
    sync. :func:`slim_kernels.reference.reference_cluster_stats` is the definition.
``backward(dy, dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h,
num_lora_experts, scaling)``
    -> ``(dx, dx_lora or None, dA_all, dB_all, dRouter)``.

Shapes, in the stacked layout of ``docs/method.md`` §6: x, x_lora (T, K); weight (N, K);
bias (N,) or None; lora_A = A_all (E_L·r, K); lora_B = B_all (N, E_L·r); router (E, K);
centers, inv_std (C, K) fp32 or None (no yielding); distance_shift (C,) fp32 or None (None
whenever centers is None); stats_keep (T,) bool or None. Outputs: y (T, N) in x's dtype; gates
(T, E), distance (T,) and h (T, E_L·r) in the accumulation dtype (fp64 for fp64 x, else
fp32); topk_idx (T, k) and assign (T,) int64 (assign = -1 without clusters).

Tensor arguments may be any strided views: the op boundary passes x, x_lora, lora_A, lora_B,
router and dy contiguous, but weight, bias, centers, inv_std, distance_shift and stats_keep as the
caller gave them (distance_shift may have stride 0: the layer passes one value expanded) and
dgates as autograd hands it, so every backend reads those through their strides (the
conformance suite, tests/ops, checks each in turn, through the op and into each backend).
"""
from typing import Optional, Protocol, Tuple

from torch import Tensor

NAMES = ("triton", "cuda", "cpp", "torch")  # the order ``auto`` prefers on a device that has them


class Backend(Protocol):
    """The interface above, for type checkers."""

    NAME: str

    def unavailable_reason(self) -> Optional[str]: ...

    def unsupported_reason(self, x: Tensor, lora_cols: int = 0,
                           num_experts: int = 0) -> Optional[str]: ...

    def forward(self, x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std,
                num_lora_experts, top_k, scaling, yield_strength, distance_reduce,
                distance_shift=None, cluster_stats=False, stats_keep=None
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]: ...

    def backward(self, dy, dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h,
                 num_lora_experts, scaling
                 ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]: ...
