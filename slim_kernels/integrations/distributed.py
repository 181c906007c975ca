"""Data-parallel synchronisation of the SLIM cluster statistics (spec section 2).

Every rank must hold identical clusters: counts, sums and sums of squares are all-reduced
before each EMA update (as SyncBatchNorm does), and the initial centres are C random tokens of
the global first batch (all ranks' tokens in rank order; rank 0 draws the indices and
broadcasts them, the rank holding each token contributes it). Outside torch.distributed (or
with one rank) these are no-ops.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

_GROUP = None  # None: the default (WORLD) group


def set_cluster_sync_group(group) -> None:
    """Use ``group`` instead of the default process group for the cluster sync."""
    global _GROUP
    _GROUP = group


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(_GROUP) > 1


def world_size() -> int:
    return dist.get_world_size(_GROUP) if _active() else 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity on one process)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_GROUP)
    return t


def broadcast_(t: torch.Tensor, src_rank: int = 0) -> torch.Tensor:
    """In-place broadcast from the group's rank ``src_rank`` (identity on one process)."""
    if _active():
        src = dist.get_global_rank(_GROUP, src_rank) if _GROUP is not None else src_rank
        dist.broadcast(t, src=src, group=_GROUP)
    return t


def full_shape(weight: torch.Tensor) -> torch.Size:
    """The logical shape of a (possibly partitioned) parameter: DeepSpeed ZeRO-3 leaves an
    empty tensor in ``.data`` and keeps the real shape in ``ds_shape``; FSDP2's DTensors
    already report their global shape."""
    return getattr(weight, "ds_shape", None) or weight.shape


def clusters_in_sync(model: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical SLIM cluster buffers (centres, variances, init
    flags) in ``model``: a cheap check for a training loop or a test (collective: call it on
    every rank of the sync group). A bit-pattern fingerprint is compared with min/max
    all-reduces. Always True outside torch.distributed."""
    from ..layer import slim_modules  # late import: layer imports this module

    parts = []
    for _, m in slim_modules(model):
        for t in (m.cluster_centers, m.cluster_vars, m.cluster_initialized):
            t = t.detach()
            if hasattr(t, "full_tensor"):  # a DTensor (not sharded by FSDP2, but be safe)
                t = t.full_tensor()
            parts.append(t.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64))
    if not parts:
        return True
    bits = torch.cat(parts)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
    fp = torch.stack([bits.sum(), (bits * weights).sum(), (bits * weights * weights).sum()])
    lo, hi = fp.clone(), fp.clone()
    if _active():
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=_GROUP)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=_GROUP)
    return bool(torch.equal(lo, hi))


def full_cpu_tensors(layers: Iterable[Tuple[str, torch.nn.Module]],
                     names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``{f"{layer}.{name}": full CPU copy}`` of the named tensors of SLIM layers, gathering
    what a data-parallel engine has sharded: FSDP2 ``DTensor`` parameters (``full_tensor``)
    and DeepSpeed ZeRO-3 partitions (``deepspeed.zero.GatheredParameters``). Collective
    whenever something is sharded: then every rank must call it."""
    layers = list(layers)
    zero3 = [getattr(m, n) for _, m in layers for n in names if hasattr(getattr(m, n), "ds_id")]
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed  # only reached when the model is a DeepSpeed ZeRO-3 model

        ctx = deepspeed.zero.GatheredParameters(zero3)
    out: Dict[str, torch.Tensor] = {}
    with ctx:
        for lname, m in layers:
            for n in names:
                t = getattr(m, n).detach()
                if hasattr(t, "full_tensor"):  # DTensor (FSDP2): all-gather the shards
                    t = t.full_tensor()
                out[f"{lname}.{n}"] = t.to("cpu", copy=True).contiguous()  # outlives the gather
    return out


def is_main_process() -> bool:
    """Global rank 0, or not distributed: the process that writes shared files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank(_GROUP) if _active() else 0


def group() -> Optional[object]:
    return _GROUP
