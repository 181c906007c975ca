"""``slim-kernels bench``: its arguments, their checks, and the run.

:func:`add_arguments` imports no torch (``--help`` stays fast); :func:`check_arguments`
turns every bad value into an argparse error naming the option, before any work starts;
:func:`run` measures, writes the CSV and the plot, and prints the tables.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..config import SlimConfig
from .cases import CPU_SHAPES, LLAMA_SHAPES, MODES, SWEEPS, Case, build_cases, provider_names

__all__ = ["DTYPES", "BenchPlan", "add_arguments", "check_arguments", "int_at_least",
           "main_from_args", "run"]

logger = logging.getLogger("slim_kernels")

# --dtype names -> torch dtype attribute
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64"}


# --------------------------------------------------------------------------------------
# Argument types: each raises ArgumentTypeError, which argparse reports with the option name
# --------------------------------------------------------------------------------------
def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def _positive_ints(text: str) -> List[int]:
    one = int_at_least(1)
    try:
        out = [one(v.strip()) for v in text.split(",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} in the comma list {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1, got {text!r}")
    return out


def _shapes(text: str) -> List[Tuple[int, int]]:
    out = []
    for v in text.split(","):
        a, sep, b = v.strip().lower().partition("x")
        try:
            K, N = int(a), int(b)
        except ValueError:
            K = N = 0
        if not sep or K < 1 or N < 1:
            raise argparse.ArgumentTypeError(
                f"expected KxN[,KxN...] with K, N integers >= 1 (e.g. 1024x3584), got {v!r}")
        out.append((K, N))
    return out


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<index>, got {text!r}")


def _modes(text: str) -> List[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in out if m not in MODES]
    if bad or not out:
        raise argparse.ArgumentTypeError(
            f"unknown or empty {bad or out}; expected a comma list of {', '.join(MODES)}")
    return out


def _names(text: str) -> List[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma list of provider names, got {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``slim-kernels bench`` (and benchmarks/run_bench.py)."""
    pos1, pos0 = int_at_least(1), int_at_least(0)
    p.add_argument("--quick", action="store_true",
                   help="small run (< 3 min on a 2-core CPU): one shape (1024x1024 on CPU), "
                        "T in 64, 256, the first three --experts / --ranks, 5 repetitions, "
                        "1 warm-up")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:<index> (default: cuda if a CUDA device is "
                        "visible, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="input and weight dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--modes", type=_modes, default=list(MODES),
                   help="comma list of forward, backward, forward+backward "
                        "(default: all three)")
    p.add_argument("--providers", type=_names, default=None,
                   help="comma list; base always runs (the ratios need it). Names: base, "
                        "slim_<backend> (torch, cpp, cuda, triton), eager_loop, eager_dense, "
                        "compiled_dense, peft_lora (default: every provider that can run "
                        "here; slim_triton and slim_cuda on CPU only when named)")
    p.add_argument("--out", default="bench_results",
                   help="output folder for the CSV and the plot")
    p.add_argument("--sweep", default="T", choices=SWEEPS, help="what varies along x")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--cpu-scale", dest="cpu_scale", action="store_true", default=None,
                       help="scaled-down shapes 1024x1024, 1024x3584, 3584x1024 "
                            "(default on CPU)")
    scale.add_argument("--llama-shapes", dest="cpu_scale", action="store_false",
                       help="Llama-3-8B shapes 4096x4096, 4096x14336, 14336x4096 "
                            "(default on CUDA)")
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="comma list of KxN (in x out) instead of the shapes above; the "
                        "experts and rank sweeps use the first (default: the shapes above)")
    p.add_argument("--T", dest="T_values", type=_positive_ints, default=None,
                   help="tokens for --sweep T, comma list (default: 64,256,1024 at CPU scale, "
                        "512,2048,8192,16384 at Llama shapes; --quick 64,256 / 1024,4096)")
    p.add_argument("--tokens", type=pos1, default=None,
                   help="T for the other sweeps (default: 256 at CPU scale, 4096 at Llama "
                        "shapes)")
    p.add_argument("--experts", type=_positive_ints, default=[2, 4, 8, 16],
                   help="E_L values for --sweep experts (default: 2,4,8,16)")
    p.add_argument("--ranks", type=_positive_ints, default=[8, 16, 32, 64],
                   help="r values for --sweep rank (default: 8,16,32,64)")
    # the layer's defaults (SlimConfig(); config.py imports no torch)
    layer = SlimConfig()
    p.add_argument("--lora-experts", type=pos1, default=layer.num_lora_experts,
                   help="E_L, LoRA experts")
    p.add_argument("--identity-experts", type=pos0, default=layer.num_identity_experts,
                   help="E_I, identity experts")
    p.add_argument("--rank", type=pos1, default=layer.rank, help="r, rank of each LoRA expert")
    p.add_argument("--top-k", type=pos1, default=layer.top_k,
                   help="experts per token, at most E_L + E_I")
    p.add_argument("--clusters", type=pos0, default=layer.num_clusters,
                   help="C, sliding clusters of weight yielding (0: no yielding)")
    p.add_argument("--reps", type=pos1, default=None,
                   help="timed repetitions (default: 7; --quick 5)")
    p.add_argument("--warmup", type=pos0, default=None,
                   help="untimed calls per provider before timing (default: 2; --quick 1)")
    p.add_argument("--threads", type=pos0, default=None,
                   help="torch intra-op threads on CPU; 0 keeps torch's default (default: 1: "
                        "on a shared machine one thread measures each provider's work "
                        "without waiting for a descheduled sibling thread)")
    p.add_argument("--check", action="store_true",
                   help="also record each provider's forward error against the fp64 "
                        "reference (metric max_rel_err)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory metrics")
    p.add_argument("--no-plot", action="store_true", help="write the CSV but no plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=pos0, default=0, help="seed of the random inputs")


@dataclass
class BenchPlan:
    """What a checked command line will run."""

    cases: List[Case]
    sweep: str
    device: str
    dtype: object  # torch.dtype
    modes: List[str]
    providers: Optional[List[str]]
    reps: int
    warmup: int
    threads: int
    memory: bool
    check: bool
    plot: bool
    progress: bool
    seed: int
    out: str


def check_arguments(ap: argparse.ArgumentParser, a: argparse.Namespace) -> BenchPlan:
    """The run the arguments ask for; every bad value is ``ap.error`` (exit 2), naming the
    option, before any work starts. The checks that need no torch come first, so that such
    a value is rejected at once rather than after seconds of imports."""
    if a.providers:
        unknown = [n for n in a.providers if n not in provider_names()]
        if unknown:
            ap.error(f"argument --providers: unknown {unknown}; choose from "
                     f"{', '.join(provider_names())}")
    experts, ranks = (a.experts[:3], a.ranks[:3]) if a.quick else (a.experts, a.ranks)
    base = Case(K=1, N=1, T=1, num_lora_experts=a.lora_experts,
                num_identity_experts=a.identity_experts, rank=a.rank, top_k=a.top_k,
                num_clusters=a.clusters)
    # the expert counts do not depend on the shapes and tokens, which depend on the device
    fewest = min(c.E for c in build_cases(a.sweep, shapes=[(1, 1)], T_values=[1], T=1,
                                          experts=experts, ranks=ranks, base=base))
    if a.top_k > fewest:
        ap.error(f"argument --top-k: {a.top_k} is more than the {fewest} experts (E_L + E_I) "
                 f"of the smallest case; expected 1 <= top-k <= {fewest}")

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        ap.error(f"argument --device: {device}: no CUDA device is visible to torch "
                 f"{torch.__version__}")
    if dev_type == "cuda" and torch.device(device).index is not None \
            and torch.device(device).index >= torch.cuda.device_count():
        ap.error(f"argument --device: {device}: only {torch.cuda.device_count()} CUDA "
                 f"device(s) visible")
    dtype = getattr(torch, DTYPES[a.dtype or ("bfloat16" if dev_type == "cuda" else "float32")])
    cpu_scale = a.cpu_scale if a.cpu_scale is not None else dev_type == "cpu"
    if a.shapes:
        shapes = a.shapes
    elif a.quick:
        shapes = [CPU_SHAPES[0] if cpu_scale else LLAMA_SHAPES[1]]
    else:
        shapes = list(CPU_SHAPES if cpu_scale else LLAMA_SHAPES)
    if a.T_values:
        T_values = a.T_values
    elif cpu_scale:
        T_values = [64, 256] if a.quick else [64, 256, 1024]
    else:
        T_values = [1024, 4096] if a.quick else [512, 2048, 8192, 16384]
    cases = build_cases(a.sweep, shapes=shapes, T_values=T_values,
                        T=a.tokens or (256 if cpu_scale else 4096), experts=experts,
                        ranks=ranks, base=base)
    return BenchPlan(
        cases=cases, sweep=a.sweep, device=device, dtype=dtype, modes=a.modes,
        providers=a.providers, reps=a.reps or (5 if a.quick else 7),
        warmup=a.warmup if a.warmup is not None else (1 if a.quick else 2),
        threads=1 if a.threads is None else a.threads, memory=not a.no_memory,
        check=a.check, plot=not a.no_plot, progress=not a.no_progress, seed=a.seed, out=a.out)


def run(plan: BenchPlan) -> int:
    """Measure, write the CSV and the plot, print the tables. 0, or 1 when nothing was
    measured (every provider asked for, besides base, was skipped)."""
    import torch

    from .measuring import dtype_name, run_bench
    from .reporting import plot_csv, speedup_table, summary_table, write_csv

    dev_type = torch.device(plan.device).type
    if dev_type == "cpu" and plan.threads > 0:
        torch.set_num_threads(plan.threads)
    t0 = time.time()
    res = run_bench(plan.cases, plan.sweep, device=plan.device, dtype=plan.dtype,
                    modes=plan.modes, providers=plan.providers, reps=plan.reps,
                    warmup=plan.warmup, memory=plan.memory, check=plan.check,
                    progress=plan.progress, seed=plan.seed)
    for n, why in res.skipped.items():
        logger.warning("bench: skipped %s: %s", n, why)
    if not res.rows or (not res.measured and res.skipped):
        logger.error("bench: nothing was measured: every provider besides base was skipped "
                     "(%s)", ", ".join(res.skipped) or "base failed too")
        return 1
    os.makedirs(plan.out, exist_ok=True)
    stem = f"bench_{plan.sweep}_{dev_type}_{dtype_name(plan.dtype)}"
    path = write_csv(res.rows, os.path.join(plan.out, f"{stem}.csv"))
    print(f"\nSLIM linear benchmark: {dev_type} {dtype_name(plan.dtype)}, sweep {plan.sweep}, "
          f"{plan.reps} interleaved repetitions, {time.time() - t0:.0f} s")
    print(f"provenance: {res.rows[0]['versions']}\n")
    print("time: ratio to base (median of the provider / median of base), median ms in brackets")
    print(summary_table(res.rows, "time_ms"))
    if dev_type == "cpu":
        print("process CPU time: ratio to base, median ms in brackets")
        print(summary_table(res.rows, "cpu_ms"))
    if plan.memory:
        print("peak memory during the call, ratio to base (MB in brackets)")
        print(summary_table(res.rows, "peak_MB"))
    if plan.check:
        print("forward error against the fp64 reference (max |y - y_ref| / max |y_ref|)")
        for r in res.rows:
            if r["metric"] == "max_rel_err":
                print(f"  {r['x']:>12}  {r['provider']:16s} {float(r['y_50']):.3g}")
        print()
    if "forward+backward" in plan.modes:
        for metric in (("time_ms", "cpu_ms") if dev_type == "cpu" else ("time_ms",)):
            print(f"fused providers, forward+backward [{metric}]: ratio to base, FLOP floor, "
                  f"and how many times faster than each unfused baseline (> 1: fused wins)")
            print(speedup_table(res.rows, "forward+backward", metric) + "\n")
    print(f"wrote {path}")
    if plan.plot:
        try:
            print(f"wrote {plot_csv(path, plan.out, stem)}")
        except ImportError as e:
            logger.warning("bench: no plot drawn (%s); pip install matplotlib to get one", e)
    return 0


def main_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the parsed arguments (errors exit 2 through ``parser``), then run."""
    return run(check_arguments(parser, args))

