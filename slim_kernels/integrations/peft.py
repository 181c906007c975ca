"""SLIM as a PEFT method: ``get_peft_model(model, SlimPeftConfig(...))``, and the one way SLIM
gets into a model (:func:`inject`, which ``apply_slim`` and ``load_slim`` call too).

From the user's side SLIM is used exactly like LoRA: LoRA's vocabulary in the config (``r``,
``lora_alpha``, ``target_modules``, ``exclude_modules``, ``modules_to_save``,
``layers_to_transform``/``layers_pattern``, ``rank_pattern``/``alpha_pattern``, ``bias``,
``fan_in_fan_out``, ``init_lora_weights``; a LoRA field SLIM cannot honour is refused with
the reason), ``print_trainable_parameters``, ``save_pretrained`` / ``PeftModel.from_pretrained``
(the cluster buffers are saved with the factors and the router), several named adapters,
``disable_adapter()`` (the base model exactly), bitsandbytes bases, GPT-2's ``Conv1D``.

Each targeted projection becomes a :class:`SlimPeftLayer`: it wraps the ``base_layer`` and
holds one :class:`~slim_kernels.SlimLinear` per adapter (``slim_experts[<name>]``), which
borrows that base layer (it is not saved twice) and runs the fused op on its weight. The
SLIM aux loss (docs/method.md §4) reaches ``outputs.loss`` through two hooks on the model
(:mod:`slim_kernels.integrations.hooks`).

Loading is checked (:mod:`slim_kernels.integrations.adapter_format`): a ``SlimPeftConfig`` built
from a saved ``adapter_config.json`` checks its integrity record, and when PEFT builds it
inside ``PeftConfig.from_pretrained(<folder>)`` (what PeftModel, AutoPeftModel, transformers'
``load_adapter`` and lm-eval call) it checks the whole folder before any model is touched: PEFT
hands the config class no path, so it is read from that call's frame (:func:`_folder_of_call`).
The tensors it verified are loaded into the layers as they are created; the tensors PEFT reads
itself afterwards are checked against the model (all present, shapes, values) and an error
there puts the model back as it was.

PEFT has no public way to add a method outside its fixed ``PeftType`` list; ``PeftType`` is a
string enum and its mapping tables take string keys, so :func:`register` fills those tables
directly. That is done in one place, only for the PEFT versions this was tested with
(``TESTED_PEFT``); on another version importing this module raises an ImportError that says so
and registers nothing. The install's hook (``_slim_kernels_peft``) imports this module when
``peft`` is imported.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..base_layers import SUPPORTED_BASES, base_handler, unsupported_base
from ..config import SlimConfig
from ..clusters import CLUSTER_KEYS, DISTANCE_KEYS
from ..layer import SlimLinear
from . import adapter_format as fmt
from .hooks import install_hooks, refresh_layers, remove_hooks, slim_state_of

PEFT_TYPE = "SLIM"
PREFIX = "slim_"
_CLUSTER_NAMES = CLUSTER_KEYS + DISTANCE_KEYS
TESTED_PEFT = ("0.21.",)  # version prefixes the registration was tested with
PEFT_PIN = "peft>=0.21,<0.22"

try:
    import peft as _peft
except ImportError as e:  # pragma: no cover - peft is a test dependency
    raise ImportError(f"slim_kernels' PEFT integration needs the peft package "
                      f"(pip install '{PEFT_PIN}')") from e

if not _peft.__version__.startswith(TESTED_PEFT):
    raise ImportError(
        f"slim_kernels.peft registers SLIM into PEFT's internal method tables, which change "
        f"between PEFT releases; it was tested with peft {', '.join(v + 'x' for v in TESTED_PEFT)} "
        f"but peft {_peft.__version__} is installed. Nothing was registered. Install a tested "
        f"peft: pip install '{PEFT_PIN}'")

from peft.config import PeftConfig, PeftConfigMixin  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists  # noqa: E402
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

__all__ = ["SlimPeftConfig", "SlimPeftLayer", "SlimTuner", "register", "inject", "plan",
           "PEFT_TYPE", "TRANSFORMERS_MODELS_TO_SLIM_TARGET_MODULES_MAPPING", "FUSED_PROJECTIONS"]


class _PeftTypeName(str):
    """"SLIM" with the ``.value`` and ``.name`` of a ``PeftType`` member: PEFT and transformers
    read ``config.peft_type.value`` (a string compares, hashes and saves as "SLIM")."""

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return str(self)


SLIM_PEFT_TYPE = _PeftTypeName(PEFT_TYPE)

# -- default targets ---------------------------------------------------------------------------
# SLIM's default is every projection of the attention and the MLP (SlimConfig's q_proj ...
# down_proj on a Llama); PEFT's LoRA mapping (mostly q and v only) covers the other model types.
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_ENC_DEC = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_FALCON = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
_BERT = ["query", "key", "value", "output.dense", "intermediate.dense"]
_VIT = _BERT + ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]  # (transformers 4, 5)
TRANSFORMERS_MODELS_TO_SLIM_TARGET_MODULES_MAPPING: Dict[str, List[str]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                           "gemma3_text", "olmo", "olmo2", "granite", "stablelm", "cohere")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    **{t: _FALCON for t in ("gpt_neox", "falcon", "bloom")},
    **{t: _ENC_DEC for t in ("opt", "bart", "mbart", "whisper")},
    **{t: ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"] for t in ("t5", "mt5")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra")},
    **{t: _VIT for t in ("vit", "deit")},
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}
# a model without a model_type (a plain nn.Module) gets SlimConfig's projection names
_NO_MODEL_TYPE = ("custom", None)

# fused module name -> the unfused projection names it stands for (Phi-3)
FUSED_PROJECTIONS: Dict[str, tuple] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def default_targets(model_type: Optional[str]) -> Optional[List[str]]:
    """SLIM's default target modules for a transformers ``model_type`` (None: unknown)."""
    if model_type in _NO_MODEL_TYPE:
        return list(_LLAMA)
    found = TRANSFORMERS_MODELS_TO_SLIM_TARGET_MODULES_MAPPING.get(model_type)
    if found is None:
        found = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return None if found is None else list(found)


# -- the config --------------------------------------------------------------------------------
_SLIM_FIELDS = [f for f in dataclasses.fields(SlimConfig) if f.name != "target_modules"]
_ALIASES = {"r": "rank", "lora_alpha": "alpha"}  # LoRA's names of SlimConfig's fields
_BIAS = ("none", "all", "slim_only")
_SINGLE_LORA_INIT = ("initialises one LoRA from the base weight or from data; SLIM's experts "
                     "start as LoRA's do (init_lora_weights=True: A kaiming-uniform, B = 0), or "
                     "with init_lora_weights='gaussian' or False")
# why a LoRA field SLIM does not have is refused (when set to anything but LoRA's default)
_WHY_NOT = {
    "use_dora": "DoRA normalises one merged weight W + BA by a learned magnitude; SLIM's update "
                "is a different mixture of experts for every token (docs/method.md §1), so "
                "there is no single merged weight to normalise",
    "loftq_config": "LoftQ " + _SINGLE_LORA_INIT,
    "eva_config": "EVA " + _SINGLE_LORA_INIT,
    "corda_config": "CorDA " + _SINGLE_LORA_INIT,
    "lora_ga_config": "LoRA-GA " + _SINGLE_LORA_INIT,
    "megatron_config": "Megatron's parallel linear layers are not a base layer SLIM supports",
    "megatron_core": "Megatron's parallel linear layers are not a base layer SLIM supports",
    "trainable_token_indices": "trainable tokens are not implemented for SLIM; train the "
                               "embedding through modules_to_save instead",
    "layer_replication": "layer replication is LoRA-specific model surgery, not implemented "
                         "for SLIM",
    "use_qalora": "QA-LoRA pools the inputs for GPTQ bases, which SLIM does not support",
    "qalora_group_size": "QA-LoRA pools the inputs for GPTQ bases, which SLIM does not support",
    "lora_bias": "SLIM's experts have no bias term (docs/method.md §1); bias='all' or "
                 "'slim_only' trains the base layers' biases instead",
    "target_parameters": "SLIM wraps modules (linear layers), not bare parameters such as "
                         "fused MoE expert tensors",
    "alora_invocation_tokens": "activated LoRA switches the adapter on after invocation "
                               "tokens; SLIM's router decides for every token instead",
    "ensure_weight_tying": "SLIM does not wrap embeddings, so there is nothing to tie",
}


def _lora_only_defaults() -> Dict[str, Any]:
    """LoRA's config fields that SlimPeftConfig does not have, with LoRA's defaults."""
    from peft import LoraConfig

    ours = {f.name for f in dataclasses.fields(SlimPeftConfig)} | set(_ALIASES)
    out = {}
    for f in dataclasses.fields(LoraConfig):
        if f.name in ours:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _field(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return dataclasses.field(default_factory=f.default_factory)
    return dataclasses.field(default=f.default)


@dataclasses.dataclass
class _SlimPeftBase(PeftConfig):
    target_modules: Optional[Union[List[str], str]] = dataclasses.field(
        default=None, metadata={"help": "module names, a regex, or 'all-linear' (PEFT's "
                                        "matching); None: the model type's default"})
    exclude_modules: Optional[Union[List[str], str]] = None
    modules_to_save: Optional[List[str]] = None
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    rank_pattern: Optional[dict] = dataclasses.field(default_factory=dict)
    alpha_pattern: Optional[dict] = dataclasses.field(default_factory=dict)
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: Union[bool, str] = True
    slim_integrity: Optional[dict] = None
    slim_kernels: str = fmt.NOTE_TEXT

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SLIM_PEFT_TYPE
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple, set, frozenset)):
                setattr(self, name, set(v))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        elif self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)  # (PEFT extends it: SEQ_CLS heads)
        if isinstance(self.target_modules, str) and (
                self.layers_to_transform is not None or self.layers_pattern is not None):
            raise ValueError("SlimPeftConfig: layers_to_transform and layers_pattern cannot be "
                             "used when target_modules is a str (a regex): write the layers into "
                             "the regex, or give target_modules as a list of names")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("SlimPeftConfig: layers_pattern is set but layers_to_transform is "
                             "not; layers_pattern only says where the layer index is")
        if self.bias == "lora_only":
            self.bias = "slim_only"  # LoRA's name for it
        if self.bias not in _BIAS:
            raise ValueError(f"SlimPeftConfig.bias={self.bias!r} is invalid: expected one of "
                             f"{', '.join(_BIAS)} ('lora_only' is taken as 'slim_only')")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init == "gaussian"):
            raise ValueError(
                f"SlimPeftConfig.init_lora_weights={self.init_lora_weights!r} is not supported: "
                f"it {_SINGLE_LORA_INIT}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"SlimPeftConfig.fan_in_fan_out={self.fan_in_fan_out!r} is "
                             f"invalid: expected a bool")
        for name, kind in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
            pat = getattr(self, name) or {}
            if not isinstance(pat, dict) or not all(isinstance(k, str) for k in pat):
                raise ValueError(f"SlimPeftConfig.{name}={pat!r} is invalid: expected a dict "
                                 f"from module name (or regex) to a {kind}")
            setattr(self, name, dict(pat))
            for key, value in pat.items():
                try:
                    self.slim_config(**{kind: value})
                except ValueError as e:
                    raise ValueError(f"SlimPeftConfig.{name}[{key!r}]={value!r} is invalid: "
                                     f"{e}") from None
        self.slim_config()  # validates the SLIM fields now, not at the first forward

    # LoRA's names of rank and alpha (read-only; the constructor takes either name)
    @property
    def r(self) -> int:
        return self.rank

    @property
    def lora_alpha(self) -> float:
        return self.alpha

    def slim_config(self, **changes: Any) -> SlimConfig:
        """The :class:`SlimConfig` of this adapter's layers (``changes``: a rank or alpha of
        ``rank_pattern``/``alpha_pattern``, or
        ``target_modules``)."""
        fields = {f.name: getattr(self, f.name) for f in _SLIM_FIELDS}
        fields.update(changes)
        return SlimConfig(**fields)

    def layer_slim_config(self, key: str) -> SlimConfig:
        """The :class:`SlimConfig` of the layer on module ``key`` (rank_pattern and
        alpha_pattern matched as LoRA matches them)."""
        changes = {}
        for pattern, name in ((self.rank_pattern, "rank"), (self.alpha_pattern, "alpha")):
            hit = get_pattern_key(list(pattern), key) if pattern else None
            if hit is not None and hit in pattern:
                changes[name] = pattern[hit]
        return self.slim_config(**changes)

    @classmethod
    def from_slim_config(cls, config: SlimConfig, **peft_fields: Any) -> "SlimPeftConfig":
        """The PEFT config of :class:`SlimConfig` ``config`` (its ``target_modules``, None:
        the model type's default) and the PEFT fields ``peft_fields``."""
        if not isinstance(config, SlimConfig):
            raise TypeError(f"config must be a SlimConfig, got {type(config).__name__}")
        fields = {f.name: getattr(config, f.name) for f in _SLIM_FIELDS}
        if config.target_modules is not None:
            fields["target_modules"] = list(config.target_modules)
        return cls(**fields, **peft_fields)

    def to_json_dict(self, auto_mapping: Optional[dict] = None) -> dict:
        """The adapter_config.json entries (without the integrity record)."""
        d = self.to_dict()
        d["peft_type"] = PEFT_TYPE
        d["task_type"] = getattr(self.task_type, "value", self.task_type)  # (TaskType or str)
        for k, v in d.items():
            if isinstance(v, (set, frozenset)):
                d[k] = sorted(v)
        if auto_mapping is not None:
            d["auto_mapping"] = auto_mapping
        d.pop(fmt.INTEGRITY, None)
        d[fmt.NOTE] = fmt.NOTE_TEXT
        return d

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        **kwargs: Any) -> None:
        """What ``PeftModel.save_pretrained`` (and transformers' adapter save) call after
        writing the tensor file: the config with the integrity record of that file, written
        atomically (a temporary file replaces the old one), and the loading note in
        README.md."""
        d = self.to_json_dict(kwargs.get("auto_mapping_dict"))
        t_path = os.path.join(save_directory, fmt.WEIGHTS_NAME)
        if os.path.isfile(t_path):
            from safetensors.torch import load_file

            d[fmt.INTEGRITY] = fmt.integrity_record(d, load_file(t_path))
        fmt.replace_file(os.path.join(save_directory, fmt.CONFIG_NAME), fmt.config_bytes(d))
        fmt.add_card_note(save_directory)


def _folder_of_call() -> Optional[str]:
    """The adapter folder of the ``PeftConfig.from_pretrained(<folder>)`` call that is building
    a config now (PEFT passes the config class the file's entries, not its path), when that
    folder is local; None otherwise."""
    code = PeftConfigMixin.from_pretrained.__func__.__code__
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        if frame.f_code is code:
            path = frame.f_locals.get("path")
            if isinstance(path, str) and os.path.isfile(os.path.join(path, fmt.CONFIG_NAME)):
                return path
            return None  # a download from the Hub: the tensor file is not there yet
        frame = frame.f_back
    return None


def _prepare_kwargs(kwargs: Dict[str, Any]) -> tuple:
    """The dataclass fields for ``SlimPeftConfig(**kwargs)`` and the tensors checked with
    them (when built from a saved folder): LoRA's names taken, LoRA fields SLIM cannot honour
    refused, unknown fields refused, a saved config's integrity record checked, and its folder
    too when PEFT is loading it."""
    verified = None
    if kwargs.get(fmt.INTEGRITY) is not None:
        folder = _folder_of_call()
        if folder is not None:
            cfg, verified = fmt.read_folder(folder, config=kwargs)
            kwargs = {**{k: v for k, v in kwargs.items() if k in fmt.UNCOVERED}, **cfg}
        else:
            fmt.check_config(kwargs)
    kwargs = dict(kwargs)
    for alias, name in _ALIASES.items():
        if alias in kwargs:
            value = kwargs.pop(alias)
            if name in kwargs and kwargs[name] != value:
                raise ValueError(f"SlimPeftConfig got {alias}={value!r} and {name}="
                                 f"{kwargs[name]!r}: {alias} is LoRA's name for {name}; give one")
            kwargs[name] = value
    known = {f.name for f in dataclasses.fields(SlimPeftConfig)}
    lora_only = _lora_only_defaults()
    for name in sorted(set(kwargs) - known):
        value = kwargs.pop(name)
        if name in lora_only:
            if name == "runtime_config" or value == lora_only[name]:
                continue  # (runtime only) / LoRA's default asks for nothing SLIM does not do
            why = _WHY_NOT.get(name, f"SLIM does not implement LoRA's {name}")
            raise ValueError(f"SlimPeftConfig cannot honour {name}={value!r}: {why}")
        raise ValueError(
            f"SlimPeftConfig got an unknown field {name!r} (an adapter saved by a newer "
            f"slim_kernels? upgrade it). Known fields: {', '.join(sorted(known | set(_ALIASES)))}")
    return kwargs, verified


_FIELDS = [(f.name, f.type, _field(f)) for f in _SLIM_FIELDS]
# SlimConfig's fields (rank, num_lora_experts, ..., balance_coef) as PEFT config fields
SlimPeftConfig = dataclasses.make_dataclass("SlimPeftConfig", _FIELDS, bases=(_SlimPeftBase,))
SlimPeftConfig.__module__ = __name__
SlimPeftConfig.__doc__ = (
    "The PEFT config of a SLIM adapter: LoRA's fields (``target_modules``, ``exclude_modules``, "
    "``modules_to_save``, ``layers_to_transform``, ``layers_pattern``, ``rank_pattern``, "
    "``alpha_pattern``, ``bias``, ``fan_in_fan_out``, ``init_lora_weights``; ``r`` and "
    "``lora_alpha`` are taken for ``rank`` and ``alpha``) plus every field of "
    ":class:`~slim_kernels.SlimConfig` (rank, num_lora_experts, num_identity_experts, top_k, "
    "num_clusters, ...). A LoRA field SLIM cannot honour is refused with the reason.")
_dataclass_init = SlimPeftConfig.__init__


def _init(self, **kwargs: Any) -> None:
    kwargs, verified = _prepare_kwargs(kwargs)
    _dataclass_init(self, **kwargs)
    self._verified = verified  # the checked tensors of a saved folder: loaded at injection


_init.__doc__ = _dataclass_init.__doc__
SlimPeftConfig.__init__ = _init



# -- the layer ---------------------------------------------------------------------------------
class SlimPeftLayer(nn.Module, BaseTunerLayer):
    """A base linear plus one SLIM mixture per adapter (``slim_experts[<name>]``)."""

    adapter_layer_names = ("slim_experts",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SlimConfig,
                 init: Union[bool, str] = True) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slim_experts = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = {}
        self.out_features, self.in_features = base_handler(base_layer).shape(base_layer)
        self.update_layer(adapter_name, config, init)

    def update_layer(self, adapter_name: str, config: SlimConfig,
                     init: Union[bool, str] = True) -> None:
        layer = SlimLinear.from_linear(self.get_base_layer(), config, own_base=False)
        if init is not True and layer.lora_A.device.type != "meta":
            with torch.no_grad():
                if init == "gaussian":  # as LoRA's: A ~ N(0, 1/r), B = 0
                    nn.init.normal_(layer.lora_A, std=1.0 / config.rank)
                else:  # False: B random too (the adapter does not start as the base)
                    E_L, N, r = layer.lora_B.shape
                    nn.init.kaiming_uniform_(layer.lora_B.view(E_L * N, r), a=math.sqrt(5))
        self.slim_experts[adapter_name] = layer
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.slim_experts]
        if self.disable_adapters or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ValueError(
                f"SLIM: adapters {active} are active at once; each routes every token over its "
                f"own experts, and two per-token mixtures do not add up to one: activate one "
                f"adapter (set_adapter)")
        return self.slim_experts[active[0]](x)

    def merge(self, *args, **kwargs) -> None:
        raise ValueError(_NO_MERGE)

    def unmerge(self, *args, **kwargs) -> None:
        pass  # never merged

    def __repr__(self) -> str:
        return "slim." + super().__repr__()


_NO_MERGE = (
    "SLIM adapters cannot be merged into the base weight: the router picks a different mixture "
    "of LoRA and identity experts for every token (docs/method.md §1), so there is no single "
    "weight update W + ΔW that gives the layer's output; keep the adapter (or use unload() to "
    "get the base model back without it)")
_NO_WEIGHTED = (
    "SLIM adapters cannot be combined with add_weighted_adapter: each adapter routes every token "
    "over its own experts with its own router and clusters, and a weighted sum of two adapters' "
    "factors is neither adapter's mixture (nor a mixture of the two); train one SLIM adapter on "
    "the combined data, or switch between adapters with set_adapter")


# -- the snapshot an error puts the model back to -----------------------------------------------
class _Snapshot:
    """The module tree, the parameters' requires_grad and the integration's attributes of a
    model, to put it back exactly as it was when an injection or a load fails."""

    _ATTRS = ("peft_config", "_slim_state")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.children = [(m, dict(m._modules)) for m in model.modules()]
        self.grads = [(p, p.requires_grad) for p in model.parameters()]
        self.attrs = {a: model.__dict__[a] for a in self._ATTRS if a in model.__dict__}

    def restore(self) -> None:
        if "_slim_state" not in self.attrs:
            remove_hooks(self.model)
        for m, children in self.children:
            m._modules.clear()
            m._modules.update(children)
        for p, flag in self.grads:
            p.requires_grad_(flag)
        for a in self._ATTRS:
            if a in self.attrs:
                self.model.__dict__[a] = self.attrs[a]
            else:
                self.model.__dict__.pop(a, None)
        refresh_layers(self.model)


# -- the tuner ---------------------------------------------------------------------------------
class SlimTuner(BaseTuner):
    """PEFT's model class for SLIM: injects :class:`SlimPeftLayer` and installs the aux-loss
    hooks on the model it wraps."""

    prefix = PREFIX
    tuner_layer_cls = SlimPeftLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_SLIM_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """PEFT's injection, all or nothing: on any error the model is put back as it was.
        The tensors a checked saved folder gave the config are loaded into the new layers."""
        snap = _Snapshot(model)
        # the tensors a checked saved folder gave the config (taken: loaded once)
        self._slim_load = self.peft_config[adapter_name].__dict__.pop("_verified", None) or {}
        self._slim_loaded = 0
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            if self._slim_load:  # the checked folder against this model, before anyone loads it
                check_against_model(model, adapter_name, _model_keys(self._slim_load, adapter_name))
            install_hooks(model)
        except BaseException:
            snap.restore()
            raise
        finally:
            self._slim_load = {}
        self._slim_snapshot = (adapter_name, snap)  # until the load that follows (rollback)
        n_layers = len(slim_layer_names(model, adapter_name))
        self._slim_verified = adapter_name if n_layers and self._slim_loaded == n_layers else None

    def rollback(self, adapter_name: str) -> bool:
        """Put the model back as it was before adapter ``adapter_name`` was injected (the last
        injection only); False when that is no longer possible."""
        name, snap = getattr(self, "_slim_snapshot", (None, None))
        if name != adapter_name or snap is None:
            return False
        snap.restore()
        self.peft_config.pop(adapter_name, None)
        self._slim_snapshot = (None, None)
        return True

    def _prepare_adapter_config(self, peft_config, model_config):
        return _resolve_targets(peft_config, model_config)

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        _add_fused_targets(peft_config, model)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent,
                            current_key, **kwargs) -> None:
        if isinstance(target, SlimPeftLayer):
            target.update_layer(adapter_name, peft_config.layer_slim_config(current_key),
                                peft_config.init_lora_weights)
            self._load_verified(current_key, target.slim_experts[adapter_name])
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"module {current_key!r} already carries a PEFT adapter ({type(target).__module__}."
                f"{type(target).__qualname__}): SLIM and another PEFT method cannot wrap the same "
                f"projection; remove {target_name!r} from one of the two target_modules")
        why = unsupported_base(target)
        if why is not None:
            raise TypeError(
                f"SLIM cannot wrap module {current_key!r} ({type(target).__module__}."
                f"{type(target).__qualname__}: {why}); supported base layers: "
                f"{'; '.join(SUPPORTED_BASES)}. Remove it from target_modules")
        # the base layer's kind says how its weight is stored; the config records it (LoRA
        # needs the flag, SLIM's handler does not: so only a wrong True is worth a warning)
        if base_handler(target).fan_in_fan_out:
            peft_config.fan_in_fan_out = True
        elif peft_config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True but module {current_key!r} is a "
                          f"{type(target).__name__} (its weight is stored (out, in)); setting "
                          f"fan_in_fan_out to False")
            peft_config.fan_in_fan_out = False
        new = SlimPeftLayer(target, adapter_name, peft_config.layer_slim_config(current_key),
                            peft_config.init_lora_weights)
        self._replace_module(parent, target_name, new, target)
        self._load_verified(current_key, new.slim_experts[adapter_name])

    def _load_verified(self, key: str, layer: SlimLinear) -> None:
        """Load the checked tensors of the layer on module ``key`` (when they are all there
        and fit: otherwise the load that follows says what is wrong)."""
        tensors = getattr(self, "_slim_load", None)
        if not tensors or layer.lora_A.device.type == "meta":
            return
        sd = {}
        for name, current in layer.state_dict().items():
            v = tensors.get(fmt.peft_key(key, name.rpartition(".")[2]))
            if v is None or v.shape != current.shape:
                return
            sd[name] = v
        with torch.no_grad():
            layer.load_state_dict(sd)
        self._slim_loaded += 1

    def take_verified(self, adapter_name: str) -> bool:
        """Whether every layer of ``adapter_name`` was loaded from checked tensors at its
        injection (asked once, by the load that follows)."""
        hit = getattr(self, "_slim_verified", None) == adapter_name
        self._slim_verified = None
        return hit

    def loaded(self, adapter_name: str) -> None:
        """The load that followed the injection of ``adapter_name`` went through: nothing to
        roll back to any more."""
        if getattr(self, "_slim_snapshot", (None,))[0] == adapter_name:
            self._slim_snapshot = (None, None)

    def add_weighted_adapter(self, *args, **kwargs):
        raise ValueError(_NO_WEIGHTED)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        refresh_layers(self.model)

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(_NO_MERGE)

    def _unload_and_optionally_merge(self, merge=True, *args, **kwargs):
        if merge:
            raise ValueError(_NO_MERGE)
        out = super()._unload_and_optionally_merge(False, *args, **kwargs)
        remove_hooks(self.model)
        return out

    # -- state dicts (PEFT's hooks: save selection, key translation, load remapping) ----------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # the adapter name sits right after slim_experts, also for the clusters' keys
        # (``q_proj.slim_experts.default.clusters.cluster_vars``), where PEFT's rule (the name
        # second to last) would keep it
        part = f".slim_experts.{adapter_name}."
        if part in key:
            return key.replace(part, ".slim_experts.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict,
                                unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict,
                                              unwanted_adapter_names)
        for key, v in out.items():  # refuse before PEFT writes anything
            if type(v) in (torch.Tensor, nn.Parameter):  # (not sharded: save_slim gathers those)
                plain = cls._remove_adapter_name_from_key(key, adapter_name)
                why = fmt.bad_values(plain, v)
                if why is not None:
                    raise ValueError(f"SLIM adapter {adapter_name!r}: {fmt.describe_key(plain)} "
                                     f"{why}; not saved (nothing was written)")
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        # flat cluster keys (PEFT folders of earlier releases) -> attribute paths
        fixed = {}
        for k, v in state_dict.items():
            kind = fmt.tensor_kind(k)
            if kind is not None and kind[1] in _CLUSTER_NAMES and \
                    not k.endswith(f".clusters.{kind[1]}"):
                k = f"{k.rpartition('.')[0]}.clusters.{kind[1]}"
            fixed[k] = v
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, fixed)
        tuner = getattr(model, "base_model", None)
        tuner = tuner if isinstance(tuner, SlimTuner) else None
        if tuner is not None and tuner.take_verified(adapter_name):
            # the layers hold the tensors checked with the config: they win over what PEFT read
            # from the folder again (a save racing the load cannot mix two adapters)
            out.update(_layer_tensors(model, adapter_name))
        try:
            check_against_model(model, adapter_name, out)
        except fmt.SlimLoadError:
            if tuner is not None:
                tuner.rollback(adapter_name)
            raise
        if tuner is not None:
            tuner.loaded(adapter_name)
        return out


def _model_keys(tensors: Dict[str, torch.Tensor], adapter_name: str) -> Dict[str, torch.Tensor]:
    """The SLIM tensors of an adapter file under the keys of the model they are injected into
    (no ``base_model.model.`` prefix, the adapter's name after ``slim_experts``)."""
    part = fmt.SLIM_PART
    return {k[len(fmt.PEFT_PREFIX):].replace(part, f"{part}{adapter_name}.", 1): v
            for k, v in tensors.items() if part in k and k.startswith(fmt.PEFT_PREFIX)}


def _layer_tensors(model: nn.Module, adapter_name: str,
                   keep_vars: bool = False) -> Dict[str, torch.Tensor]:
    """The SLIM tensors adapter ``adapter_name`` holds now, by model key."""
    out = {}
    for name in slim_layer_names(model, adapter_name):
        layer = model.get_submodule(name).slim_experts[adapter_name]
        for t, v in layer.state_dict(keep_vars=keep_vars).items():
            out[f"{name}.slim_experts.{adapter_name}.{t}"] = v
    return out


def check_against_model(model: nn.Module, adapter_name: str, state_dict: Dict[str, Any]) -> None:
    """The tensors ``state_dict`` (model keys, as PEFT loads them) of adapter
    ``adapter_name`` against the SLIM layers of ``model``: every tensor of every layer
    present, no SLIM tensor without a layer, shapes, and values in the dtype the layer holds
    (:class:`~slim_kernels.integrations.adapter_format.SlimLoadError` naming the module)."""
    expected = _layer_tensors(model, adapter_name, keep_vars=True)
    for key, v in expected.items():
        module, t = fmt.tensor_kind(key)
        if key not in state_dict:
            raise fmt.SlimLoadError(
                f"module {module!r} of the model matches target_modules but has no tensors in "
                f"the adapter ({t!r} is missing: a partial file, or the adapter was saved from "
                f"another model)")
        got = state_dict[key]
        if tuple(got.shape) != tuple(v.shape):
            raise fmt.SlimLoadError(
                f"module {module!r}: tensor {t!r} has shape {tuple(got.shape)} in the adapter but "
                f"{tuple(v.shape)} in the model (saved from a model of another shape?)")
        why = fmt.bad_values(fmt.peft_key(module, t), got, v.dtype)
        if why is not None:
            raise fmt.SlimLoadError(f"module {module!r}: tensor {t!r} {why}")
    extra = sorted(k for k in state_dict if ".slim_experts." in k and k not in expected)
    if extra:
        raise fmt.SlimLoadError(
            f"module {fmt.tensor_kind(extra[0])[0]!r} of the adapter does not exist in the "
            f"model or is not selected by its target_modules here ({type(model).__name__}; "
            f"{len(extra)} tensor(s) left over: saved from another model?)")


def _resolve_targets(config, model_config: dict):
    """target_modules None: the model type's default (:func:`default_targets`)."""
    if config.target_modules is None:
        model_type = model_config.get("model_type")
        targets = default_targets(model_type)
        if targets is None:
            raise ValueError(
                f"SLIM has no default target_modules for model type {model_type!r}: set "
                f"SlimPeftConfig(target_modules=[...]) (or 'all-linear')")
        config.target_modules = set(targets)
    return config


def _add_fused_targets(config, model: nn.Module) -> None:
    """target_modules naming all parts of a fused projection (q_proj, k_proj, v_proj for
    Phi-3's qkv_proj) target the fused module; naming only some of them is an error (a SLIM
    layer cannot wrap a slice of a linear)."""
    targets = config.target_modules
    if not isinstance(targets, (set, list, tuple)):
        return
    targets = set(targets)
    for name, _ in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf not in FUSED_PROJECTIONS or leaf in targets:
            continue
        parts = FUSED_PROJECTIONS[leaf]
        named = [p for p in parts if p in targets]
        if named and len(named) < len(parts):
            raise ValueError(
                f"module {name!r} is a fused projection ({leaf} = {' + '.join(parts)}) but "
                f"target_modules names only {named}: a SLIM layer wraps the whole fused linear, "
                f"so target all of {list(parts)} or {leaf!r} itself")
        if named:
            targets.add(leaf)
    if targets != set(config.target_modules):
        config.target_modules = targets


# -- planning and injecting (apply_slim, load_slim) --------------------------------------------
def plan(model: nn.Module, config) -> List[str]:
    """The module names (in model order) that injecting ``config`` (a SlimPeftConfig) into
    ``model`` would wrap, with the injection's matching (a copy of the config is resolved);
    changes nothing."""
    import copy

    from peft.tuners.tuners_utils import _ExcludedModule, _maybe_include_all_linear_layers

    cfg = copy.deepcopy(config)
    cfg.__dict__.pop("_verified", None)
    _resolve_targets(cfg, BaseTuner.get_model_config(model))
    _add_fused_targets(cfg, model)
    cfg = _maybe_include_all_linear_layers(cfg, model)
    inside: List[str] = []
    names = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(p) for p in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside.append(key + ".")  # (an adapter's internals are never targets)
        hit = check_target_module_exists(cfg, key)
        if hit and not isinstance(hit, _ExcludedModule):
            names.append(key)
    return names


def slim_layer_names(model: nn.Module, adapter_name: str) -> List[str]:
    """The names of the modules of ``model`` that carry SLIM adapter ``adapter_name``."""
    return [n for n, m in model.named_modules()
            if isinstance(m, SlimPeftLayer) and adapter_name in m.slim_experts]


def inject(model: nn.Module, config, adapter_name: str = "default", *,
           add_aux_to_loss: bool = True,
           tensors: Optional[Dict[str, torch.Tensor]] = None) -> List[str]:
    """Inject SLIM adapter ``adapter_name`` with ``config`` (a SlimPeftConfig) into
    ``model`` in place (as ``peft.inject_adapter_in_model`` does, with the aux-loss hooks on
    ``model``), then load ``tensors`` (an adapter file's, checked: every tensor of every layer
    present, shapes, values; no tensor left over); all or nothing. Returns the names of the
    wrapped modules."""
    from peft import set_peft_model_state_dict

    snap = _Snapshot(model)
    try:
        if tensors is not None:
            config._verified = tensors  # loaded into each layer as it is created
        SlimTuner(model, config, adapter_name)
        slim_state_of(model).add_aux_to_loss = add_aux_to_loss
        if tensors is not None:  # (the model is no PeftModel: its keys have no prefix)
            plain = {k[len(fmt.PEFT_PREFIX):] if k.startswith(fmt.PEFT_PREFIX) else k: v
                     for k, v in tensors.items()}
            res = set_peft_model_state_dict(model, plain, adapter_name=adapter_name)
            if res.unexpected_keys:
                raise fmt.SlimLoadError(
                    f"the adapter holds tensors that fit no module of this "
                    f"{type(model).__name__}, e.g. {sorted(res.unexpected_keys)[0]!r} "
                    f"({len(res.unexpected_keys)} in all)")
    except BaseException:
        snap.restore()
        raise
    finally:
        config.__dict__.pop("_verified", None)
    return slim_layer_names(model, adapter_name)


# -- registration ------------------------------------------------------------------------------
_REGISTERED = [False]


def register() -> None:
    """Add SLIM to PEFT's method tables (idempotent; all three tables or none). SLIM is not
    registered for PEFT's mixed models (``get_peft_model(..., mixed=True)``), which combine
    the deltas of several methods: PEFT refuses it there."""
    if _REGISTERED[0]:
        return
    from peft import mapping

    tables = (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, mapping.PEFT_TYPE_TO_TUNER_MAPPING,
              mapping.PEFT_TYPE_TO_PREFIX_MAPPING)
    stub = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(PEFT_TYPE)
    if getattr(stub, "_slim_kernels_stub", False):  # (the hook's message; replaced now)
        del mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE]
    taken = [t for t in tables if PEFT_TYPE in t] or (
        [mapping.PEFT_TYPE_TO_PREFIX_MAPPING] if PREFIX in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values()
        else [])
    if taken:
        raise ImportError(f"PEFT already has a method {PEFT_TYPE!r} or prefix {PREFIX!r}; "
                          f"slim_kernels.peft registered nothing")
    for table, value in zip(tables, (SlimPeftConfig, SlimTuner, PREFIX)):
        table[PEFT_TYPE] = value
    _REGISTERED[0] = True


register()
