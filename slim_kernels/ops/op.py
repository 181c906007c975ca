"""The op boundary: one autograd function over the backend's forward and backward, and one
torch custom op per direction (with fake implementations) that it calls under torch.compile,
so that ``torch.compile(fullgraph=True)`` traces a SLIM layer without graph breaks.

Every backend runs behind them; the ``backend`` argument (resolved by
:mod:`slim_kernels.ops.dispatch` before the call) says which.

Forward outputs: ``y`` (T, N) in x's dtype; ``gates`` (T, E), differentiable (the load
balance loss uses them); ``topk_idx`` (T, k) int64; ``distance`` (T,) and ``assign`` (T,)
int64 (constants); ``h`` (T, E_L·r), the LoRA-A activations saved for backward; ``stats``
(C, 2K + 3) or (0, 2K + 3), the cluster statistics when asked for. gates, distance, h and
stats are fp32, or fp64 when x is fp64 ("acc" dtype below). The distance is
``reduce_k(|x_k - c_{j*,k}| inv_std_{j*,k}) - distance_shift[j*]``, with the constant 1 for a
``distance_shift`` of None (``docs/method.md`` §2).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..routing import reduce_code
from .dispatch import backend_module, resolve_backend

__all__ = ["slim_linear_op", "slim_linear_op_unchecked", "stats_shape", "STATS_EXTRA"]


STATS_EXTRA = 3  # columns of a statistics row after the count and the 2 K sums (Σr, Σr²)


def stats_shape(C: int, K: int) -> Tuple[int, int]:
    """Shape of the cluster statistics the op returns (``docs/method.md`` §2): one row per
    cluster, ``[n, Σ(x-c) (K), Σ(x-c)² (K), Σr, Σr²]``; ``C = 0`` when not asked for."""
    return C, 2 * K + STATS_EXTRA


# -- the two custom ops: what torch.compile sees (one opaque node per direction) -------------
@torch.library.custom_op("slim_kernels::slim_fwd", mutates_args=())
def _slim_fwd(
    x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, router: Tensor,
    centers: Optional[Tensor], inv_std: Optional[Tensor], distance_shift: Optional[Tensor],
    stats_keep: Optional[Tensor], num_lora_experts: int, top_k: int, scaling: float,
    yield_strength: float, distance_reduce: str, cluster_stats: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # contiguous: the fake implementation promises contiguous outputs (inductor checks strides)
    return tuple(t.contiguous() for t in _backend_forward(
        backend, x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std,
        distance_shift, stats_keep, num_lora_experts, top_k, scaling, yield_strength,
        distance_reduce, cluster_stats))


@_slim_fwd.register_fake
def _(x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std, distance_shift,
      stats_keep, num_lora_experts, top_k, scaling, yield_strength, distance_reduce,
      cluster_stats, backend):
    T, K = x.shape
    N = weight.shape[0]
    E = router.shape[0]
    C = centers.shape[0] if cluster_stats and centers is not None else 0
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        x.new_empty((T, N)),
        x.new_empty((T, E), dtype=acc),
        x.new_empty((T, top_k), dtype=torch.long),
        x.new_empty((T,), dtype=acc),
        x.new_empty((T,), dtype=torch.long),
        x.new_empty((T, lora_A.shape[0]), dtype=acc),
        x.new_empty(stats_shape(C, K), dtype=acc),
    )


@torch.library.custom_op("slim_kernels::slim_bwd", mutates_args=())
def _slim_bwd(
    dy: Tensor, dgates: Optional[Tensor], x: Tensor, x_lora: Optional[Tensor],
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, router: Tensor,
    gates: Tensor, h: Tensor, num_lora_experts: int, scaling: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dx_lora, dA, dB, dR = backend_module(backend).backward(
        dy, dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h,
        num_lora_experts, scaling,
    )
    if dx_lora is None:
        dx_lora = x.new_empty((0,))
    return tuple(t.contiguous() for t in (dx, dx_lora, dA, dB, dR))


@_slim_bwd.register_fake
def _(dy, dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h,
      num_lora_experts, scaling, backend):
    return (
        torch.empty_like(x),
        torch.empty_like(x_lora) if x_lora is not None else x.new_empty((0,)),
        torch.empty_like(lora_A),
        torch.empty_like(lora_B),
        torch.empty_like(router),
    )


def _backend_forward(backend, x, x_lora, weight, bias, lora_A, lora_B, router, centers,
                     inv_std, distance_shift, stats_keep, num_lora_experts, top_k, scaling,
                     yield_strength, distance_reduce, cluster_stats):
    return backend_module(backend).forward(
        x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std,
        num_lora_experts, top_k, scaling, yield_strength, distance_reduce, distance_shift,
        cluster_stats, stats_keep)


class _SlimFunction(torch.autograd.Function):
    """Autograd of the op. Eager: the backend's forward and backward are called directly (the
    dispatcher round trip of a Python custom op costs more than a small layer's kernels).
    Under torch.compile: the custom ops above, so dynamo sees one opaque node per direction,
    with its fake implementation. (A ``forward(ctx, ...)`` function: one with a separate
    ``setup_context`` binds its arguments with ``inspect`` at every call, ~60 µs.)

    ``layer_layout``: lora_A and lora_B come as a SlimLinear holds them, (E_L, r, K) and
    (E_L, N, r); the stacked copy of §6 is made here and the gradients go back in that layout,
    so that autograd records one node for the call, not four (each costs microseconds)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std,
                distance_shift, stats_keep, meta):
        # meta: the non-tensor arguments in one tuple (each argument of apply costs ~0.1 µs)
        num_lora_experts, top_k, scaling, yield_strength, distance_reduce, cluster_stats, \
            backend, layer_layout = meta
        ctx.layout = lora_B.shape if layer_layout else None
        if layer_layout:
            E_L, N, r = lora_B.shape
            lora_A = lora_A.reshape(E_L * r, -1)
            lora_B = lora_B.transpose(0, 1).reshape(N, E_L * r)
        args = (x, x_lora, weight, bias, lora_A, lora_B, router, centers, inv_std,
                distance_shift, stats_keep, num_lora_experts, top_k, scaling, yield_strength,
                distance_reduce, cluster_stats)
        if torch.compiler.is_compiling():
            out = _slim_fwd(*args, backend)
        else:
            out = _backend_forward(backend, *args)
        _, gates, idx, d, assign, h, stats = out
        ctx.num_lora_experts, ctx.scaling, ctx.backend = num_lora_experts, scaling, backend
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B, router, gates, h)
        ctx.mark_non_differentiable(idx, d, assign, h, stats)
        ctx.set_materialize_grads(False)
        return tuple(out)

    @staticmethod
    def backward(ctx, dy, dgates, *_):
        x, x_lora, weight, lora_A, lora_B, router, gates, h = ctx.saved_tensors
        if dy is None:
            dy = x.new_zeros((x.shape[0], weight.shape[0]))
        args = (dy.contiguous(), dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h,
                ctx.num_lora_experts, ctx.scaling)
        if torch.compiler.is_compiling():
            dx, dx_lora, dA, dB, dR = _slim_bwd(*args, ctx.backend)
        else:
            dx, dx_lora, dA, dB, dR = backend_module(ctx.backend).backward(*args)
        if ctx.layout is not None:
            E_L, N, r = ctx.layout
            dA, dB = dA.view(E_L, r, -1), dB.view(N, E_L, r).transpose(0, 1)
        return (dx, dx_lora if x_lora is not None else None, None, None, dA, dB, dR,
                None, None, None, None, None)


_NO_FUNCTORCH = (
    "slim_kernels: the SLIM op does not run under torch.func transforms (grad, vjp, vmap, "
    "jacrev, ...): its backward is written by hand for torch.autograd, and a training forward "
    "updates the layer's clusters in place. Use loss.backward() / torch.autograd.grad.")


def slim_linear_op_unchecked(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    router: Tensor, num_lora_experts: int, top_k: int, scaling: float,
    yield_strength: float, distance_reduce: str, centers: Optional[Tensor],
    inv_std: Optional[Tensor], x_lora: Optional[Tensor], backend: str,
    distance_shift: Optional[Tensor], cluster_stats: bool, stats_keep: Optional[Tensor],
    layer_layout: bool = False,
) -> Tuple[Tensor, ...]:
    """:func:`slim_linear_op` without the argument checks, for callers that built and checked
    their arguments themselves (:class:`~slim_kernels.SlimLinear`): 2-D contiguous x, the
    shapes and dtypes the op documents, ``backend`` a name or "auto". With ``layer_layout``,
    lora_A is (E_L, r, K) and lora_B (E_L, N, r), a SlimLinear's parameters, and their
    gradients come back so. Returns all seven outputs ``(y, gates, topk_idx, distance,
    assign, h, stats)``."""
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise RuntimeError(_NO_FUNCTORCH)
    ER = lora_A.shape[0] * lora_A.shape[1] if layer_layout else lora_A.shape[0]
    name = resolve_backend(backend, x, ER, router.shape[0])
    return _SlimFunction.apply(
        x.contiguous(), None if x_lora is None else x_lora.contiguous(), weight, bias,
        lora_A.contiguous(), lora_B.contiguous(), router.contiguous(), centers, inv_std,
        distance_shift, stats_keep,
        (num_lora_experts, top_k, scaling, yield_strength, distance_reduce, cluster_stats, name,
         layer_layout))


def _matrix(name: str, t, dim: int = 2) -> Tensor:
    """``t`` is a tensor with ``dim`` dimensions (checked before its shape is read)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def _check(name: str, t: Optional[Tensor], x: Tensor, shape: Tuple[int, ...], dtype=None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    want = x.dtype if dtype is None else dtype
    if t.dtype != want:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {want} (the dtype of x)"
                        if dtype is None else f"{name} has dtype {t.dtype}, expected {want}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")


def _int(name: str, v) -> int:
    """A Python or numpy integer (not a bool, not a float), as int."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    return int(v)


def _finite(name: str, v) -> float:
    """A finite Python or numpy real number (not a bool), as float (docs/method.md §1.5)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name}={v!r} is invalid: expected a finite number")
    return v


def slim_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    router: Tensor, *, num_lora_experts: int, top_k: int, scaling: float,
    yield_strength: float = 0.0, distance_reduce: str = "rms",
    centers: Optional[Tensor] = None, inv_std: Optional[Tensor] = None,
    x_lora: Optional[Tensor] = None, backend: str = "auto",
    distance_shift: Optional[Tensor] = None, cluster_stats: bool = False,
    stats_keep: Optional[Tensor] = None,
) -> Tuple[Tensor, ...]:
    """The SLIM op on 2-D inputs, in the stacked layout of ``docs/method.md`` §6.

    Args: x (T, K); weight (N, K) frozen; bias (N,) or None, frozen; lora_A = A_all
    (E_L·r, K); lora_B = B_all (N, E_L·r); router (E, K); centers/inv_std (C, K) fp32 or None
    (no yielding); distance_shift (C,) fp32 or None: the distance is
    ``reduce_k(|x_k - c_{j*,k}| inv_std_{j*,k}) - distance_shift[j*]``, None meaning the
    constant 1 (needs centers); x_lora (T, K): x after LoRA dropout, or None. ``scaling`` and
    ``yield_strength`` must be finite (any sign); tensor values are not checked: non-finite
    ones follow docs/method.md §1.5 on every backend.

    ``cluster_stats=True`` (needs centers) also returns the per-cluster statistics of the
    sliding update (``docs/method.md`` §2): a (C, 2K + 3) tensor in the accumulation dtype,
    row j = ``[n_j, Σ(x - c_j), Σ(x - c_j)², Σr, Σr²]`` over the tokens assigned to j that
    are kept: ``stats_keep`` (T,) bool (None: every token) and every entry finite; r is the
    distance before the shift. Deterministic: the same inputs give the same bits.

    Returns (y, gates, topk_idx, distance, assign), and stats last with ``cluster_stats``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (T, K), got shape {tuple(x.shape)}")
    T, K = x.shape
    if K == 0:
        raise ValueError("x has 0 features (shape (T, 0)): the layer needs in_features >= 1")
    num_lora_experts = _int("num_lora_experts", num_lora_experts)
    top_k = _int("top_k", top_k)
    scaling = _finite("scaling", scaling)
    yield_strength = _finite("yield_strength", yield_strength)
    if not isinstance(distance_reduce, str):
        raise TypeError(f"distance_reduce must be a str, got {type(distance_reduce).__name__}")
    reduce_code(distance_reduce)
    N = _matrix("weight", weight).shape[0]
    E = _matrix("router", router).shape[0]
    R = _matrix("lora_A", lora_A).shape[0]
    _matrix("lora_B", lora_B)
    if num_lora_experts < 1 or R == 0 or R % num_lora_experts:
        raise ValueError(f"lora_A rows ({R}) must be num_lora_experts ({num_lora_experts}) "
                         "x rank, with num_lora_experts >= 1 and rank >= 1")
    _check("weight", weight, x, (N, K))
    _check("bias", bias, x, (N,))
    _check("lora_A", lora_A, x, (R, K))
    _check("lora_B", lora_B, x, (N, R))
    _check("router", router, x, (E, K))
    _check("x_lora", x_lora, x, (T, K))
    if E < num_lora_experts:
        raise ValueError(f"router has {E} rows, fewer than num_lora_experts={num_lora_experts}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k={top_k} must be in [1, {E}] (the number of experts)")
    if (centers is None) != (inv_std is None):
        raise ValueError("centers and inv_std must be given together (or both None)")
    if distance_shift is not None and centers is None:
        raise ValueError("distance_shift was given without centers and inv_std: it shifts the "
                         "cluster distance, so it needs the clusters (or pass None)")
    if centers is not None:
        C = _matrix("centers", centers).shape[0]
        _check("centers", centers, x, (C, K), dtype=torch.float32)
        _check("inv_std", inv_std, x, (C, K), dtype=torch.float32)
        if distance_shift is not None:
            _matrix("distance_shift", distance_shift, dim=1)
            _check("distance_shift", distance_shift, x, (C,), dtype=torch.float32)
        if C == 0:
            centers = inv_std = distance_shift = None
    if not isinstance(cluster_stats, (bool, np.bool_)):
        raise TypeError(f"cluster_stats must be a bool, got {type(cluster_stats).__name__}")
    cluster_stats = bool(cluster_stats)
    if cluster_stats and centers is None:
        raise ValueError("cluster_stats=True needs the clusters (centers and inv_std): the "
                         "statistics are per cluster")
    if stats_keep is not None:
        if not cluster_stats:
            raise ValueError("stats_keep was given without cluster_stats=True: it only selects "
                             "the tokens of the cluster statistics")
        _matrix("stats_keep", stats_keep, dim=1)
        _check("stats_keep", stats_keep, x, (T,), dtype=torch.bool)
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("SLIM keeps the base weight and bias frozen: call "
                         "weight.requires_grad_(False) (and bias) before training")
    out = slim_linear_op_unchecked(
        x, weight, bias, lora_A, lora_B, router, num_lora_experts, top_k, scaling,
        yield_strength, distance_reduce, centers, inv_std, x_lora, backend, distance_shift,
        cluster_stats, stats_keep, False)
    y, gates, idx, d, assign, _h, stats = out
    if cluster_stats:
        if stats.shape[0] != C:  # C = 0: no clusters were passed on (centers became None)
            stats = stats.new_zeros(stats_shape(C, K))
        return y, gates, idx, d, assign, stats
    return y, gates, idx, d, assign
