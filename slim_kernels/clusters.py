"""Sliding clusters of a SLIM layer's training inputs: weight yielding's memory (``docs/method.md``
§2).

:class:`SlidingClusters` owns the cluster buffers (centres, variances, the initialised flag,
and with ``distance_scale="spread"`` the running mean and variance of the distance r), the
routing tensors derived from them, and everything that writes them:

* :meth:`~SlidingClusters.routing`: what the op routes with, ``(centres, inv_std, shift)``,
  kept up to date in (non-persistent) buffers by every write, so routing costs no op. Before
  the clusters exist they are zeros, which makes every distance exactly 0 (no yielding): the
  forward has one form, initialised or not. For a forward that gradient checkpointing will
  re-run, a snapshot, so that the re-run routes exactly as the first forward did.
* :meth:`~SlidingClusters.update`: after a training forward, from the statistics the op
  computed in its route pass: the initialisation (the first time; it reads token counts on
  the host, once) or the EMA step (no host sync: a batch that would make a buffer non-finite
  is dropped whole, and ``rejected_batches`` counts it; :func:`slim_kernels.routing_stats`
  and the trainer integration's logs read it). Under torch.compile the update is one custom
  op (``slim_kernels::cluster_update``): one opaque node, whichever of the two it does, so
  the graph neither breaks nor changes when the clusters come into existence.

Under data parallelism the statistics are all-reduced before the step and the
initialisation's draw is rank 0's (:mod:`slim_kernels.cluster_sync`), so every rank holds
the same clusters.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import cluster_sync as _dist
from .ops.ema import cluster_ema_, refresh_routing_
from .routing import cluster_distance

__all__ = ["SlidingClusters", "CLUSTER_KEYS", "DISTANCE_KEYS"]

# the buffers saved with an adapter; DISTANCE_KEYS only with distance_scale="spread"
CLUSTER_KEYS = ("cluster_centers", "cluster_vars", "cluster_initialized")
DISTANCE_KEYS = ("distance_mean", "distance_var")

# SlidingClusters by id: the initialisation op tells its module that it succeeded
_OWNERS: Dict[int, "weakref.ReferenceType[SlidingClusters]"] = {}

Routing = Tuple[Tensor, Tensor, Tensor]


class SlidingClusters(nn.Module):
    """C centres and per-channel variances of the inputs a layer was trained on (fp32
    buffers ``cluster_centers``, ``cluster_vars`` (C, K), ``cluster_initialized``), and with
    ``spread`` the running mean and variance of r (``distance_mean``, ``distance_var``, fp32
    scalars). The buffers stay fp32 when the model is cast to another dtype. ``eps`` is the
    variance floor (``SlimConfig.cluster_eps``)."""

    def __init__(self, num_clusters: int, in_features: int, spread: bool, eps: float,
                 device=None) -> None:
        super().__init__()
        C, K = num_clusters, in_features
        f32 = dict(device=device, dtype=torch.float32)
        self.register_buffer("cluster_centers", torch.zeros(C, K, **f32))
        self.register_buffer("cluster_vars", torch.ones(C, K, **f32))
        self.register_buffer("cluster_initialized", torch.zeros((), dtype=torch.bool,
                                                                device=device))
        self.spread = spread
        if spread:
            self.register_buffer("distance_mean", torch.ones((), **f32))
            self.register_buffer("distance_var", torch.ones((), **f32))
        # derived from the above (refresh): what the op routes with
        self.register_buffer("inv_std", torch.zeros(C, K, **f32), persistent=False)
        self.register_buffer("shift", torch.zeros(C, **f32), persistent=False)
        # batches left out of the EMA because they would have made a buffer non-finite
        self.register_buffer("rejected_batches", torch.zeros((), dtype=torch.int64,
                                                             device=device), persistent=False)
        self.eps = float(eps)
        self.ready = False  # the host's copy of cluster_initialized
        self._snapshot: Optional[Tuple[Routing]] = None
        self._warned = False
        self._seen = self._versions()  # what the routing tensors were derived from
        self._own()
        self.register_load_state_dict_post_hook(SlidingClusters._after_load)

    # -- identity, copies, loading -------------------------------------------------------
    def _own(self) -> None:
        self._key = id(self)
        _OWNERS[self._key] = weakref.ref(self)

    def __getstate__(self):
        # a copy (deepcopy, pickle) has no re-run pending
        state = self.__dict__.copy()
        state["_snapshot"] = None
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._own()

    @staticmethod
    def _after_load(module: "SlidingClusters", incompatible) -> None:
        module.ready = bool(module.cluster_initialized)
        module._snapshot = None
        module.refresh()

    def _apply(self, fn, recurse=True):
        # The statistics stay fp32 (the op requires it): a dtype cast of the model
        # (model.to(torch.bfloat16), .half()) moves them to the new device but keeps fp32.
        keep = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device, dtype=torch.float32)
        return self

    def reset(self) -> None:
        """Uninitialised: centres 0, variances 1 (and mu = sigma² = 1)."""
        with torch.no_grad():
            self.cluster_centers.zero_()
            self.cluster_vars.fill_(1.0)
            self.cluster_initialized.fill_(False)
            self.rejected_batches.zero_()
            if self.spread:
                self.distance_mean.fill_(1.0)
                self.distance_var.fill_(1.0)
        self.ready = False
        self._snapshot = None
        self.refresh()

    def set_eps(self, eps: float) -> None:
        """A new variance floor: the routing tensors follow."""
        self.eps = float(eps)
        self.refresh()

    def refresh(self) -> None:
        """Recompute the routing tensors from the buffers (a loaded state dict, a reset, a new
        ``eps``; in eager mode :meth:`routing` also notices any other write to the buffers)."""
        if self.cluster_centers.device.type != "meta":
            b = self._buffers
            refresh_routing_(b["cluster_vars"], b["cluster_initialized"], b.get("distance_mean"),
                             b.get("distance_var"), b["inv_std"], b["shift"], self.eps)
        self._seen = self._versions()

    def _versions(self) -> Tuple[int, ...]:
        """The version counters of the buffers the routing tensors derive from."""
        return tuple(t._version for t in self.tensors().values())

    @property
    def num_clusters(self) -> int:
        return self.cluster_centers.shape[0]

    def tensors(self) -> Dict[str, Tensor]:
        """The saved buffers by name (:data:`CLUSTER_KEYS`, and :data:`DISTANCE_KEYS` with
        ``spread``)."""
        names = CLUSTER_KEYS + (DISTANCE_KEYS if self.spread else ())
        return {n: self._buffers[n] for n in names}

    # -- routing --------------------------------------------------------------------------
    def routing(self, snapshot: bool, recompute: bool) -> Routing:
        """(centres, inv_std, shift) for the op: ``inv_std = 1/sqrt(v + eps)`` and
        ``shift = 1`` (the paper's d = r - 1); with ``spread`` divided by and ``mu`` over
        ``sigma = sqrt(distance_var + eps)`` (every reduce is positively homogeneous, so the
        op's d = (r - mu)/sigma); zeros before the clusters exist (d = 0). ``snapshot``: keep
        a copy of what this forward routes with (the update writes the buffers in place) for
        a checkpointed re-run (``recompute``), which then gets exactly that."""
        if recompute and self._snapshot is not None:
            return self._snapshot[0]
        if not torch.compiler.is_compiling() and self._versions() != self._seen:
            self.refresh()  # a buffer was written from outside (e.g. by hand)
        out = (self.cluster_centers, self.inv_std, self.shift)
        if snapshot:
            out = tuple(t.clone() for t in out)
            self._snapshot = (out,)
        return out

    # -- the sliding update ---------------------------------------------------------------
    def update(self, x: Tensor, keep: Optional[Tensor], stats: Tensor, momentum: float,
               reduce: str) -> None:
        """One training forward's update: the initialisation from ``x`` (T, K) while the
        clusters do not exist, else the EMA step from ``stats``, the op's (C, 2K + 3)
        statistics of the kept tokens (``keep`` (T,) bool or None, and finite)."""
        b = self._buffers
        args = (x.detach(), keep, stats, b["cluster_centers"], b["cluster_vars"],
                b["cluster_initialized"], b.get("distance_mean"), b.get("distance_var"),
                b["inv_std"], b["shift"], b["rejected_batches"], float(momentum), self.eps,
                reduce, self._key)
        if torch.compiler.is_compiling():
            _cluster_update(*args)
        else:
            _update(*args)
            self._seen = self._versions()

    def check_rejected(self) -> int:
        """The number of batches left out of the EMA so far (a host read); warns once."""
        n = int(self.rejected_batches)
        if n and not self._warned:
            self._warned = True
            _warn_rejected()
        return n


def _warn_rejected() -> None:
    warnings.warn(
        "slim_kernels: a training batch would have made a SLIM layer's cluster statistics "
        "non-finite (inputs too large for fp32 variances?), so the clusters were left as they "
        "were for that batch (docs/method.md §2)", RuntimeWarning, stacklevel=3)


# -- the update: one opaque op under torch.compile --------------------------------------------
def _owner(key: int) -> Optional[SlidingClusters]:
    ref = _OWNERS.get(key)
    return ref() if ref is not None else None


@torch.no_grad()
def _update(x: Tensor, keep: Optional[Tensor], stats: Tensor, centers: Tensor,
            variances: Tensor, initialized: Tensor, distance_mean: Optional[Tensor],
            distance_var: Optional[Tensor], inv_std: Tensor, shift: Tensor, rejected: Tensor,
            momentum: float, eps: float, reduce: str, owner: int) -> None:
    """:meth:`SlidingClusters.update` on the buffers given (``owner``: the module's key, whose
    ``ready`` flag says which of the two steps runs)."""
    mod = _owner(owner)
    ready = mod is not None and mod.ready
    if not ready:
        # before the first initialisation only (a host read): the flag may have been set from
        # outside, e.g. rank 0 loaded a checkpoint and DDP broadcast its buffers
        ready = bool(initialized)
        if ready:
            refresh_routing_(variances, initialized, distance_mean, distance_var, inv_std, shift, eps)
    if ready:
        _dist.all_reduce_sum_(stats)
        cluster_ema_(centers, variances, rejected, stats, momentum, distance_mean,
                     distance_var, inv_std, shift, eps)
    else:
        ready = _init(x, keep, centers, variances, initialized, distance_mean, distance_var,
                      eps, reduce)
        if ready:
            refresh_routing_(variances, initialized, distance_mean, distance_var, inv_std, shift, eps)
    if mod is not None:
        mod.ready = ready


@torch.library.custom_op(
    "slim_kernels::cluster_update",
    mutates_args=("stats", "centers", "variances", "initialized", "distance_mean",
                  "distance_var", "inv_std", "shift", "rejected"))
def _cluster_update(x: Tensor, keep: Optional[Tensor], stats: Tensor, centers: Tensor,
                    variances: Tensor, initialized: Tensor, distance_mean: Optional[Tensor],
                    distance_var: Optional[Tensor], inv_std: Tensor, shift: Tensor,
                    rejected: Tensor, momentum: float, eps: float, reduce: str,
                    owner: int) -> None:
    _update(x, keep, stats, centers, variances, initialized, distance_mean, distance_var,
            inv_std, shift, rejected, momentum, eps, reduce, owner)


@_cluster_update.register_fake
def _(x, keep, stats, centers, variances, initialized, distance_mean, distance_var, inv_std,
      shift, rejected, momentum, eps, reduce, owner):
    return None


def _init(x: Tensor, keep: Optional[Tensor], centers: Tensor, variances: Tensor,
          initialized: Tensor, distance_mean: Optional[Tensor],
          distance_var: Optional[Tensor], eps: float, reduce: str) -> bool:
    """Centres: C distinct random kept tokens of the *global* batch; variances: its
    per-channel variance (for every cluster). Needs at least max(C, 2) kept tokens over all
    ranks, else the clusters stay uninitialised (on every rank) until a later batch. A batch
    that would give non-finite centres or variances is skipped the same way, with a warning.
    Returns whether the clusters exist now.

    The global batch is every rank's kept tokens in rank order. Rank 0 draws C distinct
    indices into it (a generator seeded from ``torch.initial_seed()``, not the global RNG)
    and broadcasts them; the rank that holds a picked token contributes it and an all-reduce
    assembles the centres. So the ranks agree whatever their seeds, any rank may hold few or
    no tokens, and a single process fed the concatenated global batch (with rank 0's seed)
    picks exactly the same tokens. With a distance scale (``distance_mean`` given) the mean
    and variance of r against the fresh clusters are set too."""
    C = centers.shape[0]
    ok = torch.isfinite(x).all(1)
    if keep is not None:
        ok = ok & keep.to(device=x.device, dtype=torch.bool)
    xs = x[ok]
    T, K = xs.shape
    W, me = _dist.world_size(), _dist.rank()
    dev = xs.device
    xd = xs.double()
    counts = torch.zeros(W, dtype=torch.float64, device=dev)
    counts[me] = float(T)
    packed = torch.cat([counts, xd.sum(0), (xd * xd).sum(0)])
    _dist.all_reduce_sum_(packed)  # tokens per rank, sums and sums of squares
    per_rank = packed[:W].round().long().tolist()
    total = sum(per_rank)
    if total < max(C, 2):
        return False  # stay uninitialised (on every rank); try again on the next batch
    n = packed[:W].sum()
    mean = packed[W: W + K] / n
    var = (packed[W + K:] / n - mean * mean).clamp_min(0.0).float()
    # the RNG is not the global one: the draw must not depend on what else consumed it
    gen = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
    pick = torch.randperm(total, generator=gen)[:C].to(dev)
    _dist.broadcast_(pick)  # rank 0's draw (ranks may be seeded differently)
    local = pick - sum(per_rank[:me])
    mine = (local >= 0) & (local < T)
    new_c = torch.zeros(C, K, dtype=torch.float32, device=dev)
    new_c[mine] = xs[local[mine]].float()
    _dist.all_reduce_sum_(new_c)  # exact: one rank holds each row, the others add 0
    # the same on every rank (all-reduced values): all stay uninitialised, or none
    if not bool(torch.isfinite(new_c).all() & torch.isfinite(var).all()):
        _warn_rejected()
        return False
    new_v = var[None, :].expand(C, K)
    if distance_mean is not None:
        dstat = _distance_stats(xs, new_c, new_v, eps, reduce)
        if dstat is None:
            _warn_rejected()
            return False
        distance_mean.copy_(dstat[0])
        distance_var.copy_(dstat[1])
    centers.copy_(new_c)
    variances.copy_(new_v)
    initialized.fill_(True)
    return True


def _distance_stats(xs: Tensor, centers: Tensor, variances: Tensor, eps: float,
                    reduce: str) -> Optional[Tuple[Tensor, Tensor]]:
    """The mean and population variance of r over the initialising (global) batch, r
    computed against the fresh clusters as the layer will route with them (inv_std =
    1/sqrt(v + eps) in fp32); fp32 scalars, or None when they are not finite or no r is.
    Each rank contributes the count, sum and sum of squares of its tokens' finite r."""
    inv_std = (variances + eps).rsqrt()
    zero = torch.zeros(centers.shape[0], dtype=torch.float32, device=xs.device)
    r, _ = cluster_distance(xs, centers, inv_std, reduce, zero)
    r = r.double()
    fin = torch.isfinite(r)
    r = r.masked_fill(~fin, 0.0)
    packed = torch.stack([fin.double().sum(), r.sum(), (r * r).sum()])
    _dist.all_reduce_sum_(packed)
    n, s, ss = packed
    if not bool(n > 0):  # every r overflowed (finite inputs): as a non-finite result
        return None
    mean = s / n
    var = (ss / n - mean * mean).clamp_min(0.0)
    mean, var = mean.float(), var.float()
    if not bool(torch.isfinite(mean) & torch.isfinite(var)):
        return None
    return mean, var
