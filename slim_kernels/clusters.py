"""Sliding clusters of a SLIM layer's training inputs: weight yielding's memory (``docs/method.md``
§2).

:class:`SlidingClusters` owns the cluster buffers (centres, variances, the initialised flag,
and with ``distance_scale="spread"`` the running mean and variance of the distance r), and
everything that writes them:

* :meth:`~SlidingClusters.routing`: what the op routes with (centres, ``inv_std``, the
  distance shift), and, for a forward that gradient checkpointing will re-run, a snapshot of
  it, so that the re-run routes exactly as the first forward did;
* :meth:`~SlidingClusters.update`: after a training forward, from the statistics the op
  computed in its route pass: the initialisation (the first time) or the EMA step.

The EMA step is a handful of whole-tensor ops, with no host sync: a batch that would make a
buffer non-finite is dropped whole (``rejected_batches`` counts them, read by
:func:`slim_kernels.routing_stats` and the trainer integration's logs). The initialisation
reads token counts on the host (once); it runs as one custom op (``slim_kernels::
cluster_init``), so that ``torch.compile`` sees a single opaque node and no graph break, and
it tells the module whether it succeeded (``ready``), which selects the steady-state path.
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
from .ops.ema import cluster_ema_
from .routing import cluster_distance

__all__ = ["SlidingClusters", "CLUSTER_KEYS", "DISTANCE_KEYS"]

# the buffers saved with an adapter; DISTANCE_KEYS only with distance_scale="spread"
CLUSTER_KEYS = ("cluster_centers", "cluster_vars", "cluster_initialized")
DISTANCE_KEYS = ("distance_mean", "distance_var")

# SlidingClusters by id: the initialisation op tells its module that it succeeded
_OWNERS: Dict[int, "weakref.ReferenceType[SlidingClusters]"] = {}

Routing = Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]


class SlidingClusters(nn.Module):
    """C centres and per-channel variances of the inputs a layer was trained on (fp32
    buffers ``cluster_centers``, ``cluster_vars`` (C, K), ``cluster_initialized``), and with
    ``spread`` the running mean and variance of r (``distance_mean``, ``distance_var``, fp32
    scalars). The buffers stay fp32 when the model is cast to another dtype."""

    def __init__(self, num_clusters: int, in_features: int, spread: bool, device=None) -> None:
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
        # batches left out of the EMA because they would have made a buffer non-finite
        self.register_buffer("rejected_batches", torch.zeros((), dtype=torch.int64,
                                                             device=device), persistent=False)
        self.ready = False  # the host's copy of cluster_initialized
        self._snapshot: Optional[Tuple[Routing]] = None
        self._warned = False
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

    @property
    def num_clusters(self) -> int:
        return self.cluster_centers.shape[0]

    def tensors(self) -> Dict[str, Tensor]:
        """The saved buffers by name (:data:`CLUSTER_KEYS`, and :data:`DISTANCE_KEYS` with
        ``spread``)."""
        names = CLUSTER_KEYS + (DISTANCE_KEYS if self.spread else ())
        return {n: self._buffers[n] for n in names}

    # -- routing --------------------------------------------------------------------------
    def routing(self, eps: float, snapshot: bool, recompute: bool) -> Routing:
        """(centres, inv_std, shift) for the op, or None before the clusters exist (no
        yielding). ``inv_std = 1/sqrt(v + eps)``; with ``spread``, divided by
        ``sigma = sqrt(distance_var + eps)`` and ``shift = distance_mean / sigma`` for every
        cluster, so that the op's ``d = r/sigma - mu/sigma`` (every reduce is positively
        homogeneous). ``snapshot``: keep what this forward routes with for a checkpointed
        re-run (``recompute``), which then gets exactly that."""
        if recompute and self._snapshot is not None:
            return self._snapshot[0]
        if not self.ready and not torch.compiler.is_compiling():
            # before the first successful initialisation only (a host read): the flag may
            # have been written from outside (a checkpoint loaded on rank 0, then DDP's
            # broadcast of its buffers)
            self.ready = bool(self.cluster_initialized)
        out: Routing = None
        if self.ready:
            centers = self.cluster_centers
            inv_std = (self.cluster_vars + eps).rsqrt()
            shift = None
            if self.spread:
                sigma = (self.distance_var + eps).sqrt()
                inv_std = inv_std / sigma
                shift = (self.distance_mean / sigma).expand(self.num_clusters)
            if snapshot:  # the EMA writes the centres in place after this forward
                centers = centers.clone()
            out = (centers, inv_std, shift)
        if snapshot:
            self._snapshot = (out,)
        return out

    # -- the sliding update ---------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: Tensor, keep: Optional[Tensor], stats: Optional[Tensor],
               momentum: float, eps: float, reduce: str) -> None:
        """One training forward's update: the initialisation from ``x`` (T, K) while the
        clusters do not exist, else the EMA step from ``stats``, the op's (C, 2K + 3)
        statistics of the kept tokens (``keep`` (T,) bool or None, and finite)."""
        if not self.ready:
            s = self._buffers
            _cluster_init(x.detach(), keep, s["cluster_centers"], s["cluster_vars"],
                          s["cluster_initialized"], s.get("distance_mean"),
                          s.get("distance_var"), float(eps), reduce, self._key)
            return
        self._ema(stats, momentum, eps)

    def _ema(self, stats: Tensor, momentum: float, eps: float) -> None:
        """The EMA step (:func:`slim_kernels.ops.ema.cluster_ema_torch` defines it): for each
        cluster with tokens, c += mom·δ and v += mom·(var - v), δ and var the batch's mean
        offset from c and variance; all or nothing (a non-finite statistic drops the batch)."""
        _dist.all_reduce_sum_(stats)
        b = self._buffers
        cluster_ema_(b["cluster_centers"], b["cluster_vars"], b["rejected_batches"], stats,
                     momentum, b.get("distance_mean"), b.get("distance_var"), eps)

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


# -- the initialisation: one opaque op --------------------------------------------------------
@torch.library.custom_op(
    "slim_kernels::cluster_init",
    mutates_args=("centers", "variances", "initialized", "distance_mean", "distance_var"))
def _cluster_init(x: Tensor, keep: Optional[Tensor], centers: Tensor, variances: Tensor,
                  initialized: Tensor, distance_mean: Optional[Tensor],
                  distance_var: Optional[Tensor], eps: float, reduce: str, owner: int) -> None:
    """Centres: C distinct random kept tokens of the *global* batch; variances: its
    per-channel variance (for every cluster). Needs at least max(C, 2) kept tokens over all
    ranks, else the clusters stay uninitialised (on every rank) until a later batch. A batch
    that would give non-finite centres or variances is skipped the same way, with a warning.

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
        return  # stay uninitialised (on every rank); try again on the next batch
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
        return
    new_v = var[None, :].expand(C, K)
    if distance_mean is not None:
        dstat = _distance_stats(xs, new_c, new_v, eps, reduce)
        if dstat is None:
            _warn_rejected()
            return
        distance_mean.copy_(dstat[0])
        distance_var.copy_(dstat[1])
    centers.copy_(new_c)
    variances.copy_(new_v)
    initialized.fill_(True)
    ref = _OWNERS.get(owner)
    mod = ref() if ref is not None else None
    if mod is not None:
        mod.ready = True


@_cluster_init.register_fake
def _(x, keep, centers, variances, initialized, distance_mean, distance_var, eps, reduce,
      owner):
    return None


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
