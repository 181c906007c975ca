"""Ratio of the SLIM op on CPU (cpp backend, torch backend) to the frozen base linear layer.

Timed by the package's harness (:func:`slim_kernels.bench.measuring.time_interleaved`, as
``slim-kernels bench`` is): every round times each variant once, in rotating order; medians
reported. The machine is shared, so only ratios measured together mean anything.

    PYTHONPATH=. python benchmarks/cpu_backend_ratio.py            # the target shape below
    PYTHONPATH=. python benchmarks/cpu_backend_ratio.py --rounds 5 --T 512 --csv out.csv

Shape: fp32, T=2048, K=N=2048, E_L=8, E_I=2, r=16, top_k=2, clusters on (C=4, yield 1.0, rms
distance). Scenario ``paper``: router N(0, 0.02) as initialised, so yielding steers many
tokens to the identity experts; ``lora2``: identity experts pushed out (yield_strength=-10),
every token selects two LoRA experts (the sparse path's worst case). Base: forward =
F.linear(x, W, b); forward+backward = that plus the dx GEMM (W frozen). cpp modes: sparse
(only the selected experts), dense (every LoRA expert), MODE:BLOCK (tokens per block), set on
the backend module (``cpp.MODE``, ``cpp.BLOCK``) before each call.
The CSV records the provenance of the run (commit, versions, machine) in every row.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slim_kernels.bench.measuring import quantiles, time_interleaved  # noqa: E402
from slim_kernels.bench.reporting import write_csv  # noqa: E402
from slim_kernels.ops import slim_linear_op  # noqa: E402
from slim_kernels.ops.backends import cpp as cpp_backend  # noqa: E402
from slim_kernels.provenance import provenance_string  # noqa: E402

logger = logging.getLogger("slim_kernels")
COLUMNS = ["provider", "mode", "scenario", "metric", "threads", "clock", "ms", "ratio",
           "provenance"]
YIELDS = {"paper": 1.0, "lora2": -10.0}


def set_cpp_mode(mode: str) -> None:
    """MODE or MODE:BLOCK onto the cpp backend's attributes (no BLOCK: the default)."""
    name, _, blk = mode.partition(":")
    cpp_backend.MODE = name
    try:
        cpp_backend.BLOCK = int(blk) if blk else 0
    except ValueError:
        raise ValueError(f"BLOCK={blk!r} is not an integer") from None


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=type(
            "F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter),
            {}))
    p.add_argument("--T", type=int, default=2048, help="tokens")
    p.add_argument("--K", type=int, default=2048, help="in features")
    p.add_argument("--N", type=int, default=2048, help="out features")
    p.add_argument("--EL", type=int, default=8, help="LoRA experts")
    p.add_argument("--EI", type=int, default=2, help="identity experts")
    p.add_argument("--r", type=int, default=16, help="rank of each LoRA expert")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds")
    p.add_argument("--modes", default="sparse,dense",
                   help="cpp variants, comma-separated MODE or MODE:BLOCK (tokens per block)")
    p.add_argument("--scenarios", default="paper,lora2", help=f"comma list of {list(YIELDS)}")
    p.add_argument("--no-torch-backend", action="store_true", help="leave the torch backend out")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process CPU time (robust to other jobs on a "
                        "shared machine; use with --threads 1, since idle OpenMP spinning counts)")
    p.add_argument("--csv", default=None, help="write the rows (COLUMNS) to this file")
    a = p.parse_args(argv)
    scen_list = [s for s in a.scenarios.split(",") if s]
    bad = [s for s in scen_list if s not in YIELDS]
    if bad or not scen_list:
        p.error(f"argument --scenarios: unknown or empty {bad or scen_list}; "
                f"choose from {', '.join(YIELDS)}")
    why = cpp_backend.unavailable_reason()
    if why:
        sys.exit(f"cpp backend unavailable: {why}")
    mode_list = [m for m in a.modes.split(",") if m]
    for m in mode_list:  # a bad mode fails here, not as a left-out variant
        try:
            set_cpp_mode(m)
            cpp_backend._flags()
        except ValueError as e:
            p.error(f"argument --modes: {m!r}: {e}")
    logging.basicConfig(format="%(levelname)s: %(message)s")

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    T, K, N, EL, EI, r, k = a.T, a.K, a.N, a.EL, a.EI, a.r, a.top_k
    x = torch.randn(T, K)
    W = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) * 0.1
    A = (torch.rand(EL * r, K) * 2 - 1) / K ** 0.5
    B = torch.randn(N, EL * r) * 0.01
    R = torch.randn(EL + EI, K) * 0.02
    centers = x[torch.randperm(T)[:4]].clone()
    inv_std = (x.var(0, keepdim=True).expand(4, K) + 1e-5).rsqrt().contiguous()
    dy = torch.randn(T, N)

    def slim(backend, scen, grad):
        with torch.set_grad_enabled(grad):
            xx = x.detach().requires_grad_(grad)
            AA, BB, RR = (t.detach().requires_grad_(grad) for t in (A, B, R))
            out = slim_linear_op(
                xx, W, b, AA, BB, RR, num_lora_experts=EL, top_k=k, scaling=2.0,
                yield_strength=YIELDS[scen], distance_reduce="rms", centers=centers,
                inv_std=inv_std, backend=backend,
            )
            if grad:
                out[0].backward(dy)
        return out

    def base(grad):
        with torch.set_grad_enabled(grad):
            xx = x.detach().requires_grad_(grad)
            y = F.linear(xx, W, b)
            if grad:
                y.backward(dy)
        return y

    def cpp(mode, scen, grad):
        set_cpp_mode(mode)
        return slim("cpp", scen, grad)

    # (provider, mode, scenario, metric) -> one call
    variants = {("base", "-", "-", "fwd"): lambda: base(False),
                ("base", "-", "-", "fwd+bwd"): lambda: base(True)}
    for scen in scen_list:
        for m in mode_list:
            variants[("cpp", m, scen, "fwd")] = lambda m=m, s=scen: cpp(m, s, False)
            variants[("cpp", m, scen, "fwd+bwd")] = lambda m=m, s=scen: cpp(m, s, True)
        if not a.no_torch_backend:
            variants[("torch", "-", scen, "fwd")] = lambda s=scen: slim("torch", s, False)
            variants[("torch", "-", scen, "fwd+bwd")] = lambda s=scen: slim("torch", s, True)

    for scen in scen_list:  # selection statistics
        with torch.no_grad():
            _, g, idx, d, _ = slim("torch", scen, False)
        nl = (idx < EL).sum(1).float().mean().item()
        print(f"# scenario {scen}: mean LoRA experts selected per token {nl:.2f} of top-{k}; "
              f"mean distance {d.mean().item():.3f}")

    t = time_interleaved({key: (lambda: None, fn) for key, fn in variants.items()},
                         reps=a.rounds, warmup=1)
    for key, msg in t.failed.items():
        logger.warning("%s failed, left out: %s", "/".join(key), msg)
    times = t.wall_ms if a.clock == "wall" else t.cpu_ms
    med = {key: quantiles(v)[0] for key, v in times.items()}
    missing = [m for m in ("fwd", "fwd+bwd") if ("base", "-", "-", m) not in med]
    if missing:
        sys.exit(f"the base linear failed ({missing}): no ratio to report")
    prov = provenance_string("cpu")
    rows = []
    print(f"# T={T} K={K} N={N} E_L={EL} E_I={EI} r={r} top_k={k} fp32, threads="
          f"{torch.get_num_threads()}, clock={a.clock}, rounds={a.rounds} (interleaved, medians)")
    print(f"{'provider':8s} {'mode':13s} {'scenario':8s} {'metric':8s} {'ms':>9s} {'x base':>7s}")
    for key in med:
        provider, mode, scen, metric = key
        ratio = med[key] / med[("base", "-", "-", metric)]
        rows.append(dict(provider=provider, mode=mode, scenario=scen, metric=metric,
                         threads=torch.get_num_threads(), clock=a.clock,
                         ms=round(med[key], 3), ratio=round(ratio, 4), provenance=prov))
        print(f"{provider:8s} {mode:13s} {scen:8s} {metric:8s} {med[key]:9.2f} {ratio:7.3f}")
    if a.csv:
        print(f"wrote {write_csv(rows, a.csv, COLUMNS)}")
    return rows


if __name__ == "__main__":
    main()
