"""Save and load SLIM adapters: ``save_slim(model, path)`` / ``load_slim(model, path)``.

A saved adapter is a folder with two files (format 2; ``docs/huggingface.md``, "What
``save_slim`` writes"):

* ``slim_adapter.<digest16>.safetensors``: per wrapped module ``<name>.lora_A``,
  ``<name>.lora_B``, ``<name>.router`` (in the model's dtype) and the cluster buffers
  ``<name>.cluster_centers``, ``<name>.cluster_vars`` (fp32) and ``<name>.cluster_initialized``
  (bool), and with ``distance_scale="spread"`` ``<name>.distance_mean`` and
  ``<name>.distance_var`` (fp32 scalars). Its name carries the first 16 hex digits of the
  adapter digest.
* ``slim_config.json``, the manifest: ``format``, ``format_version``, ``library_version``, the
  :class:`SlimConfig` (``config``), the wrapped module names (``modules``), per tensor its
  shape, dtype and sha256 (``tensors``), the name of the tensor file (``tensor_file``) and
  ``digest``, the sha256 of the canonical JSON of format, version, config, modules and
  tensors: the config is covered as well as every tensor.

Atomic: the tensor file is written under a new name and fsynced first, then the manifest
replaces the old one in one ``os.replace``; only then are files the manifest no longer names
deleted. After a kill at any moment the folder holds wholly the old adapter or wholly the new
one. One writer per folder at a time.

:func:`load_slim` reads the manifest first and validates everything (files, digest, checksums,
names, shapes, values, against the model) before it changes anything; on any error the model
is left as it was. Format 1 folders (``slim_adapter.safetensors`` beside a manifest without a
digest, written by slim_kernels 0.1) still load. A saved config without ``distance_scale``
(saved before that field existed) loads as ``distance_scale="none"``, whatever the default.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import uuid
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..config import SlimConfig
from ..layer import SLIM_KEYS, slim_keys, slim_modules
from . import distributed as _dist
from .hf import plan_slim, summarize, swap_in, unwrap_model

logger = logging.getLogger("slim_kernels")

__all__ = ["save_slim", "load_slim", "adapter_tensor_file", "SlimLoadError", "ADAPTER_FILE",
           "CONFIG_FILE", "FORMAT_VERSION"]

CONFIG_FILE = "slim_config.json"
ADAPTER_FILE = "slim_adapter.safetensors"  # the tensor file of format 1
FORMAT = "slim_kernels.slim_adapter"
FORMAT_VERSION = 2
TENSORS = SLIM_KEYS  # per wrapped module; slim_keys(config) adds distance_mean/distance_var
_TENSOR_FILE = re.compile(r"slim_adapter\.[0-9a-f]{16}\.safetensors\Z")
_TMP = re.compile(r"(slim_adapter\.[0-9a-f]{16}\.safetensors|slim_config\.json)\.tmp-[0-9a-f]{32}\Z")

PathLike = Union[str, "os.PathLike[str]"]


class SlimLoadError(ValueError):
    """A saved SLIM adapter cannot be loaded onto this model (nothing was changed)."""


def _sha256(t: Tensor) -> str:
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(b.numpy().tobytes()).hexdigest()


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _digest(meta: dict) -> str:
    """sha256 of the canonical JSON of what the manifest says about the adapter."""
    body = {k: meta.get(k) for k in ("format", "format_version", "config", "modules", "tensors")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _tensor_file_name(digest: str) -> str:
    return f"slim_adapter.{digest[:16]}.safetensors"


def _bad_values(t: str, v: Tensor, dtype: torch.dtype) -> Optional[str]:
    """What is wrong with the values of tensor ``t`` once cast to ``dtype``, or None."""
    if t == "cluster_initialized":
        return None
    w = v.detach().to(dtype)
    if not bool(torch.isfinite(w).all()):
        if bool(torch.isfinite(v).all()):
            return f"holds values that overflow {_dtype_name(dtype)} (largest |value| {v.abs().max().item():.3g})"
        return "holds non-finite values (NaN or inf)"
    if t in ("cluster_vars", "distance_var") and w.numel() and bool((w < 0).any()):
        return f"holds negative variances (smallest {w.min().item():.3g}); variances are >= 0"
    return None


def _fsync_dir(path: str) -> None:
    if os.name == "posix":  # a directory's entries are made durable through its own fd
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_durably(final: str, data: bytes) -> None:
    """Write ``data`` to a fresh temporary file, fsync it, rename it to ``final`` (atomic)."""
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_slim(model: nn.Module, path: PathLike) -> None:
    """Write the SLIM adapters, routers and cluster buffers of ``model`` to the folder ``path``
    (created if needed), atomically: after a kill at any moment the folder holds wholly the
    previous adapter (if any) or wholly the new one (see the module docstring for the files).

    Refuses (ValueError naming the module and tensor, nothing written) what :func:`load_slim`
    would reject: non-finite LoRA factors, routers or clusters, negative variances, a config
    that is no longer valid or no longer matches the layers' shapes.

    Data parallel: under torch.distributed only global rank 0 writes. With FSDP2 or DeepSpeed
    ZeRO-3 the tensors are gathered first, so call it on every rank then (with DDP or
    ZeRO-1/2, calling it on rank 0 alone is fine too)."""
    from safetensors.torch import save

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
    config_dict = config.to_dict()
    # full tensors even when FSDP2 / DeepSpeed ZeRO-3 shard them (then a collective)
    tensors: Dict[str, Tensor] = _dist.full_cpu_tensors(layers)
    for key, v in tensors.items():  # (on every rank: all raise alike)
        n, t = _split(key)
        why = _bad_values(t, v, v.dtype)
        if why is not None:
            raise ValueError(f"save_slim: module {n!r}: tensor {t!r} {why}; not saved (the "
                             f"folder is left as it was)")
    if not _dist.is_main_process():
        return  # under torch.distributed only global rank 0 writes
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": config_dict,
        "modules": [n for n, _ in layers],
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype), "sha256": _sha256(v)}
                    for k, v in tensors.items()},
    }
    meta["digest"] = digest = _digest(meta)
    meta["tensor_file"] = tensor_file = _tensor_file_name(digest)
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"save_slim: {path} exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    data = save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                   "digest": digest})
    # 1. the tensors under their own new name: the current manifest does not see them
    _write_durably(os.path.join(path, tensor_file), data)
    _fsync_dir(path)
    # 2. the manifest, in one atomic replace: from here on the folder is the new adapter
    _write_durably(os.path.join(path, CONFIG_FILE),
                   (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    _fsync_dir(path)
    # 3. what no manifest names any more: older tensor files, leftovers of killed saves
    for f in os.listdir(path):
        if f != tensor_file and (f == ADAPTER_FILE or _TENSOR_FILE.match(f) or _TMP.match(f)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, f))


def _describe(p: str) -> str:
    """What kind of file system object ``p`` is, for an error message."""
    st = os.stat(p)
    kinds = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    kind = next((k for test, k in kinds if test(st.st_mode)), "not a regular file")
    if os.path.islink(p):
        kind += f" (it is a symbolic link to {os.path.realpath(p)})"
    return kind


def _check_file(p: str) -> None:
    if not os.path.lexists(p):
        raise FileNotFoundError(f"load_slim: {p} does not exist (a SLIM adapter folder holds "
                                f"{CONFIG_FILE} and the tensor file it names, written by "
                                f"save_slim)")
    if not os.path.exists(p):
        raise FileNotFoundError(f"load_slim: {p} is a symbolic link to {os.readlink(p)!r}, "
                                f"which does not exist")
    if not os.path.isfile(p):
        raise SlimLoadError(f"load_slim: {p} is {_describe(p)}, not a regular file")


def _read_manifest(path: str) -> Tuple[dict, str]:
    """The parsed, checked manifest and the path of the tensor file it names."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_slim: {path} does not exist (expected a SLIM adapter "
                                f"folder written by save_slim)")
    if not os.path.isdir(path):
        raise SlimLoadError(f"load_slim: {path} is {_describe(path)}, not a folder: pass the "
                            f"SLIM adapter folder (the one holding {CONFIG_FILE})")
    c_path = os.path.join(path, CONFIG_FILE)
    _check_file(c_path)
    try:
        with open(c_path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimLoadError(f"load_slim: {c_path} is not valid JSON (corrupt or truncated): {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SlimLoadError(f"load_slim: {c_path} is not a SLIM adapter config "
                            f"(expected format {FORMAT!r})")
    version = meta.get("format_version")
    if type(version) is not int or version not in (1, FORMAT_VERSION):
        raise SlimLoadError(f"load_slim: {c_path} has format_version {version!r}; this library "
                            f"reads 1 and {FORMAT_VERSION}")
    for key, typ in (("config", dict), ("modules", list), ("tensors", dict)):
        if not isinstance(meta.get(key), typ):
            raise SlimLoadError(f"load_slim: {c_path} lacks a valid {key!r} entry")
    if version == 1:  # slim_kernels 0.1: fixed tensor file name, no digest
        return meta, os.path.join(path, ADAPTER_FILE)
    digest, tensor_file = meta.get("digest"), meta.get("tensor_file")
    if not isinstance(digest, str) or not isinstance(tensor_file, str):
        raise SlimLoadError(f"load_slim: {c_path} lacks a valid 'digest' or 'tensor_file' entry")
    try:
        actual = _digest(meta)
    except ValueError as e:  # e.g. NaN written into the config by hand
        raise SlimLoadError(f"load_slim: {c_path} holds values JSON does not allow: {e}") from e
    if actual != digest:
        raise SlimLoadError(f"load_slim: {c_path} fails its integrity check: its config, module "
                            f"list or tensor checksums were changed after save_slim wrote it "
                            f"(digest {actual[:16]}..., recorded {digest[:16]}...)")
    if tensor_file != _tensor_file_name(digest):
        raise SlimLoadError(f"load_slim: {c_path} names the tensor file {tensor_file!r}; "
                            f"expected {_tensor_file_name(digest)!r}")
    return meta, os.path.join(path, tensor_file)


def adapter_tensor_file(path: PathLike) -> str:
    """The path of the safetensors file of the adapter saved in the folder ``path`` (the file
    its manifest names; ``slim_adapter.safetensors`` for format 1)."""
    return _read_manifest(os.fspath(path))[1]


def _read(path: PathLike):
    from safetensors import safe_open

    path = os.fspath(path)
    for attempt in range(3):
        meta, a_path = _read_manifest(path)
        try:
            _check_file(a_path)
            with safe_open(a_path, framework="pt") as f:  # open: a later delete is harmless
                file_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            break
        except FileNotFoundError:
            # a save into this folder replaced the manifest and deleted the old tensor file
            # between the two reads: read the new manifest
            if attempt == 2 or _read_manifest(path)[0] == meta:
                raise
        except Exception as e:  # safetensors raises its own error types on bad headers / sizes
            if isinstance(e, SlimLoadError):
                raise
            raise SlimLoadError(f"load_slim: {a_path} cannot be read (corrupt or truncated "
                                f"safetensors file): {type(e).__name__}: {e}") from e
    if meta["format_version"] != 1 and file_meta.get("digest") != meta["digest"]:
        raise SlimLoadError(f"load_slim: {a_path} does not belong to {CONFIG_FILE} (its "
                            f"recorded digest differs)")
    try:
        # saved before distance_scale existed: the paper's distance, whatever the default now
        config = SlimConfig.from_dict({"distance_scale": "none", **meta["config"]})
    except (TypeError, ValueError) as e:
        raise SlimLoadError(f"load_slim: {os.path.join(path, CONFIG_FILE)} holds an invalid "
                            f"SlimConfig: {e}") from e
    return meta, config, tensors, os.path.basename(a_path)


def _split(key: str):
    name, _, t = key.rpartition(".")
    return name, t


def _validate(model: nn.Module, meta: dict, config: SlimConfig, tensors: Dict[str, Tensor],
              tensor_file: str) -> List[str]:
    modules: List[str] = list(meta["modules"])
    listed = {f"{n}.{t}": (n, t) for n in modules for t in slim_keys(config)}
    # 1. the file against its own config: every tensor present, none extra, data intact
    for key, (n, t) in listed.items():
        if key not in tensors:
            raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} is missing from "
                                f"{tensor_file} (partial or mismatched file)")
        info = meta["tensors"].get(key)
        if not isinstance(info, dict):
            raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} has no entry in "
                                f"{CONFIG_FILE}")
        v = tensors[key]
        if list(v.shape) != info.get("shape") or _dtype_name(v.dtype) != info.get("dtype"):
            raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} is {_dtype_name(v.dtype)} "
                                f"{list(v.shape)} in {tensor_file} but {info.get('dtype')} "
                                f"{info.get('shape')} in {CONFIG_FILE}")
        if _sha256(v) != info.get("sha256"):
            raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} fails its sha256 check "
                                f"(the data in {tensor_file} is corrupt)")
    extra = sorted(set(tensors) - set(listed))
    if extra:
        n, t = _split(extra[0])
        raise SlimLoadError(f"load_slim: {tensor_file} holds tensor(s) not listed in "
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
        if config.distance_scale == "spread":
            expect.update(distance_mean=(), distance_var=())
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
            # the values as the layer will hold them (factors in the model's dtype)
            fp32 = t.startswith(("cluster", "distance"))
            why = _bad_values(t, v, torch.float32 if fp32 else lin.weight.dtype)
            if why is not None:
                raise SlimLoadError(f"load_slim: module {n!r}: tensor {t!r} {why}")
    return modules


def load_slim(model: nn.Module, path: PathLike, verbose: bool = False, *,
              add_aux_to_loss: bool = True) -> nn.Module:
    """Apply SLIM to the base ``model`` as saved in the folder ``path`` (same config, same
    modules) and load the saved adapters, routers and cluster buffers; returns ``model``.

    Bit-exact: the loaded model computes what the saved one did (LoRA tensors are cast to the
    model's dtype if it differs from the saved one; then results are exact only up to that
    cast). Checked first: the manifest's digest (config, modules and tensor checksums), every
    tensor's sha256, shape and dtype, and its values (finite in the dtype the layer will hold
    them in; cluster variances >= 0). Errors (:class:`SlimLoadError`, ``FileNotFoundError``)
    name the file, module and tensor; they are raised before anything changes, so the model
    is then left as it was."""
    outer, model = model, unwrap_model(model)
    meta, config, tensors, tensor_file = _read(path)
    modules = _validate(model, meta, config, tensors, tensor_file)

    def load_tensors(layers) -> None:
        with torch.no_grad():
            for name, layer in layers:
                sd = {t: tensors[f"{name}.{t}"] for t in slim_keys(config)}
                res = layer.load_state_dict(sd, strict=False)
                bad = [k for k in res.missing_keys if not k.startswith("base_layer.")]
                if bad or res.unexpected_keys:
                    raise RuntimeError(f"load_slim: module {name!r}: state dict mismatch "
                                       f"{bad} {res.unexpected_keys}")

    swap_in(model, config, modules, add_aux_to_loss, then=load_tensors)
    model.slim_summary = summarize(model, modules, config)
    if verbose:
        logger.info("%s", model.slim_summary)
    return outer
