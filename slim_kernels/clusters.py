"""Sliding clusters of a SLIM layer's training inputs: weight yielding's memory (``docs/method.md``
§2).

:class:`SlidingClusters` owns the cluster buffers (centres, variances, the initialised flag,
and with ``distance_scale="spread"`` the running mean and variance of the distance r), the
routing tensors derived from them, and everything that writes them.

* :meth:`~SlidingClusters.routing`: what the op routes with, ``(centres, inv_std, shift)``,
  kept in (non-persistent) buffers by every write, so routing costs no op. Before the
  clusters exist they are zeros, which makes every distance exactly 0 (no yielding): the
  forward has one form, initialised or not.
* :meth:`~SlidingClusters.collect`: after a training forward, the op's statistics of its
  kept tokens are added to a pending sum (one op); the very first time, the initialisation
  is computed from the tokens (it reads token counts on the host, once).
* :meth:`~SlidingClusters.step`: at each optimizer step (a global
  ``torch.optim.Optimizer`` step hook calls it for every layer with pending work), the
  pending initialisation is applied, or the EMA step from the pending statistics (no host
  sync: a step that would make a buffer non-finite is dropped whole, and
  ``rejected_batches`` counts it).

So the clusters move once per optimizer step, from every token of every micro-batch of
that step: what one batch of the same tokens would give, whatever the gradient accumulation
(``benchmarks/cluster_accumulation.py`` measures the alternative). Within a step they do not
change, so a re-run under gradient checkpointing routes exactly as the first forward did.
Under torch.compile :meth:`collect` is one custom op (``slim_kernels::cluster_collect``): one
opaque node, so the graph neither breaks nor changes when the clusters come into existence.
Under data parallelism the pending statistics are all-reduced at the step and the
initialisation's draw is rank 0's (:mod:`slim_kernels.cluster_sync`), so every rank holds the
same clusters.
"""
from __future__ import annotations

import itertools
import warnings
import weakref
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import cluster_sync as _dist
from .ops.ema import cluster_ema_, refresh_routing_
from .routing import cluster_distance

__all__ = ["SlidingClusters", "CLUSTER_KEYS", "DISTANCE_KEYS", "step_clusters"]

# the buffers saved with an adapter; DISTANCE_KEYS only with distance_scale="spread"
CLUSTER_KEYS = ("cluster_centers", "cluster_vars", "cluster_initialized")
DISTANCE_KEYS = ("distance_mean", "distance_var")
# training forwards of one layer without an optimizer step before the warning that the
# clusters are not moving
_WARN_AFTER = 1000

# every SlidingClusters by a key of its own (an id would be reused): the collect op finds its
# module here
_OWNERS: Dict[int, "weakref.ReferenceType[SlidingClusters]"] = {}
_KEYS = itertools.count()
# the modules with work for the next step, in the order their first training forward of the
# step ran: the same on every rank of an SPMD program, so the steps' all-reduces pair up.
# Strong references: a module stays alive (and keeps its place) until its step.
_PENDING: List["SlidingClusters"] = []
_WARNED_NO_STEP = [False]


class _Host:
    """What the host knows of a SlidingClusters between steps (a plain object: written at
    every training forward, where an nn.Module attribute costs a few microseconds)."""

    __slots__ = ("ready", "has_pending", "since_step", "init")

    def __init__(self) -> None:
        self.ready = False  # the host's copy of cluster_initialized
        self.has_pending = False  # statistics or an initialisation wait for the step
        self.since_step = 0  # training forwards since the last step
        self.init: Optional[Tuple[Tensor, ...]] = None  # the pending initialisation

    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class SlidingClusters(nn.Module):
    """C centres and per-channel variances of the inputs a layer was trained on (fp32
    buffers ``cluster_centers``, ``cluster_vars`` (C, K), ``cluster_initialized``), and with
    ``spread`` the running mean and variance of r (``distance_mean``, ``distance_var``, fp32
    scalars). The buffers stay fp32 when the model is cast to another dtype. ``eps``,
    ``momentum`` and ``reduce`` are the layer config's ``cluster_eps``, ``cluster_momentum``
    and ``distance_reduce``."""

    def __init__(self, num_clusters: int, in_features: int, spread: bool, eps: float,
                 momentum: float, reduce: str, device=None) -> None:
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
        # steps left out of the EMA because they would have made a buffer non-finite
        self.register_buffer("rejected_batches", torch.zeros((), dtype=torch.int64,
                                                             device=device), persistent=False)
        # this rank's statistics since the last step: a plain tensor, not a buffer (data
        # parallel engines broadcast buffers from rank 0; these are each rank's own)
        self.pending = torch.zeros(C, 2 * K + 3, **f32)
        self.eps, self.momentum, self.reduce = float(eps), float(momentum), reduce
        self.host = _Host()
        self._warned = False
        self._seen = self._versions()  # what the routing tensors were derived from
        self._own()
        self.register_load_state_dict_post_hook(SlidingClusters._after_load)

    # -- identity, copies, loading -------------------------------------------------------
    def _own(self) -> None:
        self._key = next(_KEYS)
        _OWNERS[self._key] = weakref.ref(self)
        weakref.finalize(self, _OWNERS.pop, self._key, None)
        _install_step_hook()

    def __setstate__(self, state) -> None:
        # a copy (deepcopy, pickle) is a new layer with nothing pending: it takes part in no
        # step until it collects itself (a copy made on one rank must not join a collective)
        super().__setstate__(state)
        ready, self.host = self.host.ready, _Host()
        self.host.ready = ready
        self.pending = torch.zeros_like(self.pending)
        self._own()

    @property
    def ready(self) -> bool:
        """Whether the clusters exist (the host's copy of ``cluster_initialized``)."""
        return self.host.ready

    @staticmethod
    def _after_load(module: "SlidingClusters", incompatible=None) -> None:
        # what was pending belongs to the clusters the load replaced (the sums are relative
        # to their centres): dropped
        if module in _PENDING:
            _PENDING.remove(module)
        module.host = _Host()
        if module.cluster_initialized.device.type != "meta":
            module.host.ready = bool(module.cluster_initialized)
        module.pending.zero_()
        module.refresh()

    def __setattr__(self, name: str, value) -> None:
        # A loader that assigns each loaded tensor to its attribute path instead of calling
        # load_state_dict (transformers' ``load_adapter``): the statistics stay fp32, and the
        # routing tensors and the host's flag follow, as after load_state_dict.
        buffers = self.__dict__.get("_buffers")
        if buffers is not None and name in buffers and name in self.tensors() \
                and isinstance(value, Tensor):
            value = value.detach()
            buffers[name] = value.float() if value.is_floating_point() else value
            SlidingClusters._after_load(self)
            return
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        # The statistics stay fp32 (the op requires it): a dtype cast of the model
        # (model.to(torch.bfloat16), .half()) moves them to the new device but keeps fp32.
        keep = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers[n]
            if new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device, dtype=torch.float32)
        dev = self.cluster_centers.device
        if self.pending.device != dev:  # (a meta tensor has no values to move)
            self.pending = (torch.zeros(self.pending.shape, dtype=torch.float32, device=dev)
                            if self.pending.is_meta else self.pending.to(dev))
        return self

    def reset(self) -> None:
        """Uninitialised: centres 0, variances 1 (and mu = sigma² = 1); nothing pending."""
        if self in _PENDING:
            _PENDING.remove(self)
        with torch.no_grad():
            self.cluster_centers.zero_()
            self.cluster_vars.fill_(1.0)
            self.cluster_initialized.fill_(False)
            self.rejected_batches.zero_()
            self.pending.zero_()
            if self.spread:
                self.distance_mean.fill_(1.0)
                self.distance_var.fill_(1.0)
        self.host = _Host()
        self.refresh()

    def configure(self, eps: float, momentum: float, reduce: str) -> None:
        """New ``cluster_eps`` / ``cluster_momentum`` / ``distance_reduce`` (a layer's new
        config); the routing tensors follow a new ``eps``."""
        self.momentum, self.reduce = float(momentum), reduce
        if float(eps) != self.eps:
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
        b = self._buffers
        v = (b["cluster_centers"]._version, b["cluster_vars"]._version,
             b["cluster_initialized"]._version)
        return v + (b["distance_mean"]._version, b["distance_var"]._version) if self.spread else v

    @property
    def num_clusters(self) -> int:
        return self.cluster_centers.shape[0]

    def tensors(self) -> Dict[str, Tensor]:
        """The saved buffers by name (:data:`CLUSTER_KEYS`, and :data:`DISTANCE_KEYS` with
        ``spread``)."""
        names = CLUSTER_KEYS + (DISTANCE_KEYS if self.spread else ())
        return {n: self._buffers[n] for n in names}

    # -- routing --------------------------------------------------------------------------
    def routing(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(centres, inv_std, shift) for the op: ``inv_std = 1/sqrt(v + eps)`` and
        ``shift = 1`` (the paper's d = r - 1); with ``spread`` divided by and ``mu`` over
        ``sigma = sqrt(distance_var + eps)`` (every reduce is positively homogeneous, so the
        op's d = (r - mu)/sigma); zeros before the clusters exist (d = 0)."""
        b = self._buffers
        if not torch.compiler.is_compiling() and self._versions() != self._seen:
            self.refresh()  # a buffer was written from outside (e.g. by hand)
        return b["cluster_centers"], b["inv_std"], b["shift"]

    # -- collecting, and the step ----------------------------------------------------------
    def collect(self, x: Tensor, keep: Optional[Tensor], stats: Tensor,
                compiling: bool = False) -> None:
        """After a training forward: add ``stats``, the op's (C, 2K + 3) statistics of the
        kept tokens, to the pending sum; before the clusters exist, compute the
        initialisation from ``x`` (T, K) instead (the kept tokens: ``keep`` (T,) bool or None,
        and finite), applied at the next :meth:`step`. ``compiling``: under torch.compile."""
        initialized = self._buffers["cluster_initialized"]
        if compiling:
            _cluster_collect(x.detach(), keep, stats, initialized, self.pending, self._key)
        else:
            _collect(self, x, keep, stats, initialized, self.pending)

    @torch.no_grad()
    def step(self) -> None:
        """Apply what the training forwards since the last step left pending: the
        initialisation, or one EMA step from the summed statistics (all-reduced under data
        parallelism). A no-op when nothing is pending."""
        h = self.host
        h.since_step = 0
        if self in _PENDING:
            _PENDING.remove(self)
        if not h.has_pending:
            return
        h.has_pending = False
        b = self._buffers
        if h.init is not None:
            values, h.init = h.init, None
            for name, v in zip(("cluster_centers", "cluster_vars", "distance_mean",
                                "distance_var"), values):
                b[name].copy_(v)
            b["cluster_initialized"].fill_(True)
            h.ready = True
            self.refresh()
            return
        _dist.all_reduce_sum_(self.pending)
        cluster_ema_(b["cluster_centers"], b["cluster_vars"], b["rejected_batches"],
                     self.pending, self.momentum, b.get("distance_mean"),
                     b.get("distance_var"), b["inv_std"], b["shift"], self.eps)
        self.pending.zero_()
        self._seen = self._versions()

    def check_rejected(self) -> int:
        """The number of steps left out of the EMA so far (a host read); warns once."""
        n = int(self.rejected_batches)
        if n and not self._warned:
            self._warned = True
            _warn_rejected()
        return n


def step_clusters(model: Optional[nn.Module] = None) -> None:
    """Move the clusters of every SLIM layer (of ``model``, or of every model) by what the
    training forwards since the last step collected. A ``torch.optim.Optimizer`` step does
    this by itself; call it after the update of a loop that uses no torch optimizer."""
    mods: Iterable[SlidingClusters]
    if model is None:
        mods = list(_PENDING)
    else:
        mine = {id(m) for m in model.modules() if isinstance(m, SlidingClusters)}
        mods = [m for m in _PENDING if id(m) in mine]  # (in the order they collected)
    for m in mods:
        m.step()


@torch.compiler.disable
def _after_optimizer_step(optimizer, args, kwargs) -> None:
    step_clusters()


_HOOK: List[object] = []


def _install_step_hook() -> None:
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_after_optimizer_step))


def _warn_rejected() -> None:
    warnings.warn(
        "slim_kernels: a training step would have made a SLIM layer's cluster statistics "
        "non-finite (inputs too large for fp32 variances?), so the clusters were left as they "
        "were for that step (docs/method.md §2)", RuntimeWarning, stacklevel=3)


# -- collecting: one opaque op under torch.compile ---------------------------------------------
def _owner(key: int) -> Optional[SlidingClusters]:
    ref = _OWNERS.get(key)
    return ref() if ref is not None else None


@torch.no_grad()
def _collect(mod: SlidingClusters, x: Tensor, keep: Optional[Tensor], stats: Tensor,
             initialized: Tensor, pending: Tensor) -> None:
    """:meth:`SlidingClusters.collect` into ``pending`` (the module's, or under torch.compile
    the custom op's argument)."""
    h = mod.host
    if not h.ready:
        # before the first initialisation only (a host read): the flag may have been set from
        # outside, e.g. rank 0 loaded a checkpoint and DDP broadcast its buffers
        h.ready = bool(initialized)
        if h.ready:
            mod.refresh()
    if h.ready:
        pending.add_(stats)
        h.since_step += 1
        if h.since_step == _WARN_AFTER and not _WARNED_NO_STEP[0]:
            _WARNED_NO_STEP[0] = True
            warnings.warn(
                f"slim_kernels: {_WARN_AFTER} training forwards of a SLIM layer ran without an "
                f"optimizer step: its clusters move at each torch.optim.Optimizer step; after "
                f"an update made otherwise, call slim_kernels.step_clusters(model)",
                RuntimeWarning, stacklevel=3)
    elif h.init is None:
        h.init = _init(x, keep, mod.num_clusters, mod.spread, mod.eps, mod.reduce)
        if h.init is None:
            return
    else:
        return
    if not h.has_pending:
        h.has_pending = True
        _PENDING.append(mod)


@torch.library.custom_op("slim_kernels::cluster_collect", mutates_args=("pending",))
def _cluster_collect(x: Tensor, keep: Optional[Tensor], stats: Tensor, initialized: Tensor,
                     pending: Tensor, owner: int) -> None:
    mod = _owner(owner)
    if mod is not None:
        _collect(mod, x, keep, stats, initialized, pending)


@_cluster_collect.register_fake
def _(x, keep, stats, initialized, pending, owner):
    return None


def _init(x: Tensor, keep: Optional[Tensor], C: int, spread: bool, eps: float,
          reduce: str) -> Optional[Tuple[Tensor, ...]]:
    """Centres: C distinct random kept tokens of the *global* batch; variances: its
    per-channel variance (for every cluster). Needs at least max(C, 2) kept tokens over all
    ranks, else the clusters stay uninitialised (on every rank) until a later batch. A batch
    that would give non-finite centres or variances is skipped the same way, with a warning.
    Returns (centres, variances[, mean of r, variance of r]), or None.

    The global batch is every rank's kept tokens in rank order. Rank 0 draws C distinct
    indices into it (a generator seeded from ``torch.initial_seed()``, not the global RNG)
    and broadcasts them; the rank that holds a picked token contributes it and an all-reduce
    assembles the centres. So the ranks agree whatever their seeds, any rank may hold few or
    no tokens, and a single process fed the concatenated global batch (with rank 0's seed)
    picks exactly the same tokens. With ``spread`` the mean and variance of r against the
    fresh clusters too."""
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
        return None  # stay uninitialised (on every rank); try again on the next batch
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
        return None
    new_v = var[None, :].expand(C, K)
    if not spread:
        return new_c, new_v
    dstat = _distance_stats(xs, new_c, new_v, eps, reduce)
    if dstat is None:
        _warn_rejected()
        return None
    return (new_c, new_v) + dstat



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
