"""What a SLIM layer keeps about its forwards for the training loop: the auxiliary loss terms
(``docs/method.md`` §4) and, when asked for, routing statistics.

:class:`RoutingTracker` is per layer and holds no module state (nothing is saved). The
load-balance term of the last forward, or with :func:`accumulate_aux` the mean over the
forwards since the last :meth:`~RoutingTracker.reset_aux` (a loss computed from several
forwards, as GRPO's chunks). Routing statistics cost a few ops per forward, so they are
recorded only inside :func:`track_routing`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["RoutingTracker", "accumulate_aux", "aux_accumulating", "track_routing"]

# inside accumulate_aux(): the load-balance terms of successive forwards are averaged
_ACCUMULATE: List[int] = [0]


@contextlib.contextmanager
def accumulate_aux() -> Iterator[None]:
    """Within this context a layer's load-balance term (``docs/method.md`` §4) is the mean over
    all its forwards since the last reset, not the last forward's only: for a loss computed
    from several forwards (GRPO's chunked log-probabilities)."""
    _ACCUMULATE[0] += 1
    try:
        yield
    finally:
        _ACCUMULATE[0] -= 1


def aux_accumulating() -> bool:
    return _ACCUMULATE[0] > 0


class RoutingTracker:
    """The aux-loss terms of a layer's last forward(s), and its routing statistics."""

    def __init__(self, num_lora_experts: int) -> None:
        self.num_lora_experts = num_lora_experts
        self.tracking = False
        self.stats: Optional[Tensor] = None  # [tokens, identity mass, top-1, d sum, d tokens]
        self.reset_aux()

    def __getstate__(self):
        # a copy (deepcopy, pickle) has no aux loss pending until its own next forward
        state = self.__dict__.copy()
        state.update(pending=False, balance=None, forwards=0)
        return state

    def reset_aux(self) -> None:
        self.pending = False  # a forward ran since the last reset
        self.balance: Optional[Tensor] = None
        self.forwards = 0

    @staticmethod
    def balance_loss(gates: Tensor, idx: Tensor, coef: float) -> Optional[Tensor]:
        """``coef · E · Σ_e f_e P_e`` (docs/method.md §4), f_e the share of tokens whose top-k
        holds e (a constant), P_e the mean gate of e; None without tokens."""
        if gates.shape[0] == 0:
            return None
        f = torch.zeros_like(gates).scatter_(1, idx, 1.0).mean(0)
        return coef * gates.shape[1] * (f.detach() * gates.mean(0)).sum()

    def aux_loss(self, l1_coef: float, lora_A: Tensor, lora_B: Tensor) -> Optional[Tensor]:
        """The L1 term of the factors (``coef · (|B|_1 / (r N) + |A|_1 / (r K))``, computed now)
        plus the recorded load-balance term; None when no forward ran since the last reset or
        no term is on."""
        if not self.pending:
            return None
        l1 = None
        if l1_coef > 0:
            E_L, r, K = lora_A.shape
            N = lora_B.shape[1]
            l1 = l1_coef * (lora_B.abs().sum() / (r * N) + lora_A.abs().sum() / (r * K))
        if l1 is None or self.balance is None:
            return l1 if self.balance is None else self.balance
        return l1 + self.balance.to(l1.device)

    def has_aux_loss(self, l1_coef: float) -> bool:
        """:meth:`aux_loss` would return a tensor (cheap)."""
        return self.pending and (l1_coef > 0 or self.balance is not None)

    def after_forward(self, balance: Optional[Tensor]) -> None:
        """Record one (non-recomputed) forward's load-balance term (None when off)."""
        n, prev = self.forwards, self.balance
        if aux_accumulating() and self.pending and prev is not None and balance is not None:
            self.balance = prev * (n / (n + 1)) + balance / (n + 1)
            self.forwards = n + 1
        else:
            self.balance, self.forwards = balance, 1
        self.pending = True

    @torch.no_grad()
    def record(self, gates: Tensor, dist: Tensor, keep: Optional[Tensor], routed: bool) -> None:
        """Add a forward's tokens to the routing statistics (inside :func:`track_routing`).
        Tokens outside ``keep`` and tokens whose gates or distance are not finite are left
        out, as the clusters leave them out. ``routed``: the clusters existed (else the
        distance is not counted)."""
        g = gates.detach().float()
        d = dist.detach().float()
        ok = torch.isfinite(g).all(1) & torch.isfinite(d)
        if keep is not None:
            ok = ok & keep
        ident = g[:, self.num_lora_experts:].sum(1)
        top1 = (g.argmax(1) >= self.num_lora_experts).float() if g.shape[0] else ident
        okf = ok.float()
        vals = torch.stack([okf.sum(), torch.where(ok, ident, 0.0).sum(),
                            torch.where(ok, top1, 0.0).sum(),
                            torch.where(ok, d, 0.0).sum() * float(routed),
                            okf.sum() * float(routed)])
        self.stats = vals if self.stats is None else self.stats + vals.to(self.stats.device)

    def summary(self, reset: bool = False) -> Dict[str, float]:
        """tokens, identity_mass, identity_top1_share, mean_distance (None while no token was
        routed with clusters), distance_tokens; since the last reset (a host read)."""
        v = [0.0] * 5 if self.stats is None else self.stats.tolist()
        n, nd = v[0], v[4]
        out = dict(tokens=int(n),
                   identity_mass=v[1] / n if n else math.nan,
                   identity_top1_share=v[2] / n if n else math.nan,
                   mean_distance=v[3] / nd if nd else None,
                   distance_tokens=int(nd))
        if reset:
            self.stats = None
        return out


@contextlib.contextmanager
def track_routing(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context every SLIM layer of ``model`` records routing statistics (read
    them with :func:`slim_kernels.routing_stats`); they cost a few small ops per forward, so
    they are off otherwise. Nests; restores on exit."""
    trackers = [m.tracker for m in model.modules()
                if isinstance(getattr(m, "tracker", None), RoutingTracker)]
    if not trackers:
        raise ValueError(f"track_routing: {type(model).__name__} has no SLIM layers")
    before = [t.tracking for t in trackers]
    for t in trackers:
        t.tracking = True
    try:
        yield model
    finally:
        for t, b in zip(trackers, before):
            t.tracking = b
