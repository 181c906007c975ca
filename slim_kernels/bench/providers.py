"""The providers: implementations of one SLIM linear timed side by side on the same inputs.

Each builds a forward closure on an :class:`~.cases.Inputs`; backward is autograd's, or the
op's own.

* ``base``            frozen ``F.linear`` alone: the floor. fwd+bwd = forward GEMM + dx GEMM
                      (W frozen: no dW).
* ``slim_<backend>``  :func:`slim_kernels.slim_linear_op` with ``backend=<name>`` for every
                      backend in :func:`slim_kernels.available_backends` that accepts the
                      device (``triton`` and ``cuda`` on CPU only when asked for by name);
                      ``slim_triton`` runs the design the triton backend's dispatch picks.
* ``slim_triton_<design>`` the triton backend with one design forced (``fused``,
                      ``accumulate``, ``extended``: ``docs/benchmarks.md``, "Designs"), where
                      ``slim_triton`` runs; on CPU only when asked for by name.
* ``eager_loop``      MoE-PEFT / Mixtral style: loop over LoRA experts, gather the tokens that
                      selected the expert, two small GEMMs, ``index_add_`` the gated delta.
* ``eager_dense``     vectorised einsum: every LoRA expert on every token, (T, E_L, N), then
                      the gates weight and sum them.
* ``compiled_dense``  ``torch.compile(eager_dense)`` (dynamic shapes: one compile for all T).
* ``peft_lora``       PEFT LoRA on an ``nn.Linear`` with the same total rank E_L·r (no router,
                      no experts): what a plain LoRA of the same size costs.

All SLIM providers route alike (``docs/method.md`` §1-§2): logits ``x Rᵀ``, clusters on (C
centres, variance-normalised distance, reduce rms), yielding ``+ lam·d`` on the identity
experts, top-k softmax over all E experts (identity experts included), LoRA delta scaled by
s. :func:`reference_output` is the fp64 truth of each provider's forward.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .cases import BASELINE_PROVIDERS, TRITON_DESIGNS, Case, Inputs, provider_names

__all__ = ["Runner", "Skip", "eager_route", "eager_loop_forward", "eager_dense_forward",
           "provider_names", "providers_for", "reference_output"]


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


def eager_route(x: Tensor, router: Tensor, centers, inv_std, c: Case) -> Tuple[Tensor, Tensor]:
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
    gates, idx = eager_route(x, inp.router, inp.centers, inp.inv_std, c)
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
    gates, _ = eager_route(x, router, centers, inv_std, c)
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


def _p_slim(backend: str, design: Optional[str] = None) -> Callable[[Inputs], Runner]:
    """``slim_<backend>``; for triton, ``design`` forced (None: the one its dispatch picks,
    or SLIM_KERNELS_DESIGN's). The design is the module attribute ``launch.DESIGN``, set in
    every forward and left set: the harness runs a provider's backward right after its
    forward, so both run the provider's design."""
    def build(inp: Inputs) -> Runner:
        from ..ops.dispatch import resolve_backend
        from ..ops.op import slim_linear_op

        try:
            resolve_backend(backend, inp.x)
        except Exception as e:
            raise Skip(str(e))
        c = inp.case
        set_design = lambda: None  # noqa: E731
        if backend == "triton":
            from ..ops.backends.triton import launch

            # slim_triton: what the process started with (launch.DESIGN's own default)
            chosen = design or os.environ.get("SLIM_KERNELS_DESIGN", "").strip().lower() or None

            def set_design():
                launch.DESIGN = chosen

        def fwd():
            set_design()
            return slim_linear_op(
                inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.router,
                num_lora_experts=c.num_lora_experts, top_k=c.top_k, scaling=c.scaling,
                yield_strength=c.yield_strength if c.num_identity_experts > 0 else 0.0,
                distance_reduce=c.distance_reduce, centers=inp.centers, inv_std=inp.inv_std,
                backend=backend,
            )[0]

        return Runner(f"slim_{backend}" + (f"_{design}" if design else ""), fwd, inp.trainable)

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
    run time. ``slim_triton`` and ``slim_cuda`` are skipped on CPU unless ``requested`` names
    them (triton then runs in the Triton interpreter). A requested name that is not in
    :func:`provider_names` raises ValueError; ``base`` always runs (the ratios need it)."""
    dev_type = torch.device(device).type
    skipped: Dict[str, str] = {}
    explicit = set(requested or ())
    unknown = sorted(explicit - set(provider_names()))
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; known: {list(provider_names())}")
    if dev_type == "cpu" and "slim_triton" in explicit:
        # before the triton backend is imported: @triton.jit reads it
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from ..ops.dispatch import available_backends

    found = available_backends()
    out: Dict[str, Callable[[Inputs], Runner]] = {"base": _p_base}
    for b in found:
        names = [(f"slim_{b}", None)]
        if b == "triton":
            names += [(f"slim_triton_{d}", d) for d in TRITON_DESIGNS]
        for name, design in names:
            if dev_type == "cpu" and b in ("triton", "cuda") and name not in explicit:
                skipped[name] = (f"backend {b!r} is a GPU backend; on CPU only when asked for "
                                 "by name")
                continue
            out[name] = _p_slim(b, design)
    for n in BASELINE_PROVIDERS[1:]:
        out[n] = _BASELINES[n]
    if requested:
        for r in requested:
            if r not in out and r not in skipped:
                b = "triton" if r.startswith("slim_triton_") else r[5:]
                skipped[r] = f"backend {b!r} is not available here (available: {found})"
        keep = {"base"} | explicit
        out = {k: v for k, v in out.items() if k in keep}
        skipped = {k: v for k, v in skipped.items() if k in explicit}
    return out, skipped


def reference_output(inp: Inputs, provider: str) -> Tensor:
    """fp64 truth for a provider's forward: :func:`slim_kernels.slim_reference` for every
    SLIM provider, the plain LoRA formula for ``peft_lora``, F.linear for ``base``."""
    from ..reference import slim_reference

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
