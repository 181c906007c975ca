"""The device check: one offline command, <= 5 minutes cold on an H100/H200, that says whether
the triton backend's designs are right on a GPU and which is fastest, and ends with one line

    VERDICT correctness=PASS|FAIL fwd=<ratio>/1.10 fwd+bwd=<ratio>/1.16 best=<provider>

(``docs/benchmarks.md``, "On a GPU"). A plain script: no pytest, no install, no build (the
triton backend compiles just in time; the ``cuda`` backend is benchmarks/gpu_cuda_backend.sh's).

    python benchmarks/gpu_check.py --out $OUT        # on a CUDA GPU
    python benchmarks/gpu_check.py --dry --out DIR   # CPU, Triton interpreter, tiny shapes (CI, < 2 min)
    python benchmarks/gpu_check.py --plan --out DIR  # CPU, no kernel runs: the cold compile count

Sections, in this order (each runs in its own ``try``: an exception is an ERROR row and the
next section runs; a section that no longer fits the budget is SKIPped, saying so):

1. ``smoke``: T = 48, K = N = 256, every design x fp32 / bf16 / fp16, with an upstream gradient
   on the gates (and in bf16 also x_lora with a transposed weight, a strided bias and a
   sliced x):
   y, dx, dx_lora, dA, dB, dR against the fp64 reference given the kernel's own routing, the
   cluster statistics against theirs; the one-launch EMA step against its torch definition;
   a CUDA-graph capture of a training step (the configuration file's block shapes, as under
   ``torch.compile(mode="reduce-overhead")``) against the eager step.
2. ``grads``: bf16 at T = 8192, 4096 x 4096, every design, against the fp64 reference.
3. ``ratio``: every provider (base, slim_triton = the dispatch's design, slim_triton_fused,
   _accumulate, _extended, slim_torch, peft_lora r = E_L·r unfused, eager_loop) on the three
   target shapes, forward and forward+backward: GPU ms (CUDA events, L2 flushed, the host's
   launches kept out), host ms per call, ms per call back to back and per CUDA-graph replay,
   peak MB, and each SLIM provider's ratio to the base against the target. The fused
   linear is autotuned here; the faster design per shape bucket is written down.
4. ``kernel``: per kernel at each shape: ms, TFLOP/s, GB/s (bytes each operand moves once),
   % of cuBLAS on the same GEMM, peak MB (square shape); determinism of the dB partials and
   the statistics.
5. ``decode``: T = 1, 16, 64 at 4096 x 4096: gradients, and forward GPU / host / graph ms.
6. ``big``: T·N >= 2^31 in the dB GEMM and T·K >= 2^31 in route forward (int64 offsets), in a
   child process so that an illegal address cannot end the check.
7. ``fp32``: the gradients of section 2 in fp32.
8. ``compile``: ``torch.compile(fullgraph=True)`` of the op against eager (tiny; last, as the
   budget allows). ``compiled_dense`` (inductor on the dense reference) only with
   ``--compiled-dense``.

After every section: ``results.csv`` (one row per check: section, name, kind = correctness |
speed | info, status = PASS | FAIL | INFO | SKIP | ERROR, value, target, note), ``summary.json``
(counts, section times, the verdict so far) and ``configs/<device>.json`` (what autotuning
picked and the designs measured, in the format of
``slim_kernels/ops/backends/triton/configs/``: commit it there) are rewritten; ``env.json``
holds the versions and the GPU. The Triton and inductor caches live in ``--cache-dir``
(default ``$OUT/cache``), so a rerun on a warm machine compiles nothing.
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
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "gpu_out"))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry", action="store_true",
                      help="CPU, Triton interpreter, tiny shapes: every section end to end (CI)")
    mode.add_argument("--plan", action="store_true",
                      help="CPU, meta tensors, no kernel runs: count the distinct Triton "
                           "compiles the real run needs (cold) and estimate their time")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all sections (default 280 on a GPU: 5 minutes with a margin)")
    ap.add_argument("--cache-dir", default=None,
                    help="Triton and inductor caches (default: OUT/cache)")
    ap.add_argument("--compiled-dense", action="store_true",
                    help="also time torch.compile of the dense reference (last; slow to compile)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a child: one section
    return ap.parse_args(argv)


ARGS = _parse(sys.argv[1:]) if __name__ == "__main__" else _parse([])
MODE = "dry" if ARGS.dry else ("plan" if ARGS.plan else "gpu")
OUT = Path(ARGS.out)
CACHE = Path(ARGS.cache_dir) if ARGS.cache_dir else OUT / "cache"
# before triton is imported: @triton.jit reads TRITON_INTERPRET, the cache its directory
if MODE == "dry":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)  # never the interpreter on a GPU
    os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE / "inductor"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("SLIM_KERNELS_DESIGN", None)  # every design is timed by name
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slim_kernels.bench.cases import Case, make_inputs  # noqa: E402
from slim_kernels.bench.measuring import (flop_floor, peak_bytes, quantiles, step,  # noqa: E402
                                          sync_fn, time_back_to_back, time_cuda_graph,
                                          time_interleaved)
from slim_kernels.bench.providers import providers_for  # noqa: E402
from slim_kernels.ops import slim_linear_op  # noqa: E402
from slim_kernels.ops.backends.triton import launch as tb  # noqa: E402
from slim_kernels.ops.backends.triton import tuning  # noqa: E402
from slim_kernels.ops.ema import cluster_ema_torch  # noqa: E402
from slim_kernels.reference import reference_cluster_stats  # noqa: E402

DEV = {"dry": "cpu", "plan": "meta", "gpu": "cuda"}[MODE]
CUDA = MODE == "gpu"
PLAN = MODE == "plan"
DESIGNS = tuning.DESIGNS_FORWARD  # fused, accumulate, extended
if MODE == "dry":
    T_BIG, SHAPES, DECODE_T = 32, ((32, 32), (32, 48), (48, 32)), (1, 16)
    EXPERTS = dict(num_lora_experts=2, num_identity_experts=2, rank=8, top_k=2, num_clusters=2)
    SMOKE = dict(T=21, K=32, N=48)
    REPS, WARMUP, GRAPH_REPS = 1, 1, 1
    BIG = dict(T=300, N=40, ER=8, K=48)
else:
    T_BIG = 8192
    SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
    DECODE_T = (1, 16, 64)
    EXPERTS = dict(num_lora_experts=8, num_identity_experts=2, rank=16, top_k=2, num_clusters=4)
    SMOKE = dict(T=48, K=256, N=256)
    REPS, WARMUP, GRAPH_REPS = 10, 2, 10
    BIG = dict(T=(1 << 19) + (1 << 15), N=4096, ER=128, K=4096)  # T·N, T·K = 2.28e9 >= 2^31
TARGETS = {"forward": (1.10, 1.07), "forward+backward": (1.16, 1.11)}  # (square, MLP)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
SLIM_PROVIDERS = ["slim_triton"] + [f"slim_triton_{d}" for d in DESIGNS]
PROVIDERS = ["base"] + SLIM_PROVIDERS + ["slim_torch", "peft_lora", "eager_loop"]
SECTION_NEED = dict(smoke=20, grads=20, ratio=40, kernel=20, decode=15, big=25, fp32=15,
                    compile=45, compiled_dense=90)


# ------------------------------------------------------------------------------------------
# reporting: results.csv after every row, summary.json and the configuration file after
# every section
# ------------------------------------------------------------------------------------------
class Report:
    COLS = ["section", "name", "kind", "status", "value", "target", "note"]

    def __init__(self, out: Path, budget: float, append: bool = False):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.csv = out / "results.csv"
        if not append:
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(self.COLS)
        self.t0 = time.time()
        self.budget = budget
        self.sections = {}
        self.speed = {}  # (shape, mode, provider) -> GPU ms
        self.designs = {}  # design bucket -> {"forward": ..., "backward": ...}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def result(self, section, name, status, value="", target="", note="", kind="info") -> None:
        v = f"{value:.4g}" if isinstance(value, float) else str(value)
        self.say(f"{status:5s}  {section:7s} {name:52s} {v:>10s}  {target}  {note}".rstrip())
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([section, name, kind, status, v, target, note])

    def check(self, section, name, value, bound, note="", kind="correctness") -> None:
        if PLAN:
            return
        ok = value <= bound
        self.result(section, name, "PASS" if ok else "FAIL", float(value), f"<= {bound:.4g}",
                    note, kind)

    def info(self, section, name, value, note="") -> None:
        if not PLAN:
            self.result(section, name, "INFO", value, "", note)

    def rows(self):
        with open(self.csv) as f:
            return list(csv.DictReader(f))

    def run(self, section: str, fn) -> None:
        """fn(), an exception reported as ERROR (traceback printed) and the next section run;
        SKIP when the budget has less than the section needs. Then the files are rewritten."""
        need = SECTION_NEED.get(section, 10)
        if self.left() < need and not PLAN:
            self.result(section, "(section)", "SKIP", "", "",
                        f"time budget: {self.left():.0f} s left, needs ~{need} s")
            self.sections[section] = "skipped"
            self.flush()
            return
        t = time.time()
        try:
            fn()
            self.sections[section] = round(time.time() - t, 1)
        except Exception as e:  # every section runs and reports
            traceback.print_exc()
            self.result(section, "(section)", "ERROR", "", "",
                        f"{type(e).__name__}: {str(e)[:300]}", "correctness")
            self.sections[section] = f"error after {time.time() - t:.0f} s"
        finally:
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
        self.flush()
        self.say(f"       ({section}: {time.time() - t:.1f} s, {self.left():.0f} s of the budget "
                 f"left) SO FAR {self.verdict()}")

    def verdict(self) -> str:
        rows = self.rows()
        bad = [r for r in rows if r["kind"] == "correctness" and r["status"] in ("FAIL", "ERROR")]
        correct = "FAIL" if bad or not any(r["kind"] == "correctness" for r in rows) else "PASS"
        sq = f"T={T_BIG},{SHAPES[0][0]}x{SHAPES[0][1]}"
        base = {m: self.speed.get((sq, m, "base")) for m in TARGETS}
        best, fb = "none", {}
        if base["forward+backward"]:
            cands = [(self.speed[(sq, "forward+backward", p)] / base["forward+backward"], p)
                     for p in SLIM_PROVIDERS if (sq, "forward+backward", p) in self.speed]
            if cands:
                best = min(cands)[1]
                for m in TARGETS:
                    if (sq, m, best) in self.speed and base[m]:
                        fb[m] = self.speed[(sq, m, best)] / base[m]
        r = lambda m: f"{fb[m]:.3f}" if m in fb else "na"  # noqa: E731
        return (f"VERDICT correctness={correct} fwd={r('forward')}/{TARGETS['forward'][0]:.2f} "
                f"fwd+bwd={r('forward+backward')}/{TARGETS['forward+backward'][0]:.2f} "
                f"best={best}")

    def flush(self) -> None:
        rows = self.rows()
        counts = {}
        for row in rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        summary = dict(mode=MODE, seconds=round(time.time() - self.t0, 1), counts=counts,
                       sections=self.sections, verdict=self.verdict(),
                       failed=[f"{r['section']} {r['name']}: {r['note'] or r['value']}"
                               for r in rows if r["status"] in ("FAIL", "ERROR")][:40])
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        if CUDA:
            write_configs(self)


def write_configs(rep: Report) -> None:
    """configs/<device>.json: the configuration file the launcher would load on this GPU, with
    what autotuning picked in this process and the designs measured so far."""
    dev = torch.device("cuda")
    base = tb.device_configs(dev)
    name, arch = tb._device_name(dev), tb._device_arch(dev)
    import triton
    data = tuning.device_file(
        base, name, arch, [(fam, key, cfg) for _, fam, key, cfg in tb.tuned_here()],
        rep.designs, dict(torch=torch.__version__, triton=triton.__version__,
                          cuda=torch.version.cuda, git=_git()),
        f"benchmarks/gpu_check.py on {name}: fused-linear exact keys autotuned at the target "
        f"shapes (T = {T_BIG}, bf16), designs timed side by side (section ratio: forward = "
        "the faster GPU time of fused and accumulate, backward = the faster forward+backward "
        "minus forward; section decode for decode buckets)")
    d = rep.out / "configs"
    d.mkdir(exist_ok=True)
    (d / tuning.device_file_name(name)).write_text(tuning.dumps_configs(data) + "\n")


def _git() -> str:
    try:
        from slim_kernels.provenance import provenance_string
        return provenance_string(DEV).split("git=")[-1]
    except Exception:  # pragma: no cover
        return "unknown"


# ------------------------------------------------------------------------------------------
# plan mode: meta tensors, kernels replaced by recorders of Triton's compile key
# ------------------------------------------------------------------------------------------
COMPILES = {}  # compile key -> kernel name (plan mode)
# kernels whose integer arguments are not specialised in the key (their do_not_specialize)
NO_SPEC = {}


def _int_class(v: int) -> str:
    return "1" if v == 1 else ("D" if v % 16 == 0 else "-")


def _compile_key(name, args, kw):
    """Triton's compile key, approximately: the kernel, its constexprs and launch options, each
    tensor's dtype and 16-byte alignment, each integer's class (== 1, divisible by 16, other)."""
    fn = getattr(tb._k, name) if not isinstance(getattr(tb._k, name), _Recorder) else \
        getattr(tb._k, name).fn
    names = list(fn.arg_names)
    skip = set(getattr(fn, "do_not_specialize", ()) or ())
    parts = []
    for i, a in enumerate(args):
        arg = names[i] if i < len(names) else str(i)
        if isinstance(a, torch.Tensor):
            parts.append((a.dtype, (a.storage_offset() * a.element_size()) % 16 == 0))
        elif isinstance(a, bool) or a is None:
            parts.append(a)
        elif isinstance(a, int):
            parts.append("i" if (arg in skip or i in skip) else _int_class(a))
        elif isinstance(a, float):
            parts.append("f")
        else:
            parts.append(repr(a))
    return (name, tuple(parts), tuple(sorted((k, str(v)) for k, v in kw.items())))


class _Recorder:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn
        self.arg_names = fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kw):
            COMPILES.setdefault(_compile_key(self.name, args, kw), self.name)
        return launch


class _AutotuneRecorder:
    """The autotuner in plan mode: every candidate configuration is one compile."""

    def __init__(self, fp32):
        self.fp32 = fp32
        self.best_config = None

    def __getitem__(self, grid):
        def run(*args, **kw):
            import triton
            M = args[8]
            cfgs = tuning.linear_configs(self.fp32, decode=tuning.bucket(M) <= tuning.DECODE_M)
            for bm, bn, bk, gm, w, s in cfgs:
                key = dict(kw, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=w,
                           num_stages=s)
                COMPILES.setdefault(_compile_key("fused_linear_kernel", args, key),
                                    "fused_linear_kernel (autotune)")
            bm, bn, bk, gm, w, s = cfgs[0]
            self.best_config = triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                  GROUP_M=gm), num_warps=w, num_stages=s)
        return run


def install_plan() -> None:
    """Run the launchers as on an H200 (sm_90, 132 SMs), on meta tensors, recording what would
    compile instead of compiling it."""
    from types import SimpleNamespace
    import contextlib
    kernels = {n: _Recorder(n, getattr(tb._k, n)) for n in dir(tb._k)
               if n.endswith("_kernel") and hasattr(getattr(tb._k, n), "arg_names")}
    tb._k = SimpleNamespace(**kernels)
    tb._INTERPRET = False
    tb._device_arch = lambda dev: "sm_90"
    tb._device_name = lambda dev: "NVIDIA H200"
    tb._num_sms = lambda dev: 132
    tb._capturing = lambda dev: False
    tb._linear_kernel = lambda fp32: _AutotuneRecorder(fp32)
    torch.cuda.device = lambda dev: contextlib.nullcontext()
    # the backend takes meta tensors as CUDA ones (the package re-exports the two functions)
    import slim_kernels.ops.backends.triton as package
    from slim_kernels.ops import dispatch
    for mod in (tb, package):
        mod.unavailable_reason = lambda: None
        mod.unsupported_reason = lambda x, lora_cols=0, num_experts=0: None
    dispatch.reset_cache()


# ------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------
def rel(a, b) -> float:
    """Relative Frobenius error of a against b, in fp64."""
    if PLAN:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def case_of(K, N, T) -> Case:
    return Case(K=K, N=N, T=T, **EXPERTS)


def shape_name(case: Case) -> str:
    return f"T={case.T},{case.K}x{case.N}"


def is_mlp(case: Case) -> bool:
    return case.K != case.N


_INPUTS = {}


def inputs(case: Case, dtype):
    """The benchmark's inputs (``slim_kernels.bench.cases.make_inputs``: drawn on the CPU, ~2 s
    at 14336 x 4096, so the last ones made are kept for the next section); meta tensors of
    the same shapes in plan mode."""
    if not PLAN:
        key = (case, dtype)
        if key not in _INPUTS:
            if len(_INPUTS) >= 3:
                _INPUTS.pop(next(iter(_INPUTS)))
            _INPUTS[key] = make_inputs(case, device=DEV, dtype=dtype, seed=0)
        inp = _INPUTS[key]
        for t in inp.trainable:
            t.grad = None
        return inp
    from slim_kernels.bench.cases import Inputs
    m = lambda *s, dt=dtype, g=False: torch.empty(*s, dtype=dt, device="meta").requires_grad_(g)  # noqa: E731
    c = case
    ER, C = c.num_lora_experts * c.rank, c.num_clusters
    f32 = torch.float32
    return Inputs(case=c, x=m(c.T, c.K, g=True), weight=m(c.N, c.K), bias=m(c.N),
                  lora_A=m(ER, c.K, g=True), lora_B=m(c.N, ER, g=True), router=m(c.E, c.K, g=True),
                  centers=m(C, c.K, dt=f32), cluster_vars=m(C, c.K, dt=f32),
                  inv_std=m(C, c.K, dt=f32), dy=m(c.T, c.N))


def transposed(t):
    return t.t().contiguous().t()


def strided_1d(t):
    big = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device)
    big[::2] = t
    return big[::2]


def slim_call(inp, design, x_lora=None, weight=None, bias=None, dgates=None, sliced=False,
              stats=False):
    """One training call of the op on the triton backend with ``design`` forced (None: the
    dispatch's): forward (with the cluster statistics when ``stats``) and backward of dy (and
    ``dgates`` on the gates). Returns (outputs and gradients, idx, assign, stats)."""
    c = inp.case
    tb.DESIGN = design
    if sliced:  # x as every other row of a wider leaf
        leaf = torch.zeros(2 * c.T, c.K + 3, dtype=inp.x.dtype, device=inp.x.device)
        if not PLAN:
            leaf[::2, 1:c.K + 1] = inp.x.detach()
        leaf.requires_grad_(True)
        x = leaf[::2, 1:c.K + 1]
    else:
        leaf = x = inp.x.detach().requires_grad_(True)
    A, B, R = (t.detach().requires_grad_(True) for t in (inp.lora_A, inp.lora_B, inp.router))
    xl = None if x_lora is None else x_lora.detach().requires_grad_(True)
    out = slim_linear_op(
        x, inp.weight if weight is None else weight, inp.bias if bias is None else bias,
        A, B, R, num_lora_experts=c.num_lora_experts, top_k=c.top_k, scaling=c.scaling,
        yield_strength=c.yield_strength, distance_reduce=c.distance_reduce,
        centers=inp.centers, inv_std=inp.inv_std, x_lora=xl, backend="triton",
        cluster_stats=stats)
    y, gates, idx, _, assign = out[:5]
    if dgates is None:
        y.backward(inp.dy)
    else:
        torch.autograd.backward([y, gates], [inp.dy, dgates])
    dx = leaf.grad[::2, 1:c.K + 1] if sliced else leaf.grad
    got = dict(y=y.detach(), dx=dx, dA=A.grad, dB=B.grad, dR=R.grad)
    if xl is not None:
        got["dx_lora"] = xl.grad
    return got, idx, assign, (out[5] if stats else None)


def fixed_routing(inp, idx, assign, dtype, x_lora=None, weight=None, bias=None, dgates=None):
    """y and the gradients in ``dtype`` with the experts ``idx`` and the clusters ``assign``
    the kernel chose (``docs/method.md`` §1-§2: z = x Rᵀ + λ d on the identity experts, d the
    rms distance to the assigned centre, a constant; gates = softmax over the selected
    logits; y = x Wᵀ + b + (s g ⊙ x_lora A_allᵀ) B_allᵀ), so that routing flips between
    near-tied logits are not counted as error."""
    c = inp.case
    E_L, r = c.num_lora_experts, c.rank
    leaf = lambda t: t.detach().to(dtype).requires_grad_(True)  # noqa: E731
    x, A, B, R = leaf(inp.x), leaf(inp.lora_A), leaf(inp.lora_B), leaf(inp.router)
    xl = None if x_lora is None else leaf(x_lora)
    W = (inp.weight if weight is None else weight).detach().to(dtype)
    b = inp.bias if bias is None else bias
    b = None if b is None else b.detach().to(dtype)
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
    hg = c.scaling * gates[:, :E_L].repeat_interleave(r, dim=1) * ((x if xl is None else xl) @ A.t())
    y = F.linear(x, W, b) + hg @ B.t()
    if dgates is None:
        y.backward(inp.dy.detach().to(dtype))
    else:
        torch.autograd.backward([y, gates], [inp.dy.detach().to(dtype), dgates.to(dtype)])
    out = dict(y=y.detach(), dx=x.grad, dA=A.grad, dB=B.grad, dR=R.grad)
    if xl is not None:
        out["dx_lora"] = xl.grad
    return out


def check_grads(rep, section, tag, inp, dtype, got, idx, assign, **kw):
    """got against the fp64 truth given the kernel's routing, by the 2x rule: error <= 2 x the
    error of the same fixed-routing computation in PyTorch in that dtype, + 1e-5 relative."""
    if PLAN:
        return
    truth = fixed_routing(inp, idx, assign, torch.float64, **kw)
    base = fixed_routing(inp, idx, assign, dtype, **kw)
    for k in truth:
        e, eb = rel(got[k], truth[k]), rel(base[k], truth[k])
        rep.check(section, f"{tag} {k}", e, 2 * eb + 1e-5,
                  note=f"torch {DTYPE_NAMES[dtype]}: {eb:.3g}")


def timeit(fns: dict, reps=None, warmup=None) -> dict:
    """Median GPU ms of each callable, interleaved (the bench harness); plan: one call each."""
    if PLAN:
        for f in fns.values():
            f()
        return {n: 1.0 for n in fns}
    steps = {n: ((lambda: None), f) for n, f in fns.items()}
    t = time_interleaved(steps, reps=reps or REPS, warmup=warmup or WARMUP, sync=sync_fn(DEV),
                         cuda_events=CUDA)
    for n, msg in t.failed.items():
        raise RuntimeError(f"{n} failed: {msg}")
    return {n: quantiles(v)[0] for n, v in t.wall_ms.items()}


@contextmanager
def autotune(on: bool):
    """SLIM_KERNELS_AUTOTUNE for a block (the launcher reads it per call)."""
    old = os.environ.get("SLIM_KERNELS_AUTOTUNE")
    os.environ["SLIM_KERNELS_AUTOTUNE"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SLIM_KERNELS_AUTOTUNE", None)
        else:
            os.environ["SLIM_KERNELS_AUTOTUNE"] = old


# ------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------
def env_section(rep: Report) -> None:
    import triton

    info = dict(mode=MODE, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, device=DEV, cache=str(CACHE),
                triton_cache=os.environ.get("TRITON_CACHE_DIR"))
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        dev = torch.device("cuda")
        cfg = tb.device_configs(dev)
        info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_GB=round(p.total_memory / 2**30, 1), config_file=cfg["path"],
                    config_measured=cfg["measured"],
                    designs={f"{K}x{N}": {d: tuning.design_choice(cfg, d, False, T_BIG, K, N)
                                          for d in ("forward", "backward")}
                             for K, N in SHAPES})
    try:
        from slim_kernels.provenance import provenance_string
        info["provenance"] = provenance_string(DEV if DEV != "meta" else "cpu")
    except Exception as e:  # pragma: no cover
        info["provenance"] = f"unavailable: {e}"
    (rep.out / "env.json").write_text(json.dumps(info, indent=1))
    rep.say("env " + json.dumps(info))


def smoke_section(rep: Report) -> None:
    """Every design x dtype, plain with an upstream gradient on the gates; in bf16 also with
    x_lora and a transposed weight, a strided bias and a sliced x. Small T."""
    case = case_of(SMOKE["K"], SMOKE["N"], SMOKE["T"])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        inp = inputs(case, dtype)
        g = torch.Generator(device="cpu").manual_seed(5)
        acc = torch.float32
        dgates = torch.randn(case.T, case.E, generator=g).to(DEV, acc) if not PLAN else \
            torch.empty(case.T, case.E, device="meta", dtype=acc)
        x_lora = (inp.x.detach() * 1.25) if not PLAN else torch.empty_like(inp.x)
        variants = {"plain+dgates": dict(dgates=dgates)}
        if dtype == torch.bfloat16:  # (each variant of each dtype is more kernels to compile)
            variants["x_lora+strided"] = dict(x_lora=x_lora, weight=transposed(inp.weight),
                                              bias=strided_1d(inp.bias), dgates=dgates,
                                              sliced=True)
        for design in DESIGNS:
            for vname, kw in variants.items():
                tag = f"{design} {DTYPE_NAMES[dtype]} {vname}"
                got, idx, assign, stats = slim_call(inp, design, stats=True, **kw)
                ref_kw = {k: v for k, v in kw.items() if k != "sliced"}
                check_grads(rep, "smoke", tag, inp, dtype, got, idx, assign, **ref_kw)
                if not PLAN:
                    want = reference_cluster_stats(inp.x.detach(), inp.centers, inp.inv_std,
                                                   assign, case.distance_reduce)
                    rep.check("smoke", f"{tag} cluster stats", rel(stats, want), 1e-5)
    # the clusters' step: the one-launch kernel against its torch definition
    inp = inputs(case, torch.bfloat16)
    _, _, assign, stats = slim_call(inp, None, stats=True)
    C, K = inp.centers.shape

    def state():
        vars_ = inp.cluster_vars.clone()
        return [inp.centers.clone(), vars_, torch.zeros((), dtype=torch.int64, device=DEV),
                stats, 0.1, torch.ones((), device=DEV), torch.ones((), device=DEV),
                torch.empty_like(vars_), torch.empty(C, device=DEV), 1e-5]
    a, b = state(), state()
    tb.cluster_ema(*a)
    if not PLAN:
        cluster_ema_torch(*b)
        for i, n in ((0, "centers"), (1, "variances"), (7, "inv_std"), (8, "shift"),
                     (5, "distance_mean"), (6, "distance_var")):
            rep.check("smoke", f"ema kernel vs torch: {n}", rel(a[i], b[i]), 1e-6)
    if CUDA:  # a training step captured in a CUDA graph (the configuration file's blocks)
        design = tb.design_for("forward", inp.x, case.K, case.N)
        eager, *_ = slim_call(inp, None)
        holder = {}

        def prep():
            for t in (inp.lora_A, inp.lora_B, inp.router):
                t.grad = None

        def timed():
            holder["out"] = slim_call(inp, None)[0]
        ms = time_cuda_graph(prep, timed, 1)
        for k in ("y", "dx", "dA", "dB", "dR"):
            rep.check("smoke", f"CUDA graph replay ({design}) vs eager: {k}",
                      rel(holder["out"][k], eager[k]), 1e-6)
        rep.info("smoke", "CUDA graph replay ms (T = 48)", ms)


def grads_section(rep: Report, dtype) -> None:
    """Every design at T = 8192, 4096 x 4096 against the fp64 reference (one reference for
    the designs that route alike: the route kernels are the same)."""
    case = case_of(*SHAPES[0], T_BIG)
    inp = inputs(case, dtype)
    ref = {}
    designs = DESIGNS if dtype != torch.float32 else ("fused", "accumulate")
    for design in designs:
        got, idx, assign, _ = slim_call(inp, design)
        tag = f"{design} {DTYPE_NAMES[dtype]} {shape_name(case)}"
        if PLAN:
            continue
        key = (idx.sort(1).values.cpu().numpy().tobytes(), assign.cpu().numpy().tobytes())
        if key not in ref:
            ref.clear()  # one reference at a time (fp64 at T = 8192 is 1 GB of tensors)
            ref[key] = (fixed_routing(inp, idx, assign, torch.float64),
                        fixed_routing(inp, idx, assign, dtype))
        truth, base = ref[key]
        for k in truth:
            e, eb = rel(got[k], truth[k]), rel(base[k], truth[k])
            rep.check("grads" if dtype != torch.float32 else "fp32", f"{tag} {k}", e,
                      2 * eb + 1e-5, note=f"torch {DTYPE_NAMES[dtype]}: {eb:.3g}")
        del got


def ratio_section(rep: Report, case: Case) -> None:
    """Every provider, forward and forward+backward: GPU ms (events), host ms, back-to-back
    and CUDA-graph ms per call, peak MB; each SLIM provider's ratio to the base."""
    tag = shape_name(case)
    inp = inputs(case, torch.bfloat16)
    # plan: only what runs Triton kernels (the other providers compile none)
    builders, skipped = providers_for("cuda" if PLAN else DEV,
                                      SLIM_PROVIDERS if PLAN else PROVIDERS)
    for n, why in skipped.items():
        rep.result("ratio", f"{tag} {n}", "SKIP", "", "", why)
    runners = {n: b(inp) for n, b in builders.items()}
    sync = sync_fn(DEV)
    for mode in ("forward", "forward+backward"):
        steps = {n: step(r, mode, inp.dy) for n, r in runners.items()}
        if PLAN:
            for prep, timed in steps.values():
                prep()
                timed()
            continue
        with autotune(True):  # the fused linear tunes during warmup (its configs are written)
            t = time_interleaved(steps, reps=REPS, warmup=WARMUP, sync=sync, cuda_events=CUDA)
        for n, msg in t.failed.items():
            rep.result("ratio", f"{tag} {mode} {n}", "ERROR", "", "", msg, "correctness")
        med = {n: quantiles(v)[0] for n, v in t.wall_ms.items()}
        for n, v in med.items():
            rep.speed[(tag, mode, n)] = v
            host = quantiles(t.host_ms[n])[0]
            note = f"host {host:.3g} ms/call" + (" (launch-bound)" if host > v else "")
            rep.info("ratio", f"{tag} {mode} {n} ms", v, note)
            prep, timed = steps[n]
            b2b = time_back_to_back(prep, timed, max(2, REPS), sync, CUDA)
            rep.info("ratio", f"{tag} {mode} {n} back-to-back ms/call", b2b)
            if CUDA and n not in ("eager_loop",):  # eager_loop syncs with the host
                try:
                    rep.info("ratio", f"{tag} {mode} {n} CUDA-graph ms/replay",
                             time_cuda_graph(prep, timed, GRAPH_REPS))
                except Exception as e:
                    rep.info("ratio", f"{tag} {mode} {n} CUDA-graph ms/replay", "n/a",
                             f"{type(e).__name__}: {str(e)[:120]}")
            if case.K == case.N:  # memory: on the square shape
                rep.info("ratio", f"{tag} {mode} {n} peak MB",
                         peak_bytes(DEV, prep, timed) / 2**20)
        if "base" not in med:
            rep.result("ratio", f"{tag} {mode}", "ERROR", "", "", "base did not run", "speed")
            continue
        target = TARGETS[mode][is_mlp(case)]
        for n in SLIM_PROVIDERS + ["slim_torch", "peft_lora", "eager_loop"]:
            if n in med:
                kind = "speed" if n in SLIM_PROVIDERS else "info"
                if kind == "speed":
                    rep.check("ratio", f"{tag} {mode} {n} / base", med[n] / med["base"], target,
                              note=f"FLOP floor {flop_floor(case, mode):.4f}", kind="speed")
                else:
                    rep.info("ratio", f"{tag} {mode} {n} / base", med[n] / med["base"])
    if not PLAN:  # the design per bucket, from what was timed
        fw = lambda n: rep.speed.get((tag, "forward", n))  # noqa: E731
        fb = lambda n: rep.speed.get((tag, "forward+backward", n))  # noqa: E731
        cands = [d for d in ("fused", "accumulate") if fw(f"slim_triton_{d}") and
                 fb(f"slim_triton_{d}")]
        if cands:
            key = tuning.design_key(False, case.T, case.K, case.N)
            fwd = min(cands, key=lambda d: fw(f"slim_triton_{d}"))
            bwd = min(cands, key=lambda d: fb(f"slim_triton_{d}") - fw(f"slim_triton_{d}"))
            rep.designs[key] = dict(forward=fwd, backward=bwd, measured_ms={
                d: dict(forward=round(fw(f"slim_triton_{d}"), 4),
                        forward_backward=round(fb(f"slim_triton_{d}"), 4)) for d in cands})
            rep.info("ratio", f"{tag} designs picked", f"{fwd}/{bwd}", "forward/backward")


def _gemm_bytes(M, N, K, elem=2):
    return (M * K + K * N + M * N) * elem


def kernel_section(rep: Report, case: Case) -> None:
    """Per-kernel times at one shape (bf16): TFLOP/s, GB/s (each operand once), % of cuBLAS on
    the same GEMM; the deterministic dB partials and statistics repeat bit for bit."""
    c = case
    inp = inputs(case, torch.bfloat16)
    x, W, b = inp.x.detach(), inp.weight, inp.bias
    A, B, R = inp.lora_A.detach(), inp.lora_B.detach(), inp.router.detach()
    dy = inp.dy
    T, K, N = c.T, c.K, c.N
    E_L, ER, E, C = c.num_lora_experts, c.num_lora_experts * c.rank, c.E, c.num_clusters

    def route_fwd(stats=False, split=None, xh=None):
        return tb.route_forward(x, None, A, R, inp.centers, inp.inv_std, E_L, c.top_k,
                                c.scaling, c.yield_strength, c.distance_reduce, None, stats,
                                xh=xh, split=split)

    gates, idx, d, assign, h, hg, _ = route_fwd()
    y = torch.empty(T, N, device=DEV, dtype=x.dtype)
    xh = torch.empty(T, K + ER, device=DEV, dtype=x.dtype)
    w_ext = tb.extended_weight(W, B)
    dhz, _, _ = tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="gemm")
    Wd = dhz.shape[1]
    dh, dzp = dhz[:, :ER], dhz[:, ER:]
    AR = torch.cat([A, R])
    dx = torch.empty_like(x)
    dB = torch.empty_like(B)
    dAR = torch.empty(Wd, K, device=DEV, dtype=x.dtype)
    xb = 2 * T * K  # bytes of x (bf16)
    route_bytes = xb + 2 * (ER + E) * K + 8 * C * K + T * (4 * ER + 2 * ER + 4 * E + 24)
    fns = {  # name: (callable, GFLOP, MB moved, cuBLAS reference name or None)
        "route_fwd": (lambda: route_fwd(), 2e-9 * T * K * (ER + E + 3 * 16), route_bytes, None),
        "route_fwd one split": (lambda: route_fwd(split=1), 2e-9 * T * K * (ER + E + 3 * 16),
                                route_bytes, None),
        "route_fwd writing [x | hg]": (lambda: route_fwd(xh=xh), 2e-9 * T * K * (ER + E + 48),
                                       route_bytes + xb, None),
        "fused_linear y = [x|hg][W|B]^T + b": (
            lambda: tb.fused_linear([(x, W.t()), (hg, B.t())], y, b), 2e-9 * T * N * (K + ER),
            _gemm_bytes(T, N, K + ER), "cublas y = [x|hg][W|B]^T + b"),
        "cublas y = [x|hg][W|B]^T + b": (lambda: torch.addmm(b, xh, w_ext.t()),
                                         2e-9 * T * N * (K + ER), _gemm_bytes(T, N, K + ER), None),
        "cublas y = hg B^T + b": (lambda: torch.addmm(b, hg, B.t()), 2e-9 * T * N * ER,
                                  _gemm_bytes(T, N, ER), None),
        "cublas y += x W^T (beta = 1)": (lambda: y.addmm_(x, W.t()), 2e-9 * T * N * K,
                                         _gemm_bytes(T, N, K) + 2 * T * N, None),
        "base F.linear": (lambda: F.linear(x, W, b), 2e-9 * T * N * K, _gemm_bytes(T, N, K), None),
        "route_bwd (dB by GEMM)": (
            lambda: tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="gemm"),
            2e-9 * T * N * ER, 2 * T * N + 2 * N * ER + T * (8 * ER + 2 * Wd), None),
        "route_bwd + dB partials": (
            lambda: tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="fused"),
            4e-9 * T * N * ER, 2 * T * N + 8 * (T // 64) * N * ER, None),
        "route_bwd + dB atomics": (
            lambda: tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="atomic"),
            4e-9 * T * N * ER, 2 * T * N + 4 * N * ER, None),
        "fused_linear dB = dy^T hg": (lambda: tb.fused_linear([(dy.t(), hg)], dB),
                                      2e-9 * T * N * ER, _gemm_bytes(N, ER, T), "cublas dB = dy^T hg"),
        "cublas dB = dy^T hg": (lambda: torch.mm(dy.t(), hg), 2e-9 * T * N * ER,
                                _gemm_bytes(N, ER, T), None),
        "fused_linear dx = [dy|dh|dz][W;A;R]": (
            lambda: tb.fused_linear([(dy, W), (dh, A), (dzp, R)], dx), 2e-9 * T * K * (N + Wd),
            _gemm_bytes(T, K, N + Wd), "cublas dx = [dh|dz][A;R] + dy W"),
        "cublas dx = [dh|dz][A;R] + dy W": (
            lambda: torch.mm(dhz[:, :ER + E], AR).addmm_(dy, W), 2e-9 * T * K * (N + ER + E),
            _gemm_bytes(T, K, N + ER + E) + 4 * T * K, None),
        "base dx = dy W": (lambda: torch.mm(dy, W), 2e-9 * T * N * K, _gemm_bytes(T, K, N), None),
        "fused_linear [dA;dR] = [dh|dz]^T x": (lambda: tb.fused_linear([(dhz.t(), x)], dAR),
                                               2e-9 * T * K * Wd, _gemm_bytes(Wd, K, T),
                                               "cublas [dA;dR] = [dh|dz]^T x"),
        "cublas [dA;dR] = [dh|dz]^T x": (lambda: torch.mm(dhz[:, :ER + E].t(), x),
                                         2e-9 * T * K * (ER + E), _gemm_bytes(ER + E, K, T), None),
    }
    per_token = None
    if inp.centers is not None:  # a training forward's statistics: the route input, the pass
        per_token = route_fwd(True)[6]
        fns["route_fwd + stats input"] = (lambda: route_fwd(True), 2e-9 * T * K * (ER + E + 48),
                                          route_bytes + 8 * T, None)
        fns["cluster_stats"] = (lambda: tb.cluster_statistics(x, inp.centers, *per_token),
                                4e-9 * T * K * 16, xb + 8 * T + 4 * C * (2 * K + 3) * 6, None)
    with autotune(True):
        ms = timeit({n: f for n, (f, _, _, _) in fns.items()})
    tag = shape_name(case)
    for n, (fn, gflop, nbytes, ref) in fns.items():
        v = ms[n]
        note = f"{gflop / v:.0f} TFLOP/s, {nbytes / v * 1e-6:.0f} GB/s" if v > 0 else ""
        if ref is not None and ms.get(ref):
            note += f", {100 * ms[ref] / v:.0f}% of cuBLAS"
        if case.K == case.N and not PLAN:  # memory: on the square shape
            note += f", peak {peak_bytes(DEV, lambda: None, fn) / 2**20:.0f} MB"
        rep.info("kernel", f"{tag} {n} ms", v, note)
    if PLAN:
        return
    d1 = tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="fused")[2]
    d2 = tb.route_backward(dy, None, B, gates, h, E_L, c.scaling, db="fused")[2]
    rep.check("kernel", f"{tag} dB partials: two runs differ (max abs)",
              (d1.float() - d2.float()).abs().max().item(), 0.0, note="deterministic")
    refdB = dy.double().t() @ hg.double()
    rep.check("kernel", f"{tag} dB partials error", rel(d1, refdB), 2 * rel(dy.t() @ hg, refdB) + 1e-5)
    if per_token is not None:
        s1 = tb.cluster_statistics(x, inp.centers, *per_token)
        s2 = tb.cluster_statistics(x, inp.centers, *per_token)
        rep.check("kernel", f"{tag} cluster stats: two runs differ (bits)",
                  float(not torch.equal(s1, s2)), 0.0, note="deterministic")
        want = reference_cluster_stats(x, inp.centers, inp.inv_std, assign, c.distance_reduce)
        rep.check("kernel", f"{tag} cluster stats error", rel(s1, want), 1e-5,
                  note="vs the fp64 reference on the same x and assignment")
    split = route_fwd()
    one = route_fwd(split=1)
    rep.check("kernel", f"{tag} route split vs one pass: gates", rel(split[0], one[0]), 1e-5)
    rep.check("kernel", f"{tag} route split vs one pass: topk differ",
              float((split[1] != one[1]).any(1).float().mean()), 1e-3,
              note="fraction of tokens (near ties may flip)")


def decode_section(rep: Report) -> None:
    K, N = SHAPES[0]
    total = {"fused": 0.0, "accumulate": 0.0}  # forward GPU ms over the decode T's
    for T in DECODE_T:
        case = case_of(K, N, T)
        inp = inputs(case, torch.bfloat16)
        for design in ("fused", "accumulate"):
            with autotune(False):
                got, idx, assign, _ = slim_call(inp, design)
            check_grads(rep, "decode", f"{design} bf16 T={T}", inp, torch.bfloat16, got, idx,
                        assign)
        builders = providers_for("cuda" if PLAN else DEV, ["base"] + SLIM_PROVIDERS)[0]
        runners = {n: b(inp) for n, b in builders.items()}
        steps = {n: step(r, "forward", inp.dy) for n, r in runners.items()}
        with autotune(False):  # the configuration file's decode blocks (fewer compiles)
            if PLAN:
                for prep, timed in steps.values():
                    prep()
                    timed()
                continue
            t = time_interleaved(steps, reps=REPS, warmup=WARMUP, sync=sync_fn(DEV),
                                 cuda_events=CUDA)
        med = {n: quantiles(v)[0] for n, v in t.wall_ms.items()}
        for n, v in med.items():
            host = quantiles(t.host_ms[n])[0]
            graph = ""
            if CUDA:
                try:
                    graph = f", CUDA graph {time_cuda_graph(*steps[n], GRAPH_REPS):.3g} ms"
                except Exception as e:
                    graph = f", CUDA graph n/a ({type(e).__name__})"
            rep.info("decode", f"T={T} forward {n} ms", v, f"host {host:.3g} ms/call{graph}"
                     + (" (launch-bound)" if host > v else ""))
            if n != "base" and "base" in med:
                rep.info("decode", f"T={T} forward {n} / base", v / med["base"])
        for d in total:
            total[d] += med.get(f"slim_triton_{d}", math.inf)
    if not PLAN and all(math.isfinite(v) for v in total.values()):
        # T = 1, 16 and 64 share a bucket: the design with the smaller summed forward time
        best = min(total, key=total.get)
        rep.designs[tuning.design_key(False, DECODE_T[0], K, N)] = dict(
            forward=best, backward=tuning.UNMEASURED,
            measured_ms={d: round(v, 4) for d, v in total.items()})
        rep.info("decode", "design picked (forward)", best, "summed over T = "
                 + ", ".join(map(str, DECODE_T)))


def big_section(rep: Report) -> None:
    """dB = dyᵀ hg with T·N >= 2^31 on the fused linear (split-K) and route forward with
    T·K >= 2^31 (the last tokens against the same tokens alone)."""
    T, N, ER, K = BIG["T"], BIG["N"], BIG["ER"], BIG["K"]
    dt = torch.bfloat16
    if PLAN:
        m = lambda *s: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
        dy, hg, out = m(T, N), m(T, ER), m(N, ER)
        tb.fused_linear([(dy.t(), hg)], out)
        case = Case(K=K, N=N, T=T, **EXPERTS)
        inp = inputs(case, dt)
        route_forward_of(inp, inp.x)
        return
    g = torch.Generator(device=DEV).manual_seed(2)
    dy = torch.randn(T, N, device=DEV, dtype=dt, generator=g)
    hg = torch.randn(T, ER, device=DEV, dtype=dt, generator=g) * 0.1
    out = torch.empty(N, ER, device=DEV, dtype=dt)
    tb.fused_linear([(dy.t(), hg)], out)
    ref = torch.mm(dy.t().float(), hg.float())
    e, eb = rel(out, ref), rel(torch.mm(dy.t(), hg), ref)
    rep.check("big", "dB = dy^T hg error vs fp32", e, 2 * eb + 1e-5,
              note=f"T={T}, N={N}: (T-1)·N {'>=' if (T - 1) * N >= 2**31 else '<'} 2^31")
    del dy, hg, ref
    torch.manual_seed(3)
    x = torch.randn(T, K, device=DEV, dtype=dt)
    inp = make_inputs(Case(K=K, N=64, T=16, **EXPERTS), device=DEV, dtype=dt, seed=0)
    whole = route_forward_of(inp, x)
    tail = route_forward_of(inp, x[-256:].contiguous())
    rep.check("big", "route fwd T·K >= 2^31: last tokens' h vs alone",
              rel(whole[4][-256:], tail[4]), 1e-5,
              note=f"T={T}, K={K}: (T-1)·K {'>=' if (T - 1) * K >= 2**31 else '<'} 2^31")
    rep.check("big", "route fwd T·K >= 2^31: last tokens' gates vs alone",
              rel(whole[0][-256:], tail[0]), 1e-5)


def route_forward_of(inp, x):
    c = inp.case
    return tb.route_forward(x, None, inp.lora_A.detach(), inp.router.detach(), inp.centers,
                            inp.inv_std, c.num_lora_experts, c.top_k, c.scaling,
                            c.yield_strength, c.distance_reduce)


def compile_section(rep: Report) -> None:
    """torch.compile(fullgraph=True) of the op (small shape) against eager."""
    if PLAN:
        return
    case = case_of(SMOKE["K"], SMOKE["N"], SMOKE["T"])
    inp = inputs(case, torch.bfloat16)
    c = case
    tb.DESIGN = None

    def f(x, A, B, R):
        return slim_linear_op(x, inp.weight, inp.bias, A, B, R, num_lora_experts=c.num_lora_experts,
                              top_k=c.top_k, scaling=c.scaling, yield_strength=c.yield_strength,
                              distance_reduce=c.distance_reduce, centers=inp.centers,
                              inv_std=inp.inv_std, backend="triton")[0]
    args = [t.detach().requires_grad_(True) for t in (inp.x, inp.lora_A, inp.lora_B, inp.router)]
    y0 = f(*args)
    y0.backward(inp.dy)
    g0 = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    t = time.time()
    y1 = torch.compile(f, fullgraph=True)(*args)
    y1.backward(inp.dy)
    rep.info("compile", "torch.compile first call s", time.time() - t)
    rep.check("compile", "compiled vs eager y", rel(y1, y0), 1e-6)
    for n, a, g in zip(("dx", "dA", "dB", "dR"), args, g0):
        rep.check("compile", f"compiled vs eager {n}", rel(a.grad, g), 1e-6)


def compiled_dense_section(rep: Report) -> None:
    case = case_of(*SHAPES[0], T_BIG)
    inp = inputs(case, torch.bfloat16)
    builders, _ = providers_for(DEV, ["compiled_dense"])
    runners = {n: b(inp) for n, b in builders.items()}
    for mode in ("forward", "forward+backward"):
        steps = {n: step(r, mode, inp.dy) for n, r in runners.items()}
        t = time_interleaved(steps, reps=REPS, warmup=WARMUP, sync=sync_fn(DEV),
                             cuda_events=CUDA)
        med = {n: quantiles(v)[0] for n, v in t.wall_ms.items()}
        for n, v in med.items():
            rep.info("compiled_dense", f"{shape_name(case)} {mode} {n} ms", v)


def main() -> int:
    budget = ARGS.budget if ARGS.budget is not None else (280.0 if CUDA else 3600.0)
    if ARGS.only == "big":  # the child process of the big section
        rep = Report(OUT, budget, append=True)
        rep.run("big", lambda: big_section(rep))
        return 0
    if CUDA and not torch.cuda.is_available():
        print("no CUDA device: run with --dry (interpreter) or --plan (compile count)",
              file=sys.stderr)
        return 2
    if PLAN:
        install_plan()
    rep = Report(OUT, budget)
    rep.run("env", lambda: env_section(rep))
    with autotune(False):  # the small shapes on the configuration file's blocks
        rep.run("smoke", lambda: smoke_section(rep))
    with autotune(True):  # tuned here, reused by ratio and kernel (the same specialisations)
        rep.run("grads", lambda: grads_section(rep, torch.bfloat16))
    for K, N in SHAPES:
        rep.run("ratio", lambda c=case_of(K, N, T_BIG): ratio_section(rep, c))
    for K, N in SHAPES:
        rep.run("kernel", lambda c=case_of(K, N, T_BIG): kernel_section(rep, c))
    rep.run("decode", lambda: decode_section(rep))

    def child():
        t = time.time()
        r = subprocess.run([sys.executable, __file__, "--only", "big", "--out", str(OUT),
                            "--cache-dir", str(CACHE)], timeout=max(30.0, rep.left()))
        rep.say(f"       (big child: exit {r.returncode}, {time.time() - t:.0f} s)")
        if r.returncode != 0:
            rep.result("big", "child process", "ERROR", r.returncode, "",
                       "died (an illegal address or out of memory?): see its output above",
                       "correctness")
    rep.run("big", child if CUDA else (lambda: big_section(rep)))
    with autotune(False):
        rep.run("fp32", lambda: grads_section(rep, torch.float32))
    rep.run("compile", lambda: compile_section(rep))
    if ARGS.compiled_dense:
        rep.run("compiled_dense", lambda: compiled_dense_section(rep))
    tb.DESIGN = None
    if PLAN:
        return plan_report(rep)
    rep.flush()
    counts = {}
    for row in rep.rows():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    rep.say("SUMMARY " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            + f"  ({time.time() - rep.t0:.0f} s; results in {rep.csv})")
    rep.say(rep.verdict())
    return 0


def compile_seconds():
    """Seconds per cold compile of each kernel: the sm_90 rows of benchmarks/triton_resources.csv
    (``compile_s``: triton.compile with an empty cache on this project's 2-core build machine,
    one core) averaged per kernel, times 2 for what the JIT adds (binding, loading the binary)
    and a slower host. Triton compiles one kernel at a time."""
    per = {}
    with open(ROOT / "benchmarks" / "triton_resources.csv") as f:
        for row in csv.DictReader(f):
            if row["arch"] == "sm_90" and row.get("compile_s"):
                per.setdefault(row["kernel"], []).append(float(row["compile_s"]))
    return {k: round(2 * sum(v) / len(v), 2) for k, v in per.items()}


def plan_report(rep: Report) -> int:
    per = {}
    for name in COMPILES.values():
        per[name] = per.get(name, 0) + 1
    secs = compile_seconds()
    est = sum(secs.get(n.split(" ")[0], 3.0) * k for n, k in per.items())
    plan = dict(compiles=len(COMPILES), per_kernel=per, compile_seconds_estimate=round(est),
                seconds_per_compile=secs, budget=280,
                keys=sorted(f"{n}: {k[2]} {k[1]}" for k, n in COMPILES.items()))
    (rep.out / "plan.json").write_text(json.dumps(plan, indent=1))
    rep.say("PLAN per kernel: " + ", ".join(f"{k}={v}" for k, v in sorted(per.items())))
    rep.say(f"PLAN compiles={len(COMPILES)} compile_seconds~{est:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
