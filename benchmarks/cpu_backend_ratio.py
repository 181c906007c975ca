"""Ratio of the SLIM op on CPU (cpp backend, torch backend) to the frozen base linear layer.

Interleaved in one run (every round times each variant once, in rotating order), medians
reported; the machine is shared, so only ratios measured together mean anything.

    PYTHONPATH=. python benchmarks/cpu_backend_ratio.py            # the issue's shape
    PYTHONPATH=. python benchmarks/cpu_backend_ratio.py --rounds 5 --T 512 --csv out.csv

Shape (issue 4): fp32, T=2048, K=N=2048, E_L=8, E_I=2, r=16, top_k=2, clusters on (C=4,
yield 1.0, rms distance). Scenario ``paper``: router N(0, 0.02) as initialised, so yielding
steers many tokens to the identity experts; ``lora2``: identity experts pushed out
(yield_strength=-10), every token selects two LoRA experts (the sparse path's worst case).
Base: forward = F.linear(x, W, b); forward+backward = that plus the dx GEMM (W frozen).
cpp modes: sparse (only the selected experts), dense (every LoRA expert), *-fused (base GEMM
per token block inside the same pass instead of one GEMM over all tokens).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from slim_kernels.ops import slim_linear_op  # noqa: E402
from slim_kernels.ops.backends import cpp as cpp_backend  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--K", type=int, default=2048)
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--EL", type=int, default=8)
    p.add_argument("--EI", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--modes", default="sparse,dense",
                   help="cpp variants, comma-separated MODE or MODE:BLOCK (tokens per block)")
    p.add_argument("--scenarios", default="paper,lora2")
    p.add_argument("--no-torch-backend", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process CPU time (robust to other jobs on a "
                        "shared machine; use with --threads 1, since idle OpenMP spinning counts)")
    p.add_argument("--csv", default=None, help="write provider,mode,scenario,metric,ms,ratio rows")
    a = p.parse_args(argv)
    why = cpp_backend.unavailable_reason()
    if why:
        sys.exit(f"cpp backend unavailable: {why}")

    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    torch.manual_seed(0)
    T, K, N, EL, EI, r, k = a.T, a.K, a.N, a.EL, a.EI, a.r, a.top_k
    E = EL + EI
    x = torch.randn(T, K)
    W = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) * 0.1
    A = (torch.rand(EL * r, K) * 2 - 1) / K ** 0.5
    B = torch.randn(N, EL * r) * 0.01
    R = torch.randn(E, K) * 0.02
    centers = x[torch.randperm(T)[:4]].clone()
    inv_std = (x.var(0, keepdim=True).expand(4, K) + 1e-5).rsqrt().contiguous()
    dy = torch.randn(T, N)
    yields = {"paper": 1.0, "lora2": -10.0}

    def slim(backend, scen, grad):
        xx = x.detach().requires_grad_(grad)
        AA, BB, RR = (t.detach().requires_grad_(grad) for t in (A, B, R))
        out = slim_linear_op(
            xx, W, b, AA, BB, RR, num_lora_experts=EL, top_k=k, scaling=2.0,
            yield_strength=yields[scen], distance_reduce="rms", centers=centers,
            inv_std=inv_std, backend=backend,
        )
        if grad:
            out[0].backward(dy)
        return out

    def base(grad):
        xx = x.detach().requires_grad_(grad)
        y = F.linear(xx, W, b)
        if grad:
            y.backward(dy)
        return y

    variants = {}
    variants[("base", "-", "-", "fwd")] = lambda: base(False)
    variants[("base", "-", "-", "fwd+bwd")] = lambda: base(True)
    scen_list = [s for s in a.scenarios.split(",") if s]
    modes = [m for m in a.modes.split(",") if m]
    for scen in scen_list:
        for m in modes:
            def run(grad, m=m, scen=scen):
                name, _, blk = m.partition(":")
                os.environ["SLIM_KERNELS_CPP_MODE"] = name
                os.environ["SLIM_KERNELS_CPP_BLOCK"] = blk
                with torch.set_grad_enabled(grad):
                    return slim("cpp", scen, grad)
            variants[("cpp", m, scen, "fwd")] = lambda run=run: run(False)
            variants[("cpp", m, scen, "fwd+bwd")] = lambda run=run: run(True)
        if not a.no_torch_backend:
            variants[("torch", "-", scen, "fwd")] = lambda scen=scen: slim("torch", scen, False)
            variants[("torch", "-", scen, "fwd+bwd")] = (
                lambda scen=scen: torch.enable_grad() and slim("torch", scen, True))

    # selection statistics
    for scen in scen_list:
        with torch.no_grad():
            _, g, idx, d, _ = slim("torch", scen, False)
        nl = (idx < EL).sum(1).float().mean().item()
        print(f"# scenario {scen}: mean LoRA experts selected per token {nl:.2f} of top-{k}; "
              f"mean distance {d.mean().item():.3f}")

    keys = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    times = {key: [] for key in keys}
    for rnd in range(a.rounds):
        order = keys[rnd % len(keys):] + keys[: rnd % len(keys)]
        for key in order:
            t0 = clock()
            variants[key]()
            times[key].append(clock() - t0)
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    rows = []
    print(f"# T={T} K={K} N={N} E_L={EL} E_I={EI} r={r} top_k={k} fp32, threads="
          f"{torch.get_num_threads()}, clock={a.clock}, rounds={a.rounds} (interleaved, medians)")
    print(f"{'provider':8s} {'mode':13s} {'scenario':8s} {'metric':8s} {'ms':>9s} {'x base':>7s}")
    for key in keys:
        prov, mode, scen, metric = key
        ratio = med[key] / med[("base", "-", "-", metric)]
        rows.append(dict(provider=prov, mode=mode, scenario=scen, metric=metric,
                         threads=torch.get_num_threads(), clock=a.clock,
                         ms=round(med[key], 3), ratio=round(ratio, 4)))
        print(f"{prov:8s} {mode:13s} {scen:8s} {metric:8s} {med[key]:9.2f} {ratio:7.3f}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
