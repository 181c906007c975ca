"""SLIM as a PEFT method: ``get_peft_model(model, SlimPeftConfig(...))``.

From the user's side SLIM is then used exactly like LoRA: ``print_trainable_parameters``,
``save_pretrained`` / ``PeftModel.from_pretrained`` (the cluster buffers are saved with the
factors and the router), several named adapters (``add_adapter``, ``set_adapter``,
``delete_adapter``), ``disable_adapter()`` (the base model exactly), ``target_modules`` with
PEFT's matching (names, regex, ``"all-linear"``, ``exclude_modules``), bitsandbytes bases.

Each targeted projection becomes a :class:`SlimPeftLayer`: it wraps the ``base_layer`` and
holds one :class:`~slim_kernels.SlimLinear` per adapter (``slim_experts[<name>]``), which
borrows that base layer (it is not saved twice) and runs the fused op on its weight.
The SLIM aux loss (docs/method.md §4) reaches ``outputs.loss`` through the same hooks as
:func:`~slim_kernels.apply_slim`, installed on the tuner model.

PEFT has no public way to add a method outside its fixed ``PeftType`` list; ``PeftType`` is
a string enum and its mapping tables take string keys, so :func:`register` fills those tables
directly. That is done in one place, only for the PEFT versions this was tested with
(``TESTED_PEFT``); on another version importing this module raises an ImportError that says so
and registers nothing.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Union

import torch
from torch import nn

from ..config import SlimConfig
from ..base_layers import unsupported_base
from ..layer import SlimLinear, slim_modules
from . import hf as _hf

PEFT_TYPE = "SLIM"
PREFIX = "slim_"
TESTED_PEFT = ("0.21.",)  # version prefixes the registration was tested with

try:
    import peft as _peft
except ImportError as e:  # pragma: no cover - peft is a test dependency
    raise ImportError("slim_kernels.peft needs the peft package (pip install peft)") from e

if not _peft.__version__.startswith(TESTED_PEFT):
    raise ImportError(
        f"slim_kernels.peft registers SLIM into PEFT's internal method tables, which change "
        f"between PEFT releases; it was tested with peft {', '.join(v + 'x' for v in TESTED_PEFT)} "
        f"but peft {_peft.__version__} is installed. Nothing was registered. Install a tested "
        f"peft, or use slim_kernels.apply_slim / save_slim / load_slim, which do not need PEFT.")

from peft.config import PeftConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer  # noqa: E402

__all__ = ["SlimPeftConfig", "SlimPeftLayer", "SlimTuner", "register", "PEFT_TYPE"]

_SLIM_FIELDS = [f for f in dataclasses.fields(SlimConfig) if f.name != "target_modules"]


def _field(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return dataclasses.field(default_factory=f.default_factory)
    return dataclasses.field(default=f.default)


@dataclasses.dataclass
class _SlimPeftBase(PeftConfig):
    target_modules: Optional[Union[List[str], str]] = dataclasses.field(
        default=None, metadata={"help": "module names, a regex, or 'all-linear' (PEFT's matching)"})
    exclude_modules: Optional[Union[List[str], str]] = dataclasses.field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = set(self.exclude_modules)
        self.slim_config()  # validates the SLIM fields now, not at the first forward

    def slim_config(self) -> SlimConfig:
        """The :class:`SlimConfig` of each layer of this adapter."""
        return SlimConfig(**{f.name: getattr(self, f.name) for f in _SLIM_FIELDS})


# SlimConfig's fields (rank, num_lora_experts, ..., balance_coef) as PEFT config fields
SlimPeftConfig = dataclasses.make_dataclass(
    "SlimPeftConfig", [(f.name, f.type, _field(f)) for f in _SLIM_FIELDS], bases=(_SlimPeftBase,))
SlimPeftConfig.__module__ = __name__
SlimPeftConfig.__doc__ = (
    "The PEFT config of a SLIM adapter: ``target_modules``/``exclude_modules`` as in "
    "``LoraConfig`` plus every field of :class:`~slim_kernels.SlimConfig` (rank, "
    "num_lora_experts, num_identity_experts, top_k, num_clusters, ...).")


class SlimPeftLayer(nn.Module, BaseTunerLayer):
    """A base linear plus one SLIM mixture per adapter (``slim_experts[<name>]``)."""

    adapter_layer_names = ("slim_experts",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SlimPeftConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slim_experts = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = {}
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SlimPeftConfig) -> None:
        layer = SlimLinear.from_linear(self.get_base_layer(), config.slim_config(), own_base=False)
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


class SlimTuner(BaseTuner):
    """PEFT's model class for SLIM: injects :class:`SlimPeftLayer` and installs the aux-loss
    hooks of :func:`slim_kernels.apply_slim` on itself."""

    prefix = PREFIX
    tuner_layer_cls = SlimPeftLayer

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs):
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        if getattr(self, "_slim_state", None) is None:
            _hf._install_hooks(self, True, [])
        self._refresh_layers()

    def _refresh_layers(self) -> None:
        st = getattr(self, "_slim_state", None)
        if st is not None:
            st.layers = [m for _, m in slim_modules(self.model)]

    def inject_adapter(self, *args, **kwargs):
        out = super().inject_adapter(*args, **kwargs)
        self._refresh_layers()
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._refresh_layers()

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            peft_config.target_modules = set(SlimConfig().target_modules)
        return peft_config

    def _check_new_adapter_config(self, config) -> None:
        pass

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent,
                            current_key, **kwargs) -> None:
        if isinstance(target, SlimPeftLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"module {current_key!r} already carries a {type(target).__name__} adapter: SLIM "
                f"and another PEFT method cannot wrap the same projection")
        why = unsupported_base(target)
        if why is not None:
            raise TypeError(
                f"SLIM cannot wrap module {current_key!r} ({type(target).__module__}."
                f"{type(target).__qualname__}: {why}); it wraps torch.nn.Linear and "
                f"bitsandbytes Linear4bit / Linear8bitLt")
        new = SlimPeftLayer(target, adapter_name, peft_config)
        self._replace_module(parent, target_name, new, target)

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(_NO_MERGE)

    def _unload_and_optionally_merge(self, merge=True, *args, **kwargs):
        if merge:
            raise ValueError(_NO_MERGE)
        out = super()._unload_and_optionally_merge(False, *args, **kwargs)
        _hf._remove_hooks(self)
        return out


_REGISTERED = [False]


def register() -> None:
    """Add SLIM to PEFT's method tables (idempotent; all four tables or none)."""
    if _REGISTERED[0]:
        return
    from peft import mapping

    tables = (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, mapping.PEFT_TYPE_TO_TUNER_MAPPING,
              mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING, mapping.PEFT_TYPE_TO_PREFIX_MAPPING)
    taken = [t for t in tables if PEFT_TYPE in t] or (
        [mapping.PEFT_TYPE_TO_PREFIX_MAPPING] if PREFIX in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values()
        else [])
    if taken:
        raise ImportError(f"PEFT already has a method {PEFT_TYPE!r} or prefix {PREFIX!r}; "
                          f"slim_kernels.peft registered nothing")
    values = (SlimPeftConfig, SlimTuner, SlimTuner, PREFIX)
    for table, value in zip(tables, values):
        table[PEFT_TYPE] = value
    _REGISTERED[0] = True


register()
