"""The one adapter format: PEFT's folder layout, with an integrity record, written atomically.

A SLIM adapter is a folder holding what ``PeftModel.save_pretrained`` writes for any PEFT
method (``docs/huggingface.md``, "The adapter folder"):

* ``adapter_config.json``: the ``SlimPeftConfig`` (``peft_type: "SLIM"``), plus two entries of
  slim_kernels' own: ``slim_kernels`` (a note saying what is needed to load the adapter) and
  ``slim_integrity``: the format and its version, per tensor its shape, dtype and sha256, and
  ``digest``, the sha256 of the canonical JSON of the format, its version, the config (every
  entry but the bookkeeping ones in :data:`UNCOVERED`) and the tensor entries. An edited
  ``alpha`` or ``target_modules``, a flipped bit in a tensor, a missing or an extra tensor:
  each fails a check, whichever way the folder is loaded.
* ``adapter_model.safetensors``: the tensors under PEFT's names
  (``base_model.model.<module>.slim_experts.lora_A``, ``....slim_experts.clusters.cluster_vars``,
  and the ``modules_to_save`` / bias tensors PEFT adds); its metadata repeats the digest.
* ``README.md``: the adapter card, which says how to load the adapter.

A save (:func:`write_folder`) writes a complete new folder beside the old one and exchanges
the two in one atomic rename (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np`` on
macOS): after a kill at any moment the folder is wholly the old adapter or wholly the new
one, whoever loads it. A reader (:func:`read_folder`) that races a save and gets the config
of one and the tensors of the other sees the digests differ and reads again.

Folders of the own format of earlier releases (``slim_config.json`` beside
``slim_adapter[.<digest16>].safetensors``, format 1 and 2) are read and turned into the same
(config, tensors) pair. Nothing here imports PEFT.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import time
import uuid
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from ..config import SlimConfig
from ..clusters import CLUSTER_KEYS, DISTANCE_KEYS

logger = logging.getLogger("slim_kernels")

__all__ = ["SlimLoadError", "PEFT_PREFIX", "SLIM_PART", "CONFIG_NAME", "WEIGHTS_NAME", "README_NAME", "FORMAT",
           "FORMAT_VERSION", "INTEGRITY", "NOTE", "NOTE_TEXT", "UNCOVERED", "CARD_NOTE",
           "integrity_record", "check_config", "check_tensors", "bad_values", "read_folder",
           "write_folder", "replace_file", "config_bytes", "card", "add_card_note",
           "tensor_kind", "describe_key", "peft_key", "sha256", "dtype_name"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
FORMAT = "slim_kernels.peft_adapter"
FORMAT_VERSION = 3  # 1 and 2: the own format of earlier releases (slim_config.json)
INTEGRITY = "slim_integrity"  # the config entry holding the record
NOTE = "slim_kernels"  # the config entry holding NOTE_TEXT
NOTE_TEXT = (
    "A SLIM adapter (peft_type SLIM). Loading it needs the slim_kernels package installed beside "
    "peft; then PeftModel.from_pretrained, AutoPeftModelFor*.from_pretrained, transformers' "
    "load_adapter and lm-eval's peft= load it as they load a LoRA adapter. If PEFT raises "
    "KeyError: 'SLIM', SLIM is not registered in that Python: add `import slim_kernels.peft` "
    "before loading.")
# config entries outside the digest: PEFT's bookkeeping (inference_mode flips at every save,
# base_model_name_or_path may point at a local copy of the base), and the record itself
UNCOVERED = frozenset({"inference_mode", "base_model_name_or_path", "revision", "peft_version",
                       "auto_mapping", INTEGRITY, NOTE})
PEFT_PREFIX = "base_model.model."  # of the keys in an adapter file (a PeftModel's names)
SLIM_PART = ".slim_experts."  # between a wrapped module's name and its SLIM tensors' names
_LEGACY_CONFIG = "slim_config.json"
_LEGACY_FORMAT = "slim_kernels.slim_adapter"
_LEGACY_TENSORS = "slim_adapter.safetensors"  # format 1
_READ_ATTEMPTS = 20

PathLike = Union[str, "os.PathLike[str]"]


class SlimLoadError(ValueError):
    """A saved SLIM adapter cannot be loaded (the model, if any, was left unchanged)."""


# -- tensors ----------------------------------------------------------------------------------
def sha256(t: Tensor) -> str:
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(b.numpy().tobytes()).hexdigest()


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def peft_key(module: str, name: str) -> str:
    """The file key of tensor ``name`` (``lora_A``, ``cluster_vars``, ...) of the SLIM layer on
    ``module`` (its name in the plain model)."""
    inner = f"clusters.{name}" if name in CLUSTER_KEYS + DISTANCE_KEYS else name
    return f"{PEFT_PREFIX}{module}{SLIM_PART}{inner}"


def tensor_kind(key: str) -> Optional[Tuple[str, str]]:
    """``(module, name)`` of a SLIM layer's tensor from its file key (module as in the plain
    model; name ``lora_A``, ..., ``cluster_vars``), None for the other tensors of an adapter
    (``modules_to_save``, biases)."""
    if SLIM_PART not in key:
        return None
    module, _, rest = key.partition(SLIM_PART)
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module, rest.rpartition(".")[2]


def bad_values(key: str, v: Tensor, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """What is wrong with the values of the tensor ``key`` once cast to ``dtype`` (default:
    its own), or None. Integer and bool tensors are not checked."""
    if not v.is_floating_point():
        return None
    w = v.detach() if dtype is None else v.detach().to(dtype)
    if not bool(torch.isfinite(w).all()):
        if bool(torch.isfinite(v).all()):
            return (f"holds values that overflow {dtype_name(w.dtype)} (largest |value| "
                    f"{v.abs().max().item():.3g})")
        return "holds non-finite values (NaN or inf)"
    kind = tensor_kind(key)
    if kind is not None and kind[1] in ("cluster_vars", "distance_var") and w.numel() \
            and bool((w < 0).any()):
        return f"holds negative variances (smallest {w.min().item():.3g}); variances are >= 0"
    return None


def describe_key(key: str) -> str:
    kind = tensor_kind(key)
    return f"module {kind[0]!r}: tensor {kind[1]!r}" if kind else f"tensor {key!r}"


# -- the integrity record ----------------------------------------------------------------------
def _canonical(value):
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def _digest(config: Mapping, tensors: Mapping) -> str:
    body = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "config": {k: _canonical(v) for k, v in config.items() if k not in UNCOVERED},
            "tensors": _canonical(tensors)}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def integrity_record(config: Mapping, tensors: Mapping[str, Tensor]) -> dict:
    """The ``slim_integrity`` entry for ``config`` (the adapter_config.json entries) and the
    adapter's ``tensors`` (file keys)."""
    entries = {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype), "sha256": sha256(v)}
               for k, v in sorted(tensors.items())}
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "digest": _digest(config, entries), "tensors": entries}


def check_config(config: Mapping, where: str = CONFIG_NAME) -> Optional[dict]:
    """Check the record of the adapter_config.json entries ``config`` against the entries:
    returns the record (None when there is none: a folder PEFT saved without slim_kernels'
    record), raises :class:`SlimLoadError` when an entry was changed after the save."""
    rec = config.get(INTEGRITY)
    if rec is None:
        return None
    if not isinstance(rec, Mapping) or not isinstance(rec.get("tensors"), Mapping) \
            or not isinstance(rec.get("digest"), str):
        raise SlimLoadError(f"{where}: its {INTEGRITY!r} entry is not a valid integrity record")
    if rec.get("format") != FORMAT or rec.get("format_version") != FORMAT_VERSION:
        raise SlimLoadError(f"{where}: integrity record of format {rec.get('format')!r} version "
                            f"{rec.get('format_version')!r}; this slim_kernels reads {FORMAT!r} "
                            f"version {FORMAT_VERSION} (saved by a newer slim_kernels? upgrade)")
    try:
        actual = _digest(config, rec["tensors"])
    except (TypeError, ValueError) as e:  # NaN written into the config by hand, ...
        raise SlimLoadError(f"{where} holds values JSON does not allow: {e}") from e
    if actual != rec["digest"]:
        raise SlimLoadError(
            f"{where} fails its integrity check: its SLIM settings (config entries, "
            f"target_modules, ...) or tensor checksums were changed after the adapter was saved "
            f"(digest {actual[:16]}..., recorded {rec['digest'][:16]}...)")
    return dict(rec)


def _check_values(tensors: Mapping[str, Tensor], where: str) -> None:
    """Raise :class:`SlimLoadError` naming the first tensor whose values :func:`bad_values`
    rejects (``where``: the file, for the message)."""
    for key, v in tensors.items():
        why = bad_values(key, v)
        if why is not None:
            raise SlimLoadError(f"{where}: {describe_key(key)} {why}")


def check_tensors(record: Optional[Mapping], tensors: Mapping[str, Tensor],
                  where: str = WEIGHTS_NAME) -> None:
    """The tensors against the record (every one present, none extra, shape, dtype, sha256),
    then their values (:func:`bad_values`); without a record, the values only. Raises
    :class:`SlimLoadError` naming the module and tensor."""
    if record is not None:
        entries = record["tensors"]
        for key, info in entries.items():
            if key not in tensors:
                raise SlimLoadError(f"{where}: {describe_key(key)} is missing (partial or "
                                    f"mismatched file)")
            v = tensors[key]
            if not isinstance(info, Mapping) or list(v.shape) != info.get("shape") \
                    or dtype_name(v.dtype) != info.get("dtype"):
                raise SlimLoadError(f"{where}: {describe_key(key)} is {dtype_name(v.dtype)} "
                                    f"{list(v.shape)} but {CONFIG_NAME} records "
                                    f"{info.get('dtype')} {info.get('shape')}")
            if sha256(v) != info.get("sha256"):
                raise SlimLoadError(f"{where}: {describe_key(key)} fails its sha256 check (the "
                                    f"data is corrupt)")
        extra = sorted(set(tensors) - set(entries))
        if extra:
            raise SlimLoadError(f"{where} holds tensor(s) its record in {CONFIG_NAME} does not "
                                f"list, e.g. {describe_key(extra[0])} ({len(extra)} in all)")
    _check_values(tensors, where)


# -- reading a folder --------------------------------------------------------------------------
def _describe(p: str) -> str:
    """What kind of file system object ``p`` is, for an error message."""
    st = os.stat(p)
    kinds = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
    kind = next((k for test, k in kinds if test(st.st_mode)), "not a regular file")
    if os.path.islink(p):
        kind += f" (it is a symbolic link to {os.path.realpath(p)})"
    return kind


def _check_file(p: str) -> None:
    """A regular file (or a link to one): never open a FIFO or a device, which could block or
    never end."""
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{p} does not exist (a SLIM adapter folder holds {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME})")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p} is a symbolic link to {os.readlink(p)!r}, which does not "
                                f"exist")
    if not os.path.isfile(p):
        raise SlimLoadError(f"{p} is {_describe(p)}, not a regular file")


def _read_json(p: str) -> dict:
    _check_file(p)
    try:
        with open(p, "r", encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimLoadError(f"{p} is not valid JSON (corrupt or truncated): {e}") from e
    if not isinstance(d, dict):
        raise SlimLoadError(f"{p} holds a JSON {type(d).__name__}, not an object")
    return d


def _read_tensors(p: str) -> Tuple[Dict[str, Tensor], dict]:
    from safetensors import safe_open

    _check_file(p)
    try:
        with safe_open(p, framework="pt") as f:  # open: a later replace is harmless
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types on bad headers / sizes
        raise SlimLoadError(f"{p} cannot be read (corrupt or truncated safetensors file): "
                            f"{type(e).__name__}: {e}") from e


def _stamp(path: str, t_path: str) -> Optional[Tuple[int, ...]]:
    """What changes when a save replaces the folder ``path``: its inode and the tensor file's
    inode, size and modification time (None where a file is missing)."""
    try:
        d, t = os.stat(path), os.stat(t_path)
    except OSError:
        return None
    return d.st_ino, t.st_ino, t.st_size, t.st_mtime_ns


def read_folder(path: PathLike, config: Optional[Mapping] = None
                ) -> Tuple[dict, Dict[str, Tensor]]:
    """``(config entries, tensors)`` of the adapter folder ``path``, checked (regular files,
    the record's digest, every tensor against it, the values). ``config``: the entries a
    caller already read from the folder's adapter_config.json (PEFT's loaders): the tensors
    are checked against them, and only if a save replaced the folder in between are the
    folder's current entries returned instead. Reads again while a concurrent save makes the
    config and the tensors disagree. Folders of format 1 and 2 (``slim_config.json``) are
    returned as the same pair (no record: their own checks ran)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist (expected a SLIM adapter folder)")
    if not os.path.isdir(path):
        raise SlimLoadError(f"{path} is {_describe(path)}, not a folder: pass the SLIM adapter "
                            f"folder (the one holding {CONFIG_NAME})")
    c_path, t_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.lexists(c_path) and os.path.lexists(os.path.join(path, _LEGACY_CONFIG)):
        return _read_legacy(path)
    for attempt in range(_READ_ATTEMPTS):
        stamp = _stamp(path, t_path)
        given = config is not None and attempt == 0  # read by the caller, before the stamp
        cfg = dict(config) if given else _read_json(c_path)
        if cfg.get("peft_type") != "SLIM":
            raise SlimLoadError(f"{c_path} is an adapter of PEFT type {cfg.get('peft_type')!r}, "
                                f"not a SLIM adapter")
        record = check_config(cfg, c_path)
        tensors, meta = _read_tensors(t_path)
        digest = meta.get("slim_digest")
        try:
            if digest is not None and (record is None or digest != record["digest"]):
                raise SlimLoadError(f"{t_path} does not belong to {c_path} (the digest its "
                                    f"metadata records differs)")
            check_tensors(record, tensors, t_path)
        except SlimLoadError:
            # a save replaced the folder between the two reads: read the new one. The config
            # alone cannot tell (two saves may bring the same config back while the tensors
            # read were the other save's), so the folder's and the tensor file's identity count
            if attempt + 1 < _READ_ATTEMPTS and (given or _stamp(path, t_path) != stamp
                                                 or _read_json(c_path) != cfg):
                time.sleep(0.001 * attempt)
                continue
            raise
        if record is None:
            logger.warning("slim_kernels: %s has no integrity record (saved by PEFT before "
                           "slim_kernels recorded one): its tensors' values are checked, their "
                           "checksums cannot be; save it again to add the record", c_path)
        return cfg, tensors
    raise SlimLoadError(f"{path} changed {_READ_ATTEMPTS} times while it was read (saves into "
                        f"it without pause?)")


def _read_legacy(path: str) -> Tuple[dict, Dict[str, Tensor]]:
    """A folder of the own format (1: ``slim_adapter.safetensors`` and a manifest without a
    digest; 2: ``slim_adapter.<digest16>.safetensors`` named by a digested manifest)."""
    for _ in range(_READ_ATTEMPTS):
        c_path = os.path.join(path, _LEGACY_CONFIG)
        meta = _read_json(c_path)
        if meta.get("format") != _LEGACY_FORMAT:
            raise SlimLoadError(f"{c_path} is not a SLIM adapter config (expected format "
                                f"{_LEGACY_FORMAT!r})")
        version = meta.get("format_version")
        if type(version) is not int or version not in (1, 2):
            raise SlimLoadError(f"{c_path} has format_version {version!r}; this library reads "
                                f"1 and 2 (and {FORMAT_VERSION} in {CONFIG_NAME})")
        for key, typ in (("config", dict), ("modules", list), ("tensors", dict)):
            if not isinstance(meta.get(key), typ):
                raise SlimLoadError(f"{c_path} lacks a valid {key!r} entry")
        if version == 1:
            t_name = _LEGACY_TENSORS
        else:
            digest, t_name = meta.get("digest"), meta.get("tensor_file")
            if not isinstance(digest, str) or not isinstance(t_name, str):
                raise SlimLoadError(f"{c_path} lacks a valid 'digest' or 'tensor_file' entry")
            body = {k: meta.get(k) for k in ("format", "format_version", "config", "modules",
                                              "tensors")}
            try:
                actual = hashlib.sha256(json.dumps(
                    body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                    allow_nan=False).encode("ascii")).hexdigest()
            except ValueError as e:
                raise SlimLoadError(f"{c_path} holds values JSON does not allow: {e}") from e
            if actual != digest:
                raise SlimLoadError(f"{c_path} fails its integrity check: its config, module "
                                    f"list or tensor checksums were changed after save_slim "
                                    f"wrote it (digest {actual[:16]}..., recorded "
                                    f"{digest[:16]}...)")
            if t_name != f"slim_adapter.{digest[:16]}.safetensors":
                raise SlimLoadError(f"{c_path} names the tensor file {t_name!r}; expected "
                                    f"'slim_adapter.{digest[:16]}.safetensors'")
        t_path = os.path.join(path, t_name)
        try:
            tensors, file_meta = _read_tensors(t_path)
        except FileNotFoundError:
            if _read_json(c_path) != meta:
                continue  # a save replaced the manifest and deleted the old tensor file
            raise
        if version == 2 and file_meta.get("digest") != meta["digest"]:
            raise SlimLoadError(f"{t_path} does not belong to {_LEGACY_CONFIG} (its recorded "
                                f"digest differs)")
        return _convert_legacy(meta, tensors, c_path, t_path)
    raise SlimLoadError(f"{path} changed {_READ_ATTEMPTS} times while it was read")


def _convert_legacy(meta: dict, tensors: Dict[str, Tensor], c_path: str, t_path: str
                    ) -> Tuple[dict, Dict[str, Tensor]]:
    try:
        # saved before distance_scale existed: the paper's distance, whatever the default now
        slim = SlimConfig.from_dict({"distance_scale": "none", **meta["config"]})
    except (TypeError, ValueError) as e:
        raise SlimLoadError(f"{c_path} holds an invalid SlimConfig: {e}") from e
    names = ("lora_A", "lora_B", "router") + CLUSTER_KEYS + (
        DISTANCE_KEYS if slim.distance_scale == "spread" else ())
    modules = [str(m) for m in meta["modules"]]
    listed = {f"{m}.{t}": (m, t) for m in modules for t in names}
    out: Dict[str, Tensor] = {}
    for key, (m, t) in listed.items():
        if key not in tensors:
            raise SlimLoadError(f"{t_path}: module {m!r}: tensor {t!r} is missing (partial or "
                                f"mismatched file)")
        info, v = meta["tensors"].get(key), tensors[key]
        if not isinstance(info, dict):
            raise SlimLoadError(f"{c_path}: module {m!r}: tensor {t!r} has no entry")
        if list(v.shape) != info.get("shape") or dtype_name(v.dtype) != info.get("dtype"):
            raise SlimLoadError(f"{t_path}: module {m!r}: tensor {t!r} is {dtype_name(v.dtype)} "
                                f"{list(v.shape)} but {info.get('dtype')} {info.get('shape')} in "
                                f"{_LEGACY_CONFIG}")
        if sha256(v) != info.get("sha256"):
            raise SlimLoadError(f"{t_path}: module {m!r}: tensor {t!r} fails its sha256 check "
                                f"(the data is corrupt)")
        out[peft_key(m, t)] = v
    extra = sorted(set(tensors) - set(listed)) or sorted(set(meta["tensors"]) - set(listed))
    if extra:
        raise SlimLoadError(f"{t_path} holds tensor(s) its manifest's modules do not list, "
                            f"e.g. {extra[0]!r} ({len(extra)} in all)")
    _check_values(out, t_path)
    config = {k: v for k, v in slim.to_dict().items() if k != "target_modules"}
    config.update(peft_type="SLIM", task_type=None, target_modules=modules)
    return config, out


# -- writing a folder --------------------------------------------------------------------------
def _fsync_dir(path: str) -> None:
    if os.name == "posix":  # a directory's entries are made durable through its own fd
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: str, data: bytes) -> None:
    """Write ``data`` to a fresh temporary file beside ``path``, fsync it and rename it over
    ``path``: readers see the old file or the new one, never a partial one."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def config_bytes(config: Mapping) -> bytes:
    """adapter_config.json as PEFT writes it (sorted keys, indent 2)."""
    return json.dumps(_canonical(config), indent=2, sort_keys=True).encode("utf-8")


_CARD_MARK = "<!-- slim_kernels: loading -->"
CARD_NOTE = f"""{_CARD_MARK}
## Loading this SLIM adapter

This is a SLIM adapter (Soft LoRA and Identity Mixture, PEFT type `SLIM`). Loading it needs
the `slim_kernels` package installed beside `peft`; it then loads as a LoRA adapter does:

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this folder>")
```

`AutoPeftModelForCausalLM.from_pretrained`, transformers' `model.load_adapter` and lm-eval's
`--model_args pretrained=...,peft=<this folder>` work too. If PEFT raises `KeyError: 'SLIM'`,
SLIM is not registered in that Python (slim_kernels is not installed, or Python runs with
`-S`): add `import slim_kernels.peft` before loading.
"""


def card(base_model: Optional[str]) -> bytes:
    """README.md of an adapter saved by save_slim."""
    head = "---\nlibrary_name: peft\n"
    if base_model:
        head += f"base_model: {json.dumps(base_model)}\n"
    head += "tags:\n- slim\n- peft\n---\n\n# SLIM adapter\n\n"
    return (head + CARD_NOTE).encode("utf-8")


def add_card_note(folder: str) -> None:
    """Append the loading note to the README.md PEFT wrote into ``folder`` (once)."""
    p = os.path.join(folder, README_NAME)
    text = ""
    if os.path.isfile(p):
        with open(p, "r", encoding="utf-8") as f:
            text = f.read()
    if _CARD_MARK not in text:
        replace_file(p, (text.rstrip("\n") + "\n\n" + CARD_NOTE).lstrip("\n").encode("utf-8"))


def _libc_exchange() -> Optional[Callable[[str, str], None]]:
    """An atomic exchange of two paths, or None where the platform has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux"):
        fn = getattr(libc, "renameat2", None)
        at_fdcwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE

        if fn is not None:
            def call(a: bytes, b: bytes) -> int:
                return fn(at_fdcwd, a, at_fdcwd, b, exchange)
        else:  # glibc < 2.28: the system call itself
            nr = {"x86_64": 316, "aarch64": 276}.get(os.uname().machine)
            if nr is None:
                return None

            def call(a: bytes, b: bytes) -> int:
                return libc.syscall(nr, at_fdcwd, a, at_fdcwd, b, exchange)
    elif sys.platform == "darwin":
        fn = getattr(libc, "renamex_np", None)
        if fn is None:
            return None

        def call(a: bytes, b: bytes) -> int:
            return fn(a, b, 2)  # RENAME_SWAP
    else:
        return None

    def exchange_paths(a: str, b: str) -> None:
        if call(os.fsencode(a), os.fsencode(b)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{os.strerror(e)}: exchanging {a} and {b}")
    return exchange_paths


_EXCHANGE = [_libc_exchange()]


def exchange(a: str, b: str) -> None:
    """Swap the directories ``a`` and ``b`` in one atomic step (raises OSError where the
    platform or file system cannot)."""
    if _EXCHANGE[0] is None:
        raise OSError(errno.ENOSYS, "no atomic exchange of two paths on this platform")
    _EXCHANGE[0](a, b)


def _carry(src: str, dst: str) -> None:
    """Hard-link (or copy) the entry ``src`` to ``dst``, folders recursively: the old folder
    keeps its entries until the exchange."""
    if os.path.isdir(src) and not os.path.islink(src):
        os.mkdir(dst)
        for e in os.listdir(src):
            _carry(os.path.join(src, e), os.path.join(dst, e))
    elif os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _ours(name: str) -> bool:
    """Entries a save writes or replaces (this format's and the own format's files)."""
    return name in (CONFIG_NAME, WEIGHTS_NAME, README_NAME, _LEGACY_CONFIG, _LEGACY_TENSORS) or (
        name.startswith("slim_adapter.") and name.endswith(".safetensors"))


def write_folder(path: PathLike, files: Mapping[str, bytes]) -> None:
    """Make the folder ``path`` hold ``files`` (name -> bytes), atomically: a complete new
    folder is written and fsynced beside it, then exchanged with the old one in one step
    (:func:`exchange`). Entries of the old folder that are not an adapter's (a trainer's
    checkpoint files, say) are carried over as hard links. Where no atomic exchange exists,
    the old folder is renamed away first, and a kill between the two renames leaves it as
    ``.<name>.slim-old-<id>`` beside ``path``. One writer per folder at a time."""
    path = os.path.realpath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a folder")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, glob.escape(f".{base}.slim-tmp-") + "*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed save
    tmp = os.path.join(parent, f".{base}.slim-tmp-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        for name, data in files.items():
            _write_file(os.path.join(tmp, name), data)
        old = os.path.isdir(path)
        if old:
            for e in os.listdir(path):
                if e not in files and not _ours(e):
                    _carry(os.path.join(path, e), os.path.join(tmp, e))
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        _fsync_dir(tmp)
        if not old:
            os.rename(tmp, path)
        else:
            try:
                exchange(tmp, path)
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                aside = os.path.join(parent, f".{base}.slim-old-{uuid.uuid4().hex}")
                os.rename(path, aside)
                os.rename(tmp, path)
                tmp = aside
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            if os.path.isdir(tmp) and os.path.realpath(tmp) != path:
                shutil.rmtree(tmp)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under the temporary name
