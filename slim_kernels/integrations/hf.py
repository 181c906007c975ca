"""Drop SLIM into an existing (Hugging Face) model and training loop.

Only :class:`~slim_kernels.SlimLinear` and :class:`~slim_kernels.SlimConfig` are used here:
this module knows nothing of the kernels, and nothing in it needs ``transformers`` itself
(it works on any ``nn.Module`` whose projections are ``nn.Linear``).

* :func:`apply_slim` swaps the projections named by ``config.target_modules`` for SlimLinear,
  freezes every other parameter and installs two hooks on the top-level model:
  - a forward pre-hook that hands every layer the ``attention_mask`` as its ``token_keep``
    (so padding tokens do not move the clusters) and clears the layers' last aux losses;
  - a forward hook that, in training mode and when the output carries a loss (labels were
    given), adds :func:`slim_kernels.aux_loss` to ``outputs.loss``.
* :func:`disable_slim` runs the base model exactly, for before/after comparisons.
* :class:`SlimAuxLossMixin` / :func:`with_slim_aux` for trainers that compute the loss
  themselves instead of reading ``outputs.loss`` (TRL's SFTTrainer, label smoothing,
  ``compute_loss_func``).

Fused projections (Phi-3): ``qkv_proj`` and ``gate_up_proj`` are single ``nn.Linear`` modules.
When ``target_modules`` names all of ``q_proj, k_proj, v_proj`` (resp. ``gate_proj, up_proj``)
and the model has a fused ``qkv_proj`` (resp. ``gate_up_proj``) instead, the fused linear is
wrapped as one SlimLinear (one router and one set of experts over the fused output). Naming only
part of a fused group is an error (a SlimLinear cannot wrap a slice of a linear); name the fused
module itself (``"qkv_proj"``) to target it explicitly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..config import SlimConfig
from ..base_layers import unsupported_base
from ..layer import SlimLinear, accumulate_aux, aux_accumulating, aux_loss, slim_modules

logger = logging.getLogger("slim_kernels")

__all__ = [
    "FUSED_PROJECTIONS",
    "SlimSummary",
    "SlimAuxLossMixin",
    "apply_slim",
    "disable_slim",
    "plan_slim",
    "slim_aux_suppressed",
    "with_slim_aux",
]

# fused module name -> the unfused projection names it stands for
FUSED_PROJECTIONS: Dict[str, Tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclasses.dataclass
class SlimSummary:
    """What :func:`apply_slim` did. Also stored as ``model.slim_summary``."""

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
            f"SLIM: swapped {self.num_layers} linear layers for SlimLinear "
            f"({self.config.num_lora_experts} LoRA + {self.config.num_identity_experts} identity "
            f"experts, rank {self.config.rank}, top-{self.config.top_k}); trainable parameters "
            f"{self.trainable_params:,} of {self.total_params:,} "
            f"({100.0 * self.trainable_share:.3f} %)"
        )


class _SlimState:
    """Per-model state of the integration (kept as ``model._slim_state``)."""

    def __init__(self, add_aux_to_loss: bool, layers: List[SlimLinear]) -> None:
        self.add_aux_to_loss = add_aux_to_loss
        self.layers = layers
        self.handles: list = []
        self.disabled = 0
        self.warned_no_grad = False
        self.warned_fused = False

    def __getstate__(self):
        # a copy of the model (deepcopy, pickle) is outside the disable_slim context the
        # original may be in
        return {**self.__dict__, "disabled": 0}


# -- planning (no mutation) ---------------------------------------------------------------
def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def plan_slim(model: nn.Module, config: SlimConfig) -> List[str]:
    """The qualified names of the modules :func:`apply_slim` would wrap, in model order.
    Changes nothing. Raises if a target matches nothing, if a matching module is not an
    ``nn.Linear``, or if only part of a fused projection is targeted."""
    if not isinstance(config, SlimConfig):
        raise TypeError(f"config must be a SlimConfig, got {type(config).__name__}")
    existing = [n for n, _ in slim_modules(model)]
    if existing:
        raise RuntimeError(
            f"the model already has {len(existing)} SlimLinear layer(s) (e.g. {existing[0]!r}): "
            f"SLIM was applied already; apply_slim/load_slim expect a model without SLIM"
        )
    targets = set(config.target_modules)
    used = set()
    names: List[str] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        leaf = _leaf(name)
        hit = leaf in targets
        if not hit and leaf in FUSED_PROJECTIONS:
            parts = FUSED_PROJECTIONS[leaf]
            named = [p for p in parts if p in targets]
            if named and len(named) < len(parts):
                raise ValueError(
                    f"module {name!r} is a fused projection ({leaf} = {' + '.join(parts)}) but "
                    f"target_modules names only {named}: a SlimLinear wraps the whole fused "
                    f"linear, so target all of {list(parts)} or {leaf!r} itself"
                )
            if named:
                hit = True
                used.update(parts)
        if not hit:
            continue
        why = unsupported_base(mod)
        if why is not None:
            what = f"{type(mod).__module__}.{type(mod).__qualname__}"
            if _is_peft_layer(mod):
                raise TypeError(
                    f"module {name!r} matches target_modules ({leaf!r}) but already carries a "
                    f"PEFT adapter ({what}): SLIM and that adapter cannot wrap the same "
                    f"projection; remove {leaf!r} from one of the two target_modules")
            raise TypeError(
                f"module {name!r} matches target_modules ({leaf!r}) but is a {what}, not "
                f"torch.nn.Linear ({why}): SLIM wraps torch.nn.Linear and quantized linears (bitsandbytes Linear4bit / "
                f"Linear8bitLt) only (e.g. GPT-2's Conv1D is not supported); remove {leaf!r} "
                f"from target_modules or convert the module to nn.Linear"
            )
        used.add(leaf)
        names.append(name)
    unused = sorted(targets - used)
    if unused:
        linear_leaves = sorted({_leaf(n) for n, m in model.named_modules()
                                if n and isinstance(m, nn.Linear)})
        raise ValueError(
            f"target_modules {unused} match no module of {type(model).__name__}; "
            f"its nn.Linear module names are {linear_leaves}. Set SlimConfig.target_modules "
            f"to names that exist"
        )
    return names


def _is_peft_layer(mod: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA, ...): it wraps a ``base_layer`` and knows its adapters."""
    return (not isinstance(mod, SlimLinear) and isinstance(getattr(mod, "base_layer", None), nn.Module)
            and hasattr(mod, "active_adapters"))


def _get_parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
        return model.get_submodule(parent_name), child
    return model, name


def swap_in(model: nn.Module, config: SlimConfig, names: Sequence[str],
            add_aux_to_loss: bool, then=None) -> List[Tuple[str, SlimLinear]]:
    """Mutate: wrap ``names``, freeze the rest, install the hooks, call ``then(layers)``.
    All or nothing: on any error the model is put back as it was."""
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    swapped: List[Tuple[nn.Module, str, nn.Module]] = []
    try:
        layers = []
        for name in names:
            parent, child = _get_parent(model, name)
            old = getattr(parent, child)
            new = SlimLinear.from_linear(old, config)
            setattr(parent, child, new)
            swapped.append((parent, child, old))
            layers.append((name, new))
        slim_params = {id(p) for _, m in layers for p in (m.lora_A, m.lora_B, m.router)}
        # an adapter of another PEFT method already on the model stays as the user set it
        keep = {id(p) for m in model.modules() if _is_peft_layer(m)
                for n, p in m.named_parameters() if not n.startswith("base_layer.") and p.requires_grad}
        for p in model.parameters():
            p.requires_grad_(id(p) in slim_params or id(p) in keep)
        _install_hooks(model, add_aux_to_loss, [m for _, m in layers])
        if then is not None:
            then(layers)
        return layers
    except BaseException:
        for parent, child, old in reversed(swapped):
            setattr(parent, child, old)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        _remove_hooks(model)
        raise


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


def apply_slim(model: nn.Module, config: Optional[SlimConfig] = None, verbose: bool = True, *,
               add_aux_to_loss: bool = True) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` whose name ends in one of ``config.target_modules``
    for :class:`SlimLinear` (same weight/bias tensors), freeze every other parameter and
    return ``model``.

    The summary (layers swapped, trainable parameters and their share) is logged (logger
    ``slim_kernels``, level INFO) when ``verbose`` and kept as ``model.slim_summary`` (a :class:`SlimSummary`).

    With ``add_aux_to_loss`` (default), in training mode, whenever the model returns a loss
    (labels given), ``outputs.loss`` includes :func:`slim_kernels.aux_loss`; when the trainer
    passes ``num_items_in_batch`` (HF Trainer with gradient accumulation) the aux loss is
    weighted by this micro-batch's share of the label tokens, so it is counted once per
    optimizer step. The attention mask of every forward is handed to the layers
    (each layer's ``token_keep``) either way.

    Errors (the model is left unchanged): SLIM already applied; a target name that matches
    nothing; a matching module that is not ``nn.Linear`` (e.g. GPT-2's Conv1D); only part of
    a fused projection targeted. See the module docstring for fused projections (Phi-3).
    """
    if config is None:
        config = SlimConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, "_slim_state", None) is not None:
        raise RuntimeError("apply_slim was already called on this model (it has SLIM hooks)")
    names = plan_slim(model, config)
    swap_in(model, config, names, add_aux_to_loss)
    summary = summarize(model, names, config)
    model.slim_summary = summary
    if verbose:
        logger.info("%s", summary)
    return model


# -- hooks --------------------------------------------------------------------------------
def _find_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> Optional[Tensor]:
    m = kwargs.get("attention_mask")
    if m is None and len(args) >= 2 and isinstance(args[1], Tensor) and isinstance(args[0], Tensor):
        # positional (input_ids, attention_mask, ...) as in every *ForCausalLM.forward
        if args[1].shape == args[0].shape[:2]:
            m = args[1]
    if not isinstance(m, Tensor) or m.dim() != 2:
        return None  # 4-D / float masks: no per-token padding information we can trust
    if m.is_floating_point():
        return None
    return m  # the layers read it as bool (nonzero: a real token)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    st: _SlimState = module._slim_state
    mask = _find_attention_mask(module, args, kwargs)
    reset = not aux_accumulating()  # (SlimAuxLossMixin: every forward of one loss counts)
    for layer in st.layers:
        layer.token_keep = mask  # padding tokens do not move the clusters
        if reset:
            layer.reset_aux_loss()  # aux_loss(model) then reflects this forward only
    return None


_SUPPRESS: List[int] = [0]


@contextlib.contextmanager
def slim_aux_suppressed() -> Iterator[None]:
    """Within this context the forward hook does not add the SLIM aux loss to
    ``outputs.loss`` (used by :class:`SlimAuxLossMixin`, which adds it itself)."""
    _SUPPRESS[0] += 1
    try:
        yield
    finally:
        _SUPPRESS[0] -= 1


def _label_count(module: nn.Module, kwargs: dict) -> Optional[Tensor]:
    """Label tokens of this micro-batch, counted as HF Trainer counts num_items_in_batch."""
    if kwargs.get("shift_labels") is not None:
        return kwargs["shift_labels"].ne(-100).sum()
    labels = kwargs.get("labels")
    if not isinstance(labels, Tensor):
        return None
    if type(getattr(module, "model", module)).__name__.endswith("ForCausalLM") or \
            type(module).__name__.endswith("ForCausalLM"):
        labels = labels[..., 1:]
    return labels.ne(-100).sum()


def _weighted_aux(module: nn.Module, kwargs: dict) -> Optional[Tensor]:
    layers = module._slim_state.layers
    if not any(m.has_aux_loss() for m in layers):
        return None
    aux = aux_loss(module)
    n_all = kwargs.get("num_items_in_batch")
    if n_all is not None:
        n_here = _label_count(module, kwargs)
        if n_here is not None:
            if isinstance(n_all, Tensor):
                n_all = n_all.to(aux.device).float().reshape(-1)[0]
            aux = aux * (n_here.to(aux.device).float() / n_all)
    st: _SlimState = module._slim_state
    if not st.warned_no_grad and torch.is_grad_enabled() and any(
            m.tracker.balance is not None and not m.tracker.balance.requires_grad
            for m in layers):
        st.warned_no_grad = True
        warnings.warn(
            "slim_kernels: the SLIM aux loss has no gradient in this forward (with reentrant "
            "gradient checkpointing the first forward runs under no_grad, so the load-balance "
            "term from the gates is a constant). Use use_reentrant=False to train it.",
            RuntimeWarning, stacklevel=2,
        )
    return aux


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    st: _SlimState = module._slim_state
    try:
        if output is None or not st.add_aux_to_loss or st.disabled or _SUPPRESS[0]:
            return None
        if not module.training:
            return None
        if kwargs.get("fused_lm_head") and not st.warned_fused and torch.is_grad_enabled() and any(
                m.has_aux_loss() for m in st.layers):
            # TRL's fused LM head: SFTTrainer computes its loss from outputs.log_probs and never
            # reads outputs.loss, so the aux loss added below would be lost (a no_grad forward,
            # e.g. GRPO scoring its completions, trains nothing: no warning).
            st.warned_fused = True
            warnings.warn(
                "slim_kernels: this forward uses TRL's fused LM head, whose trainer ignores "
                "outputs.loss, so the SLIM aux loss does not reach training. Use "
                "slim_kernels.with_slim_aux(SFTTrainer) (or add slim_kernels.aux_loss(model) to "
                "the loss yourself).", RuntimeWarning, stacklevel=2)
        if isinstance(output, dict) or hasattr(output, "keys"):
            loss = output.get("loss") if hasattr(output, "get") else None
            if loss is None:
                return None
            aux = _weighted_aux(module, kwargs)
            if aux is None:
                return None
            output["loss"] = loss + aux.to(loss.dtype)  # ModelOutput keeps .loss in sync
            return output
        if isinstance(output, tuple) and output and (
                kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None):
            loss = output[0]
            if isinstance(loss, Tensor) and loss.dim() == 0:
                aux = _weighted_aux(module, kwargs)
                if aux is None:
                    return None
                return (loss + aux.to(loss.dtype),) + tuple(output[1:])
        return None
    finally:
        for layer in st.layers:
            layer.token_keep = None


def _install_hooks(model: nn.Module, add_aux_to_loss: bool, layers: List[SlimLinear]) -> None:
    st = _SlimState(add_aux_to_loss, layers)
    model._slim_state = st
    st.handles.append(model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
    st.handles.append(model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True))


def _remove_hooks(model: nn.Module) -> None:
    st = getattr(model, "_slim_state", None)
    if st is None:
        return
    for h in st.handles:
        h.remove()
    del model._slim_state


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
    st = getattr(model, "_slim_state", None)
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


def _slim_state_of(inner: nn.Module):
    """The integration state of a model: apply_slim's (on the model) or SLIM-PEFT's (on the
    tuner model inside a PeftModel)."""
    st = getattr(inner, "_slim_state", None)
    if st is None:
        st = getattr(getattr(inner, "base_model", None), "_slim_state", None)
    return st


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
        st = _slim_state_of(inner)
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
