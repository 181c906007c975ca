"""Helpers for data-parallel training code: check that every rank holds the same SLIM
clusters, gather sharded SLIM tensors, find the process that writes files.

The sync itself happens inside the layer (:mod:`slim_kernels.cluster_sync`); choose its
process group with :func:`set_cluster_sync_group`.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Mapping

import torch
import torch.distributed as dist

from ..cluster_sync import active as _active, set_cluster_sync_group  # noqa: F401  (re-exported)
from ..cluster_sync import group as _group
from ..layer import slim_modules

def clusters_in_sync(model: torch.nn.Module) -> bool:
    """True when every rank holds bit-identical SLIM cluster buffers (centres, variances, init
    flags, and the distance statistics of ``distance_scale="spread"`` layers) in ``model``: a cheap check for a training loop or a test (collective: call it on
    every rank of the sync group). A bit-pattern fingerprint is compared with min/max
    all-reduces. Always True outside torch.distributed."""
    parts = []
    for _, m in slim_modules(model):
        for t in m.clusters.tensors().values():
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
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=_group())
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=_group())
    return bool(torch.equal(lo, hi))


def full_cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``{name: full CPU copy}`` of ``tensors`` (live parameters and buffers, e.g. a
    ``state_dict(keep_vars=True)``), gathering what a data-parallel engine has sharded: FSDP2
    ``DTensor`` parameters (``full_tensor``) and DeepSpeed ZeRO-3 partitions
    (``deepspeed.zero.GatheredParameters``). Collective whenever something is sharded: then
    every rank must call it."""
    zero3 = [t for t in tensors.values() if hasattr(t, "ds_id")]
    ctx = contextlib.nullcontext()
    if zero3:
        import deepspeed  # only reached when the model is a DeepSpeed ZeRO-3 model

        ctx = deepspeed.zero.GatheredParameters(zero3)
    out: Dict[str, torch.Tensor] = {}
    with ctx:
        for name, t in tensors.items():
            t = t.detach()
            if hasattr(t, "full_tensor"):  # DTensor (FSDP2): all-gather the shards
                t = t.full_tensor()
            out[name] = t.to("cpu", copy=True).contiguous()  # outlives the gather
    return out


def is_main_process() -> bool:
    """Global rank 0, or not distributed: the process that writes shared files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


