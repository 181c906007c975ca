"""Time the fused SLIM Triton op against the frozen base linear (cuBLAS) and the eager
per-expert reference, forward and forward+backward, on one CUDA GPU.

    python benchmarks/bench_triton.py [--out results.csv] [--iters 30] [--shapes 4096x4096,...]

Shapes (the issue's targets): T=8192, E_L=8, E_I=2, r=16, top_k=2, bf16, C=4 clusters with
yielding on, K×N in {4096×4096, 4096×14336, 14336×4096}. Providers are interleaved call by
call (each timed with CUDA events), and the median / 20th / 80th percentiles are written.

Providers:
  base            F.linear(x, W, b); fwd_bwd: + the dx GEMM (W frozen: no dW)
  slim_triton     slim_linear_op(..., backend="triton")  (route + fused linear kernels)
  slim_torch      slim_linear_op(..., backend="torch")   (stacked PyTorch, cuBLAS)
  eager_reference slim_kernels.reference.slim_reference  (per-expert loop, autograd)

CSV columns: kernel,provider,mode,metric,x,y_50,y_20,y_80,device,dtype,versions.
metric "time_ms" rows hold times; "ratio_vs_base" rows hold provider/base median ratios;
"max_rel_err_vs_torch" (mode fwd) checks the triton output against the torch backend.
"""
import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import slim_kernels  # noqa: E402
from slim_kernels.reference import slim_reference  # noqa: E402

COLS = ["kernel", "provider", "mode", "metric", "x", "y_50", "y_20", "y_80", "device", "dtype",
        "versions"]


def quantiles(v):
    v = sorted(v)
    q = lambda p: v[min(len(v) - 1, max(0, int(round(p * (len(v) - 1)))))]
    return statistics.median(v), q(0.2), q(0.8)


def make(T, K, N, E_L, r, E_I, C, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    f = lambda *s, sc=1.0: (torch.randn(*s, generator=g, device=dev) * sc).to(dtype)
    W = f(N, K, sc=K ** -0.5)
    b = f(N, sc=0.1)
    A = f(E_L * r, K, sc=K ** -0.5).requires_grad_(True)
    B = f(N, E_L * r, sc=0.02).requires_grad_(True)
    R = f(E_L + E_I, K, sc=0.02).requires_grad_(True)
    x = f(T, K)
    centers = torch.randn(C, K, generator=g, device=dev)
    cvars = torch.rand(C, K, generator=g, device=dev) + 0.5
    return dict(x=x, W=W, b=b, A=A, B=B, R=R, centers=centers, vars=cvars,
                inv_std=(cvars + 1e-5).rsqrt(), dy=f(T, N), E_L=E_L, r=r)


def providers(c, top_k, scaling, lam):
    E_L, r = c["E_L"], c["r"]
    K = c["x"].shape[1]
    N = c["W"].shape[0]

    def slim(backend):
        def fwd(x):
            return slim_kernels.slim_linear_op(
                x, c["W"], c["b"], c["A"], c["B"], c["R"], num_lora_experts=E_L, top_k=top_k,
                scaling=scaling, yield_strength=lam, distance_reduce="rms",
                centers=c["centers"], inv_std=c["inv_std"], backend=backend)[0]
        return fwd

    def base(x):
        return F.linear(x, c["W"], c["b"])

    def eager(x):
        return slim_reference(
            x, c["W"], c["b"], c["A"].view(E_L, r, K), c["B"].view(N, E_L, r).permute(1, 0, 2),
            c["R"], top_k=top_k, scaling=scaling, yield_strength=lam, distance_reduce="rms",
            centers=c["centers"], cluster_vars=c["vars"], cluster_eps=1e-5)[0]

    return {"base": base, "slim_triton": slim("triton"), "slim_torch": slim("torch"),
            "eager_reference": eager}


def step(fn, c):
    """One training step of fn: forward, backward of dy (grads of x, A, B, R)."""
    params = (c["A"], c["B"], c["R"])
    xg = c["x"].detach().requires_grad_(True)

    def run():
        for p in params:
            p.grad = None
        xg.grad = None
        fn(xg).backward(c["dy"])
    return run


class _CpuEvent:
    """Stand-in for torch.cuda.Event in the CPU dry run (--device cpu)."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def bench_shape(K, N, args, writer, meta):
    dev = args.device
    dtype = torch.bfloat16
    Event = (lambda: torch.cuda.Event(enable_timing=True)) if dev == "cuda" else _CpuEvent
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    c = make(args.T, K, N, args.E_L, args.r, args.E_I, args.C, dtype, dev)
    provs = providers(c, args.top_k, 2.0, 1.0)
    x = f"{K}x{N}"
    # correctness spot check (forward) against the torch backend
    with torch.no_grad():
        yt = provs["slim_triton"](c["x"]).float()
        yr = provs["slim_torch"](c["x"]).float()
    rel = ((yt - yr).abs().max() / yr.abs().max()).item()
    writer.writerow(dict(meta, provider="slim_triton", mode="fwd", metric="max_rel_err_vs_torch",
                         x=x, y_50=rel, y_20=rel, y_80=rel))
    print(f"[{x}] triton vs torch backend: max rel err {rel:.3g}", flush=True)
    for mode in ("fwd", "fwd_bwd"):
        fns = {}
        for name, fn in provs.items():
            if name == "eager_reference" and args.skip_eager:
                continue
            if mode == "fwd":
                fns[name] = (lambda f: (lambda: f(c["x"])))(fn)
            else:
                fns[name] = step(fn, c)
        # warm-up (compiles and autotunes the triton kernels)
        for f in fns.values():
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                for _ in range(3):
                    f()
        sync()
        times = {n: [] for n in fns}
        t_end = time.time() + args.budget_s
        for it in range(args.iters):
            ev = []
            for name, f in fns.items():  # interleaved: one call of each provider per round
                s, e = Event(), Event()
                with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                    s.record()
                    f()
                    e.record()
                ev.append((name, s, e))
            sync()
            for name, s, e in ev:
                times[name].append(s.elapsed_time(e))
            if time.time() > t_end and it >= 5:
                break
        qs = {n: quantiles(v) for n, v in times.items()}
        for name, (m, lo, hi) in qs.items():
            writer.writerow(dict(meta, provider=name, mode=mode, metric="time_ms", x=x,
                                 y_50=m, y_20=lo, y_80=hi))
            ratio = m / qs["base"][0]
            writer.writerow(dict(meta, provider=name, mode=mode, metric="ratio_vs_base", x=x,
                                 y_50=ratio, y_20=ratio, y_80=ratio))
            print(f"[{x}] {mode:8s} {name:16s} {m:8.3f} ms  ({lo:.3f}-{hi:.3f})  "
                  f"x{ratio:.3f} of base", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", str(ROOT / "benchmarks")),
                                                  "triton_bench.csv"))
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--E_L", type=int, default=8)
    ap.add_argument("--E_I", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--C", type=int, default=4)
    ap.add_argument("--top_k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--budget_s", type=float, default=25.0, help="time cap per shape and mode")
    ap.add_argument("--skip_eager", action="store_true")
    ap.add_argument("--device", default="cuda",
                    help="cuda; or cpu for a dry run of this script under TRITON_INTERPRET=1 "
                         "(tiny shapes only, e.g. --T 40 --shapes 48x40)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_triton.py needs a CUDA GPU (or --device cpu for a dry run)")
    import triton
    devname = torch.cuda.get_device_name() if args.device == "cuda" else "cpu-interpreter"
    meta = dict(kernel="slim_linear", device=devname, dtype="bf16",
                versions=f"torch={torch.__version__};triton={triton.__version__};"
                         f"slim_kernels={slim_kernels.__version__}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLS)
        w.writeheader()
        for s in args.shapes.split(","):
            K, N = (int(v) for v in s.split("x"))
            bench_shape(K, N, args, w, meta)
            fh.flush()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
