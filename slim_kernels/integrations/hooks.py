"""The two hooks every SLIM model carries on its top-level module (``apply_slim``'s model, or
the model inside a ``PeftModel``), installed by the PEFT tuner when it injects the first SLIM
adapter:

* a forward pre-hook that hands every SLIM layer the ``attention_mask`` as its ``token_keep``
  (so padding tokens do not move the clusters) and clears the layers' last aux losses;
* a forward hook that, in training mode and when the output carries a loss (labels were
  given), adds :func:`slim_kernels.aux_loss` to ``outputs.loss``.

The integration's per-model state is kept as ``model._slim_state`` (:func:`slim_state_of`).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, List, Optional

import torch
from torch import Tensor, nn

from ..layer import SlimLinear, aux_accumulating, aux_loss

__all__ = ["install_hooks", "refresh_layers", "remove_hooks", "slim_aux_suppressed",
           "slim_state_of"]


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


def install_hooks(model: nn.Module, add_aux_to_loss: bool = True) -> None:
    """Install the two hooks on ``model`` (once: a second call only refreshes the layer list,
    as for a second adapter) and record the SLIM layers it holds now."""
    st = getattr(model, "_slim_state", None)
    if st is None:
        st = _SlimState(add_aux_to_loss, [])
        model._slim_state = st
        st.handles.append(model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        st.handles.append(model.register_forward_hook(_post_hook, with_kwargs=True,
                                                      always_call=True))
    refresh_layers(model)


def refresh_layers(model: nn.Module) -> None:
    """After adapters were added or removed: the layers the hooks serve."""
    from ..layer import slim_modules

    st = getattr(model, "_slim_state", None)
    if st is not None:
        st.layers = [m for _, m in slim_modules(model)]


def remove_hooks(model: nn.Module) -> None:
    st = getattr(model, "_slim_state", None)
    if st is None:
        return
    for h in st.handles:
        h.remove()
    del model._slim_state


def slim_state_of(model: nn.Module):
    """The integration state of a model: on the model itself, or on the model inside a
    ``PeftModel`` (``get_base_model()``); None without SLIM hooks."""
    st = model.__dict__.get("_slim_state")
    if st is None and callable(getattr(model, "get_base_model", None)):
        st = getattr(model.get_base_model(), "__dict__", {}).get("_slim_state")
    return st
