"""Block configurations of the fused-linear kernel, how one is chosen, and the split-K and dB
choices of the launchers (``docs/method.md`` §6). Pure Python: no torch, no triton.

* Autotuning is keyed on power-of-two buckets of M, N and K (:func:`bucket`), so a new token
  count reuses the configuration of its bucket instead of benchmarking again.
* :data:`TABLE` is the shipped configuration per GPU architecture, used with no autotuning at
  all: under CUDA-graph capture (benchmarking inside a capture is unsafe) and whenever
  ``SLIM_KERNELS_AUTOTUNE=0``. :data:`TUNED` holds exact-key entries measured on a GPU (the
  device check, ``benchmarks/gpu_check.py``, writes them to ``tuned_configs.json``).
* :func:`split_k`: the weight gradients (M = E_L·r + E rows, N = K) and decode (M <= 64)
  have too few output tiles to fill the GPU, so the long K loop is split over programs whose
  fp32 partials are summed in a fixed order.
* :func:`db_mode`: how backward sums ``dB_all = dyᵀ hg``: a GEMM of its own (a third pass over
  dy), inside the route-backward pass over dy with per-program partials (deterministic), or
  with atomics (only when the caller allows non-deterministic algorithms and asks for it).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
Config = Tuple[int, int, int, int, int, int]

BUCKET_CAP = 1 << 15  # every size >= 32768 shares one bucket
DECODE_M = 64  # KEY_M <= this: the small-M configurations

# bf16 / fp16: tensor-core dots (wgmma on sm_90 when BLOCK_M >= 64, mma otherwise)
LINEAR_CONFIGS_GPU: Tuple[Config, ...] = (
    (128, 256, 64, 8, 8, 3),
    (128, 128, 32, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),  # the skinny weight-gradient GEMMs (N = E_L·r): more programs
)
LINEAR_CONFIGS_GPU_DECODE: Tuple[Config, ...] = (  # M <= 64 (T = 1..64 tokens)
    (16, 64, 128, 1, 4, 4),
    (16, 128, 64, 1, 4, 4),
    (32, 64, 128, 1, 4, 4),
    (64, 64, 64, 1, 4, 4),
)
# fp32: ieee FMA dots (torch's fp32 matmul default is ieee too)
LINEAR_CONFIGS_GPU_FP32: Tuple[Config, ...] = (
    (64, 64, 32, 8, 4, 3),
    (128, 64, 16, 8, 8, 3),
)
LINEAR_CONFIGS_GPU_FP32_DECODE: Tuple[Config, ...] = (
    (16, 64, 32, 1, 4, 3),
    (32, 64, 32, 1, 4, 3),
)
LINEAR_CONFIG_INTERPRET: Config = (32, 32, 32, 8, 4, 1)


def linear_configs(fp32: bool, decode: Optional[bool] = None) -> Tuple[Config, ...]:
    """The autotuning candidates: ``decode`` True (M <= DECODE_M), False (larger M), None
    (both: every configuration compiled ahead of time)."""
    big = LINEAR_CONFIGS_GPU_FP32 if fp32 else LINEAR_CONFIGS_GPU
    small = LINEAR_CONFIGS_GPU_FP32_DECODE if fp32 else LINEAR_CONFIGS_GPU_DECODE
    if decode is None:
        return big + small
    return small if decode else big


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(n: int, cap: int = BUCKET_CAP) -> int:
    """The autotuning key of a size: the next power of two, capped (1, 2, 4, ..., cap)."""
    return min(next_pow2(max(int(n), 1)), cap)


def tune_key(M: int, N: int, K: int) -> Tuple[int, int, int]:
    return bucket(M), bucket(N), bucket(K)


# The shipped table: per architecture and dtype family, rules tried in order; the first whose
# bounds hold (KEY_M <= m_max, KEY_N <= n_max; None = any) gives the configuration. Chosen
# from the block shapes of the autotuning lists (compiled for sm_80 / sm_90 without spills,
# benchmarks/triton_resources.csv), not yet measured on a GPU: replace the rules with what the
# device check's autotuning picks (TUNED below, or edit the rules).
TABLE: Dict[str, Dict[str, Sequence[Tuple[Optional[int], Optional[int], Config]]]] = {
    "sm_90": {
        "half": (
            (16, None, (16, 64, 128, 1, 4, 4)),
            (DECODE_M, None, (32, 64, 128, 1, 4, 4)),
            (None, 128, (64, 64, 64, 8, 4, 4)),
            (256, None, (64, 128, 64, 8, 4, 4)),
            (None, None, (128, 256, 64, 8, 8, 3)),
        ),
        "fp32": (
            (DECODE_M, None, (16, 64, 32, 1, 4, 3)),
            (None, None, (64, 64, 32, 8, 4, 3)),
        ),
    },
    "sm_80": {
        "half": (
            (16, None, (16, 64, 128, 1, 4, 4)),
            (DECODE_M, None, (32, 64, 128, 1, 4, 4)),
            (None, 128, (64, 64, 64, 8, 4, 4)),
            (256, None, (64, 128, 64, 8, 4, 4)),
            (None, None, (128, 128, 32, 8, 4, 4)),
        ),
        "fp32": (
            (DECODE_M, None, (16, 64, 32, 1, 4, 3)),
            (None, None, (64, 64, 32, 8, 4, 3)),
        ),
    },
}
# exact keys measured on a GPU: {arch: {family: {"KEY_M,KEY_N,KEY_K,HAS_2,HAS_3,SPLIT": cfg}}}
TUNED: Dict[str, Dict[str, Dict[str, Config]]] = {}


def family(fp32: bool) -> str:
    return "fp32" if fp32 else "half"


def table_arch(arch: str) -> str:
    """The table's architecture for ``arch`` ("sm_89"): itself, else the nearest lower one
    listed, else the lowest listed."""
    if arch in TABLE:
        return arch
    have = sorted(TABLE, key=lambda a: int(a[3:]))
    try:
        cap = int(arch[3:])
    except ValueError:
        return have[0]
    lower = [a for a in have if int(a[3:]) <= cap]
    return lower[-1] if lower else have[0]


def exact_key(key: Tuple[int, int, int], has_2: bool, has_3: bool, split: int) -> str:
    return ",".join(str(int(v)) for v in (*key, has_2, has_3, split))


def table_config(arch: str, fp32: bool, key: Tuple[int, int, int], has_2: bool = False,
                 has_3: bool = False, split: int = 1) -> Config:
    """The shipped configuration for bucketed ``key`` = (KEY_M, KEY_N, KEY_K) on ``arch``."""
    a = table_arch(arch)
    fam = family(fp32)
    hit = TUNED.get(a, {}).get(fam, {}).get(exact_key(key, has_2, has_3, split))
    if hit is not None:
        return tuple(hit)
    km, kn, _ = key
    for m_max, n_max, cfg in TABLE[a][fam]:
        if (m_max is None or km <= m_max) and (n_max is None or kn <= n_max):
            return cfg
    raise LookupError(f"no table rule for {key} on {a}/{fam}")  # the last rule has no bounds


def autotune_enabled() -> bool:
    """False when ``SLIM_KERNELS_AUTOTUNE`` is 0/false/no/off: the table is used, nothing is
    benchmarked."""
    return os.environ.get("SLIM_KERNELS_AUTOTUNE", "1").strip().lower() not in (
        "0", "false", "no", "off")


def split_k(M: int, N: int, K: int, num_sms: int, min_k: int = 512, max_split: int = 16) -> int:
    """How many programs share one output tile's K loop. 1 when the (64 x 64) tiles already
    give two programs per SM; else enough splits for that, each at least ``min_k`` deep.
    At T = 8192, [dA; dR] = [dh | dz]ᵀ x (M = 138, N = 4096) has 192 tiles that each loop 128
    times over T: on 132 SMs, 2 splits. A decode forward (M = 1, N = K = 4096): 4."""
    tiles = -(-M // 64) * -(-N // 64)
    want = 2 * max(1, num_sms)
    if tiles >= want:
        return 1
    return max(1, min(-(-want // tiles), K // min_k, max_split))


DB_MODES = ("auto", "gemm", "fused", "atomic")


def db_mode(T: int, N: int, ER: int, block_t: int, elem_bytes: int,
            deterministic_required: bool) -> str:
    """How backward sums dB_all = dyᵀ hg (``SLIM_KERNELS_DB``: auto | gemm | fused | atomic).

    * ``gemm``: its own split-K GEMM, a third pass over dy (T·N·elem_bytes).
    * ``fused``: inside route backward's pass over dy; each of the cdiv(T, block_t) programs
      writes an (N, ER) fp32 partial, summed in program order: deterministic, but the
      partials are written and read once, 8·ER/block_t bytes per element of dy.
    * ``atomic``: fused, with fp32 atomics into one (N, ER) buffer: no partials, rounding
      that depends on the order the programs run in. Only when asked for AND
      ``torch.are_deterministic_algorithms_enabled()`` is False; otherwise ``fused``.
    * ``auto`` (default): ``fused`` when its partials cost fewer bytes than the dy pass they
      save, else ``gemm``."""
    want = os.environ.get("SLIM_KERNELS_DB", "auto").strip().lower() or "auto"
    if want not in DB_MODES:
        raise ValueError(f"SLIM_KERNELS_DB={want!r}: expected one of {DB_MODES}")
    if want == "atomic":
        return "fused" if deterministic_required else "atomic"
    if want != "auto":
        return want
    programs = -(-T // block_t)
    partial_bytes = 2 * programs * N * ER * 4
    return "fused" if partial_bytes < T * N * elem_bytes else "gemm"


def stats_groups(T: int, K: int, block_t: int, block_k: int, num_sms: int,
                 max_groups: int = 8) -> int:
    """How many token groups the cluster-statistics kernel splits T into (grid axis 1; its
    axis 0 has cdiv(K, block_k) + 1 programs). 1 when axis 0 alone gives two programs per SM;
    else enough groups for that, each at least 8 tiles of ``block_t`` tokens, at most
    ``max_groups``. Each group beyond the first costs a (C, 2K + 3) fp32 partial, written and
    read once by the fixed-order sum: about 8·C·block_k bytes per program, whatever K. At
    T = 8192, K = 4096, block_k = 64 on 132 SMs: 65 programs per group, 5 groups."""
    per_group = -(-K // block_k) + 1
    want = 2 * max(1, num_sms)
    if per_group >= want:
        return 1
    return max(1, min(-(-want // per_group), -(-T // (8 * block_t)), max_groups))
