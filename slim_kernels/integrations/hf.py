"""Drop SLIM into an existing (Hugging Face) model and training loop.

* :func:`apply_slim` is a convenience over the PEFT tuner (:mod:`slim_kernels.integrations.peft`,
  the one way SLIM gets into a model): it injects a SLIM adapter into the model itself, as
  ``peft.inject_adapter_in_model`` (or transformers' ``model.add_adapter``) does with a LoRA:
  every target becomes a ``SlimPeftLayer`` holding the base layer and a
  :class:`~slim_kernels.SlimLinear`; every other parameter is frozen; two hooks on the model
  add the SLIM aux loss to ``outputs.loss`` and hand the attention mask to the layers
  (:mod:`slim_kernels.integrations.hooks`). It takes a :class:`SlimConfig` (or a
  ``SlimPeftConfig`` for PEFT's other fields) and checks more than PEFT does: every name in
  ``target_modules`` must match, and SLIM must not be on the model already.
* :func:`disable_slim` runs the base model exactly, for before/after comparisons.
* :class:`SlimAuxLossMixin` / :func:`with_slim_aux` for trainers that compute the loss
  themselves instead of reading ``outputs.loss`` (TRL's SFTTrainer, label smoothing,
  ``compute_loss_func``).

Fused projections (Phi-3): ``qkv_proj`` and ``gate_up_proj`` are single linear modules, wrapped
by default. When ``target_modules`` names all of ``q_proj, k_proj, v_proj`` (resp. ``gate_proj,
up_proj``) and the model has a fused ``qkv_proj`` (resp. ``gate_up_proj``) instead, the fused
linear is wrapped as one SLIM layer (one router and one set of experts over the fused output).
Naming only part of a fused group is an error (a SLIM layer cannot wrap a slice of a linear).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from typing import Iterator, List, Union

import torch
from torch import nn

from ..config import SlimConfig
from ..layer import accumulate_aux, aux_loss, slim_modules
from .hooks import slim_aux_suppressed, slim_state_of

logger = logging.getLogger("slim_kernels")

__all__ = [
    "SlimSummary",
    "SlimAuxLossMixin",
    "apply_slim",
    "disable_slim",
    "plan_slim",
    "slim_aux_suppressed",
    "with_slim_aux",
]


@dataclasses.dataclass
class SlimSummary:
    """What :func:`apply_slim` (or :func:`~slim_kernels.load_slim`) did. Also stored as
    ``model.slim_summary``. ``layers``: the names of the wrapped modules."""

    layers: List[str]
    trainable_params: int
    total_params: int
    config: SlimConfig

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (
            f"SLIM: swapped {self.num_layers} linear layers for SLIM layers "
            f"({self.config.num_lora_experts} LoRA + {self.config.num_identity_experts} identity "
            f"experts, rank {self.config.rank}, top-{self.config.top_k}); trainable parameters "
            f"{self.trainable_params:,} of {self.total_params:,} "
            f"({100.0 * self.trainable_share:.3f} %)"
        )


# -- planning (no mutation) ---------------------------------------------------------------
def _peft_config(config):
    """A SlimPeftConfig for ``config`` (a SlimConfig, or a SlimPeftConfig as it is)."""
    from .peft import SlimPeftConfig

    if isinstance(config, SlimPeftConfig):
        return config
    if not isinstance(config, SlimConfig):
        raise TypeError(f"config must be a SlimConfig (or a SlimPeftConfig), got "
                        f"{type(config).__name__}")
    return SlimPeftConfig.from_slim_config(config)


def slim_target_model(model: nn.Module) -> nn.Module:
    """The model SLIM goes into: the model inside a PeftModel (another method's adapters stay
    where they are), else the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def plan_slim(model: nn.Module, config: Union[SlimConfig, "object"]) -> List[str]:
    """The qualified names of the modules :func:`apply_slim` would wrap, in model order.
    Changes nothing. Raises if SLIM is on the model already, if a name in
    ``config.target_modules`` matches no module, or if only part of a fused projection is
    targeted (a matching module that is no supported linear raises at :func:`apply_slim`)."""
    from .peft import plan

    peft_config = _peft_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    existing = [n for n, _ in slim_modules(model)]
    if existing:
        raise RuntimeError(
            f"the model already has {len(existing)} SLIM layer(s) (e.g. {existing[0]!r}): "
            f"SLIM was applied already; apply_slim/load_slim expect a model without SLIM")
    base = slim_target_model(model)
    names = plan(base, peft_config)
    targets = peft_config.target_modules
    if isinstance(targets, (set, list, tuple)):  # every name the user gave must match
        from ..base_layers import unsupported_base
        from .peft import FUSED_PROJECTIONS

        leaves = {n.rpartition(".")[2] for n in names}
        covered = leaves | {p for leaf in leaves for p in FUSED_PROJECTIONS.get(leaf, ())}
        unused = sorted(t for t in targets if t not in covered
                        and not any(n == t or n.endswith("." + t) for n in names))
        if unused:
            linear = sorted({n.rpartition(".")[2] for n, m in base.named_modules()
                             if n and unsupported_base(m) is None})
            raise ValueError(
                f"target_modules {unused} match no module of {type(base).__name__}; its linear "
                f"module names are {linear}. Set target_modules to names that exist")
    if not names:
        raise ValueError(f"target_modules {targets!r} match no module of {type(base).__name__}")
    return names


def summarize(model: nn.Module, names: List[str], config: SlimConfig) -> SlimSummary:
    seen = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return SlimSummary(layers=list(names), trainable_params=trainable, total_params=total,
                       config=config)


def apply_slim(model: nn.Module, config: Union[SlimConfig, "object", None] = None,
               verbose: bool = True, *, add_aux_to_loss: bool = True,
               adapter_name: str = "default") -> nn.Module:
    """Wrap, in place, every module of ``model`` that ``config.target_modules`` names (None:
    the model type's projections, :class:`SlimConfig`) in a SLIM layer over the same
    weight/bias tensors, freeze every other parameter and return ``model``. ``config``: a
    :class:`SlimConfig`, or a ``SlimPeftConfig`` (``modules_to_save``, ``layers_to_transform``,
    ``rank_pattern``, ``bias``, ...). The injection is PEFT's, through SLIM's PEFT tuner
    (what ``get_peft_model`` does, without the ``PeftModel`` wrapper).

    The summary (layers wrapped, trainable parameters and their share) is logged (logger
    ``slim_kernels``, level INFO) when ``verbose`` and kept as ``model.slim_summary`` (a
    :class:`SlimSummary`).

    With ``add_aux_to_loss`` (default), in training mode, whenever the model returns a loss
    (labels given), ``outputs.loss`` includes :func:`slim_kernels.aux_loss`; when the trainer
    passes ``num_items_in_batch`` (HF Trainer with gradient accumulation) the aux loss is
    weighted by this micro-batch's share of the label tokens, so it is counted once per
    optimizer step. The attention mask of every forward is handed to the layers
    (each layer's ``token_keep``) either way.

    Errors (the model is left unchanged): SLIM already applied; a target name that matches
    nothing; a matching module that is no supported linear (``nn.Linear``, GPT-2's
    ``Conv1D``, bitsandbytes, ``dequantize()``); only part of a fused projection targeted.
    """
    from .peft import inject

    if config is None:
        config = SlimConfig()
    peft_config = _peft_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if slim_state_of(slim_target_model(model)) is not None:
        raise RuntimeError("apply_slim was already called on this model (it has SLIM hooks)")
    plan_slim(model, peft_config)
    names = inject(slim_target_model(model), peft_config, adapter_name, add_aux_to_loss=add_aux_to_loss)
    model.slim_summary = summarize(model, names, config if isinstance(config, SlimConfig)
                                   else peft_config.slim_config(target_modules=tuple(names)))
    if verbose:
        logger.info("%s", model.slim_summary)
    return model


# -- base model on demand -----------------------------------------------------------------
_DISABLED = [0]  # disable_slim contexts open in this process
_BACKWARD = [None]  # the wrapper below while installed as torch.autograd.backward
_DISABLED_LOCK = threading.Lock()
_NO_GRAD_MSG = "does not require grad and does not have a grad_fn"


def _explain_no_grad(backward):
    """``torch.autograd.backward`` (which ``Tensor.backward`` calls), with autograd's generic
    error for a loss without a graph explained while a disable_slim context is open."""
    @functools.wraps(backward)
    def wrapper(*args, **kwargs):
        try:
            return backward(*args, **kwargs)
        except RuntimeError as e:
            if not _DISABLED[0] or _NO_GRAD_MSG not in str(e) or "disable_slim" in str(e):
                raise
            raise RuntimeError(
                f"{e}: the SLIM adapters are disabled here (inside slim_kernels.disable_slim), "
                f"so every SlimLinear computes only its frozen base linear and this loss has "
                f"nothing to train unless some other parameter requires grad. Compute the loss "
                f"you train on outside disable_slim.") from e
    return wrapper


def _open_disabled() -> None:
    with _DISABLED_LOCK:
        if _DISABLED[0] == 0 and torch.autograd.backward is not _BACKWARD[0]:
            _BACKWARD[0] = torch.autograd.backward = _explain_no_grad(torch.autograd.backward)
        _DISABLED[0] += 1


def _close_disabled() -> None:
    with _DISABLED_LOCK:
        _DISABLED[0] -= 1
        if _DISABLED[0] == 0 and torch.autograd.backward is _BACKWARD[0]:
            # (left in place, inert, if something wrapped it in the meantime)
            torch.autograd.backward = _BACKWARD[0].__wrapped__


@contextlib.contextmanager
def disable_slim(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context every SlimLinear of ``model`` computes only its base linear
    (``F.linear(x, W, b)``, exactly what the original ``nn.Linear`` computed): no experts, no
    cluster update, no routing statistics, no aux loss. Nests; restores on exit. A copy of the
    model made inside (deepcopy, pickle) is not disabled.

    A loss computed here usually has no gradient (apply_slim froze every other parameter):
    ``loss.backward()`` inside the context then raises an error that says so, instead of
    autograd's generic "element 0 of tensors does not require grad". (Outside the context,
    such a loss gets autograd's message.)"""
    layers = [m for _, m in slim_modules(model)]
    if not layers:
        raise ValueError(f"disable_slim: {type(model).__name__} has no SlimLinear layers")
    st = slim_state_of(model)
    _open_disabled()
    for m in layers:
        m.disabled += 1
    if st is not None:
        st.disabled += 1
    try:
        yield model
    finally:
        if st is not None and st.disabled:
            st.disabled -= 1
        for m in layers:
            m.disabled = max(0, m.disabled - 1)
        _close_disabled()


# -- trainers that compute their own loss ---------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate / torch.compile wrappers."""
    inner = model
    for _ in range(8):
        if isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module
        else:
            break
    return inner


class SlimAuxLossMixin:
    """Mix into a ``transformers.Trainer`` subclass whose ``compute_loss`` does not return
    the model's ``outputs.loss`` (TRL's SFTTrainer with its fused LM head, DPOTrainer,
    GRPOTrainer, label smoothing, ``compute_loss_func``): adds :func:`slim_kernels.aux_loss` to
    the loss of every training step, once per optimizer step under gradient accumulation
    (``aux / steps`` when the trainer does not divide the loss itself), and logs it as
    ``slim_aux_loss`` (the mean per micro-batch, undivided: the same value whatever the
    accumulation). A loss computed from several forwards (GRPO's chunks) counts the
    load-balance term of each (their mean, :func:`slim_kernels.tracking.accumulate_aux`); forwards
    with the adapters disabled (a DPO/GRPO reference through ``disable_adapter``) add none."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = unwrap_model(model)
        layers = [m for _, m in slim_modules(inner)]
        for m in layers:
            m.reset_aux_loss()
        with slim_aux_suppressed(), accumulate_aux():
            res = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        if not model.training:
            return res
        loss, outputs = res if return_outputs else (res, None)
        st = slim_state_of(inner)
        if st is not None and (not st.add_aux_to_loss or st.disabled):
            return res
        if any(m.has_aux_loss() for m in layers):
            aux = aux_loss(inner)
            self._slim_aux_sum = getattr(self, "_slim_aux_sum", 0.0) + float(aux.detach())
            self._slim_aux_n = getattr(self, "_slim_aux_n", 0) + 1
            # Trainer divides the loss by the accumulation steps itself unless the loss was
            # normalised by num_items_in_batch (or by compute_loss_func); then the aux must be
            # divided here (the same rule as Trainer.training_step).
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (bool(getattr(self, "model_accepts_loss_kwargs", False))
                          and num_items_in_batch is not None) or \
                    getattr(self, "compute_loss_func", None) is not None
            if scaled:
                aux = aux / max(1, int(getattr(self, "current_gradient_accumulation_steps", 1)))
            loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        n = getattr(self, "_slim_aux_n", 0)
        if n and "loss" in logs:
            logs["slim_aux_loss"] = self._slim_aux_sum / n
            self._slim_aux_sum, self._slim_aux_n = 0.0, 0
        if "loss" in logs and getattr(self, "model", None) is not None:
            # steps the clusters left out (docs/method.md §2): read here, where the trainer
            # reads its loss back anyway, not in the forward (no host sync there); warns once
            rejected = sum(m.clusters.check_rejected()
                           for _, m in slim_modules(unwrap_model(self.model)))
            if rejected:
                logs["slim_rejected_cluster_steps"] = rejected
        return super().log(logs, *args, **kwargs)


def with_slim_aux(trainer_cls: type) -> type:
    """``SlimSFTTrainer = with_slim_aux(trl.SFTTrainer)``: the trainer class with
    :class:`SlimAuxLossMixin` mixed in."""
    return type(f"Slim{trainer_cls.__name__}", (SlimAuxLossMixin, trainer_cls), {})
