"""Save and load SLIM adapters: ``save_slim(model, path)`` / ``load_slim(model, path)``.

A saved adapter is a folder with two files:

* ``slim_adapter.safetensors``: per wrapped module ``<name>.lora_A``, ``<name>.lora_B``,
  ``<name>.router`` (in the model's dtype) and the cluster buffers ``<name>.cluster_centers``,
  ``<name>.cluster_vars`` (fp32) and ``<name>.cluster_initialized`` (bool);
* ``slim_config.json``: ``format``, ``format_version``, ``library_version``, the
  :class:`SlimConfig` (``config``), the list of wrapped module names (``modules``), and per
  tensor its shape, dtype and sha256 (``tensors``) so that corrupt data is detected.

:func:`load_slim` validates everything (files, checksums, names, shapes, against the model)
before it changes anything; on any error the model is left as it was.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, List, Union

import torch
from torch import Tensor, nn

from ..config import SlimConfig
from ..layer import slim_modules
from . import distributed as _dist
from .hf import plan_slim, summarize, swap_in, unwrap_model

logger = logging.getLogger("slim_kernels")

__all__ = ["save_slim", "load_slim", "SlimLoadError", "ADAPTER_FILE", "CONFIG_FILE", "FORMAT_VERSION"]

ADAPTER_FILE = "slim_adapter.safetensors"
CONFIG_FILE = "slim_config.json"
FORMAT = "slim_kernels.slim_adapter"
FORMAT_VERSION = 1
TENSORS = ("lora_A", "lora_B", "router", "cluster_centers", "cluster_vars", "cluster_initialized")

PathLike = Union[str, "os.PathLike[str]"]


class SlimLoadError(ValueError):
    """A saved SLIM adapter cannot be loaded onto this model (nothing was changed)."""


def _sha256(t: Tensor) -> str:
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(b.numpy().tobytes()).hexdigest()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def save_slim(model: nn.Module, path: PathLike) -> None:
    """Write the SLIM adapters, routers and cluster buffers of ``model`` to the folder ``path``
    (created if needed): ``slim_adapter.safetensors`` and ``slim_config.json``.

    Data parallel: under torch.distributed only global rank 0 writes. With FSDP2 or DeepSpeed
    ZeRO-3 the tensors are gathered first, so call it on every rank then (with DDP or
    ZeRO-1/2, calling it on rank 0 alone is fine too)."""
    from safetensors.torch import save_file

    from .._version import __version__

    model = unwrap_model(model)  # names as in the plain model, not torch.compile's / DDP's wrapper
    layers = list(slim_modules(model))
    if not layers:
        raise ValueError(f"save_slim: {type(model).__name__} has no SlimLinear layers "
                         f"(call apply_slim first)")
    config = layers[0][1].config
    for name, m in layers:
        if m.config != config:
            raise ValueError(f"save_slim: SlimLinear {name!r} has another SlimConfig than "
                             f"{layers[0][0]!r}; one adapter file holds one config")
    # full tensors even when FSDP2 / DeepSpeed ZeRO-3 shard them (then a collective)
    tensors: Dict[str, Tensor] = _dist.full_cpu_tensors(layers, TENSORS)
    if not _dist.is_main_process():
        return  # under torch.distributed only global rank 0 writes
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": config.to_dict(),
        "modules": [n for n, _ in layers],
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype), "sha256": _sha256(v)}
                    for k, v in tensors.items()},
    }
    os.makedirs(path, exist_ok=True)
    a_path, c_path = os.path.join(path, ADAPTER_FILE), os.path.join(path, CONFIG_FILE)
    save_file(tensors, a_path + ".tmp", metadata={"format": FORMAT,
                                                  "format_version": str(FORMAT_VERSION)})
    with open(c_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.replace(a_path + ".tmp", a_path)
    os.replace(c_path + ".tmp", c_path)


def _read(path: PathLike):
    from safetensors.torch import load_file

    a_path, c_path = os.path.join(path, ADAPTER_FILE), os.path.join(path, CONFIG_FILE)
    for p in (c_path, a_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"load_slim: {p} does not exist (a SLIM adapter folder holds "
                                    f"{CONFIG_FILE} and {ADAPTER_FILE}, written by save_slim)")
    try:
        with open(c_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimLoadError(f"load_slim: {c_path} is not valid JSON (corrupt or truncated): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SlimLoadError(f"load_slim: {c_path} is not a SLIM adapter config "
                            f"(expected format {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SlimLoadError(f"load_slim: {c_path} has format_version "
                            f"{meta.get('format_version')!r}; this library reads {FORMAT_VERSION}")
    for key, typ in (("config", dict), ("modules", list), ("tensors", dict)):
        if not isinstance(meta.get(key), typ):
            raise SlimLoadError(f"load_slim: {c_path} lacks a valid {key!r} entry")
    try:
        config = SlimConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise SlimLoadError(f"load_slim: {c_path} holds an invalid SlimConfig: {e}") from e
    try:
        tensors = load_file(a_path)
    except Exception as e:  # safetensors raises its own error types on bad headers / sizes
        raise SlimLoadError(f"load_slim: {a_path} cannot be read (corrupt or truncated "
                            f"safetensors file): {type(e).__name__}: {e}") from e
    return meta, config, tensors


def _split(key: str):
    name, _, t = key.rpartition(".")
    return name, t


def _validate(model: nn.Module, meta: dict, config: SlimConfig, tensors: Dict[str, Tensor],
              path: PathLike) -> List[str]:
    modules: List[str] = list(meta["modules"])
    listed = {f"{n}.{t}": (n, t) for n in modules for t in TENSORS}
    # 1. the file against its own config: every tensor present, none extra, data intact
    for key, (n, t) in listed.items():
        if key not in tensors:
            raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} is missing from "
                                f"{ADAPTER_FILE} (partial or mismatched file)")
        info = meta["tensors"].get(key)
        if not isinstance(info, dict):
            raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} has no entry in "
                                f"{CONFIG_FILE}")
        v = tensors[key]
        if list(v.shape) != info.get("shape") or _dtype_name(v.dtype) != info.get("dtype"):
            raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} is {_dtype_name(v.dtype)} "
                                f"{list(v.shape)} in {ADAPTER_FILE} but {info.get('dtype')} "
                                f"{info.get('shape')} in {CONFIG_FILE}")
        if _sha256(v) != info.get("sha256"):
            raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} fails its sha256 check "
                                f"(the data in {ADAPTER_FILE} is corrupt)")
    extra = sorted(set(tensors) - set(listed))
    if extra:
        n, t = _split(extra[0])
        raise SlimLoadError(f"load_slim: {ADAPTER_FILE} holds tensor(s) not listed in "
                            f"{CONFIG_FILE}, e.g. module {n!r}: tensor {t!r} ({len(extra)} in all)")
    extra_meta = sorted(set(meta["tensors"]) - set(listed))
    if extra_meta:
        n, t = _split(extra_meta[0])
        raise SlimLoadError(f"load_slim: {CONFIG_FILE} lists tensor(s) of modules not in its "
                            f"'modules', e.g. module {n!r}: tensor {t!r}")
    # 2. the adapter against the model
    planned = plan_slim(model, config)  # raises if SLIM is on already or targets do not fit
    missing = [n for n in modules if n not in planned]
    if missing:
        why = "does not exist in the model"
        try:
            mod = model.get_submodule(missing[0])
            why = f"is a {type(mod).__name__} the config's target_modules do not select"
        except AttributeError:
            pass
        raise SlimLoadError(f"load_slim: module {missing[0]!r} of the adapter {why} "
                            f"({type(model).__name__}; {len(missing)} such module(s))")
    unmatched = [n for n in planned if n not in set(modules)]
    if unmatched:
        raise SlimLoadError(f"load_slim: module {unmatched[0]!r} of the model matches "
                            f"target_modules but has no tensors in the adapter "
                            f"({len(unmatched)} such module(s)); the adapter was saved from "
                            f"another model")
    c = config
    for n in modules:
        lin = model.get_submodule(n)
        K, N = lin.in_features, lin.out_features
        expect = {
            "lora_A": (c.num_lora_experts, c.rank, K),
            "lora_B": (c.num_lora_experts, N, c.rank),
            "router": (c.num_experts, K),
            "cluster_centers": (c.num_clusters, K),
            "cluster_vars": (c.num_clusters, K),
            "cluster_initialized": (),
        }
        for t, shape in expect.items():
            v = tensors[f"{n}.{t}"]
            if tuple(v.shape) != shape:
                raise SlimLoadError(
                    f"load_slim: module {n!r}: tensor {t!r} has shape {tuple(v.shape)} but the "
                    f"model's {type(lin).__name__}({K} -> {N}) with this config needs {shape} "
                    f"(adapter saved from a model of another shape?)")
            if t == "cluster_initialized":
                ok = v.dtype == torch.bool
            else:
                ok = v.is_floating_point()
            if not ok:
                raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} has dtype {v.dtype}")
    return modules


def load_slim(model: nn.Module, path: PathLike, verbose: bool = False, *,
              add_aux_to_loss: bool = True) -> nn.Module:
    """Apply SLIM to the base ``model`` as saved in the folder ``path`` (same config, same
    modules) and load the saved adapters, routers and cluster buffers; returns ``model``.

    Bit-exact: the loaded model computes what the saved one did (LoRA tensors are cast to the
    model's dtype if it differs from the saved one; then results are exact only up to that
    cast). Errors (:class:`SlimLoadError`, ``FileNotFoundError``) name the module and tensor;
    they are raised before anything changes, so the model is then left as it was."""
    outer, model = model, unwrap_model(model)
    meta, config, tensors = _read(path)
    modules = _validate(model, meta, config, tensors, path)

    def load_tensors(layers) -> None:
        with torch.no_grad():
            for name, layer in layers:
                sd = {t: tensors[f"{name}.{t}"] for t in TENSORS}
                res = layer.load_state_dict(sd, strict=False)
                bad = [k for k in res.missing_keys if k not in ("weight", "bias")]
                if bad or res.unexpected_keys:
                    raise RuntimeError(f"load_slim: module {name!r}: state dict mismatch "
                                       f"{bad} {res.unexpected_keys}")

    swap_in(model, config, modules, add_aux_to_loss, then=load_tensors)
    model.slim_summary = summarize(model, modules, config)
    if verbose:
        logger.info("%s", model.slim_summary)
    return outer
