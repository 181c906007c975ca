"""Block configurations of the fused-linear kernel, the design a call runs, how both are
chosen, and the split choices of the launchers (``docs/method.md`` §6). Pure Python: no
torch, no triton.

* Autotuning is keyed on power-of-two buckets of M, N and K (:func:`bucket`), so a new token
  count reuses the configuration of its bucket instead of benchmarking again. The
  candidates are :func:`linear_configs` (the AOT test compiles each of them).
* Configurations as data: one JSON file per GPU (``configs/<device name>.json``, written by the
  device check) or per architecture (``configs/sm_80.json``, ``sm_90.json``: the shipped
  starting points, not measured), loaded by the launcher (:func:`load_configs`). Their
  ``fused_linear`` rules are used with no autotuning at all: under CUDA-graph capture
  (benchmarking inside a capture is unsafe) and whenever ``SLIM_KERNELS_AUTOTUNE=0``. Their
  ``designs`` say, per dtype family and shape bucket, which design runs each direction
  (:func:`design_choice`; :data:`DEFAULT_DESIGN` while "unmeasured").
* :func:`split_k`: the weight gradients (M = E_L·r + E rows, N = K) and decode (M <= 64)
  have too few output tiles to fill the GPU, so the long K loop is split over programs whose
  fp32 partials are summed in a fixed order. :func:`route_split` does the same for route
  forward, and :func:`stats_groups` for the cluster statistics (over tokens).
* :func:`db_mode`: how backward sums ``dB_all = dyᵀ hg``: a GEMM of its own (a third pass over
  dy), inside the route-backward pass over dy with per-program partials (deterministic), or
  with atomics (only when the caller allows non-deterministic algorithms and asks for it).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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


# ------------------------------------------------------------------------------------------
# Configurations as data: one JSON file per GPU (or per architecture) in ``configs/`` beside
# the kernels, the way vLLM keeps its tuned Triton configurations. Format (``FORMAT``):
#
#   {"format": 1, "device": "NVIDIA H200" | null, "arch": "sm_90", "measured": bool,
#    "source": "how the file was made", "versions": {...},
#    "fused_linear": {"half" | "fp32": {"rules": [[m_max, n_max, cfg], ...],
#                                       "exact": {"KEY_M,KEY_N,KEY_K,HAS_2,HAS_3,SPLIT": cfg}}},
#    "designs": {"<family>/<decode|prefill>/<K bucket>x<N bucket>" | "<family>/<...>/*" | "*":
#                {"forward": design | "unmeasured", "backward": design | "unmeasured", ...}}}
#
# rules are tried in order: the first whose bounds hold (KEY_M <= m_max, KEY_N <= n_max;
# null = any) gives the configuration; "exact" entries (what autotuning picked for one key)
# come first. The shipped ``sm_80.json`` / ``sm_90.json`` hold block shapes that compile without
# spills (benchmarks/triton_resources.csv) and designs "unmeasured"; the device check
# (benchmarks/gpu_check.py) writes ``<device name>.json`` with what it timed, to be committed
# here. Lookup for a GPU: ``<device name>.json``, else ``<arch>.json``, else the nearest lower
# architecture's file, in the folders of ``SLIM_KERNELS_CONFIG_DIR`` (os.pathsep-separated)
# first, then ``configs/``.
# ------------------------------------------------------------------------------------------
FORMAT = 1
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DESIGNS_FORWARD = ("fused", "accumulate", "extended")
DESIGNS_BACKWARD = ("fused", "accumulate")
# the choice while a GPU has not measured the bucket (docs/benchmarks.md, "Designs"): the
# big GEMMs on cuBLAS, which is what the base itself runs, so the ratio to the base does
# not hinge on a Triton GEMM matching cuBLAS; no second copy of W (unlike "extended")
DEFAULT_DESIGN = {"forward": "accumulate", "backward": "accumulate"}
UNMEASURED = "unmeasured"


def device_file_name(device_name: str) -> str:
    """``NVIDIA H200`` -> ``NVIDIA_H200.json`` (vLLM's spelling: spaces to underscores)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", device_name.strip()) + ".json"


def _search_dirs() -> List[Path]:
    extra = os.environ.get("SLIM_KERNELS_CONFIG_DIR", "")
    return [Path(d) for d in extra.split(os.pathsep) if d] + [CONFIG_DIR]


def _arch_num(arch: str) -> int:
    try:
        return int(arch[3:])
    except ValueError:
        return -1


def config_file(arch: str, device_name: Optional[str] = None) -> Path:
    """The file that configures a GPU: its own, else its architecture's, else the nearest
    lower architecture's (the lowest shipped one when none is lower)."""
    dirs = _search_dirs()
    names = ([device_file_name(device_name)] if device_name else []) + [f"{arch}.json"]
    for name in names:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    shipped = sorted((p for p in CONFIG_DIR.glob("sm_*.json")), key=lambda p: _arch_num(p.stem))
    if not shipped:
        raise FileNotFoundError(f"no sm_*.json in {CONFIG_DIR}")
    lower = [p for p in shipped if _arch_num(p.stem) <= _arch_num(arch)]
    return (lower or shipped)[-1 if lower else 0]


def load_configs(arch: str, device_name: Optional[str] = None) -> Dict:
    """The parsed configuration file of a GPU (see above), with ``"path"`` added."""
    path = config_file(arch, device_name)
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT}")
    data["path"] = str(path)
    return data


def family(fp32: bool) -> str:
    return "fp32" if fp32 else "half"


def exact_key(key: Tuple[int, int, int], has_2: bool, has_3: bool, split: int) -> str:
    return ",".join(str(int(v)) for v in (*key, has_2, has_3, split))


def table_config(cfgs: Dict, fp32: bool, key: Tuple[int, int, int], has_2: bool = False,
                 has_3: bool = False, split: int = 1) -> Config:
    """The fused linear's configuration for bucketed ``key`` = (KEY_M, KEY_N, KEY_K) from a
    loaded file: its exact entry, else the first rule that holds."""
    fam = cfgs["fused_linear"][family(fp32)]
    hit = fam.get("exact", {}).get(exact_key(key, has_2, has_3, split))
    if hit is not None:
        return tuple(hit)
    km, kn, _ = key
    for m_max, n_max, cfg in fam["rules"]:
        if (m_max is None or km <= m_max) and (n_max is None or kn <= n_max):
            return tuple(cfg)
    raise LookupError(f"{cfgs.get('path')}: no rule for {key}")  # the last rule has no bounds


def design_key(fp32: bool, T: int, K: int, N: int) -> str:
    """The shape bucket of a design choice: dtype family, decode (T <= DECODE_M) or
    prefill, and the power-of-two buckets of K and N."""
    return f"{family(fp32)}/{'decode' if T <= DECODE_M else 'prefill'}/{bucket(K)}x{bucket(N)}"


def design_choice(cfgs: Dict, direction: str, fp32: bool, T: int, K: int, N: int
                  ) -> Tuple[str, str]:
    """(design, why) for one direction ("forward" | "backward") of a call: the file's first
    measured entry for the bucket (exact, then ``<family>/<decode|prefill>/*``, then ``*``),
    or :data:`DEFAULT_DESIGN` while they are all "unmeasured" or absent. "extended" is never
    picked here (it keeps a second copy of W: only when asked for, SLIM_KERNELS_DESIGN)."""
    key = design_key(fp32, T, K, N)
    table = cfgs.get("designs", {})
    for k in (key, key.rsplit("/", 1)[0] + "/*", "*"):
        v = table.get(k, {}).get(direction)
        if v is None or v == UNMEASURED:
            continue
        allowed = DESIGNS_FORWARD[:2] if direction == "forward" else DESIGNS_BACKWARD
        if v not in allowed:
            raise ValueError(f"{cfgs.get('path')}: designs[{k!r}][{direction!r}] = {v!r}, "
                             f"expected one of {allowed} or {UNMEASURED!r}")
        return v, f"measured ({k} in {os.path.basename(str(cfgs.get('path')))})"
    return DEFAULT_DESIGN[direction], f"default: {key} unmeasured"


def device_file(base: Dict, device_name: str, arch: str, tuned_rows, designs: Dict,
                versions: Dict, source: str) -> Dict:
    """A device's configuration file (the format above) from ``base`` (the file it used),
    what autotuning picked (``tuned_rows``: (family, exact key, config)) and the measured
    design choices: what the device check writes."""
    out = {k: v for k, v in base.items() if k != "path"}
    out.update(format=FORMAT, device=device_name, arch=arch, measured=True, source=source,
               versions=versions)
    fl = json.loads(json.dumps(out["fused_linear"]))
    for fam, key, cfg in tuned_rows:
        fl[fam].setdefault("exact", {})[key] = list(cfg)
    out["fused_linear"] = fl
    merged = dict(out.get("designs", {}))
    merged.update(designs)
    out["designs"] = merged
    return out


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


def route_split(T: int, K: int, block_t: int, block_k: int, num_sms: int, min_steps: int = 4,
                max_split: int = 8) -> int:
    """How many programs share one token block's K loop in route forward (grid axis 2; their
    fp32 partials are summed in split order by a second, small launch). 1 when the token
    blocks alone give every SM a program; else enough splits for that, each at least
    ``min_steps`` BLOCK_K steps long, at most ``max_split``. At T = 8192 with 128-token blocks
    on 132 SMs: 64 blocks, 3 splits, 192 programs (K = 4096 in 32-channel steps: 43 each).
    Decode (T = 1, K = 4096): 8 splits of 16 steps."""
    blocks = -(-max(1, T) // block_t)
    if blocks >= num_sms:
        return 1
    steps = -(-K // block_k)
    return max(1, min(-(-num_sms // blocks), steps // min_steps, max_split))


def dumps_configs(data: Dict, indent: int = 0) -> str:
    """A configuration file's JSON text: objects one key a line, lists on one line (a rule, a
    configuration), so that a diff of two measured files reads row by row."""
    pad = " " * (indent + 1)
    if isinstance(data, dict):
        if not data:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {dumps_configs(v, indent + 1)}"
                 for k, v in data.items() if k != "path"]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return json.dumps(data)
