"""Process-group primitives for the data-parallel cluster sync (``docs/method.md`` §2).

Every rank must hold identical clusters: the layer all-reduces counts, sums and sums of
squares before each sliding update (as SyncBatchNorm does) and broadcasts rank 0's draw of
the initial centres. Outside torch.distributed (or with one rank) these are no-ops.
Higher-level helpers for training code live in :mod:`slim_kernels.integrations.distributed`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

_GROUP = None  # None: the default (WORLD) group


def set_cluster_sync_group(group) -> None:
    """Use ``group`` instead of the default process group for the cluster sync."""
    global _GROUP
    _GROUP = group


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(_GROUP) > 1


def world_size() -> int:
    return dist.get_world_size(_GROUP) if active() else 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity on one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_GROUP)
    return t


def broadcast_(t: torch.Tensor, src_rank: int = 0) -> torch.Tensor:
    """In-place broadcast from the group's rank ``src_rank`` (identity on one process)."""
    if active():
        src = dist.get_global_rank(_GROUP, src_rank) if _GROUP is not None else src_rank
        dist.broadcast(t, src=src, group=_GROUP)
    return t


def full_shape(weight: torch.Tensor) -> torch.Size:
    """The logical shape of a (possibly partitioned) parameter: DeepSpeed ZeRO-3 leaves an
    empty tensor in ``.data`` and keeps the real shape in ``ds_shape``; FSDP2's DTensors
    already report their global shape."""
    return getattr(weight, "ds_shape", None) or weight.shape


def rank() -> int:
    return dist.get_rank(_GROUP) if active() else 0


def group() -> Optional[object]:
    return _GROUP
