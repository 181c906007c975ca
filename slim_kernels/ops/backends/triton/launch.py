"""Backend ``triton``: the SLIM kernels of ``docs/method.md`` §6, their launchers, and the
designs that combine them with cuBLAS.

Same interface as :mod:`slim_kernels.ops.backends.torch` (``NAME``, ``unavailable_reason``,
``unsupported_reason``, ``forward``, ``backward``); the op boundary
(:mod:`slim_kernels.ops.op`, torch custom ops ``slim_kernels::slim_fwd`` / ``slim_bwd`` with
autograd and fake implementations) calls them, so ``torch.compile(fullgraph=True)`` sees one
opaque op per direction.

Designs (``docs/benchmarks.md``, "Designs"). Every design runs the Triton route kernels; they
differ in who runs the big GEMMs:

* ``fused``: the Triton fused linear, ``y = [x | hg] [W | B_all]ᵀ + b`` in one kernel, and the
  same kernel for dx and the weight gradients (the design the project set out to build);
* ``accumulate``: cuBLAS, ``y = hg B_allᵀ + b`` then ``y += x Wᵀ`` (beta = 1: cuBLAS reads y in
  its epilogue); backward ``dx = [dh | dz] [A_all; R]`` then ``dx += dy W``, ``dB_all = dyᵀ hg``
  and ``[dA_all; dR] = [dh | dz]ᵀ x`` on cuBLAS;
* ``extended`` (forward only; its backward is accumulate's): the route kernel writes
  ``[x | hg]`` into one (T, K + E_L·r) buffer and one cuBLAS GEMM against ``[W | B_all]``
  computes y, the bias in its epilogue. ``[W | B_all]`` is a second copy of W, kept per weight
  (:func:`extended_weight`): never picked by the dispatch, only when asked for.

Which design runs: :data:`DESIGN` (``SLIM_KERNELS_DESIGN``, read at import; set the attribute
to switch in a running process) when set, else the GPU's configuration file per dtype family
and shape bucket (:func:`tuning.design_choice`: ``tuning.DEFAULT_DESIGN`` while unmeasured),
and ``fused`` under the interpreter. Forward and backward choose independently: backward reads
only what every design's forward saves (gates, h).

Launches per call (T tokens, K in, N out, ER = E_L·r, E experts, ``fused`` design):

forward   route_fwd  (T/BLOCK_T × h blocks × S) [h | z] = x [A_all; R]ᵀ, clusters, top-k, hg
          route_epilogue (T/BLOCK_T × h blocks) when the K loop is split (S > 1): the sum of
                                            the S partials, then the same epilogue
          fused_linear (T×N tiles)          y = [x | hg] [W | B_all]ᵀ + b
          cluster_stats ((K/BLOCK_K + 1) × G) with cluster_stats=True: the (C, 2K + 3)
                                            statistics, a second pass over x (+ the sum of
                                            the G group partials when G > 1)
backward  route_bwd  (T/BLOCK_T programs)   dhg = dy B_all -> dhz = [dh | dz | 0], hg
                                            (+ dB_all = dyᵀ hg: partials or atomics)
          fused_linear (T×K tiles)          dx = [dy | dh | dz] [W ; A_all ; R]
          fused_linear (N×ER tiles × split) dB_all = dyᵀ hg   (when not in route_bwd)
          fused_linear ((ER+E)×K × split)   [dA_all; dR] = [dh | dz]ᵀ x
(with x_lora: dx = [dy | dz][W; R], dx_lora = dh A_all, dA = dhᵀ x_lora, dR = dzᵀ x).
dhz's rows are padded to a multiple of 16 elements (zeros), so that every GEMM operand has
16-byte aligned rows (Triton falls back to 2-byte loads otherwise; the AOT test checks).

Every launch runs under ``torch.cuda.device(x.device)``. The fused linear's block
configuration: :mod:`.tuning` (autotuned per power-of-two bucket of the sizes, or the GPU's
configuration file under CUDA graphs and with ``SLIM_KERNELS_AUTOTUNE=0``).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ....routing import reduce_code
from ...op import stats_shape
from .tuning import (DECODE_M, DESIGNS_FORWARD, LINEAR_CONFIG_INTERPRET, autotune_enabled,
                     db_mode, design_choice, exact_key, family, linear_configs, load_configs,
                     route_split, split_k, stats_groups, table_config, tune_key)

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
# the design every call runs, when set: fused | accumulate | extended (None or "auto": the
# configuration file's choice). Read once, here; set the attribute to switch in a running
# process (the benchmark's design providers do).
DESIGN: Optional[str] = os.environ.get("SLIM_KERNELS_DESIGN", "").strip().lower() or None


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


def route_config(rp: int, interpret: Optional[bool] = None, backward: bool = False,
                 fp32: bool = False):
    """(BLOCK_T, BLOCK_K, num_warps, num_stages, H_BLOCK) of the route kernels for padded
    E_L·r = rp. H_BLOCK is the width of h columns one program accumulates. ``interpret``
    None: whether the interpreter runs.

    Forward, bf16/fp16: 128-token blocks (half the L2 re-reads of A_all, R and the centres
    that 64-token blocks cost; the K loop is split when that leaves SMs idle:
    :func:`tuning.route_split`), 32 channels a step (with 64, the tf32x3 cluster dots, each
    fp32 operand split in two tf32 halves, spilled ~1 KB on sm_90 at 64 and 128 tokens; at 32,
    230-250 registers), 2 pipeline stages (with 3, 24-32 bytes spilled on sm_80 with triton
    3.6). fp32 inputs use ieee (FMA) dots, whose operands live in registers: 32 tokens x 16
    channels (64 x 64 spilled 20 KB; 32 x 32 with the cluster dots 12-40 bytes on sm_90).
    h is column-local after routing, so wide h is split over a second grid axis in blocks of
    128 (each block recomputes the E + C routing columns; at rp = 1024 a single accumulator
    spilled ~15 KB). Backward needs every column of a token for dg, so it keeps rp whole and
    shrinks BLOCK_T instead; with 4 warps at rp = 128 ptxas spilled: 8 warps."""
    if _INTERPRET if interpret is None else interpret:
        return (32, 16, 4, 1, min(rp, 64)) if not backward else (32, 32, 4, 1, rp)
    if not backward:
        return (32, 16, 8, 2, min(rp, 64)) if fp32 else (128, 32, 8, 2, min(rp, 128))
    if fp32:
        return (32, 32, 8, 2, rp) if rp <= 128 else (16, 16, 8, 2, rp)
    if rp <= 128:
        return 64, 64, 8, 3, rp
    if rp <= 256:
        return 32, 64, 4, 3, rp
    if rp <= 512:
        return 16, 64, 8, 2, rp
    return 16, 32, 8, 2, rp


def route_epilogue_config(interpret: Optional[bool] = None):
    """(BLOCK_T, BLOCK_K, num_warps) of route forward's second launch when the K loop is
    split: 32 tokens, 4 warps (at 128 tokens and 8 warps the 128-column h sum, top-k and the
    term-by-term rms of a non-finite block spilled 56-96 bytes on sm_90)."""
    return (32, 16, 4) if (_INTERPRET if interpret is None else interpret) else (32, 32, 4)


def dhz_width(ER: int, E: int) -> int:
    """Row length of backward's [dh | dz | 0] buffer: E_L·r + E rounded up to 16 elements."""
    return -(-(ER + E) // 16) * 16


_linear_autotuned = {}
_TUNED_HERE: Dict[tuple, tuple] = {}  # what autotuning picked in this process (arch, key...)


def _triton_config(cfg):
    bm, bn, bk, gm, w, s = cfg
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_warps=w, num_stages=s)


def _linear_kernel(fp32: bool):
    """The autotuned fused-linear kernel on GPU, one autotuner per dtype family, keyed on
    the power-of-two buckets KEY_M/N/K (not the sizes: a new T does not re-tune)."""
    if fp32 not in _linear_autotuned:
        big = [_triton_config(c) for c in linear_configs(fp32, decode=False)]
        small = [_triton_config(c) for c in linear_configs(fp32, decode=True)]

        def prune(configs, named_args, **kwargs):
            return small if named_args["KEY_M"] <= DECODE_M else big

        _linear_autotuned[fp32] = triton.autotune(
            configs=big + small,
            key=["KEY_M", "KEY_N", "KEY_K", "HAS_2", "HAS_3", "SPLIT_K"],
            prune_configs_by={"early_config_prune": prune},
        )(_k.fused_linear_kernel)
    return _linear_autotuned[fp32]


def _device_arch(dev: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(dev)
    return f"sm_{major}{minor}"


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev)


_SMS: Dict[int, int] = {}
_CONFIGS: Dict[object, Dict] = {}  # device index -> its parsed configuration file
_DESIGNS: Dict[tuple, str] = {}  # (device index, direction, fp32, bucket key) -> design


def _dev_index(dev: torch.device):
    if dev.type != "cuda":
        return dev.type
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _num_sms(dev: torch.device) -> int:
    if _INTERPRET or dev.type != "cuda":
        return 4
    i = _dev_index(dev)
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def device_configs(dev: torch.device) -> Dict:
    """The parsed configuration file of ``dev``'s GPU (:func:`tuning.load_configs`), loaded
    once per device (:func:`reset_configs` forgets it)."""
    i = _dev_index(dev)
    if i not in _CONFIGS:
        _CONFIGS[i] = load_configs(_device_arch(dev), _device_name(dev))
    return _CONFIGS[i]


def reset_configs() -> None:
    """Forget the loaded configuration files and design choices (after a new file was
    written, or SLIM_KERNELS_CONFIG_DIR changed)."""
    _CONFIGS.clear()
    _DESIGNS.clear()


def _capturing(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def linear_plan(dev: torch.device, fp32: bool, key, has_2: bool, has_3: bool, split: int):
    """("interpret" | "table" | "autotune", config or None) for one fused-linear launch: the
    interpreter's one configuration; the GPU's configuration file when
    SLIM_KERNELS_AUTOTUNE=0 or under CUDA-graph capture (what autotuning picked earlier in
    this process first, if it did); autotuning otherwise."""
    if _INTERPRET:
        return "interpret", LINEAR_CONFIG_INTERPRET
    if autotune_enabled() and not _capturing(dev):
        return "autotune", None
    arch = _device_arch(dev)
    cfg = _TUNED_HERE.get((arch, fp32, key, has_2, has_3, split))
    return "table", cfg or table_config(device_configs(dev), fp32, key, has_2, has_3, split)


def tuned_here():
    """What autotuning picked in this process, as rows for a configuration file's "exact"
    entries: (arch, family, exact key, config)."""
    return [(arch, family(fp32), exact_key(key, h2, h3, sp), cfg)
            for (arch, fp32, key, h2, h3, sp), cfg in sorted(_TUNED_HERE.items(), key=str)]


def design_for(direction: str, x: Tensor, K: int, N: int) -> str:
    """The design that runs ``direction`` ("forward" | "backward") of a call on x (T, K)
    with N outputs: :data:`DESIGN` when set (backward runs accumulate's for "extended"), else
    ``fused`` under the interpreter, else the GPU's configuration file (cached per bucket)."""
    forced = DESIGN
    if forced is not None and forced != "auto":
        if forced not in DESIGNS_FORWARD:
            raise ValueError(f"SLIM_KERNELS_DESIGN / launch.DESIGN = {forced!r}: expected one "
                             f"of auto, {', '.join(DESIGNS_FORWARD)}")
        return "accumulate" if (direction == "backward" and forced == "extended") else forced
    if _INTERPRET or x.device.type == "cpu":
        return "fused"
    T = x.shape[0]
    fp32 = x.dtype == torch.float32
    key = (_dev_index(x.device), direction, fp32, T <= DECODE_M, K, N)
    name = _DESIGNS.get(key)
    if name is None:
        name = _DESIGNS[key] = design_choice(device_configs(x.device), direction, fp32, T, K,
                                             N)[0]
    return name


def _device_guard(t: Tensor):
    """Triton launches on the *current* CUDA device: make it t's for the launch (a model
    spread over GPUs with device_map calls layers on several)."""
    if t.device.type == "cpu":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


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
def fused_linear(segments, out: Tensor, bias: Optional[Tensor] = None,
                 split: Optional[int] = None) -> Tensor:
    """out (M, N) = Σ a_i b_i (+ bias) for up to 3 (a_i (M, K_i), b_i (K_i', N)) segments,
    any strides (views such as ``W.t()``, ``dy.t()`` or a bias ``b[::2]`` are read in place).
    b_i may have fewer rows than a_i has columns (K_i' <= K_i, not for the first segment):
    a_i's columns beyond K_i' must then be zero (backward's dz, padded to 16 columns, against
    R's E rows).

    ``split`` programs share each output tile's first-segment K loop (None: :func:`split_k`);
    with more than one, each writes an fp32 (fp64) partial and the partials are summed in
    split order (deterministic), then cast into ``out``."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    assert 1 <= len(segments) <= 3
    segs = list(segments)
    while len(segs) < 3:
        segs.append(segs[0])
    (a1, b1), (a2, b2), (a3, b3) = segs
    assert a1.shape[1] == b1.shape[0]
    for a, b in segs:
        assert a.shape[0] == M and b.shape[1] == N and a.shape[1] >= b.shape[0]
    K1 = a1.shape[1]
    with _device_guard(out):
        if split is None:
            split = split_k(M, N, K1, _num_sms(out.device))
        split = max(1, min(int(split), max(1, K1)))
        dst = out
        if split > 1:
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            # shape [split, M, N]
            dst = torch.empty((split, M, N), dtype=acc, device=out.device)
        upcast, prec = _flags(out.dtype)
        key = tune_key(M, N, K1)
        has_2, has_3 = len(segments) >= 2, len(segments) >= 3
        args = (
            # shape [M, K1], [K1, N], [M, K2], [K2B, N], [M, K3], [K3B, N], [N], [M, N]
            a1, b1, a2, b2, a3, b3, bias if bias is not None else out, dst,
            M, N, K1, a2.shape[1], a3.shape[1], b2.shape[0], b3.shape[0],
            a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
            a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
            a3.stride(0), a3.stride(1), b3.stride(0), b3.stride(1),
            dst.stride(-2), dst.stride(-1),
            bias.stride(0) if bias is not None else 1,  # bias is read through its stride (b[::2])
            dst.stride(0) if split > 1 else 0,
            split, *key,
        )
        flags = dict(HAS_2=has_2, HAS_3=has_3, HAS_BIAS=bias is not None,
                     IS_FP64=out.dtype == torch.float64, UPCAST=upcast, DOT_PREC=prec)
        fp32 = out.dtype == torch.float32
        mode, cfg = linear_plan(out.device, fp32, key, has_2, has_3, split)
        if mode == "autotune":
            grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),
                                 split)
            kern = _linear_kernel(fp32)
            kern[grid](*args, **flags)
            best = getattr(kern, "best_config", None)
            if best is not None:
                kw = best.kwargs
                _TUNED_HERE[(_device_arch(out.device), fp32, key, has_2, has_3, split)] = (
                    kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], best.num_warps,
                    best.num_stages)
        else:
            bm, bn, bk, gm, w, s = cfg
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
            _k.fused_linear_kernel[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                         GROUP_M=gm, num_warps=w, num_stages=s)
        if split > 1:
            out.copy_(dst.sum(0))  # a fixed-order reduction over the splits
    return out


def route_forward(x, x_lora, lora_A, router, centers, inv_std, num_lora_experts, top_k,
                  scaling, yield_strength, distance_reduce, distance_shift=None,
                  stats=False, stats_keep=None, xh=None, split=None):
    """Launch route forward: returns gates, topk_idx, distance, assign, h (acc dtype), hg (x
    dtype) and, with ``stats`` (and clusters), the per-token input of
    :func:`cluster_statistics`: (sj (T,) int32: j* of a kept token, else -1; r (T,) acc
    dtype: the distance before the shift), else None. ``distance_shift`` (C,) fp32 or None
    (the constant 1) and ``stats_keep`` (T,) bool or None (every token) are read through
    their strides.

    ``xh`` (T, K + E_L·r), the extended-K design's buffer: x is copied into its first K
    columns in the same pass, and hg is written into the rest (the returned hg is that view).
    ``split``: programs per token block's K loop (None: :func:`tuning.route_split`); with more
    than one, a second launch sums their partials and runs the epilogue."""
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
    hg = torch.empty((T, ER), dtype=x.dtype, device=dev) if xh is None else xh[:, K:]
    C = 0 if centers is None else centers.shape[0]
    stats = bool(stats) and C > 0
    per_token = None
    if stats:
        per_token = (torch.empty((T,), dtype=torch.int32, device=dev),  # sj
                     torch.empty((T,), dtype=acc, device=dev))  # r
    if T == 0:
        return gates, idx, dist, assign, h, hg, per_token
    reduce_id = reduce_code(distance_reduce)
    has_shift = bool(C) and distance_shift is not None
    if C:
        centers = centers.contiguous()
        inv_std = inv_std.contiguous()
    else:
        centers = inv_std = x  # dummies, never read
    shift = distance_shift if has_shift else inv_std  # a dummy when there is none, never read
    has_keep = stats and stats_keep is not None
    # the bool mask as bytes (same strides): a dummy when there is none, never read
    keep = stats_keep.view(torch.uint8) if has_keep else idx
    sj, rr = per_token if stats else (idx, dist)  # dummies without statistics, never written
    RP, EP = _pad16(ER), _pad16(E)
    CP = _pad16(max(C, 1))  # the cluster dots need 16 columns
    bt, bk, w, s, hb = route_config(RP, fp32=x.dtype == torch.float32)
    upcast, prec = _flags(x.dtype)
    # cluster dots: fp32 operands (x - c_0 and the centres), tf32x3 on tensor cores on a GPU
    cprec = "ieee" if (_INTERPRET or acc == torch.float64) else "tf32x3"
    xl = x if x_lora is None else x_lora
    if split is None:
        split = route_split(T, K, bt, bk, _num_sms(dev))
    k_chunk = triton.cdiv(triton.cdiv(K, max(1, int(split))), bk) * bk
    split = triton.cdiv(K, k_chunk)  # no empty split
    partial = split > 1
    pw = EP + 3 * CP + 1  # a routing partial row: z, squared distances, reduce, NaN terms, x_nf
    if partial:
        ph = torch.empty((split, T, ER), dtype=acc, device=dev)  # shape [S, T, ER]
        pr = torch.empty((split, T, pw), dtype=acc, device=dev)  # shape [S, T, pw]
    else:
        ph = pr = h  # dummies, never read
    xc = x if xh is None else xh  # a dummy without xh, never written
    const = dict(ER=ER, R=ER // E_L, E=E, E_L=E_L, TOPK=top_k, C=C, RP=hb, EP=EP, CP=CP,
                 REDUCE=reduce_id, YIELD=bool(C > 0 and yield_strength != 0.0 and E > E_L),
                 HAS_SHIFT=has_shift, STATS=stats, HAS_KEEP=has_keep, UPCAST=upcast,
                 BLOCK_T=bt)
    _k.route_fwd_kernel[(triton.cdiv(T, bt), RP // hb, split)](
        # shape [T, K], [T, K], [ER, K], [E, K], [C, K], [C, K], [C], [T], [T, K + ER]
        x, xl, lora_A, router, centers, inv_std, shift, keep, xc,
        # shape [T, E], [T, top_k], [T], [T], [T, ER], [T, ER], [T], [T]
        gates, idx, dist, assign, h, hg, sj, rr,
        # shape [S, T, ER], [S, T, pw]
        ph, pr,
        T, K, k_chunk,
        x.stride(0), xl.stride(0), lora_A.stride(0), router.stride(0),
        centers.stride(0), inv_std.stride(0), shift.stride(0) if has_shift else 0,
        keep.stride(0) if has_keep else 0,
        xc.stride(0), hg.stride(0), T * ER, pw,
        float(scaling), float(yield_strength),
        **const, HAS_XL=x_lora is not None, WRITE_X=xh is not None, PARTIAL=partial,
        DOT_PREC=prec, CDOT_PREC=cprec, BLOCK_K=bk, num_warps=w, num_stages=s,
    )
    if partial:
        et, ek, ew = route_epilogue_config()
        _k.route_epilogue_kernel[(triton.cdiv(T, et), RP // hb)](
            # shape [S, T, ER], [S, T, pw], [T, K], [C, K], [C, K], [C], [T]
            ph, pr, x, centers, inv_std, shift, keep,
            gates, idx, dist, assign, h, hg, sj, rr,
            T, K, split,
            x.stride(0), centers.stride(0), inv_std.stride(0),
            shift.stride(0) if has_shift else 0, keep.stride(0) if has_keep else 0,
            hg.stride(0), T * ER, pw,
            float(scaling), float(yield_strength),
            **dict(const, BLOCK_T=et), BLOCK_K=ek, num_warps=ew, num_stages=1,
        )
    return gates, idx, dist, assign, h, hg, per_token


def stats_config(interpret: Optional[bool] = None):
    """(BLOCK_T, BLOCK_K, num_warps, num_stages) of the cluster-statistics kernel (GPU: 64
    tokens by 64 channels, (16, 64) x (64, 64) one-hot dots; the interpreter: small tiles).
    With 4 warps ptxas spilled at 64 x 64 (the tf32x3 split of D and D² and the pipelined
    x and centre tiles): 8 warps, ~230 registers, none spilled (sm_80 and sm_90)."""
    if _INTERPRET if interpret is None else interpret:
        return 16, 16, 4, 1
    return 64, 64, 8, 3


def cluster_statistics(x: Tensor, centers: Tensor, sj: Tensor, r: Tensor,
                  groups: Optional[int] = None) -> Tensor:
    """Launch cluster_stats: the (C, 2K + 3) statistics (acc dtype) from x (T, K) contiguous,
    the centres (C, K) and route_fwd's per-token ``sj``, ``r``. ``groups``: how many token
    groups share the pass (None: :func:`tuning.stats_groups`); with more than one, each writes
    a (C, 2K + 3) partial and the partials are summed in group order (deterministic)."""
    T, K = x.shape
    C = centers.shape[0]
    acc = r.dtype
    out = torch.empty(stats_shape(C, K), dtype=acc, device=x.device)
    if T == 0:
        return out.zero_()
    centers = centers.contiguous()
    bt, bk, w, s = stats_config()
    nkb = triton.cdiv(K, bk)
    if groups is None:
        groups = stats_groups(T, K, bt, bk, _num_sms(x.device))
    group_len = triton.cdiv(triton.cdiv(T, max(1, int(groups))), bt) * bt
    groups = triton.cdiv(T, group_len)  # no empty group
    dst = out if groups == 1 else torch.empty((groups,) + out.shape, dtype=acc,
                                              device=x.device)
    _k.cluster_stats_kernel[(nkb + 1, groups)](
        # shape [T, K], [C, K], [T], [T], [groups, C, 2K + 3] (or [C, 2K + 3])
        x, centers, sj, r, dst,
        T, K, group_len,
        x.stride(0), centers.stride(0), dst.stride(0) if groups > 1 else 0, dst.stride(-2),
        C=C, CP=max(16, _next_pow2(C)),
        # one-hot dots against fp32 D: tf32x3 on tensor cores (~fp32 accuracy), ieee else
        DOT_PREC="ieee" if (_INTERPRET or acc == torch.float64) else "tf32x3",
        BLOCK_T=bt, BLOCK_K=bk, num_warps=w, num_stages=s,
    )
    if groups > 1:
        torch.sum(dst, 0, out=out)  # a fixed-order reduction over the groups
    return out


_EXTENDED: Dict[tuple, Tuple[int, Tensor]] = {}  # weight key -> (its version, [W | B_all])


def extended_weight(weight: Tensor, lora_B: Tensor) -> Tensor:
    """[W | B_all] (N, K + E_L·r) for the extended-K design: W copied once per weight (again
    when the weight changes in place, by its version counter), B_all copied in every call
    (it trains). A second copy of W per layer: 2·N·K bytes in bf16, as much again as the
    frozen base. It cannot be a view instead: the weight belongs to the model (loaded, tied,
    sharded, quantised or saved as its owner decides), and W as a view of [W | B_all] would
    have a row stride of K + E_L·r that every other user of the weight would see. The entry
    goes when the weight tensor it was made for is freed."""
    N, K = weight.shape
    ER = lora_B.shape[1]
    key = (weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape),
           tuple(weight.stride()), ER)
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor has no version counter
        version = -1
    hit = _EXTENDED.get(key)
    if hit is None or hit[0] != version:
        w_ext = torch.empty((N, K + ER), dtype=weight.dtype, device=weight.device)
        w_ext[:, :K].copy_(weight)
        if hit is None:
            weakref.finalize(weight, _EXTENDED.pop, key, None)
        _EXTENDED[key] = hit = (version, w_ext)
    w_ext = hit[1]
    w_ext[:, K:].copy_(lora_B)
    return w_ext


def cluster_ema(centers: Tensor, variances: Tensor, rejected: Tensor, stats: Tensor,
                momentum: float, distance_mean: Optional[Tensor],
                distance_var: Optional[Tensor], inv_std: Tensor, shift: Tensor,
                eps: float) -> None:
    """:func:`slim_kernels.ops.ema.cluster_ema_torch` in one launch (``cluster_ema_kernel``),
    in place. Rows of the (C, K) tensors and of stats must have unit element stride."""
    C, K = centers.shape
    for t in (centers, variances, inv_std, stats):
        assert t.stride(-1) == 1, "cluster_ema: rows must have unit element stride"
    has = distance_mean is not None
    dm, dv = (distance_mean, distance_var) if has else (centers, centers)  # dummies, unread
    with _device_guard(centers):
        _k.cluster_ema_kernel[(1,)](
            # shape [C, K], [C, K], [], [C, 2K + 3], [], [], [C, K], [C]
            centers, variances, rejected, stats, dm, dv, inv_std, shift,
            C, K,
            centers.stride(0), variances.stride(0), stats.stride(0), inv_std.stride(0),
            shift.stride(0),
            float(momentum), float(eps),
            HAS_DIST=has, CP=_next_pow2(max(C, 1)), BLOCK=64 if _INTERPRET else 1024,
            num_warps=8,
        )


def forward(
    x: Tensor, x_lora: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, router: Tensor,
    centers: Optional[Tensor], inv_std: Optional[Tensor],
    num_lora_experts: int, top_k: int, scaling: float, yield_strength: float,
    distance_reduce: str, distance_shift: Optional[Tensor] = None,
    cluster_stats: bool = False, stats_keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y = x Wᵀ + b + hg B_allᵀ after the route kernel, by the design :func:`design_for`
    picks, and the cluster statistics after it when asked for (see the module docstring)."""
    T, K = x.shape
    N = weight.shape[0]
    ER, E = lora_A.shape[0], router.shape[0]
    _check_sizes(ER, E, num_lora_experts)
    want_stats = bool(cluster_stats) and centers is not None and centers.shape[0] > 0
    design = design_for("forward", x, K, N)
    with _device_guard(x):
        x = x.contiguous()
        x_lora = None if x_lora is None else x_lora.contiguous()
        lora_A, router = lora_A.contiguous(), router.contiguous()
        # shape [T, K + ER]: the extended design's [x | hg]
        xh = torch.empty((T, K + ER), dtype=x.dtype, device=x.device) if (
            design == "extended" and T > 0) else None
        gates, idx, dist, assign, h, hg, per_token = route_forward(
            x, x_lora, lora_A, router, centers, inv_std, num_lora_experts, top_k,
            scaling, yield_strength, distance_reduce, distance_shift, want_stats, stats_keep,
            xh=xh)
        if T == 0:
            y = torch.empty((T, N), dtype=x.dtype, device=x.device)
        elif design == "fused":
            y = torch.empty((T, N), dtype=x.dtype, device=x.device)
            fused_linear([(x, weight.t()), (hg, lora_B.t())], y, bias)
        elif design == "accumulate":
            y = hg @ lora_B.t() if bias is None else torch.addmm(bias, hg, lora_B.t())
            y.addmm_(x, weight.t())  # beta = 1: cuBLAS adds y in its epilogue
        else:  # extended
            w_ext = extended_weight(weight, lora_B)
            y = xh @ w_ext.t() if bias is None else torch.addmm(bias, xh, w_ext.t())
        if want_stats:
            stats = cluster_statistics(x, centers, *per_token)
        else:
            stats = torch.empty(stats_shape(0, K), dtype=gates.dtype, device=x.device)
    return y, gates, idx, dist, assign, h, stats


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

    Kernels: route_bwd computes dhg and the epilogue (dh, dz into one (T, ER + E) buffer
    padded to 16 columns, and hg recomputed from the saved h). Then, by design: ``fused``
    computes dx with the Triton fused linear, its K loop extended over [dy | dh | dz], and
    the weight gradients with transposed strides (split-K when they have few output tiles);
    dB_all is summed either inside route_bwd's pass over dy (dy read twice in all) or by a GEMM
    of its own (three times): :func:`tuning.db_mode`. ``accumulate``: cuBLAS,
    dx = [dh | dz] [A_all; R] then dx += dy W, dB_all = dyᵀ hg, [dA; dR] = [dh | dz]ᵀ x.
    W and b are frozen: no dW, no db.
    """
    T, K = x.shape
    N = weight.shape[0]
    ER, E = lora_A.shape[0], router.shape[0]
    E_L = num_lora_experts
    _check_sizes(ER, E, E_L)
    if T == 0:
        dx = torch.zeros_like(x)
        dxl = None if x_lora is None else torch.zeros_like(x_lora)
        return (dx, dxl, torch.zeros_like(lora_A), torch.zeros_like(lora_B),
                torch.zeros_like(router))
    design = design_for("backward", x, K, N)
    with _device_guard(x):
        return _backward(dy, dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h,
                         E_L, scaling, design)


def _db_mode(T: int, N: int, ER: int, block_t: int, dt: torch.dtype) -> str:
    elem = torch.empty((), dtype=dt).element_size()
    return db_mode(T, N, ER, block_t, elem, torch.are_deterministic_algorithms_enabled())


def route_backward(dy, dgates, lora_B, gates, h, num_lora_experts, scaling, db=None):
    """Launch route_bwd: returns dhz = [dh | dz | 0] (T, :func:`dhz_width`) and hg (x dtype),
    and dB_all (x dtype) when it is summed in the same pass over dy, else None. ``db``:
    "gemm" | "fused" | "atomic" (None: :func:`tuning.db_mode`). Contiguous inputs."""
    T, N = dy.shape
    ER, E = h.shape[1], gates.shape[1]
    E_L = num_lora_experts
    dt, dev = dy.dtype, dy.device
    W = dhz_width(ER, E)
    dhz = torch.empty((T, W), dtype=dt, device=dev)
    hg = torch.empty((T, ER), dtype=dt, device=dev)
    RP, EP = _pad16(ER), _pad16(max(E, W - ER))
    bt, bk, w, s, _ = route_config(RP, backward=True, fp32=dt == torch.float32)
    upcast, prec = _flags(dt)
    programs = triton.cdiv(T, bt)
    mode = db or _db_mode(T, N, ER, bt, dt)
    acc = h.dtype  # fp32 (fp64 for fp64 x)
    if mode == "fused":  # one (N, ER) partial per program, summed below in program order
        buf = torch.empty((programs, N, ER), dtype=acc, device=dev)  # shape [programs, N, ER]
    elif mode == "atomic":
        buf = torch.zeros((N, ER), dtype=acc, device=dev)  # shape [N, ER]
    else:
        buf = hg  # a dummy, never read
    _k.route_bwd_kernel[(programs,)](
        # shape [T, N], [N, ER], [T, ER], [T, E], [T, E] (dgates, or a dummy)
        dy, lora_B, h, gates, dgates if dgates is not None else gates,
        # shape [T, W], [T, ER], see buf
        dhz, hg, buf,
        T, N,
        dy.stride(0), lora_B.stride(0), dhz.stride(0),
        dgates.stride(0) if dgates is not None else 0,
        N * ER,
        float(scaling),
        ER=ER, R=ER // E_L, E=E, E_L=E_L, RP=RP, EP=EP, EW=W - ER,
        HAS_DG=dgates is not None, DB_MODE={"gemm": 0, "fused": 1, "atomic": 2}[mode],
        UPCAST=upcast, DOT_PREC=prec, BLOCK_T=bt, BLOCK_K=bk, num_warps=w, num_stages=s,
    )
    dB = None
    if mode == "fused":
        dB = buf.sum(0).to(dt)  # a fixed-order reduction over the programs
    elif mode == "atomic":
        dB = buf.to(dt)
    return dhz, hg, dB


def _backward(dy, dgates, x, x_lora, weight, lora_A, lora_B, router, gates, h, E_L, scaling,
              design):
    T, K = x.shape
    ER, E = lora_A.shape[0], router.shape[0]
    dt = x.dtype
    dev = x.device
    dy = dy.contiguous()
    x = x.contiguous()
    lora_A, lora_B, router = lora_A.contiguous(), lora_B.contiguous(), router.contiguous()
    h = h.contiguous()
    gates = gates.contiguous()
    if dgates is not None:
        dgates = dgates.contiguous()
    cublas = design == "accumulate"
    dhz, hg, dB = route_backward(dy, dgates, lora_B, gates, h, E_L, scaling,
                                 db="gemm" if cublas else None)
    W = dhz.shape[1]
    dh, dzp = dhz[:, :ER], dhz[:, ER:]  # dzp: dz and its zero padding (W - ER columns)
    dz = dhz[:, ER:ER + E]
    if cublas:
        dB = dy.t() @ hg
        if x_lora is None:
            dx = dhz[:, :ER + E] @ torch.cat([lora_A, router])
            dx.addmm_(dy, weight)  # beta = 1: cuBLAS adds dx in its epilogue
            dAR = dhz[:, :ER + E].t() @ x
            # the op boundary forbids outputs that alias each other: dR (E×K, small) is copied
            return dx, None, dAR[:ER], dB, dAR[ER:].clone()
        dx = dz @ router
        dx.addmm_(dy, weight)
        return dx, dh @ lora_A, dh.t() @ x_lora, dB, dz.t() @ x
    if dB is None:
        dB = torch.empty_like(lora_B)
        fused_linear([(dy.t(), hg)], dB)  # (N, ER) = dyᵀ hg
    dx = torch.empty((T, K), dtype=dt, device=dev)
    if x_lora is None:
        fused_linear([(dy, weight), (dh, lora_A), (dzp, router)], dx)
        dx_lora = None
        dAR = torch.empty((W, K), dtype=dt, device=dev)
        fused_linear([(dhz.t(), x)], dAR)  # [dA; dR; 0] = [dh | dz | 0]ᵀ x
        dA, dR = dAR[:ER], dAR[ER:ER + E].clone()
    else:
        x_lora = x_lora.contiguous()
        fused_linear([(dy, weight), (dzp, router)], dx)
        dx_lora = torch.empty_like(x_lora)
        fused_linear([(dh, lora_A)], dx_lora)
        dA = torch.empty_like(lora_A)
        fused_linear([(dh.t(), x_lora)], dA)
        dRp = torch.empty((W - ER, K), dtype=dt, device=dev)
        fused_linear([(dzp.t(), x)], dRp)  # [dR; 0] = [dz | 0]ᵀ x
        dR = dRp[:E].clone()
    return dx, dx_lora, dA, dB, dR
