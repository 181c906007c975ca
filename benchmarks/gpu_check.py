"""The device check: one offline command that says whether the triton backend is right and fast
on a GPU (``docs/benchmarks.md``, "On a GPU"). A plain script (no pytest on the device image).

    python benchmarks/gpu_check.py --out $OUT        # on a CUDA GPU, < 8 minutes
    python benchmarks/gpu_check.py --dry --out DIR   # CPU, Triton interpreter, tiny shapes (CI)

Every check prints one line ``PASS|FAIL|INFO|SKIP|ERROR  section  name  value  target`` and
appends it to ``$OUT/results.csv``; a check that raises is reported as ERROR and the others
still run (no stop at the first failure). In order:

1. ``linear``: the Triton fused linear alone (``x Wᵀ``) against ``torch.mm`` (cuBLAS) on each
   shape, bf16. PASS when Triton / cuBLAS <= forward target / FLOP floor: above that, the
   forward target is out of reach whatever the route kernel costs.
2. ``grads``: bf16 and fp32 at T = 8192, K x N = 4096x4096, 4096x14336, 14336x4096, E_L = 8,
   E_I = 2, r = 16, top-2, 4 clusters: y, dx, dA, dB, dRouter against the fp64 reference
   *given the kernel's own top-k indices and cluster assignments* (routing flips between
   near-tied logits are not error), by the 2x rule (error <= 2 x the error of the same
   fixed-routing computation in PyTorch in that dtype, + 1e-5 relative).
3. ``wgrad_2g``: a weight-gradient GEMM dB = dyᵀ hg with T·N >= 2^31 (int64 offsets), in a
   subprocess so that an illegal address cannot end the check.
4. ``ratio``: forward and forward+backward of the SLIM op against the frozen base
   (``F.linear``), the eager per-expert loop and ``torch.compile`` of the dense reference,
   against the targets (fwd <= 1.10x base, 1.07x on the MLP shapes; fwd+bwd <= 1.16x /
   1.11x; >= 2x faster than the eager loop; >= 1.3x faster than compiled dense).
5. ``kernel``: per-kernel times (route forward, fused linear, route backward with each way of
   summing dB, dB GEMM, dx, [dA; dR], and a training forward's route with the statistics'
   per-token input and the cluster-statistics pass) and whether the deterministic dB and
   cluster statistics repeat bit for bit; the statistics against the fp64 reference.
6. ``decode``: T in {1, 16, 64}: the gradients as in 2, and forward times against the base.
(The fp32 half of 2 runs last.)

Timing: :func:`slim_kernels.bench.measuring.time_interleaved` (the project's one harness;
CUDA events with the L2 flushed on a GPU). Autotuning is printed (TRITON_PRINT_AUTOTUNING=1)
and what it picked is written to ``$OUT/tuned_configs.json`` (rows for the shipped table,
``slim_kernels/ops/backends/triton/tuning.py``). A time budget (``--budget``) skips what no
longer fits, saying so.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "gpu_out"))
    ap.add_argument("--dry", action="store_true",
                    help="CPU, Triton interpreter, tiny shapes: the script end to end (CI)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all checks (default 450 on a GPU: the 8-minute run, "
                         "less a margin)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a child: one section
    return ap.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else _parse([])
# before triton is imported: @triton.jit reads TRITON_INTERPRET, the autotuner the print flag
if ARGS.dry:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)  # never the interpreter on a GPU
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slim_kernels.bench.cases import Case, make_inputs  # noqa: E402
from slim_kernels.bench.measuring import (flop_floor, quantiles, step, sync_fn,  # noqa: E402
                                          time_interleaved)
from slim_kernels.bench.providers import providers_for  # noqa: E402
from slim_kernels.ops import slim_linear_op  # noqa: E402
from slim_kernels.ops.backends.triton import launch as tb  # noqa: E402
from slim_kernels.reference import reference_cluster_stats  # noqa: E402

DEV = "cpu" if ARGS.dry else "cuda"
CUDA = DEV == "cuda"
if ARGS.dry:
    T_BIG, SHAPES, DECODE_T = 64, ((48, 48), (48, 80), (80, 48)), (1, 4)
    EXPERTS = dict(num_lora_experts=2, num_identity_experts=2, rank=4, top_k=2, num_clusters=2)
    REPS, WARMUP = 2, 1
    BIG_T, BIG_N, BIG_ER = 300, 40, 8
else:
    T_BIG = 8192
    SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
    DECODE_T = (1, 16, 64)
    EXPERTS = dict(num_lora_experts=8, num_identity_experts=2, rank=16, top_k=2, num_clusters=4)
    REPS, WARMUP = 20, 3
    BIG_T, BIG_N, BIG_ER = (1 << 19) + (1 << 15), 4096, 128  # T·N = 2.28e9 >= 2^31
TARGETS = {"forward": (1.10, 1.07), "forward+backward": (1.16, 1.11)}  # (square, MLP)
EAGER_SPEEDUP, COMPILED_SPEEDUP = 2.0, 1.3
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
class Report:
    COLS = ["section", "name", "status", "value", "target", "note"]

    def __init__(self, out: Path, budget: float, append: bool = False):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.csv = out / "results.csv"
        if not append:
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(self.COLS)
        self.t0 = time.time()
        self.budget = budget
        self.counts = {}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def result(self, section, name, status, value="", target="", note="") -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        v = f"{value:.4g}" if isinstance(value, float) else str(value)
        self.say(f"{status:5s}  {section:9s} {name:48s} {v:>12s}  {target}  {note}".rstrip())
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([section, name, status, v, target, note])

    def check(self, section, name, value, bound, note="", lower_is_better=True) -> None:
        ok = value <= bound if lower_is_better else value >= bound
        op = "<=" if lower_is_better else ">="
        self.result(section, name, "PASS" if ok else "FAIL", float(value),
                    f"{op} {bound:.4g}", note)

    def run(self, section, name, fn, need: float = 0.0) -> None:
        """fn(), reporting an exception as ERROR (with its traceback) and going on; SKIP when
        the budget has less than ``need`` seconds left."""
        if self.left() < need:
            self.result(section, name, "SKIP", "", "", f"time budget: {self.left():.0f} s left, "
                        f"needs ~{need:.0f} s")
            return
        t = time.time()
        try:
            fn()
        except Exception as e:  # every check runs and reports
            traceback.print_exc()
            self.result(section, name, "ERROR", "", "", f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            self.say(f"       ({section} {name}: {time.time() - t:.1f} s, "
                     f"{self.left():.0f} s of the budget left)")
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()


def rel(a, b) -> float:
    """Relative Frobenius error of a against b, in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def case_of(K, N, T) -> Case:
    return Case(K=K, N=N, T=T, **EXPERTS)


def shape_name(case: Case) -> str:
    return f"T={case.T},{case.K}x{case.N}"


def is_mlp(case: Case) -> bool:
    return case.K != case.N


def timeit(fns: dict, reps=None, warmup=None) -> dict:
    """Median ms of each callable, interleaved (the bench harness)."""
    steps = {n: ((lambda: None), f) for n, f in fns.items()}
    t = time_interleaved(steps, reps=reps or REPS, warmup=warmup or WARMUP, sync=sync_fn(DEV),
                         cuda_events=CUDA)
    for n, msg in t.failed.items():
        raise RuntimeError(f"{n} failed: {msg}")
    return {n: quantiles(v)[0] for n, v in t.wall_ms.items()}


# ------------------------------------------------------------------------------------------
# the fp64 reference given the kernel's routing
# ------------------------------------------------------------------------------------------
def fixed_routing(inp, idx, assign, dtype):
    """y and the gradients of x, A_all, B_all, R for upstream dy, in ``dtype``, with the
    experts ``idx`` and the clusters ``assign`` the kernel chose (``docs/method.md`` §1-§2:
    z = x Rᵀ + λ d on the identity experts, d the rms distance to the assigned centre, a
    constant; gates = softmax over the selected logits; y = x Wᵀ + b + (s g ⊙ x A_allᵀ) B_allᵀ)."""
    c = inp.case
    E_L, r = c.num_lora_experts, c.rank
    leaf = lambda t: t.detach().to(dtype).requires_grad_(True)  # noqa: E731
    x, A, B, R = leaf(inp.x), leaf(inp.lora_A), leaf(inp.lora_B), leaf(inp.router)
    W = inp.weight.detach().to(dtype)
    b = None if inp.bias is None else inp.bias.detach().to(dtype)
    z = x @ R.t()
    if inp.centers is not None and c.yield_strength != 0.0 and c.num_identity_experts > 0:
        with torch.no_grad():
            xf = inp.x.detach().double()
            diff = (xf - inp.centers.double()[assign]) * inp.inv_std.double()[assign]
            d = diff.square().mean(1).sqrt() - 1.0
        bump = torch.zeros(c.E, dtype=dtype, device=x.device)
        bump[E_L:] = c.yield_strength
        z = z + d.to(dtype)[:, None] * bump
    g = torch.softmax(z.gather(1, idx), dim=1)
    gates = torch.zeros_like(z).scatter(1, idx, g)
    hg = c.scaling * gates[:, :E_L].repeat_interleave(r, dim=1) * (x @ A.t())
    y = F.linear(x, W, b) + hg @ B.t()
    y.backward(inp.dy.detach().to(dtype))
    return dict(y=y.detach(), dx=x.grad, dA=A.grad, dB=B.grad, dRouter=R.grad)


def triton_call(inp):
    """Forward and backward of the SLIM op on the triton backend; outputs and gradients."""
    c = inp.case
    for t in inp.trainable:
        t.grad = None
    y, gates, idx, d, assign = slim_linear_op(
        inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.router,
        num_lora_experts=c.num_lora_experts, top_k=c.top_k, scaling=c.scaling,
        yield_strength=c.yield_strength, distance_reduce=c.distance_reduce,
        centers=inp.centers, inv_std=inp.inv_std, backend="triton")
    y.backward(inp.dy)
    got = dict(y=y.detach(), dx=inp.x.grad, dA=inp.lora_A.grad, dB=inp.lora_B.grad,
               dRouter=inp.router.grad)
    return got, idx, assign


def grads_check(rep: Report, section: str, case: Case, dtype) -> None:
    inp = make_inputs(case, device=DEV, dtype=dtype, seed=0)
    got, idx, assign = triton_call(inp)
    truth = fixed_routing(inp, idx, assign, torch.float64)
    base = fixed_routing(inp, idx, assign, dtype)
    tag = f"{DTYPE_NAMES[dtype]} {shape_name(case)}"
    for k in ("y", "dx", "dA", "dB", "dRouter"):
        e, eb = rel(got[k], truth[k]), rel(base[k], truth[k])
        rep.check(section, f"{tag} {k}", e, 2 * eb + 1e-5, note=f"torch {DTYPE_NAMES[dtype]}: "
                  f"{eb:.3g}")
    with torch.no_grad():  # routing flips against the fp64 top-k (information only)
        z = inp.x.detach().double() @ inp.router.detach().double().t()
        if inp.centers is not None and case.num_identity_experts:
            xf = inp.x.detach().double()
            dd = ((xf - inp.centers.double()[assign]) * inp.inv_std.double()[assign])
            z[:, case.num_lora_experts:] += case.yield_strength * (dd.square().mean(1).sqrt() - 1)[:, None]
        ref_idx = z.topk(case.top_k, dim=1).indices
        flips = int((idx.sort(1).values != ref_idx.sort(1).values).any(1).sum())
    rep.result(section, f"{tag} routing flips vs fp64", "INFO", flips, "", "not counted as error")


# ------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------
def env_section(rep: Report) -> None:
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                device=DEV, dry=ARGS.dry, interpret=os.environ.get("TRITON_INTERPRET", "0"),
                autotune=os.environ.get("SLIM_KERNELS_AUTOTUNE", "1"),
                db=os.environ.get("SLIM_KERNELS_DB", "auto"))
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}",
                    sms=p.multi_processor_count, memory_GB=round(p.total_memory / 2**30, 1))
    try:
        from slim_kernels.provenance import provenance_string
        info["provenance"] = provenance_string(DEV)
    except Exception as e:  # pragma: no cover
        info["provenance"] = f"unavailable: {e}"
    (rep.out / "env.json").write_text(json.dumps(info, indent=1))
    rep.say("env " + json.dumps(info))


def linear_section(rep: Report, case: Case) -> None:
    """The Triton fused linear alone (x Wᵀ) against torch.mm (cuBLAS), bf16."""
    dt = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(case.T, case.K, device=DEV, dtype=dt, generator=g)
    W = torch.randn(case.N, case.K, device=DEV, dtype=dt, generator=g) / math.sqrt(case.K)
    y = torch.empty(case.T, case.N, device=DEV, dtype=dt)
    tb.fused_linear([(x, W.t())], y)
    e, eb = rel(y, x.double() @ W.double().t()), rel(x @ W.t(), x.double() @ W.double().t())
    tag = shape_name(case)
    rep.check("linear", f"{tag} triton x W^T error", e, 2 * eb + 1e-5)
    ms = timeit({"triton": lambda: tb.fused_linear([(x, W.t())], y),
                 "cublas": lambda: torch.mm(x, W.t())})
    tflops = lambda t: 2 * case.T * case.N * case.K / (t * 1e-3) / 1e12  # noqa: E731
    rep.result("linear", f"{tag} triton ms", "INFO", ms["triton"], "",
               f"{tflops(ms['triton']):.0f} TFLOP/s")
    rep.result("linear", f"{tag} cublas ms", "INFO", ms["cublas"], "",
               f"{tflops(ms['cublas']):.0f} TFLOP/s")
    fwd_target = TARGETS["forward"][is_mlp(case)]
    bound = fwd_target / flop_floor(case, "forward")
    rep.check("linear", f"{tag} triton / cublas", ms["triton"] / ms["cublas"], bound,
              note=f"fwd target {fwd_target} / FLOP floor {flop_floor(case, 'forward'):.4f}")


def ratio_section(rep: Report, case: Case, providers) -> None:
    inp = make_inputs(case, device=DEV, dtype=torch.bfloat16, seed=0)
    builders, skipped = providers_for(DEV, ["slim_triton", *providers])
    for n, why in skipped.items():
        rep.result("ratio", f"{shape_name(case)} {n}", "SKIP", "", "", why)
    runners = {n: b(inp) for n, b in builders.items()}
    tag = shape_name(case)
    for mode in ("forward", "forward+backward"):
        steps = {n: step(r, mode, inp.dy) for n, r in runners.items()}
        t = time_interleaved(steps, reps=REPS, warmup=WARMUP, sync=sync_fn(DEV),
                             cuda_events=CUDA)
        for n, msg in t.failed.items():
            rep.result("ratio", f"{tag} {mode} {n}", "ERROR", "", "", msg)
        med = {n: quantiles(v)[0] for n, v in t.wall_ms.items()}
        for n, v in med.items():
            rep.result("ratio", f"{tag} {mode} {n} ms", "INFO", v)
        s = med.get("slim_triton")
        if s is None or "base" not in med:
            rep.result("ratio", f"{tag} {mode} slim_triton / base", "ERROR", "", "",
                       "slim_triton or base did not run")
            continue
        target = TARGETS[mode][is_mlp(case)]
        rep.check("ratio", f"{tag} {mode} slim_triton / base", s / med["base"], target,
                  note=f"FLOP floor {flop_floor(case, mode):.4f}")
        for n, need in (("eager_loop", EAGER_SPEEDUP), ("compiled_dense", COMPILED_SPEEDUP)):
            if n in med:
                rep.check("ratio", f"{tag} {mode} {n} / slim_triton", med[n] / s, need,
                          lower_is_better=False)


def kernel_section(rep: Report, case: Case) -> None:
    """Per-kernel times of one SLIM call (bf16), and the dB modes."""
    c = case
    inp = make_inputs(case, device=DEV, dtype=torch.bfloat16, seed=0)
    x, W, b = inp.x.detach(), inp.weight, inp.bias
    A, B, R = inp.lora_A.detach(), inp.lora_B.detach(), inp.router.detach()
    dy = inp.dy
    E_L, ER, E = c.num_lora_experts, c.num_lora_experts * c.rank, c.E

    def route_fwd(stats=False):
        return tb.route_forward(x, None, A, R, inp.centers, inp.inv_std, E_L, c.top_k,
                                c.scaling, c.yield_strength, c.distance_reduce, None, stats)

    gates, idx, d, assign, h, hg, _ = route_fwd()
    y = torch.empty(c.T, c.N, device=DEV, dtype=x.dtype)
    dhz, _, _ = tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="gemm")
    dh, dz = dhz[:, :ER], dhz[:, ER:]
    dx = torch.empty_like(x)
    dB = torch.empty_like(B)
    dAR = torch.empty(ER + E, c.K, device=DEV, dtype=x.dtype)
    fns = {
        "route_fwd": route_fwd,
        "fused_linear y": lambda: tb.fused_linear([(x, W.t()), (hg, B.t())], y, b),
        "route_bwd (dB by GEMM)": lambda: tb.route_backward(dy, None, B, gates, h, E_L,
                                                            c.scaling, db="gemm"),
        "route_bwd + dB partials": lambda: tb.route_backward(dy, None, B, gates, h, E_L,
                                                             c.scaling, db="fused"),
        "route_bwd + dB atomics": lambda: tb.route_backward(dy, None, B, gates, h, E_L,
                                                            c.scaling, db="atomic"),
        "dB GEMM (split-K)": lambda: tb.fused_linear([(dy.t(), hg)], dB),
        "fused_linear dx": lambda: tb.fused_linear([(dy, W), (dh, A), (dz, R)], dx),
        "[dA; dR] (split-K)": lambda: tb.fused_linear([(dhz.t(), x)], dAR),
        "base F.linear": lambda: F.linear(x, W, b),
        "base dx (dy W)": lambda: torch.mm(dy, W),
    }
    per_token = None
    if inp.centers is not None:  # a training forward: the cluster statistics' two passes
        per_token = route_fwd(True)[6]
        fns["route_fwd + stats input"] = lambda: route_fwd(True)
        fns["cluster_stats"] = lambda: tb.cluster_statistics(x, inp.centers, *per_token)
    ms = timeit(fns)
    tag = shape_name(case)
    for n, v in ms.items():
        rep.result("kernel", f"{tag} {n} ms", "INFO", v)
    gemm = ms["route_bwd (dB by GEMM)"] + ms["dB GEMM (split-K)"]
    for n in ("route_bwd + dB partials", "route_bwd + dB atomics"):
        rep.result("kernel", f"{tag} {n} / (route_bwd + dB GEMM)", "INFO", ms[n] / gemm, "",
                   "< 1: summing dB in route_bwd pays")
    d1 = tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="fused")[2]
    d2 = tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="fused")[2]
    rep.check("kernel", f"{tag} dB partials: two runs differ (max abs)",
              (d1.float() - d2.float()).abs().max().item(), 0.0, note="deterministic")
    a1 = tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="atomic")[2]
    rep.result("kernel", f"{tag} dB atomics vs partials (rel)", "INFO", rel(a1, d1))
    ref = dy.double().t() @ hg.double()
    for n, v in (("partials", d1), ("atomics", a1)):
        rep.check("kernel", f"{tag} dB {n} error", rel(v, ref),
                  2 * rel(dy.t() @ hg, ref) + 1e-5)
    if per_token is not None:
        rep.result("kernel", f"{tag} cluster_stats / route_fwd", "INFO",
                   ms["cluster_stats"] / ms["route_fwd"], "", "the second pass over x")
        s1 = tb.cluster_statistics(x, inp.centers, *per_token)
        s2 = tb.cluster_statistics(x, inp.centers, *per_token)
        rep.check("kernel", f"{tag} cluster stats: two runs differ (bits)",
                  float(not torch.equal(s1, s2)), 0.0, note="deterministic")
        want = reference_cluster_stats(x, inp.centers, inp.inv_std, assign, c.distance_reduce)
        rep.check("kernel", f"{tag} cluster stats error (tf32x3 one-hot dots)", rel(s1, want),
                  1e-5, note="vs the fp64 reference on the same x and assignment")


def decode_section(rep: Report) -> None:
    K, N = SHAPES[0]
    for T in DECODE_T:
        case = case_of(K, N, T)
        grads_check(rep, "decode", case, torch.bfloat16)
        inp = make_inputs(case, device=DEV, dtype=torch.bfloat16, seed=0)
        builders, _ = providers_for(DEV, ["slim_triton"])
        runners = {n: b(inp) for n, b in builders.items()}
        steps = {n: step(r, "forward", inp.dy) for n, r in runners.items()}
        t = time_interleaved(steps, reps=REPS, warmup=WARMUP, sync=sync_fn(DEV),
                             cuda_events=CUDA)
        med = {n: quantiles(v)[0] for n, v in t.wall_ms.items()}
        for n, v in med.items():
            rep.result("decode", f"T={T} forward {n} ms", "INFO", v)
        if "slim_triton" in med:
            rep.result("decode", f"T={T} forward slim_triton / base", "INFO",
                       med["slim_triton"] / med["base"])


def wgrad_2g_section(rep: Report) -> None:
    """dB = dyᵀ hg with T·N >= 2^31 on the fused linear (split-K), against fp32 torch.mm."""
    T, N, ER = BIG_T, BIG_N, BIG_ER
    dt = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(2)
    dy = torch.randn(T, N, device=DEV, dtype=dt, generator=g)
    hg = torch.randn(T, ER, device=DEV, dtype=dt, generator=g) * 0.1
    out = torch.empty(N, ER, device=DEV, dtype=dt)
    tb.fused_linear([(dy.t(), hg)], out)
    if CUDA:
        torch.cuda.synchronize()
    ref = torch.mm(dy.t().float(), hg.float())
    e, eb = rel(out, ref), rel(torch.mm(dy.t(), hg), ref)
    note = f"T={T}, N={N}: T·N = {T * N:.3g}, (T-1)·N {'>=' if (T - 1) * N >= 2**31 else '<'} 2^31"
    rep.check("wgrad_2g", "dB = dy^T hg error vs fp32", e, 2 * eb + 1e-5, note=note)
    ms = timeit({"triton": lambda: tb.fused_linear([(dy.t(), hg)], out),
                 "cublas": lambda: torch.mm(dy.t(), hg)}, reps=5, warmup=1)
    rep.result("wgrad_2g", "triton / cublas time", "INFO", ms["triton"] / ms["cublas"], "",
               f"{ms['triton']:.3g} ms vs {ms['cublas']:.3g} ms")


def write_tuned(rep: Report) -> None:
    table = {}
    for arch, fam, key, cfg in tb.tuned_here():
        table.setdefault(arch, {}).setdefault(fam, {})[key] = list(cfg)
    (rep.out / "tuned_configs.json").write_text(json.dumps(table, indent=1, sort_keys=True))


def main() -> int:
    out = Path(ARGS.out)
    budget = ARGS.budget if ARGS.budget is not None else (450.0 if CUDA else 3600.0)
    if ARGS.only == "wgrad_2g":  # the child process of section 3
        rep = Report(out, budget, append=True)
        rep.run("wgrad_2g", "T·N >= 2^31", lambda: wgrad_2g_section(rep))
        return 1 if rep.counts.get("ERROR") else 0
    if CUDA and not torch.cuda.is_available():
        print("no CUDA device: run with --dry for the CPU dry run", file=sys.stderr)
        return 2
    rep = Report(out, budget)
    rep.run("env", "versions", lambda: env_section(rep))
    cases = [case_of(K, N, T_BIG) for K, N in SHAPES]
    for case in cases:
        rep.run("linear", shape_name(case), lambda c=case: linear_section(rep, c), need=20)
    for case in cases:
        rep.run("grads", f"bf16 {shape_name(case)}",
                lambda c=case: grads_check(rep, "grads", c, torch.bfloat16), need=30)

    def child():
        t = time.time()
        r = subprocess.run([sys.executable, __file__, "--only", "wgrad_2g", "--out", str(out)]
                           + (["--dry"] if ARGS.dry else []), timeout=max(30.0, rep.left()))
        rep.say(f"       (wgrad_2g child: exit {r.returncode}, {time.time() - t:.0f} s)")
        if r.returncode not in (0, 1):
            rep.result("wgrad_2g", "child process", "ERROR", r.returncode, "",
                       "died (an illegal address or out of memory?): see its output above")
    rep.run("wgrad_2g", "subprocess", child, need=45)
    for i, case in enumerate(cases):
        # torch.compile of the dense reference: on the square shape (its compile is slow)
        extra = ["eager_loop"] + (["compiled_dense"] if i == 0 else [])
        rep.run("ratio", shape_name(case), lambda c=case, p=extra: ratio_section(rep, c, p),
                need=60 if i == 0 else 30)
    for case in cases:
        rep.run("kernel", shape_name(case), lambda c=case: kernel_section(rep, c), need=20)
    rep.run("decode", "T in " + ",".join(map(str, DECODE_T)), lambda: decode_section(rep),
            need=30)
    for case in cases:  # last: fp32 is also held to the reference by the interpreter tests
        rep.run("grads", f"fp32 {shape_name(case)}",
                lambda c=case: grads_check(rep, "grads", c, torch.float32), need=40)
    write_tuned(rep)
    # the child's rows are in results.csv too: count every row
    with open(rep.csv) as f:
        rows = list(csv.DictReader(f))
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    rep.say("SUMMARY " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            + f"  ({time.time() - rep.t0:.0f} s; results in {rep.csv})")
    return 1 if counts.get("ERROR") else 0


if __name__ == "__main__":
    raise SystemExit(main())
