"""What a benchmark point is: the layer shape, tokens and SLIM configuration (:class:`Case`),
the sweeps over them, the modes and provider names, and the inputs every provider shares.

Importing this module does not import torch (the command's arguments are built from it);
:func:`make_inputs` does.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "MODES", "SWEEPS", "BACKEND_NAMES", "TRITON_DESIGNS", "BASELINE_PROVIDERS", "LLAMA_SHAPES", "CPU_SHAPES",
    "Case", "Inputs", "build_cases", "case_from_kernel", "make_inputs", "parse_kernel",
    "provider_names", "sweep_label", "x_key",
]

# forward: a training forward (grad enabled, activations saved); backward: the backward of a
# forward run just before (untimed); forward+backward: both
MODES = ("forward", "backward", "forward+backward")
SWEEPS = ("T", "shape", "experts", "rank")
# the unfused baselines; the fused providers are ``slim_<backend>`` (providers.providers_for)
BASELINE_PROVIDERS = ("base", "eager_loop", "eager_dense", "compiled_dense", "peft_lora")
# slim_kernels.ops.backends.NAMES, written out: that module imports torch, and --providers is
# checked before torch is imported (tests/test_cli.py checks that the two agree)
BACKEND_NAMES = ("triton", "cuda", "cpp", "torch")
# the triton backend's designs (slim_kernels.ops.backends.triton.tuning.DESIGNS_FORWARD, written
# out for the same reason): provider ``slim_triton_<design>`` forces one, ``slim_triton`` runs
# what the backend's dispatch picks
TRITON_DESIGNS = ("fused", "accumulate", "extended")
# Llama-3-8B projections as (K in, N out): q/o (4096x4096), gate/up (4096x14336), down.
LLAMA_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
# The same aspect ratios scaled down by 4 for a 2-core CPU.
CPU_SHAPES = ((1024, 1024), (1024, 3584), (3584, 1024))


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
    alpha: Optional[float] = None  # None: 2r, the SlimConfig default
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


def case_from_kernel(kernel: str, x: str) -> Case:
    """The :class:`Case` of one CSV point: its ``kernel`` string with the swept field = x."""
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


def sweep_label(kernel: str) -> str:
    """Name of the swept field of a ``kernel`` string: T, KxN, E_L or r."""
    f = parse_kernel(kernel)
    if f.get("K") == "*":
        return "KxN"
    return next((n for n, v in f.items() if v == "*"), "x")


def x_key(x: str):
    """Sort key of x values: numbers in order, then the others (shapes) as written."""
    try:
        return (0, float(x), x)
    except ValueError:
        return (1, 0.0, x)


def provider_names() -> Tuple[str, ...]:
    """Every name ``--providers`` accepts, whether or not it can run here."""
    slim = []
    for b in BACKEND_NAMES:
        slim.append(f"slim_{b}")
        if b == "triton":
            slim += [f"slim_triton_{d}" for d in TRITON_DESIGNS]
    return BASELINE_PROVIDERS[:1] + tuple(slim) + BASELINE_PROVIDERS[1:]


def build_cases(sweep: str, *, shapes: Sequence[Tuple[int, int]], T_values: Sequence[int],
                T: int, experts: Sequence[int], ranks: Sequence[int], base: Case) -> List[Case]:
    """The points of one sweep; the other fields come from ``base``."""
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


@dataclass
class Inputs:
    """The tensors every provider of one case shares (the stacked layout of
    ``docs/method.md`` §6)."""

    case: Case
    x: "Tensor"            # (T, K), requires grad
    weight: "Tensor"       # (N, K), frozen
    bias: Optional["Tensor"]
    lora_A: "Tensor"       # (E_L·r, K) leaf
    lora_B: "Tensor"       # (N, E_L·r) leaf
    router: "Tensor"       # (E, K) leaf
    centers: Optional["Tensor"]        # (C, K) fp32
    cluster_vars: Optional["Tensor"]
    inv_std: Optional["Tensor"]        # (C, K) fp32 = rsqrt(vars + eps)
    dy: "Tensor"           # (T, N) upstream gradient
    cluster_eps: float = 1e-5

    @property
    def trainable(self) -> List["Tensor"]:
        return [self.x, self.lora_A, self.lora_B, self.router]


def make_inputs(case: Case, device="cpu", dtype=None, seed: int = 0) -> Inputs:
    """Random inputs with non-trivial routing (``dtype`` None: float32): B is non-zero (a
    trained adapter, not the zero init), the clusters are centred on tokens of the same
    distribution so that some tokens are in-domain (d < 0) and some out (d > 0)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    g = torch.Generator().manual_seed(seed)
    c = case
    K, N, T, R_ = c.K, c.N, c.T, c.num_lora_experts * c.rank

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

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
