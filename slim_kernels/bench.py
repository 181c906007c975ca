"""Benchmarks of the SLIM op against unfused baselines (issue 6).

One module, used by ``slim-kernels bench``, ``benchmarks/run_bench.py``,
``benchmarks/plot.py`` and ``tests/test_bench_entries.py``. Importing it is cheap: torch is
imported, matplotlib / peft / tqdm only when needed.

Providers (each builds a forward closure on the *same* inputs; backward is autograd's, or
the op's own):

* ``base``            frozen ``F.linear`` alone: the floor. fwd+bwd = forward GEMM + dx GEMM
                      (W frozen: no dW).
* ``slim_<backend>``  :func:`slim_kernels.slim_linear_op` with ``backend=<name>`` for every
                      backend in :func:`slim_kernels.available_backends` that accepts the
                      device (``triton`` on CPU only when asked for by name).
* ``eager_loop``      MoE-PEFT / Mixtral style: loop over LoRA experts, gather the tokens that
                      selected the expert, two small GEMMs, ``index_add_`` the gated delta.
* ``eager_dense``     vectorised einsum: every LoRA expert on every token, (T, E_L, N), then
                      the gates weight and sum them.
* ``compiled_dense``  ``torch.compile(eager_dense)`` (dynamic shapes: one compile for all T).
* ``peft_lora``       PEFT LoRA on an ``nn.Linear`` with the same total rank E_L·r (no router,
                      no experts): what a plain LoRA of the same size costs.

All SLIM providers route alike: logits ``x Rᵀ``, clusters on (C sliding-cluster centres,
variance-normalised distance, reduce rms), yielding ``+ lam·d`` on the identity experts,
top-k softmax over all E experts (identity experts included), LoRA delta scaled by s.

Modes: ``forward`` (a training forward: grad enabled, activations saved), ``backward``
(the backward of a forward run just before, untimed), ``forward+backward``.

Metrics, one CSV schema (``CSV_COLUMNS``):

* ``time_ms``: wall time of one call, median / p20 / p80 over repetitions that go
  round-robin over the providers (the start provider rotates each repetition), so drift of
  a shared machine hits every provider alike. CUDA: synchronised before and after.
* ``cpu_ms`` (CPU only): process CPU time of the same calls (all threads), quantiles as
  above. On a shared machine it leaves out the time the process waited for a core.
* ``peak_MB``: peak of the bytes allocated *during* the call above what was allocated at its
  start (outputs, saved activations, temporaries). CUDA: ``torch.cuda.max_memory_allocated``.
  CPU: the allocation / free events of ``torch.profiler(profile_memory=True)`` summed in time
  order (CPU allocator only; one untimed call; the untimed forward before a timed backward
  is profiled too, so the activations backward frees are counted as freed).
* ``saved_MB`` (forward mode only): bytes of the tensors autograd keeps for backward, not
  counting the inputs and parameters themselves (``saved_tensors_hooks``; distinct storages).

The FLOP floor (SLIM_SPEC section 6) is reported beside the measured ratios: per token the
base forward is 2NK and SLIM adds 2(E_L·r+E)K + 2E_L·r·N; the base backward is the dx GEMM
2NK and SLIM adds dhg = dy B_all (2E_L·r·N), dB_all (2E_L·r·N), [dA; dR] (2(E_L·r+E)K) and
dx += [dh|dz][A;R] (2(E_L·r+E)K).
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CSV_COLUMNS", "MODES", "BASELINE_PROVIDERS", "LLAMA_SHAPES", "CPU_SHAPES",
    "Case", "Inputs", "Runner", "make_inputs", "providers_for", "run_bench",
    "flop_floor", "write_csv", "read_csv", "summary_table", "markdown_table", "speedup_table",
    "plot_csv", "reference_output",
]

CSV_COLUMNS = ["kernel", "provider", "mode", "metric", "x", "y_50", "y_20", "y_80",
               "device", "dtype", "versions"]
MODES = ("forward", "backward", "forward+backward")
BASELINE_PROVIDERS = ("base", "eager_loop", "eager_dense", "compiled_dense", "peft_lora")
# Llama-3-8B projections as (K in, N out): q/o (4096x4096), gate/up (4096x14336), down.
LLAMA_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
# The same aspect ratios scaled down by 4 for a 2-core CPU.
CPU_SHAPES = ((1024, 1024), (1024, 3584), (3584, 1024))
SWEEPS = ("T", "shape", "experts", "rank")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float64": torch.float64}


# --------------------------------------------------------------------------------------
# The case and its inputs
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One benchmark point: layer shape, tokens and SLIM configuration."""

    K: int
    N: int
    T: int
    num_lora_experts: int = 8
    num_identity_experts: int = 2
    rank: int = 16
    top_k: int = 2
    num_clusters: int = 4
    yield_strength: float = 1.0
    distance_reduce: str = "rms"
    alpha: Optional[float] = None  # None: 2r (spec default)
    bias: bool = True

    @property
    def E(self) -> int:
        return self.num_lora_experts + self.num_identity_experts

    @property
    def scaling(self) -> float:
        a = 2.0 * self.rank if self.alpha is None else self.alpha
        return a / self.rank

    def kernel_name(self, sweep: str) -> str:
        """The ``kernel`` CSV column: the fixed configuration, ``*`` marking the swept field."""
        f = {"K": self.K, "N": self.N, "T": self.T, "E_L": self.num_lora_experts,
             "E_I": self.num_identity_experts, "r": self.rank, "k": self.top_k,
             "C": self.num_clusters}
        star = {"T": ("T",), "shape": ("K", "N"), "experts": ("E_L",), "rank": ("r",)}[sweep]
        return "slim_linear " + " ".join(f"{k}={'*' if k in star else v}" for k, v in f.items())

    def x_value(self, sweep: str) -> str:
        return {"T": str(self.T), "shape": f"{self.K}x{self.N}",
                "experts": str(self.num_lora_experts), "rank": str(self.rank)}[sweep]


def parse_kernel(kernel: str) -> Dict[str, str]:
    """Inverse of :meth:`Case.kernel_name`: {'K': '1024', 'T': '*', ...}."""
    parts = kernel.split()
    return dict(p.split("=", 1) for p in parts[1:] if "=" in p)


@dataclass
class Inputs:
    """The tensors every provider of one case shares (SLIM stacked layout, spec section 6)."""

    case: Case
    x: Tensor            # (T, K), requires grad
    weight: Tensor       # (N, K), frozen
    bias: Optional[Tensor]
    lora_A: Tensor       # (E_L·r, K) leaf
    lora_B: Tensor       # (N, E_L·r) leaf
    router: Tensor       # (E, K) leaf
    centers: Optional[Tensor]   # (C, K) fp32
    cluster_vars: Optional[Tensor]
    inv_std: Optional[Tensor]   # (C, K) fp32 = rsqrt(vars + eps)
    dy: Tensor           # (T, N) upstream gradient
    cluster_eps: float = 1e-5

    @property
    def trainable(self) -> List[Tensor]:
        return [self.x, self.lora_A, self.lora_B, self.router]


def make_inputs(case: Case, device="cpu", dtype=torch.float32, seed: int = 0) -> Inputs:
    """Random inputs with non-trivial routing: B is non-zero (a trained adapter, not the
    zero init), the clusters are centred on tokens of the same distribution so that some
    tokens are in-domain (d < 0) and some out (d > 0)."""
    g = torch.Generator().manual_seed(seed)
    c = case
    K, N, T, R_ = c.K, c.N, c.T, c.num_lora_experts * c.rank

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std)

    bound = 1.0 / math.sqrt(K)
    x = rnd(T, K)
    weight = (torch.rand(N, K, generator=g) * 2 - 1) * bound
    bias = (torch.rand(N, generator=g) * 2 - 1) * bound if c.bias else None
    lora_A = (torch.rand(R_, K, generator=g) * 2 - 1) * bound
    lora_B = rnd(N, R_, std=1.0 / math.sqrt(R_))
    router = rnd(c.E, K, std=0.02)
    centers = cluster_vars = inv_std = None
    eps = 1e-5
    if c.num_clusters > 0:
        centers = rnd(c.num_clusters, K) * 0.7
        cluster_vars = 1.0 + 0.5 * torch.rand(c.num_clusters, K, generator=g)
        inv_std = (cluster_vars + eps).rsqrt()
    dy = rnd(T, N)

    def dev(t, trainable=False, keep_fp32=False):
        if t is None:
            return None
        t = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype).contiguous()
        return t.requires_grad_(trainable)

    return Inputs(
        case=case, x=dev(x, True), weight=dev(weight), bias=dev(bias),
        lora_A=dev(lora_A, True), lora_B=dev(lora_B, True), router=dev(router, True),
        centers=dev(centers, keep_fp32=True), cluster_vars=dev(cluster_vars, keep_fp32=True),
        inv_std=dev(inv_std, keep_fp32=True), dy=dev(dy), cluster_eps=eps,
    )


# --------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------
@dataclass
class Runner:
    """A provider bound to one case: ``fwd()`` returns y (T, N) with a graph;
    ``leaves`` are the tensors whose .grad is cleared before every call."""

    name: str
    fwd: Callable[[], Tensor]
    leaves: List[Tensor]
    exclude: List[Tensor] = field(default_factory=list)  # not counted as saved activations
    note: str = ""


class Skip(Exception):
    """A provider that cannot run here (the message says why)."""


def _acc(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _eager_route(x: Tensor, router: Tensor, centers, inv_std, c: Case) -> Tuple[Tensor, Tensor]:
    """Router as an eager implementation writes it: dense gates (T, E) (zero off the top-k,
    differentiable) and the selected indices (T, k).

    Cluster assignment by ``||x||² - 2 x·c + ||c||²`` (a GEMM), then the variance-normalised
    distance to the assigned centre, no gradient through it; ``+ lam·d`` on identity logits;
    ``torch.topk`` then softmax over the kept logits."""
    acc = _acc(x.dtype)
    z = (x @ router.t()).to(acc)
    if centers is not None and c.yield_strength != 0.0 and c.num_identity_experts > 0:
        with torch.no_grad():
            xf = x.detach().to(acc)
            cf = centers.to(acc)
            sq = (xf * xf).sum(1, keepdim=True) - 2.0 * (xf @ cf.t()) + (cf * cf).sum(1)[None]
            assign = sq.argmin(1)
            u = (xf - cf[assign]).abs_().mul_(inv_std.to(acc)[assign])
            if c.distance_reduce == "rms":
                d = u.square_().mean(1).sqrt_()
            elif c.distance_reduce == "mean":
                d = u.mean(1)
            else:
                d = u.amax(1)
            d = d - 1.0
            bump = torch.zeros(c.E, dtype=acc, device=x.device)
            bump[c.num_lora_experts:] = c.yield_strength
        z = z + d[:, None] * bump
    vals, idx = z.topk(c.top_k, dim=1)
    w = torch.softmax(vals, dim=1)
    gates = torch.zeros_like(z).scatter(1, idx, w)
    return gates, idx


def eager_loop_forward(inp: Inputs, x: Optional[Tensor] = None) -> Tensor:
    """MoE-PEFT (MixLoRA) / Mixtral style: per expert, the tokens that chose it."""
    c = inp.case
    x = inp.x if x is None else x
    T, K = x.shape
    N, r, E_L = c.N, c.rank, c.num_lora_experts
    gates, idx = _eager_route(x, inp.router, inp.centers, inp.inv_std, c)
    y = F.linear(x, inp.weight, inp.bias)
    A = inp.lora_A.view(E_L, r, K)
    B = inp.lora_B.view(N, E_L, r)
    delta = torch.zeros_like(y)
    # one (k, T) mask per expert, as MoE-PEFT builds it with one_hot
    expert_mask = F.one_hot(idx, num_classes=c.E).permute(2, 1, 0)  # (E, k, T)
    for e in range(E_L):
        _, top_x = torch.where(expert_mask[e])
        if top_x.numel() == 0:
            continue
        xs = x.index_select(0, top_x)
        out = F.linear(F.linear(xs, A[e]), B[:, e, :])
        w = (c.scaling * gates[top_x, e]).to(out.dtype)
        delta.index_add_(0, top_x, out * w[:, None])
    return y + delta


def eager_dense_forward(inp: Inputs, x: Optional[Tensor] = None) -> Tensor:
    """Vectorised: every LoRA expert on every token (einsum to (T, E_L, N)), then gate."""
    return _dense(inp.x if x is None else x, inp.weight, inp.bias, inp.lora_A, inp.lora_B,
                  inp.router, inp.centers, inp.inv_std, inp.case)


def _dense(x, weight, bias, lora_A, lora_B, router, centers, inv_std, c: Case) -> Tensor:
    T, K = x.shape
    N, r, E_L = c.N, c.rank, c.num_lora_experts
    gates, _ = _eager_route(x, router, centers, inv_std, c)
    A = lora_A.view(E_L, r, K)
    B = lora_B.view(N, E_L, r)
    h = torch.einsum("tk,erk->ter", x, A)
    out = torch.einsum("ter,ner->ten", h, B)
    g = (c.scaling * gates[:, :E_L]).to(out.dtype)
    return F.linear(x, weight, bias) + (g[:, :, None] * out).sum(1)


def _p_base(inp: Inputs) -> Runner:
    return Runner("base", lambda: F.linear(inp.x, inp.weight, inp.bias), [inp.x])


def _p_eager_loop(inp: Inputs) -> Runner:
    return Runner("eager_loop", lambda: eager_loop_forward(inp), inp.trainable)


def _p_eager_dense(inp: Inputs) -> Runner:
    return Runner("eager_dense", lambda: eager_dense_forward(inp), inp.trainable)


_COMPILED: Dict[str, Callable] = {}


def _p_compiled_dense(inp: Inputs) -> Runner:
    try:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    except Exception as e:  # pragma: no cover
        raise Skip(f"torch.compile unavailable: {type(e).__name__}: {e}")
    fn = _COMPILED.get("dense")
    if fn is None:
        fn = torch.compile(_dense, dynamic=True)
        _COMPILED["dense"] = fn
    c = inp.case

    def fwd():
        return fn(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.router,
                  inp.centers, inp.inv_std, c)

    return Runner("compiled_dense", fwd, inp.trainable, note="torch.compile(dynamic=True)")


def _p_peft_lora(inp: Inputs) -> Runner:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from peft import LoraConfig, get_peft_model
    except Exception as e:
        raise Skip(f"peft does not import: {type(e).__name__}: {e}")
    c = inp.case
    R_ = c.num_lora_experts * c.rank

    class _M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(c.K, c.N, bias=inp.bias is not None)

    m = _M()
    cfg = LoraConfig(r=R_, lora_alpha=c.scaling * R_, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(m, cfg).to(device=inp.x.device, dtype=inp.x.dtype)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(inp.weight)
        if inp.bias is not None:
            layer.base_layer.bias.copy_(inp.bias)
        layer.lora_A["default"].weight.copy_(inp.lora_A)
        layer.lora_B["default"].weight.copy_(inp.lora_B)
    if abs(layer.scaling["default"] - c.scaling) > 1e-9:  # pragma: no cover
        raise Skip(f"peft scaling {layer.scaling['default']} != {c.scaling}")
    leaves = [inp.x] + [p for p in model.parameters() if p.requires_grad]
    return Runner("peft_lora", lambda: layer(inp.x), leaves,
                  exclude=list(model.parameters()), note=f"peft LoRA r={R_}")


def _p_slim(backend: str) -> Callable[[Inputs], Runner]:
    def build(inp: Inputs) -> Runner:
        from .ops.dispatch import resolve_backend
        from .ops.op import slim_linear_op

        try:
            resolve_backend(backend, inp.x)
        except Exception as e:
            raise Skip(str(e))
        c = inp.case

        def fwd():
            return slim_linear_op(
                inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.router,
                num_lora_experts=c.num_lora_experts, top_k=c.top_k, scaling=c.scaling,
                yield_strength=c.yield_strength if c.num_identity_experts > 0 else 0.0,
                distance_reduce=c.distance_reduce, centers=inp.centers, inv_std=inp.inv_std,
                backend=backend,
            )[0]

        return Runner(f"slim_{backend}", fwd, inp.trainable)

    return build


_BASELINES: Dict[str, Callable[[Inputs], Runner]] = {
    "base": _p_base,
    "eager_loop": _p_eager_loop,
    "eager_dense": _p_eager_dense,
    "compiled_dense": _p_compiled_dense,
    "peft_lora": _p_peft_lora,
}


def providers_for(device: str, requested: Optional[Sequence[str]] = None
                  ) -> Tuple[Dict[str, Callable[[Inputs], Runner]], Dict[str, str]]:
    """(name -> builder, skipped name -> reason) in display order.

    The fused providers are ``slim_<b>`` for each ``b`` in ``available_backends()``, found at
    run time (so ``cpp`` and ``triton`` join when they land). ``slim_triton`` is skipped on
    CPU unless ``requested`` names it (it would run in the Triton interpreter)."""
    dev_type = torch.device(device).type
    skipped: Dict[str, str] = {}
    explicit = set(requested or ())
    if dev_type == "cpu" and "slim_triton" in explicit:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .ops.dispatch import available_backends

    found = available_backends()
    out: Dict[str, Callable[[Inputs], Runner]] = {"base": _p_base}
    for b in found:
        name = f"slim_{b}"
        if dev_type == "cpu" and b in ("triton", "cuda") and name not in explicit:
            skipped[name] = f"backend {b!r} is a GPU backend; on CPU only when asked for by name"
            continue
        out[name] = _p_slim(b)
    for n in BASELINE_PROVIDERS[1:]:
        out[n] = _BASELINES[n]
    if requested:
        unknown = [r for r in requested if r not in out and r not in skipped
                   and not r.startswith("slim_")]
        if unknown:
            raise ValueError(f"unknown provider(s) {unknown}; known: {list(out)}")
        for r in requested:
            if r.startswith("slim_") and r not in out and r not in skipped:
                skipped[r] = f"backend {r[5:]!r} is not available here (available: {found})"
        keep = {"base"} | set(requested)  # base is always run: ratios need it
        out = {k: v for k, v in out.items() if k in keep}
        skipped = {k: v for k, v in skipped.items() if k in explicit}
    return out, skipped


# --------------------------------------------------------------------------------------
# Reference (for the correctness test of the baselines themselves)
# --------------------------------------------------------------------------------------
def reference_output(inp: Inputs, provider: str) -> Tensor:
    """fp64 truth for a provider's forward: :func:`slim_kernels.slim_reference` for every
    SLIM provider, the plain LoRA formula for ``peft_lora``, F.linear for ``base``."""
    from .reference import slim_reference

    c = inp.case
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    x, W, b = d(inp.x), d(inp.weight), d(inp.bias)
    if provider == "base":
        return F.linear(x, W, b)
    if provider == "peft_lora":
        return F.linear(x, W, b) + c.scaling * (x @ d(inp.lora_A).t()) @ d(inp.lora_B).t()
    E_L, r, K, N = c.num_lora_experts, c.rank, c.K, c.N
    A = d(inp.lora_A).view(E_L, r, K)
    B = d(inp.lora_B).view(N, E_L, r).permute(1, 0, 2)
    y, _, _, _ = slim_reference(
        x, W, b, A, B, d(inp.router), top_k=c.top_k, scaling=c.scaling,
        yield_strength=c.yield_strength if c.num_identity_experts > 0 else 0.0,
        distance_reduce=c.distance_reduce, centers=inp.centers, cluster_vars=inp.cluster_vars,
        cluster_eps=inp.cluster_eps,
    )
    return y


# --------------------------------------------------------------------------------------
# FLOP floor (spec section 6)
# --------------------------------------------------------------------------------------
def flop_floor(case: Case, mode: str) -> float:
    """SLIM FLOPs / base FLOPs for ``mode`` (the ratio a perfect fused kernel reaches when
    compute-bound). Per token: forward base 2NK, SLIM extra 2(E_L·r+E)K + 2E_L·r·N;
    backward base 2NK (dx only), SLIM extra 4E_L·r·N + 4(E_L·r+E)K."""
    K, N, R_, E = case.K, case.N, case.num_lora_experts * case.rank, case.E
    base_f = 2.0 * N * K
    extra_f = 2.0 * (R_ + E) * K + 2.0 * R_ * N
    base_b = 2.0 * N * K
    extra_b = 4.0 * R_ * N + 4.0 * (R_ + E) * K
    if mode == "forward":
        return 1.0 + extra_f / base_f
    if mode == "backward":
        return 1.0 + extra_b / base_b
    return 1.0 + (extra_f + extra_b) / (base_f + base_b)


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------
def _sync_fn(device: str) -> Callable[[], None]:
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _step(runner: Runner, mode: str, dy: Tensor):
    """(prep, timed) closures for one call of ``runner`` in ``mode``; prep is untimed."""
    state: Dict[str, Optional[Tensor]] = {"y": None}

    def clear():
        for t in runner.leaves:
            t.grad = None

    if mode == "forward":
        def prep():
            clear()

        def timed():
            return runner.fwd()
    elif mode == "backward":
        def prep():
            clear()
            state["y"] = runner.fwd()

        def timed():
            y = state["y"]
            state["y"] = None
            y.backward(dy)
    elif mode == "forward+backward":
        def prep():
            clear()

        def timed():
            runner.fwd().backward(dy)
    else:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    return prep, timed


class _quiet_fd2:
    """Send the C-level stderr (fd 2) to /dev/null inside the block."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self._null, 2)
        except Exception:  # pragma: no cover (no fd 2, e.g. some notebooks)
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            os.close(self._null)
        return False


def _cpu_peak_bytes(prep: Callable[[], None], timed: Callable[[], object]) -> float:
    """Peak of (allocated - allocated when ``timed`` starts) during ``timed``, from the
    profiler's allocation / free events (CPU allocator). ``prep`` runs inside the profiler
    too, so that blocks it allocates (the graph of a forward before a timed backward) are
    seen when ``timed`` frees them; frees of blocks older than the profiler are not seen."""
    from torch.profiler import ProfilerActivity, profile

    keep = []
    with _quiet_fd2():  # kineto prints profiler_start/stop lines on fd 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            prep()
            mark = time.time_ns()  # the profiler's event clock is the epoch clock
            keep.append(timed())
    # CPU-only profiling: every [memory] event is a CPU allocation (+) or free (-)
    evs = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]")
    level = sum(nb for t, nb in evs if t < mark)
    cur = peak = level
    for t, nb in evs:
        if t < mark:
            continue
        cur += nb
        peak = max(peak, cur)
    del keep
    return float(peak - level)


def _peak_bytes(device: str, prep, timed) -> float:
    if torch.device(device).type == "cuda":
        prep()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = timed()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        del out
        return float(peak)
    return _cpu_peak_bytes(prep, timed)


def _saved_bytes(runner: Runner, inp: Inputs) -> float:
    """Bytes of distinct storages autograd saves in a forward, inputs and parameters aside."""
    skip = {t.untyped_storage().data_ptr() for t in
            [inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.router, inp.dy]
            + [t for t in (inp.bias, inp.centers, inp.inv_std) if t is not None]
            + runner.exclude}
    seen: Dict[int, int] = {}

    def pack(t):
        try:
            s = t.untyped_storage()
            p = s.data_ptr()
            if p not in skip:
                seen[p] = s.nbytes()
        except Exception:
            pass
        return t

    for t in runner.leaves:
        t.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = runner.fwd()
    del y
    return float(sum(seen.values()))


def _quantiles(v: List[float]) -> Tuple[float, float, float]:
    s = sorted(v)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles
    return statistics.median(s), q[1], q[7]


def versions_string(device: str) -> str:
    import importlib.metadata as md

    from ._version import __version__

    v = [f"slim_kernels={__version__}", f"torch={torch.__version__}",
         f"python={platform.python_version()}"]
    for pkg in ("peft", "triton"):
        try:
            v.append(f"{pkg}={md.version(pkg)}")
        except Exception:
            pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        v.append(f"gpu={torch.cuda.get_device_name()}")
    else:
        v.append(f"cpu={platform.machine()}x{os.cpu_count()}")
    v.append(f"threads={torch.get_num_threads()}")
    rev = _git_rev()
    if rev:
        v.append(f"git={rev}")
    return ";".join(v)


def _git_rev() -> str:
    """Short commit of the checkout the package runs from ('' when not a git checkout)."""
    import subprocess

    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return ""


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@dataclass
class BenchResult:
    rows: List[Dict[str, str]]
    skipped: Dict[str, str]
    cases: List[Tuple[str, Case]]


def run_bench(
    cases: Sequence[Case], sweep: str = "T", *, device: str = "cpu",
    dtype: torch.dtype = torch.float32, modes: Sequence[str] = MODES,
    providers: Optional[Sequence[str]] = None, reps: int = 7, warmup: int = 2,
    memory: bool = True, progress: bool = True, seed: int = 0,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> BenchResult:
    """Run every provider on every case in every mode; return CSV rows."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode {m!r}: expected one of {MODES}")
    builders, skipped = providers_for(device, providers)
    dev_name = torch.device(device).type
    vers = versions_string(device)
    dname = _dtype_name(dtype)
    rows: List[Dict[str, str]] = []
    sync = _sync_fn(device)
    total = len(cases) * len(modes) * (warmup + reps) * len(builders)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="bench", unit="call", leave=True, file=sys.stderr)
        except Exception:  # pragma: no cover
            bar = None
    done_cases: List[Tuple[str, Case]] = []

    def row(kernel, prov, mode, metric, x, y50, y20, y80):
        rows.append(dict(kernel=kernel, provider=prov, mode=mode, metric=metric, x=x,
                         y_50=f"{y50:.6g}", y_20=f"{y20:.6g}", y_80=f"{y80:.6g}",
                         device=dev_name, dtype=dname, versions=vers))

    for case in cases:
        kernel, xval = case.kernel_name(sweep), case.x_value(sweep)
        done_cases.append((kernel, case))
        inp = make_inputs(case, device=device, dtype=dtype, seed=seed)
        runners: Dict[str, Runner] = {}
        for name, build in builders.items():
            try:
                runners[name] = build(inp)
            except Skip as e:
                skipped.setdefault(name, str(e))
            except Exception as e:
                skipped.setdefault(name, f"{type(e).__name__}: {e}")
        for mode in modes:
            steps = {n: _step(r, mode, inp.dy) for n, r in runners.items()}
            # warm-up (torch.compile compiles here); a provider that fails is dropped
            for n in list(steps):
                prep, timed = steps[n]
                try:
                    for _ in range(warmup):
                        prep()
                        out = timed()
                        del out
                        sync()
                except Exception as e:
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    skipped.setdefault(n, f"failed at {kernel} T={case.T} {mode}: {msg}")
                    log(f"[bench] skipping {n}: {msg}")
                    del steps[n]
                    runners.pop(n, None)
                    if bar is not None:
                        bar.update(reps)
                if bar is not None:
                    bar.update(warmup)
            times: Dict[str, List[float]] = {n: [] for n in steps}
            cpu_times: Dict[str, List[float]] = {n: [] for n in steps}
            names = list(steps)
            for rep in range(reps):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for n in order:
                    prep, timed = steps[n]
                    prep()
                    sync()
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    out = timed()
                    sync()
                    t1 = time.perf_counter()
                    c1 = time.process_time()
                    del out
                    times[n].append((t1 - t0) * 1e3)
                    cpu_times[n].append((c1 - c0) * 1e3)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"{xval} {mode}", refresh=False)
            for n in names:
                y50, y20, y80 = _quantiles(times[n])
                row(kernel, n, mode, "time_ms", xval, y50, y20, y80)
                if dev_name == "cpu":
                    y50, y20, y80 = _quantiles(cpu_times[n])
                    row(kernel, n, mode, "cpu_ms", xval, y50, y20, y80)
            if memory:
                for n in names:
                    try:
                        mb = _peak_bytes(device, *steps[n]) / 2**20
                        row(kernel, n, mode, "peak_MB", xval, mb, mb, mb)
                        if mode == "forward":
                            sv = _saved_bytes(runners[n], inp) / 2**20
                            row(kernel, n, mode, "saved_MB", xval, sv, sv, sv)
                    except Exception as e:  # memory is best effort; say so
                        log(f"[bench] memory of {n} not measured: {type(e).__name__}: {e}")
        del inp, runners
        gc.collect()
    if bar is not None:
        bar.close()
    return BenchResult(rows, skipped, done_cases)


# --------------------------------------------------------------------------------------
# CSV, summary, plots
# --------------------------------------------------------------------------------------
def write_csv(rows: Iterable[Dict[str, str]], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_COLUMNS})
    return path


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        if rd.fieldnames != CSV_COLUMNS:
            raise ValueError(f"{path}: columns {rd.fieldnames}, expected {CSV_COLUMNS}")
        return list(rd)


def _case_from_kernel(kernel: str, x: str) -> Case:
    f = parse_kernel(kernel)
    K, N = f["K"], f["N"]
    if K == "*":
        K, N = x.split("x")
    T = x if f["T"] == "*" else f["T"]
    E_L = x if f["E_L"] == "*" else f["E_L"]
    r = x if f["r"] == "*" else f["r"]
    return Case(K=int(K), N=int(N), T=int(T), num_lora_experts=int(E_L),
                num_identity_experts=int(f["E_I"]), rank=int(r), top_k=int(f["k"]),
                num_clusters=int(f["C"]))


def _sweep_label(kernel: str) -> str:
    """Name of the swept field of a ``kernel`` string: T, KxN, E_L or r."""
    f = parse_kernel(kernel)
    if f.get("K") == "*":
        return "KxN"
    return next((n for n, v in f.items() if v == "*"), "x")


def _xkey(x: str):
    try:
        return (0, float(x), x)
    except ValueError:
        return (1, 0.0, x)


def ratio_rows(rows: List[Dict[str, str]], metric: str = "time_ms") -> List[Dict[str, object]]:
    """Per (kernel, mode, x, provider): median, ratio to base (median over median), the
    p20/p80 ratio band, and the FLOP floor of SLIM at that point."""
    base = {(r["kernel"], r["mode"], r["x"]): float(r["y_50"]) for r in rows
            if r["metric"] == metric and r["provider"] == "base"}
    out = []
    for r in rows:
        if r["metric"] != metric:
            continue
        b = base.get((r["kernel"], r["mode"], r["x"]))
        case = _case_from_kernel(r["kernel"], r["x"])
        out.append(dict(kernel=r["kernel"], mode=r["mode"], x=r["x"], provider=r["provider"],
                        y_50=float(r["y_50"]),
                        ratio=float(r["y_50"]) / b if b else float("nan"),
                        floor=flop_floor(case, r["mode"])))
    return out


def summary_table(rows: List[Dict[str, str]], metric: str = "time_ms") -> str:
    """Text tables: per kernel and mode, rows = providers, columns = x, cells =
    'ratio to base (median)'; a last row gives the SLIM FLOP floor."""
    rr = ratio_rows(rows, metric)
    lines: List[str] = []
    kernels = list(dict.fromkeys(r["kernel"] for r in rr))
    unit = "ms" if metric.endswith("_ms") else "MB"
    for k in kernels:
        for mode in MODES:
            sel = [r for r in rr if r["kernel"] == k and r["mode"] == mode]
            if not sel:
                continue
            xs = sorted(dict.fromkeys(r["x"] for r in sel), key=_xkey)
            provs = list(dict.fromkeys(r["provider"] for r in sel))
            sweep_name = _sweep_label(k)
            head = [f"{mode} [{metric}]"] + [f"{sweep_name}={x}" for x in xs]
            table = [head]
            for p in provs:
                cells = [p]
                for x in xs:
                    m = [r for r in sel if r["provider"] == p and r["x"] == x]
                    cells.append(f"{m[0]['ratio']:.2f}x ({m[0]['y_50']:.3g} {unit})" if m else "-")
                table.append(cells)
            if metric.endswith("_ms"):
                fl = ["FLOP floor (SLIM)"]
                for x in xs:
                    m = [r for r in sel if r["x"] == x]
                    fl.append(f"{m[0]['floor']:.2f}x" if m else "-")
                table.append(fl)
            w = [max(len(row[i]) for row in table) for i in range(len(head))]
            lines.append(k)
            for i, row_ in enumerate(table):
                lines.append("  " + "  ".join(c.ljust(w[j]) for j, c in enumerate(row_)))
                if i == 0:
                    lines.append("  " + "  ".join("-" * w[j] for j in range(len(head))))
            lines.append("")
    return "\n".join(lines)


def markdown_table(rows: List[Dict[str, str]], mode: str = "forward+backward",
                   metric: str = "time_ms") -> str:
    """One markdown table per kernel for ``mode``: ratio to base, FLOP floor row."""
    rr = [r for r in ratio_rows(rows, metric) if r["mode"] == mode]
    out = []
    for k in dict.fromkeys(r["kernel"] for r in rr):
        sel = [r for r in rr if r["kernel"] == k]
        xs = sorted(dict.fromkeys(r["x"] for r in sel), key=_xkey)
        sweep_name = _sweep_label(k)
        what = {"time_ms": "wall time", "cpu_ms": "process CPU time",
                "peak_MB": "peak memory", "saved_MB": "saved activations"}.get(metric, metric)
        unit = "ms" if metric.endswith("_ms") else "MB"
        out.append(f"`{k}`, {mode}, {what}: ratio to `base` (median {unit} in brackets)\n")
        out.append("| provider | " + " | ".join(f"{sweep_name}={x}" for x in xs) + " |")
        out.append("|---|" + "---|" * len(xs))
        for p in dict.fromkeys(r["provider"] for r in sel):
            cells = []
            for x in xs:
                m = [r for r in sel if r["provider"] == p and r["x"] == x]
                cells.append(f"{m[0]['ratio']:.2f}x ({m[0]['y_50']:.3g})" if m else "-")
            out.append(f"| {p} | " + " | ".join(cells) + " |")
        if metric.endswith("_ms"):
            fl = [f"{[r for r in sel if r['x'] == x][0]['floor']:.2f}x" for x in xs]
            out.append("| *FLOP floor (SLIM)* | " + " | ".join(fl) + " |")
        out.append("")
    return "\n".join(out)


def speedup_table(rows: List[Dict[str, str]], mode: str = "forward+backward",
                  metric: str = "time_ms", markdown: bool = False) -> str:
    """For each fused provider (``slim_*``) and point: its ratio to base, the FLOP floor, and
    how many times faster it is than each unfused baseline (baseline median / its median;
    > 1 means the fused path wins)."""
    rr = [r for r in ratio_rows(rows, metric) if r["mode"] == mode]
    med = {(r["kernel"], r["x"], r["provider"]): r["y_50"] for r in rr}
    fused = [p for p in dict.fromkeys(r["provider"] for r in rr) if p.startswith("slim_")]
    others = [p for p in BASELINE_PROVIDERS[1:] if any(r["provider"] == p for r in rr)]
    head = ["point", "provider", "vs base", "FLOP floor"] + [f"{o} / it" for o in others]
    table = [head]
    for k in dict.fromkeys(r["kernel"] for r in rr):
        f = parse_kernel(k)
        xs = sorted(dict.fromkeys(r["x"] for r in rr if r["kernel"] == k), key=_xkey)
        sweep_name = _sweep_label(k)
        fixed = " ".join(f"{a}={b}" for a, b in f.items()
                         if b != "*" and a in ("K", "N", "T", "E_L", "r"))
        for x in xs:
            for p in fused:
                me = med.get((k, x, p))
                if me is None:
                    continue
                r0 = [r for r in rr if r["kernel"] == k and r["x"] == x and r["provider"] == p][0]
                cells = [f"{fixed} {sweep_name}={x}", p, f"{r0['ratio']:.2f}x",
                         f"{r0['floor']:.2f}x"]
                for o in others:
                    v = med.get((k, x, o))
                    cells.append(f"{v / me:.2f}x" if v else "-")
                table.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in table[1:]]
        return "\n".join(out)
    w = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[j]) for j, c in enumerate(r)) for r in table]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


_STYLE = {"base": ("k", "-", "o"), "eager_loop": ("tab:red", "--", "s"),
          "eager_dense": ("tab:orange", "--", "^"), "compiled_dense": ("tab:purple", "--", "v"),
          "peft_lora": ("tab:gray", ":", "x")}
_FUSED_COLORS = ["tab:blue", "tab:green", "tab:cyan", "tab:olive"]


def _style(p: str, fused_i: Dict[str, int]):
    if p in _STYLE:
        return _STYLE[p]
    i = fused_i.setdefault(p, len(fused_i))
    return (_FUSED_COLORS[i % len(_FUSED_COLORS)], "-", "D")


def plot_csv(path: str, outdir: Optional[str] = None, prefix: Optional[str] = None) -> List[str]:
    """From one CSV: ``<prefix>_time.png`` (wall time vs x per provider, a panel per layer
    shape and mode), ``<prefix>_overhead.png`` (ratio to base, with the SLIM FLOP floor
    dotted), the same two for process CPU time (``_time_cpu``, ``_overhead_cpu``) when the
    CSV has ``cpu_ms``, and ``<prefix>_memory.png`` (peak MB). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(path)
    outdir = outdir or os.path.dirname(os.path.abspath(path))
    prefix = prefix or os.path.splitext(os.path.basename(path))[0]
    os.makedirs(outdir, exist_ok=True)
    written = []
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    dev = rows[0]["device"] if rows else "?"
    dt = rows[0]["dtype"] if rows else "?"
    fused_i: Dict[str, int] = {}

    def short(k):
        f = parse_kernel(k)
        return " ".join(f"{a}={b}" for a, b in f.items() if b != "*" and a in ("K", "N", "T",
                                                                                 "E_L", "r"))

    def grid(metric, value, ylabel, fname, logy=True, floor=False):
        sel = [r for r in rows if r["metric"] == metric]
        if not sel:
            return
        fig, axes = plt.subplots(len(modes), len(kernels), squeeze=False,
                                 figsize=(max(4.2 * len(kernels), 7.0), 3.2 * len(modes)))
        for j, k in enumerate(kernels):
            for i, mode in enumerate(modes):
                ax = axes[i][j]
                s = [r for r in sel if r["kernel"] == k and r["mode"] == mode]
                xs = sorted(dict.fromkeys(r["x"] for r in s), key=_xkey)
                numeric = all(_xkey(x)[0] == 0 for x in xs)
                pos = {x: (float(x) if numeric else n) for n, x in enumerate(xs)}
                for p in dict.fromkeys(r["provider"] for r in s):
                    pts = sorted(((pos[r["x"]], value(r)) for r in s if r["provider"] == p),
                                 key=lambda t: t[0])
                    pts = [(a, b) for a, b in pts if b is not None and not math.isnan(b)]
                    if not pts:
                        continue
                    c, ls, mk = _style(p, fused_i)
                    ax.plot([a for a, _ in pts], [b for _, b in pts], color=c, ls=ls, marker=mk,
                            label=p, ms=4)
                    if metric.endswith("_ms") and not floor:
                        lo = [(pos[r["x"]], float(r["y_20"]), float(r["y_80"])) for r in s
                              if r["provider"] == p]
                        lo.sort()
                        ax.fill_between([a for a, _, _ in lo], [b for _, b, _ in lo],
                                        [c_ for _, _, c_ in lo], color=c, alpha=0.15, lw=0)
                if floor:
                    fl = [(pos[x], flop_floor(_case_from_kernel(k, x), mode)) for x in xs]
                    ax.plot([a for a, _ in fl], [b for _, b in fl], color="k", ls=":", lw=1,
                            label="FLOP floor (SLIM)")
                    ax.axhline(1.0, color="k", lw=0.6)
                    ax.set_ylim(bottom=0.0)
                if numeric:
                    ax.set_xscale("log", base=2)
                else:
                    ax.set_xticks(list(pos.values()), xs, rotation=20, fontsize=7)
                if logy:
                    ax.set_yscale("log")
                sweep_name = _sweep_label(k)
                ax.set_xlabel(sweep_name)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{short(k)}\n{mode}", fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
        h, l = axes[0][0].get_legend_handles_labels()
        ncol = min(len(l), 8 if len(kernels) > 1 else 4)
        fig.legend(h, l, loc="upper center", ncol=ncol, fontsize=8)
        fig.text(0.01, 0.005, f"SLIM linear, {dev} {dt}; {rows[0]['versions']}", fontsize=6)
        top = 1.0 - (0.025 * math.ceil(len(l) / ncol) + 0.01) * 3.0 / len(modes)
        fig.tight_layout(rect=(0, 0.015, 1, top))
        fn = os.path.join(outdir, f"{prefix}_{fname}.png")
        fig.savefig(fn, dpi=110)
        plt.close(fig)
        written.append(fn)

    for metric, tag, what in (("time_ms", "", "wall"), ("cpu_ms", "_cpu", "process CPU")):
        if not any(r["metric"] == metric for r in rows):
            continue
        grid(metric, lambda r: float(r["y_50"]), f"{what} ms (median, p20-p80)", f"time{tag}")
        rr = {(r["kernel"], r["mode"], r["x"], r["provider"]): r["ratio"]
              for r in ratio_rows(rows, metric)}
        grid(metric, lambda r, rr=rr: rr.get((r["kernel"], r["mode"], r["x"], r["provider"])),
             f"{what} time / base", f"overhead{tag}", logy=False, floor=True)
    grid("peak_MB", lambda r: float(r["y_50"]), "peak MB during the call", "memory")
    return written


# --------------------------------------------------------------------------------------
# Sweeps and the CLI entry
# --------------------------------------------------------------------------------------
def build_cases(sweep: str, *, shapes: Sequence[Tuple[int, int]], T_values: Sequence[int],
                T: int, experts: Sequence[int], ranks: Sequence[int], base: Case) -> List[Case]:
    rep = dataclasses.replace
    if sweep == "T":
        return [rep(base, K=K, N=N, T=t) for (K, N) in shapes for t in T_values]
    if sweep == "shape":
        return [rep(base, K=K, N=N, T=T) for (K, N) in shapes]
    K, N = shapes[0]
    if sweep == "experts":
        return [rep(base, K=K, N=N, T=T, num_lora_experts=e) for e in experts]
    if sweep == "rank":
        return [rep(base, K=K, N=N, T=T, rank=r) for r in ranks]
    raise ValueError(f"sweep {sweep!r}: expected one of {SWEEPS}")


def _ints(s: str) -> List[int]:
    return [int(v) for v in str(s).split(",") if v.strip()]


def _shapes(s: str) -> List[Tuple[int, int]]:
    out = []
    for v in s.split(","):
        a, b = v.lower().split("x")
        out.append((int(a), int(b)))
    return out


def add_arguments(p) -> None:
    """The flags of ``slim-kernels bench`` (also used by benchmarks/run_bench.py)."""
    p.add_argument("--quick", action="store_true",
                   help="small run (< 3 min on a 2-core CPU): one shape (1024x1024 on CPU), "
                        "T in 64, 256, 5 repetitions, 1 warm-up")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if present)")
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma list of forward, backward, forward+backward")
    p.add_argument("--providers", default=None,
                   help="comma list (default: all). base always runs. Names: base, "
                        "slim_<backend> (torch, cpp, cuda, triton), eager_loop, eager_dense, "
                        "compiled_dense, peft_lora")
    p.add_argument("--out", default="bench_results", help="output folder for CSV and PNGs")
    p.add_argument("--sweep", default="T", choices=SWEEPS)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--cpu-scale", dest="cpu_scale", action="store_true", default=None,
                       help="scaled-down shapes 1024x1024, 1024x3584, 3584x1024 (default on CPU)")
    scale.add_argument("--llama-shapes", dest="cpu_scale", action="store_false",
                       help="Llama-8B shapes 4096x4096, 4096x14336, 14336x4096 (default on CUDA)")
    p.add_argument("--shapes", default=None, help="override: comma list of KxN (in x out)")
    p.add_argument("--T", dest="T_values", default=None, help="tokens for --sweep T (comma list)")
    p.add_argument("--tokens", type=int, default=None, help="T for the other sweeps")
    p.add_argument("--experts", default="2,4,8,16", help="E_L values for --sweep experts")
    p.add_argument("--ranks", default="8,16,32,64", help="r values for --sweep rank")
    p.add_argument("--lora-experts", type=int, default=8)
    p.add_argument("--identity-experts", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; quick 5)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per provider before timing (default 2; quick 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory metrics")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on CPU (default 1: on a shared machine one "
                        "thread measures each provider's work without waiting for a "
                        "descheduled sibling thread; 0 keeps torch's default)")


def main_from_args(args) -> int:
    """Run a sweep from parsed CLI args; write CSV, plots, and print the summary."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev_type = torch.device(device).type
    if dev_type == "cuda" and not torch.cuda.is_available():
        print("slim-kernels bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype_s = args.dtype or ("bfloat16" if dev_type == "cuda" else "float32")
    if dtype_s not in _DTYPES:
        print(f"slim-kernels bench: --dtype {dtype_s!r}: expected one of {sorted(_DTYPES)}",
              file=sys.stderr)
        return 2
    dtype = _DTYPES[dtype_s]
    if dev_type == "cpu":
        threads = 1 if args.threads is None else args.threads
        if threads > 0:
            torch.set_num_threads(threads)
    cpu_scale = args.cpu_scale if args.cpu_scale is not None else dev_type == "cpu"
    if args.shapes:
        shapes = _shapes(args.shapes)
    elif args.quick:
        shapes = [CPU_SHAPES[0] if cpu_scale else LLAMA_SHAPES[1]]
    else:
        shapes = list(CPU_SHAPES if cpu_scale else LLAMA_SHAPES)
    if args.T_values:
        T_values = _ints(args.T_values)
    elif cpu_scale:
        T_values = [64, 256] if args.quick else [64, 256, 1024]
    else:
        T_values = [1024, 4096] if args.quick else [512, 2048, 8192, 16384]
    T = args.tokens or (256 if cpu_scale else 4096)
    experts = _ints(args.experts)
    ranks = _ints(args.ranks)
    if args.quick:
        experts, ranks = experts[:3], ranks[:3]
    reps = args.reps or (5 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    provs = [p.strip() for p in args.providers.split(",")] if args.providers else None
    base = Case(K=1, N=1, T=1, num_lora_experts=args.lora_experts,
                num_identity_experts=args.identity_experts, rank=args.rank, top_k=args.top_k,
                num_clusters=args.clusters)
    cases = build_cases(args.sweep, shapes=shapes, T_values=T_values, T=T, experts=experts,
                        ranks=ranks, base=base)
    t0 = time.time()
    res = run_bench(cases, args.sweep, device=device, dtype=dtype, modes=modes, providers=provs,
                    reps=reps, warmup=warmup, memory=not args.no_memory,
                    progress=not args.no_progress, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    stem = f"bench_{args.sweep}_{dev_type}_{_dtype_name(dtype)}"
    path = write_csv(res.rows, os.path.join(args.out, f"{stem}.csv"))
    print(f"\nSLIM linear benchmark: {dev_type} {_dtype_name(dtype)}, sweep {args.sweep}, "
          f"{reps} interleaved repetitions, {time.time() - t0:.0f} s")
    print(f"versions: {versions_string(device)}\n")
    print("time: ratio to base (median of the provider / median of base), median ms in brackets")
    print(summary_table(res.rows, "time_ms"))
    if dev_type == "cpu":
        print("process CPU time: ratio to base, median ms in brackets")
        print(summary_table(res.rows, "cpu_ms"))
    if not args.no_memory:
        print("peak memory during the call, ratio to base (MB in brackets)")
        print(summary_table(res.rows, "peak_MB"))
    for metric in (("time_ms", "cpu_ms") if dev_type == "cpu" else ("time_ms",)):
        print(f"fused providers, forward+backward [{metric}]: ratio to base, FLOP floor, and "
              f"how many times faster than each unfused baseline (> 1: fused wins)")
        print(speedup_table(res.rows, "forward+backward", metric) + "\n")
    for n, why in res.skipped.items():
        print(f"skipped {n}: {why}")
    print(f"CSV: {path}")
    if not args.no_plot:
        try:
            for f in plot_csv(path, args.out, stem):
                print(f"plot: {f}")
        except Exception as e:
            print(f"plots not drawn: {type(e).__name__}: {e}", file=sys.stderr)
    return 0
