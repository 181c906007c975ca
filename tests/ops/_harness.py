"""The conformance harness: one way to make a case, run it on a backend, and hold the result to
the fp64 reference :func:`slim_kernels.reference.slim_reference` (``docs/method.md`` §1-§2),
shared by every backend (``docs/method.md`` §6 for the stacked layout the op takes).

* :data:`TARGETS`: a backend on a device (``torch``, ``cpp``, ``triton`` under the interpreter
  on CPU; ``torch``, ``cuda``, ``triton`` on CUDA), the triton backend also in each of its
  designs (its cuBLAS GEMMs are torch ops, so on CPU they run as plain torch beside the
  interpreted route kernels). :func:`unrunnable` says why one cannot run.
* :class:`Case` and :data:`CASES`: shapes (small and odd: K = 45, N = 29, rank 5) and routing
  situations; :func:`make_inputs` builds the tensors in a dtype on a device.
* :data:`LAYOUTS` and :func:`apply_layout`: one tensor argument replaced by a strided view with
  the same values (transposed storage, a slice of a bigger tensor filled with garbage, a
  stride-0 expand, b[::2]).
* :func:`run_op` runs forward and backward through the public ``slim_linear_op``;
  :func:`run_backend` calls a backend module's ``forward``/``backward`` directly.
* :func:`truth` is the fp64 reference (with autograd) on the very values the backend got;
  :func:`check` compares: relative error < 1e-5 in fp32 and < 1e-12 in fp64 (Frobenius and
  max-abs both), bf16/fp16 by the 2x rule (at most twice the error of the reference, or of
  the torch backend, evaluated in that precision), top-k indices and assignments exactly.
* :func:`conform_rows` and :func:`check_nonfinite`: the same on inputs with NaN or inf
  (``docs/method.md`` §1.5): the same rows non-finite as in the reference, the others held
  by :func:`check`.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import pytest
import torch
from torch import Tensor

from slim_kernels.ops import slim_linear_op
from slim_kernels.reference import reference_cluster_stats, slim_reference, topk_softmax

EPS = 1e-5  # cluster variance epsilon (the layer's default)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REQUIRE_EXT = os.environ.get("SLIM_KERNELS_REQUIRE_EXT", "") == "1"
LOW = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16",
             torch.float16: "fp16"}


def dtypes(*which: torch.dtype):
    """``@dtypes(...)``: parametrise a test over ``dtype`` (default: all four)."""
    return pytest.mark.parametrize("dtype", which or ALL_DTYPES, ids=lambda d: DTYPE_IDS[d])


# ------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A backend on a device; for triton, ``design`` forces one of its designs
    (``launch.DESIGN``; None: what its dispatch picks, ``fused`` under the interpreter)."""
    backend: str
    device: str
    design: Optional[str] = None

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}" + (f"-{self.design}" if self.design else "")

    def module(self):
        return importlib.import_module(f"slim_kernels.ops.backends.{self.backend}")


TARGETS = (
    Target("torch", "cpu"), Target("cpp", "cpu"), Target("triton", "cpu"),
    Target("triton", "cpu", "accumulate"), Target("triton", "cpu", "extended"),
    Target("torch", "cuda"), Target("cuda", "cuda"), Target("triton", "cuda"),
    Target("triton", "cuda", "fused"), Target("triton", "cuda", "accumulate"),
    Target("triton", "cuda", "extended"),
)
# The dtypes each target must run. Tests skip the others; tests/ops/test_dispatch.py checks that
# every backend declares exactly this (unsupported_reason), so a skip here cannot hide a
# backend that stopped supporting a dtype.
SUPPORTED = {t: ALL_DTYPES for t in TARGETS}
for _t in TARGETS:
    if _t.backend == "triton" and _t.device == "cuda":
        SUPPORTED[_t] = (torch.float32, torch.bfloat16, torch.float16)


def skip_unsupported(t: Target, dtype: torch.dtype) -> None:
    """Skip a dtype the target does not run (its declared limits, checked in test_dispatch)."""
    if dtype not in SUPPORTED[t]:
        pytest.skip(f"{t.id} does not run {dtype} (see its unsupported_reason)")


def unrunnable(t: Target) -> Optional[str]:
    """None when target ``t`` can run in this process, else why not (a skip reason)."""
    if t.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if t.backend == "triton" and t.device == "cpu" and not INTERPRET:
        return ("triton on CPU tensors needs TRITON_INTERPRET=1 (tests/conftest.py sets it "
                "only when no CUDA device is present)")
    return t.module().unavailable_reason()


def require(t: Target) -> Target:
    """Skip (saying why) unless target ``t`` can run here; the cpp backend fails instead under
    SLIM_KERNELS_REQUIRE_EXT=1 (CI), where the extension must have been built. (The design of
    a triton target is set by the ``target`` fixture.)"""
    why = unrunnable(t)
    if why is not None:
        if t.backend == "cpp" and REQUIRE_EXT:
            pytest.fail(f"cpp backend unavailable: {why} (SLIM_KERNELS_REQUIRE_EXT=1)")
        pytest.skip(f"{t.id}: {why}")
    return t


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One call of the op. ``router``: "random"; "identity" (every token's identity logits
    ~ +12: all tokens to identity); "uniform" (all logits 0: ties everywhere); "pairs"
    (router rows 1 = 2 and 3 = 4, with exact logits: ties broken by the lower index).
    ``centers``: "far" (random) or "near" (the first C tokens plus a little noise, so that
    the distance d takes both signs). ``shift``: pass a ``distance_shift`` (C,) of random
    values in [-0.5, 2.5] (else None: the constant 1; ``docs/method.md`` §2). ``keep``: pass
    a ``stats_keep`` mask that leaves about a third of the tokens out of the cluster
    statistics (else None: every token counts). The statistics are asked for whenever the
    case has clusters."""
    T: int = 37
    K: int = 45
    N: int = 29
    E_L: int = 3
    r: int = 5
    E_I: int = 2
    C: int = 4
    top_k: int = 2
    scaling: float = 0.7
    lam: float = 1.0  # yield strength
    reduce: str = "rms"
    bias: bool = True
    x_lora: bool = False  # LoRA dropout input
    dgates: bool = True  # an upstream gradient on the gates (the load-balance loss)
    router: str = "random"
    router_scale: float = 1.0
    centers: str = "far"
    shift: bool = False
    keep: bool = False
    seed: int = 0

    @property
    def E(self) -> int:
        return self.E_L + self.E_I

    def but(self, **kw) -> "Case":
        return dataclasses.replace(self, **kw)


BASE = Case()
CASES: Dict[str, Case] = {
    "basic": BASE,
    "T0": BASE.but(T=0),
    "T0_x_lora": BASE.but(T=0, x_lora=True),
    "T1": BASE.but(T=1, E_I=1, seed=1),
    "T1_x_lora": BASE.but(T=1, x_lora=True, seed=1),
    "reduce_max": BASE.but(T=21, C=3, lam=2.0, reduce="max", centers="near", seed=3),
    "reduce_mean": BASE.but(T=21, C=3, lam=2.0, reduce="mean", centers="near", seed=3),
    "reduce_rms": BASE.but(T=21, C=3, lam=2.0, reduce="rms", centers="near", seed=3),
    "no_clusters": BASE.but(C=0, seed=4),
    "no_bias_no_identity": BASE.but(E_I=0, C=0, bias=False, E_L=2, r=12, top_k=1, seed=5),
    # yielding asked for, but no identity expert to yield to: a no-op
    "no_identity_yield": BASE.but(E_I=0, lam=0.8, reduce="max", seed=15),
    "x_lora": BASE.but(x_lora=True, lam=0.5, reduce="mean", seed=2),
    "x_lora_no_dgates": BASE.but(x_lora=True, dgates=False, seed=12),
    "dense": BASE.but(E_I=3, top_k=6, lam=0.8, reduce="mean", seed=7),
    "dense_no_dgates": BASE.but(top_k=5, reduce="max", dgates=False, seed=8),
    "all_identity": BASE.but(router="identity", seed=9),
    "one_hot": BASE.but(E_I=1, top_k=1, router_scale=3.0, seed=6),
    "uniform_k2": BASE.but(router="uniform", C=0, top_k=2, seed=10),
    "uniform_k3": BASE.but(router="uniform", C=0, top_k=3, seed=10),
    "tied_pairs": BASE.but(router="pairs", top_k=3, seed=11),
    # E_L·r = 70: an expert straddles the column blocks the triton route kernel splits h into
    "wide_70": BASE.but(T=5, K=20, N=17, E_L=14, r=5, C=2, seed=13),
    # E_L·r = 1024: the triton backend's upper limit
    "wide_1024": BASE.but(T=5, K=20, N=17, E_L=8, r=128, C=2, seed=14),
    # a distance_shift per cluster (distance_scale="spread": d = r - shift[j*])
    "shift_max": BASE.but(T=21, C=3, lam=2.0, reduce="max", centers="near", shift=True, seed=3),
    "shift_mean": BASE.but(T=21, C=3, lam=2.0, reduce="mean", centers="near", shift=True,
                           seed=3),
    "shift_rms": BASE.but(T=21, C=3, lam=2.0, reduce="rms", centers="near", shift=True, seed=3),
    "shift_x_lora": BASE.but(x_lora=True, lam=0.5, reduce="mean", shift=True, seed=2),
    # the distance is shifted, but nothing yields (lam = 0)
    "shift_no_yield": BASE.but(lam=0.0, shift=True, seed=24),
    # a padding mask: some tokens stay out of the cluster statistics
    "stats_keep": BASE.but(keep=True, shift=True, centers="near", seed=25),
    "stats_keep_T1": BASE.but(T=1, keep=True, seed=26),
}


def make_inputs(case: Case, dtype: torch.dtype, device="cpu") -> Dict[str, Optional[Tensor]]:
    """The op's arguments for ``case``, contiguous, in ``dtype`` on ``device`` (centers,
    inv_std and distance_shift fp32; dgates in the accumulation dtype, as the gates;
    stats_keep bool), plus
    ``vars`` (the cluster variances the reference takes), ``dy`` and ``dgates`` (the upstream
    gradients)."""
    c = case
    g = torch.Generator().manual_seed(c.seed)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    ER = c.E_L * c.r
    x = f(c.T, c.K)
    inp = dict(
        x=x, x_lora=f(c.T, c.K), weight=f(c.N, c.K) / c.K ** 0.5, bias=f(c.N) * 0.5,
        lora_A=f(ER, c.K) / c.K ** 0.5, lora_B=f(c.N, ER) / c.r ** 0.5,
        router=f(c.E, c.K) * c.router_scale / c.K ** 0.5, dy=f(c.T, c.N), dgates=f(c.T, c.E),
    )
    if c.router == "identity":
        assert c.E_I > 0
        x[:, 0] = 1.0  # a constant feature the router keys on
        inp["router"][:, 0] = 0.0
        # +12: far above the other logits (~N(0, 1)), yet small enough that fp32 logits keep
        # the gates between the identity experts accurate to 1e-5 (at 100 they did not)
        inp["router"][c.E_L:, 0] = 12.0
    elif c.router == "uniform":
        inp["router"].zero_()
    elif c.router == "pairs":
        assert c.E == 5
        # x on a 1/4 grid and the router on a 1/64 grid: every logit is exact in any dtype and
        # summation order (a GEMM may sum the columns of equal rows in different orders)
        x.mul_(4).round_().div_(4)
        inp["router"] = (inp["router"] * 64).round() / 64
        inp["router"][2] = inp["router"][1]
        inp["router"][4] = inp["router"][3]
    else:
        assert c.router == "random", c.router
    out = {k: v.to(dtype).to(device) for k, v in inp.items()}
    out["dgates"] = inp["dgates"].to(acc_dtype(dtype)).to(device) if c.dgates else None
    if not c.x_lora:
        out["x_lora"] = None
    if not c.bias:
        out["bias"] = None
    if c.C:
        if c.centers == "near":
            cen = x[:c.C] + 0.1 * f(c.C, c.K)
        else:
            cen = f(c.C, c.K) * 0.5
        var = torch.rand(c.C, c.K, generator=g, dtype=torch.float64) + 0.5
        out["centers"] = cen.float().to(device)
        out["vars"] = var.float().to(device)
        # as the layer and the reference form it, in fp32, on the CPU: the reference gets
        # these very values (a CUDA rsqrt may differ in the last bit)
        out["inv_std"] = (var.float() + EPS).rsqrt().to(device)
    else:
        out["centers"] = out["inv_std"] = out["vars"] = None
    out["distance_shift"] = None
    if c.C and c.shift:  # drawn last: the other inputs are those of the case without a shift
        sh = torch.rand(c.C, generator=g, dtype=torch.float64) * 3.0 - 0.5
        out["distance_shift"] = sh.float().to(device)
    out["stats_keep"] = None
    if c.C and c.keep:  # drawn after the shift, for the same reason
        keep = torch.rand(c.T, generator=g) >= 1 / 3
        if c.T > 1:
            keep[0], keep[-1] = False, True  # both kinds, whatever the draw
        out["stats_keep"] = keep.to(device)
    return out


# ------------------------------------------------------------------------------------------
# memory layouts: one argument as a strided view with the same values
# ------------------------------------------------------------------------------------------
def transposed(t: Tensor) -> Tensor:
    """The same values from column-major storage (strides (1, rows))."""
    v = t.t().contiguous().t()
    assert not v.is_contiguous() or t.shape[0] <= 1 or t.shape[1] <= 1
    return v


def sliced(t: Tensor) -> Tensor:
    """The same values as every other row and columns 1..cols of a bigger tensor whose other
    entries are garbage (large values): a misread shows."""
    rows, cols = t.shape
    g = torch.Generator().manual_seed(123)
    big = (torch.randn(2 * rows, cols + 3, generator=g, dtype=torch.float64) * 1e3)
    big = big.to(t.dtype).to(t.device)
    v = big[::2, 1:cols + 1]
    v.copy_(t)
    return v


def strided_1d(t: Tensor) -> Tensor:
    """The same values as every other element (stride 2, like ``b[::2]``) of a longer tensor
    with garbage in between (for a bool mask: the opposite values)."""
    g = torch.Generator().manual_seed(321)
    big = (torch.randn(2 * t.shape[0] + 1, generator=g, dtype=torch.float64) * 1e3)
    big = big.to(t.dtype).to(t.device)
    if t.dtype == torch.bool:
        big[0::2] = ~torch.cat([t, t[-1:]])
    v = big[1::2]
    v.copy_(t)
    return v


def expanded(t: Tensor) -> Tensor:
    """Row 0 (element 0 of a 1-D tensor) broadcast to every row (stride 0): the values change,
    the truth follows them."""
    return t[:1].expand(*t.shape)


KINDS = {"transposed": transposed, "sliced": sliced, "strided": strided_1d, "expanded": expanded}
# (argument, kind) pairs; "dy"/"dgates" are the upstream gradients of y and the gates
LAYOUTS = (
    ("x", "transposed"), ("x", "sliced"), ("x", "expanded"),
    ("x_lora", "transposed"), ("x_lora", "sliced"),
    ("weight", "transposed"), ("weight", "sliced"),
    ("bias", "strided"),
    ("lora_A", "transposed"), ("lora_A", "sliced"),
    ("lora_B", "transposed"), ("lora_B", "sliced"),
    ("router", "transposed"), ("router", "sliced"),
    ("centers", "transposed"), ("centers", "sliced"),
    ("inv_std", "transposed"), ("inv_std", "sliced"),
    ("distance_shift", "strided"), ("distance_shift", "expanded"),
    ("stats_keep", "strided"),
    ("dy", "transposed"), ("dgates", "transposed"),
)
# what slim_linear_op hands to the backend as the caller gave it (see ops/backends/__init__.py)
PASSED_THROUGH = (
    ("weight", "transposed"), ("weight", "sliced"), ("bias", "strided"),
    ("centers", "transposed"), ("centers", "sliced"),
    ("inv_std", "transposed"), ("inv_std", "sliced"),
    ("distance_shift", "strided"), ("distance_shift", "expanded"), ("stats_keep", "strided"),
    ("dgates", "transposed"),
)


def layout_case(arg: str) -> Case:
    """The case a layout test of ``arg`` runs: basic, with x_lora when x_lora is the argument,
    with a distance shift when that is the argument."""
    which = {"x_lora": "x_lora", "distance_shift": "shift_rms", "stats_keep": "stats_keep"}
    return CASES[which.get(arg, "basic")]


def apply_layout(inp: Dict[str, Optional[Tensor]], arg: str, kind: str) -> Dict:
    """``inp`` with argument ``arg`` replaced by its ``kind`` view (asserted non-contiguous)."""
    out = dict(inp)
    t = inp[arg]
    assert t is not None and t.is_contiguous(), arg
    v = KINDS[kind](t)
    assert not v.is_contiguous(), (arg, kind)
    if kind != "expanded":
        assert torch.equal(v, t)
    out[arg] = v
    return out


def misread(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` read as if it were contiguous: the same storage and offset, row-major strides
    (the bug of a backend that ignores strides)."""
    if t is None:
        return None
    strides, s = [], 1
    for n in reversed(t.shape):
        strides.append(s)
        s *= n
    return torch.as_strided(t, t.shape, tuple(reversed(strides)), t.storage_offset())


# ------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------
GRAD_ARGS = ("x", "x_lora", "lora_A", "lora_B", "router")
GRAD_KEYS = {"x": "dx", "x_lora": "dx_lora", "lora_A": "dA", "lora_B": "dB", "router": "dR"}


class _UpstreamGrad(torch.autograd.Function):
    """A scalar whose backward hands ``grad`` to ``t`` as it is (strides included), so the op's
    backward gets exactly the dy / dgates the test chose."""

    @staticmethod
    def forward(ctx, t, grad):
        ctx.grad = grad
        return t.new_zeros((), dtype=torch.float64)

    @staticmethod
    def backward(ctx, _):
        return ctx.grad, None


def run_op(t: Target, case: Case, inp: Dict) -> Dict[str, Tensor]:
    """Forward and backward through the public ``slim_linear_op`` (CPU copies)."""
    leaves = {k: (None if inp[k] is None else inp[k].detach().requires_grad_(True))
              for k in GRAD_ARGS}
    want_stats = inp["centers"] is not None
    res = slim_linear_op(
        leaves["x"], inp["weight"], inp["bias"], leaves["lora_A"], leaves["lora_B"],
        leaves["router"], num_lora_experts=case.E_L, top_k=case.top_k, scaling=case.scaling,
        yield_strength=case.lam, distance_reduce=case.reduce, centers=inp["centers"],
        inv_std=inp["inv_std"], x_lora=leaves["x_lora"], backend=t.backend,
        distance_shift=inp.get("distance_shift"), cluster_stats=want_stats,
        stats_keep=inp.get("stats_keep"))
    y, gates, idx, d, assign = res[:5]
    loss = _UpstreamGrad.apply(y, inp["dy"])
    if inp["dgates"] is not None:  # else backward gets dgates=None
        loss = loss + _UpstreamGrad.apply(gates, inp["dgates"])
    loss.backward()
    out = dict(y=y, gates=gates, idx=idx, d=d, assign=assign)
    if want_stats:
        out["stats"] = res[5]
    for k, leaf in leaves.items():
        if leaf is not None:
            out[GRAD_KEYS[k]] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return {k: v.detach().cpu() for k, v in out.items()}


def run_backend(t: Target, case: Case, inp: Dict, module=None) -> Dict[str, Tensor]:
    """The backend module's forward, then its backward on (dy, dgates), called directly: the
    arguments arrive with the strides ``inp`` has."""
    mod = module or t.module()
    want_stats = inp["centers"] is not None
    y, gates, idx, d, assign, h, stats = mod.forward(
        inp["x"], inp["x_lora"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
        inp["router"], inp["centers"], inp["inv_std"], case.E_L, case.top_k, case.scaling,
        case.lam, case.reduce, inp.get("distance_shift"), want_stats, inp.get("stats_keep"))
    dx, dxl, dA, dB, dR = mod.backward(
        inp["dy"], inp["dgates"], inp["x"], inp["x_lora"], inp["weight"], inp["lora_A"],
        inp["lora_B"], inp["router"], gates, h, case.E_L, case.scaling)
    out = dict(y=y, gates=gates, idx=idx, d=d, assign=assign, dx=dx, dA=dA, dB=dB, dR=dR)
    if inp["x_lora"] is not None:
        out["dx_lora"] = dxl
    if want_stats:
        out["stats"] = stats
    return {k: v.detach().cpu() for k, v in out.items()}


def _reference(case: Case, inp: Dict, dtype: Optional[torch.dtype]) -> Dict[str, Tensor]:
    """slim_reference with autograd on the values in ``inp`` (CPU), in ``dtype`` (None: fp64),
    gradients in the stacked layout."""
    E_L, r = case.E_L, case.r

    def val(k):
        v = inp.get(k)
        if v is None:
            return None
        v = v.detach().cpu().contiguous()
        if k in ("centers", "vars", "inv_std", "distance_shift", "stats_keep"):
            return v
        return v.to(dtype or torch.float64)

    leaves = {k: (None if inp[k] is None else val(k).requires_grad_(True)) for k in GRAD_ARGS}
    A, B = leaves["lora_A"], leaves["lora_B"]
    K, N = A.shape[1], B.shape[0]
    y, gates, d, assign = slim_reference(
        leaves["x"], val("weight"), val("bias"), A.view(E_L, r, K),
        B.view(N, E_L, r).permute(1, 0, 2), leaves["router"], top_k=case.top_k,
        scaling=case.scaling, yield_strength=case.lam, distance_reduce=case.reduce,
        centers=val("centers"), cluster_vars=val("vars"), cluster_eps=EPS,
        x_lora=leaves["x_lora"], distance_shift=val("distance_shift"))
    loss = (y.double() * val("dy").double()).sum()
    if inp["dgates"] is not None:
        loss = loss + (gates.double() * inp["dgates"].detach().cpu().double()).sum()
    if loss.requires_grad:
        loss.backward()
    with torch.no_grad():  # the selected experts, decreasing, ties to the lower index
        z = (leaves["x"] @ leaves["router"].t()).to(gates.dtype)
        if case.C and case.lam != 0.0 and case.E_I:
            z[:, E_L:] += case.lam * d[:, None]
        _, idx = topk_softmax(z, case.top_k)
    out = dict(y=y, gates=gates, idx=idx, d=d, assign=assign)
    if inp["centers"] is not None:  # the statistics of the sliding update, independently
        out["stats"] = reference_cluster_stats(
            leaves["x"].detach(), val("centers"), val("inv_std"), assign, case.reduce,
            val("stats_keep"))
    for k, leaf in leaves.items():
        if leaf is not None:
            out[GRAD_KEYS[k]] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return {k: v.detach() for k, v in out.items()}


def truth(case: Case, inp: Dict) -> Dict[str, Tensor]:
    """The fp64 reference on exactly the values the backend got (already rounded to its
    dtype), differentiated by autograd."""
    return _reference(case, inp, None)


def reference_lowp(case: Case, inp: Dict) -> Dict[str, Tensor]:
    """The reference itself evaluated in the inputs' low precision (bf16/fp16): a baseline of
    the 2x rule."""
    return _reference(case, inp, inp["x"].dtype)


# ------------------------------------------------------------------------------------------
# comparing
# ------------------------------------------------------------------------------------------
FLOAT_KEYS = ("y", "gates", "d", "dx", "dx_lora", "dA", "dB", "dR", "stats")
ACC_KEYS = ("gates", "d", "stats")  # outputs in the accumulation dtype
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def err(a: Tensor, b: Tensor) -> float:
    """Frobenius norm of the difference, in fp64."""
    return (a.double() - b.double()).norm().item()


def check(got: Dict[str, Tensor], want: Dict[str, Tensor], dtype: torch.dtype,
          baselines: Sequence[Dict[str, Tensor]] = (), label: str = "",
          floor: float = 1e-5, unit: float = 0.0) -> None:
    """Assert ``got`` (a backend's outputs and gradients) conforms to ``want`` (the fp64
    truth). fp32/fp64: relative error below :data:`TOL`, Frobenius and max-abs. bf16/fp16: the
    2x rule, error vs the truth at most twice the smallest error of the ``baselines`` (the same
    call evaluated in that precision), plus a floor of ``floor`` relative + 1e-6 absolute. Indices
    of the selected experts and cluster assignments: exactly equal. ``unit``: the errors are
    relative to at least this magnitude per element (an output that cancels to near zero is
    judged at the scale of its terms, when the inputs are known to be of that order)."""
    acc = acc_dtype(dtype)
    assert set(got) == set(want), (label, sorted(got), sorted(want))
    for k in FLOAT_KEYS:
        if k not in want:
            continue
        a, b = got[k], want[k]
        assert a.shape == b.shape, f"{label} {k}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        exp_dtype = acc if k in ACC_KEYS else dtype
        assert a.dtype == exp_dtype, f"{label} {k}: dtype {a.dtype}, expected {exp_dtype}"
        scale = max(b.double().norm().item(), unit * b.numel() ** 0.5)
        e = err(a, b)
        if dtype in TOL:
            tol = TOL[dtype]
            assert e <= tol * scale, f"{label} {k}: rel err {e / max(scale, 1e-300):.3g} > {tol}"
            if b.numel():
                amax = max(b.double().abs().max().item(), unit)
                emax = (a.double() - b.double()).abs().max().item()
                assert emax <= tol * amax, (
                    f"{label} {k}: max-abs rel err {emax / max(amax, 1e-300):.3g} > {tol}")
        else:
            assert baselines, "the 2x rule needs a low-precision baseline"
            e_base = min(err(base[k], b) for base in baselines)
            bound = 2 * e_base + floor * scale + 1e-6
            assert e <= bound, (f"{label} {k}: err {e:.3g} > 2 x the {dtype} baseline's "
                                f"{e_base:.3g} (+ floor)")
    for k in ("idx", "assign"):
        assert got[k].dtype == torch.int64, f"{label} {k}: dtype {got[k].dtype}"
        assert got[k].shape == want[k].shape, f"{label} {k}: shape"
    assert torch.equal(got["assign"], want["assign"]), f"{label} assign differs from the reference"
    same = (got["idx"] == want["idx"]).all(1)
    if dtype in LOW:
        # logits rounded to bf16/fp16 can tie or swap where the fp64 logits differ by less than
        # the rounding: a token may then select as a baseline in that precision does
        for base in baselines:
            same |= (got["idx"] == base["idx"]).all(1)
    assert same.all(), (f"{label} idx differs from the reference at tokens "
                        f"{(~same).nonzero().flatten().tolist()[:10]}")


def conform(got: Dict[str, Tensor], case: Case, inp: Dict, label: str = "") -> Dict[str, Tensor]:
    """check() of ``got`` against the truth on ``inp``; returns the truth. The bf16/fp16
    baselines: the reference evaluated in that precision, and the torch backend (the stacked
    op in plain PyTorch) on the same inputs and device; the smaller error of the two counts."""
    dtype = inp["x"].dtype
    want = truth(case, inp)
    baselines = ()
    if dtype in LOW:
        baselines = (reference_lowp(case, inp),
                     run_op(Target("torch", inp["x"].device.type), case, inp))
    check(got, want, dtype, baselines, label)
    return want


# ------------------------------------------------------------------------------------------
# non-finite values (docs/method.md §1.5)
# ------------------------------------------------------------------------------------------
TOKEN_FLOATS = ("y", "gates", "d", "dx", "dx_lora")  # one row per token
WEIGHT_GRADS = ("dA", "dB", "dR")
# one row per cluster: a bad token never enters it (docs/method.md §1.5), a bad centre, variance
# or shift makes its cluster's row non-finite
CLUSTER_ROWS = ("stats",)


def bad_rows(t: Tensor) -> Tensor:
    """(T,) bool: the rows (tokens) of ``t`` with a NaN or inf."""
    return ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)


def valid_topk(idx: Tensor, num_experts: int) -> bool:
    """Every row of ``idx`` is a prefix of a permutation of the experts: in range, distinct."""
    if idx.numel() == 0:
        return True
    ok = (idx >= 0).all() and (idx < num_experts).all()
    return bool(ok) and bool((idx.sort(1).values.diff(1) != 0).all())


def check_nonfinite(got: Dict[str, Tensor], want: Dict[str, Tensor], label: str = "") -> None:
    """The non-finite half of the contract, against the truth on the same inputs: the same
    rows non-finite in every per-token output and input gradient, the same weight gradients
    non-finite, and valid index slots everywhere."""
    for k in TOKEN_FLOATS:
        if k in want:
            g, w = bad_rows(got[k]), bad_rows(want[k])
            assert torch.equal(g, w), (
                f"{label} {k}: non-finite rows {g.nonzero().flatten()[:10].tolist()}, "
                f"the reference's {w.nonzero().flatten()[:10].tolist()}")
    for k in WEIGHT_GRADS:
        g, w = bool(bad_rows(got[k]).any()), bool(bad_rows(want[k]).any())
        assert g == w, f"{label} {k}: non-finite {g}, the reference's {w}"
    for k in CLUSTER_ROWS:
        if k in want:
            g, w = bad_rows(got[k]), bad_rows(want[k])
            assert torch.equal(g, w), (f"{label} {k}: non-finite clusters "
                                       f"{g.nonzero().flatten().tolist()}, the reference's "
                                       f"{w.nonzero().flatten().tolist()}")
    E = want["gates"].shape[1]
    assert valid_topk(got["idx"], E), f"{label}: idx slots are not a permutation prefix"


def conform_rows(got: Dict[str, Tensor], case: Case, inp: Dict, label: str = "",
                 skip: Optional[Tensor] = None, floor: float = 1e-5, unit: float = 0.0) -> Dict:
    """:func:`conform` for inputs with non-finite values: :func:`check_nonfinite`, then
    :func:`check` of every float output on the rows where the truth's is finite, of idx and
    assign on every row, and of the weight gradients the truth has finite. ``skip`` (T,)
    bool: rows left out of the value comparison, and with them the weight gradients and the
    cluster statistics (sums over every row). ``floor``, ``unit``: those of :func:`check`. Returns the truth."""
    dtype = inp["x"].dtype
    want = truth(case, inp)
    check_nonfinite(got, want, label)
    skip = torch.zeros(case.T, dtype=torch.bool) if skip is None else skip
    keep = {k: ~bad_rows(want[k]) & ~skip for k in TOKEN_FLOATS if k in want}
    # the selected experts and clusters on every token (NaN ranks last, §1.5)
    keep["idx"] = keep["assign"] = ~skip

    def rows(out):
        sub = {k: out[k][m] for k, m in keep.items()}
        sub.update({k: out[k] for k in WEIGHT_GRADS
                    if not skip.any() and not bad_rows(want[k]).any()})
        sub.update({k: out[k][~bad_rows(want[k])] for k in CLUSTER_ROWS
                    if k in want and not skip.any()})
        return sub

    baselines = ()
    if dtype in LOW:
        baselines = (reference_lowp(case, inp),
                     run_op(Target("torch", inp["x"].device.type), case, inp))
    check(rows(got), rows(want), dtype, [rows(b) for b in baselines], label, floor, unit)
    return want


# How far the good rows may differ from the same call without the bad tokens, relative to
# the largest value of that output: only the summation order differs (a BLAS picks its
# blocking by T; the cpp backend gathers the tokens of each expert per block of 128), so the
# difference is rounding, a few units in the last place (measured: < 3e-7 in fp32, < 5e-16 in
# fp64, none in bf16). A bad token leaking into another row shows as NaN or as O(1).
WITHOUT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2,
               torch.float16: 1e-3}


def drop_tokens(inp: Dict, case: Case, rows: Sequence[int]):
    """(inputs, case) of the same call without the tokens ``rows``."""
    keep = [i for i in range(case.T) if i not in set(rows)]
    out = {k: (v[keep] if k in ("x", "x_lora", "dy", "dgates", "stats_keep") and v is not None
               else v)
           for k, v in inp.items()}
    return out, case.but(T=len(keep))


def check_other_tokens(got: Dict[str, Tensor], alone: Dict[str, Tensor], bad: Tensor,
                       dtype: torch.dtype, label: str = "",
                       skip: Optional[Tensor] = None, unit: float = 0.0,
                       stats: Optional[Tensor] = None) -> None:
    """The rows of ``got`` outside ``bad`` (and ``skip``) are ``alone``, the same call run
    without the bad tokens: idx and assign exactly, floats within :data:`WITHOUT_TOL` of their
    largest value (at least ``unit``, as in :func:`check`). The cluster statistics are
    ``stats`` (default: those of ``alone``; a token whose x is finite counts in them even when
    its x_lora is not, so pass the clean call's for a bad x_lora)."""
    rows = ~bad if skip is None else ~bad & ~skip
    sub = rows[~bad]
    if "stats" in alone and (skip is None or not skip.any()):
        # the bad tokens never entered the cluster statistics: those of the call without them
        a, b = got["stats"], alone["stats"] if stats is None else stats
        assert bool(torch.isfinite(a).all()), f"{label} stats: a bad token reached them"
        tol = WITHOUT_TOL[dtype] * max(b.double().abs().max().item() if b.numel() else 0.0,
                                       unit)
        e = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        assert e <= tol, f"{label} stats: moved by {e:.3g} > {tol:.3g} with the bad tokens"
    for k in TOKEN_FLOATS + ("idx", "assign"):
        if k not in alone:
            continue
        a, b = got[k][rows], alone[k][sub]
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{label} {k}: the other tokens' values moved"
            continue
        assert bool(torch.isfinite(b).all()), f"{label} {k}: the clean call is not finite"
        tol = WITHOUT_TOL[dtype] * max(b.double().abs().max().item() if b.numel() else 0.0,
                                       unit)
        e = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        assert e <= tol, f"{label} {k}: the other tokens moved by {e:.3g} > {tol:.3g}"
