"""Save and load SLIM adapters: ``save_slim(model, path)`` / ``load_slim(model, path)``.

Conveniences over the PEFT tuner and PEFT's folder layout
(:mod:`slim_kernels.integrations.adapter_format`): ``save_slim`` writes what
``PeftModel.save_pretrained`` writes (``adapter_config.json``, ``adapter_model.safetensors``,
``README.md``), with the integrity record, atomically; ``load_slim`` checks a folder and
injects the adapter through the tuner. So one folder loads both ways: ``save_slim``'s with
``PeftModel.from_pretrained`` (and transformers, lm-eval), ``save_pretrained``'s with
``load_slim``. Folders of the own format of earlier releases (format 1 and 2) still load.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Union

from torch import Tensor, nn

from . import adapter_format as fmt
from . import distributed as _dist
from .adapter_format import SlimLoadError
from .hf import plan_slim, slim_target_model, summarize, unwrap_model

logger = logging.getLogger("slim_kernels")

__all__ = ["save_slim", "load_slim", "SlimLoadError"]

PathLike = Union[str, "os.PathLike[str]"]


def _slim_adapter(model: nn.Module, adapter_name: Optional[str]):
    """(name, SlimPeftConfig) of the SLIM adapter of ``model`` to save."""
    from .peft import SlimPeftConfig, slim_layer_names

    configs = getattr(model, "peft_config", None) or {}
    slim = {n: c for n, c in configs.items() if isinstance(c, SlimPeftConfig)}
    if not slim:
        raise ValueError(f"save_slim: {type(model).__name__} has no SlimLinear layers (call apply_slim "
                         f"or get_peft_model first)")
    if adapter_name is None:
        active = [n for n in slim if slim_layer_names(slim_target_model(model), n)]
        get = getattr(model, "active_adapter", None)
        current = get if isinstance(get, str) else None
        adapter_name = current if current in slim else (active[0] if len(active) == 1 else None)
        if adapter_name is None:
            raise ValueError(f"save_slim: the model holds the SLIM adapters {sorted(slim)}: "
                             f"pass adapter_name=")
    if adapter_name not in slim:
        raise ValueError(f"save_slim: no SLIM adapter {adapter_name!r} (the model has "
                         f"{sorted(slim)})")
    return adapter_name, slim[adapter_name]


def save_slim(model: nn.Module, path: PathLike, adapter_name: Optional[str] = None) -> None:
    """Write the SLIM adapter of ``model`` (``apply_slim``'s model or a ``PeftModel``; the
    active adapter, or ``adapter_name``) to the folder ``path`` in PEFT's layout, atomically:
    after a kill at any moment the folder is wholly the previous adapter (if any) or wholly
    the new one (``docs/huggingface.md``, "The adapter folder").

    Refuses (ValueError naming the module and tensor, nothing written) what the loaders
    would reject: non-finite factors, routers or clusters, negative variances.

    Data parallel: under torch.distributed only global rank 0 writes. With FSDP2 or DeepSpeed
    ZeRO-3 the tensors are gathered first, so call it on every rank then (with DDP or
    ZeRO-1/2, calling it on rank 0 alone is fine too)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    model = unwrap_model(model)  # names as in the plain model, not torch.compile's / DDP's wrapper
    adapter_name, config = _slim_adapter(model, adapter_name)
    selected = get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True),
                                         adapter_name=adapter_name)
    inner = slim_target_model(model)
    if inner is model:  # (a PeftModel's keys carry the prefix already)
        selected = {f"base_model.model.{k}": v for k, v in selected.items()}
    # full tensors even when FSDP2 / DeepSpeed ZeRO-3 shard them (then a collective)
    tensors: Dict[str, Tensor] = _dist.full_cpu_tensors(selected)
    for key, v in tensors.items():  # (on every rank: all raise alike)
        why = fmt.bad_values(key, v)
        if why is not None:
            raise ValueError(f"save_slim: {fmt.describe_key(key)} {why}; not saved (the folder "
                             f"is left as it was)")
    if not _dist.is_main_process():
        return
    base_name = config.base_model_name_or_path or getattr(inner, "name_or_path", None) or None
    entries = config.to_json_dict(None if config.task_type is not None else {
        "base_model_class": type(inner).__name__, "parent_library": type(inner).__module__})
    entries.update(base_model_name_or_path=base_name, inference_mode=True)
    record = fmt.integrity_record(entries, tensors)
    entries[fmt.INTEGRITY] = record
    fmt.write_folder(path, {
        fmt.CONFIG_NAME: fmt.config_bytes(entries),
        fmt.WEIGHTS_NAME: save(tensors, metadata={"format": "pt", "slim_digest": record["digest"]}),
        fmt.README_NAME: fmt.card(base_name),
    })


def load_slim(model: nn.Module, path: PathLike, verbose: bool = False, *,
              add_aux_to_loss: bool = True, adapter_name: str = "default") -> nn.Module:
    """Apply SLIM to the base ``model`` as saved in the folder ``path`` (by ``save_slim``,
    ``PeftModel.save_pretrained``, or the own format of earlier releases) and load the saved
    adapters, routers and cluster buffers; returns ``model``.

    Bit-exact: the loaded model computes what the saved one did (tensors are cast to the
    model's dtype if it differs from the saved one; then results are exact only up to that
    cast). Checked first: the integrity record (config and tensor checksums), every tensor's
    sha256, shape and dtype, and the values; then, against the model, that every wrapped
    module gets all its tensors, that none is left over, their shapes, and their values in
    the dtype the layer holds them in. Errors (:class:`SlimLoadError`, ``FileNotFoundError``)
    name the file, module and tensor; on any error the model is left as it was."""
    from .peft import SlimPeftConfig, inject

    outer, model = model, unwrap_model(model)
    entries, tensors = fmt.read_folder(path)
    try:
        config = SlimPeftConfig(**entries)
    except (TypeError, ValueError) as e:
        if isinstance(e, SlimLoadError):
            raise
        raise SlimLoadError(f"{os.fspath(path)}: {fmt.CONFIG_NAME} holds an invalid SLIM "
                            f"config: {e}") from e
    config.inference_mode = False
    plan_slim(model, config)  # SLIM already on the model, targets that do not exist: raise here
    names = inject(slim_target_model(model), config, adapter_name,
                   add_aux_to_loss=add_aux_to_loss, tensors=tensors)
    model.slim_summary = summarize(model, names, config.slim_config(target_modules=tuple(names)))
    if verbose:
        logger.info("%s", model.slim_summary)
    return outer


def adapter_tensor_file(path: PathLike) -> str:
    """The path of the tensor file of the adapter folder ``path``."""
    return os.path.join(os.fspath(path), fmt.WEIGHTS_NAME)

