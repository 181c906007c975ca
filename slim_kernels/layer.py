"""SlimLinear: a frozen base linear plus a SLIM mixture of LoRA and identity experts.

The layer wraps its base as ``base_layer`` (an ``nn.Linear``, or a quantized linear such as
bitsandbytes' ``Linear4bit``/``Linear8bitLt``) and owns what is *state*: the LoRA factors,
the router, the sliding clusters, the dynamic-merging masks and the auxiliary losses. The
maths runs in one op (:func:`slim_kernels.ops.slim_linear_op`), whose backend the layer does
not know, called with the base weight (dequantized for a quantized base).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BUILD_FIELDS, SHAPE_FIELDS, SlimConfig
from . import cluster_sync as _dist
from .ops import slim_linear_op
from .routing import cluster_batch_stats, cluster_distance, merge_masks

__all__ = ["SlimLinear", "aux_loss", "routing_stats", "token_mask", "slim_modules",
           "base_weight", "unsupported_base", "accumulate_aux", "aux_accumulating", "slim_keys"]

SUPPORTED_BASES = ("torch.nn.Linear (floating-point weight)", "bitsandbytes Linear4bit",
                   "bitsandbytes Linear8bitLt",
                   "a linear-like module with in_features, out_features, bias and a "
                   "dequantize() method returning the (out, in) weight")

# A mask of the real (non-padding) tokens of the current forward, set by the integrations
# (see :func:`token_mask`); padding tokens then do not move the clusters.
_TOKEN_MASK: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar(
    "slim_token_mask", default=None
)
# the layer's own state-dict entries (everything else is the base layer's)
SLIM_KEYS = ("lora_A", "lora_B", "router", "cluster_centers", "cluster_vars", "cluster_initialized")
# and those of a layer with distance_scale="spread" (docs/method.md §2): the running mean and
# variance of r, fp32 scalars
DISTANCE_KEYS = ("distance_mean", "distance_var")
# their values in a layer whose clusters are not initialised yet, and in a state dict saved
# without them: mu = 1, sigma² = 1, so that d = (r - 1) / sqrt(1 + eps), the paper's d
# (up to that factor)
DISTANCE_DEFAULTS = {"distance_mean": 1.0, "distance_var": 1.0}


def slim_keys(config: SlimConfig) -> Tuple[str, ...]:
    """The layer's own state-dict entries under ``config``: :data:`SLIM_KEYS`, and
    :data:`DISTANCE_KEYS` with ``distance_scale="spread"``."""
    return SLIM_KEYS + (DISTANCE_KEYS if config.distance_scale == "spread" else ())
# Seed of the fixed eval-mode merge mask (merge_at_eval=True).
EVAL_MASK_SEED = 0x5115


# Inside accumulate_aux(): the load-balance terms of successive forwards are averaged.
_AUX_ACCUMULATE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "slim_aux_accumulate", default=False)


@contextlib.contextmanager
def accumulate_aux() -> Iterator[None]:
    """Within this context a layer's load-balance term (docs/method.md §4) is the mean over
    all its forwards since the last :meth:`SlimLinear.reset_aux_loss`, not the last forward's
    only: for a loss computed from several forwards (GRPO's chunked log-probabilities)."""
    tok = _AUX_ACCUMULATE.set(True)
    try:
        yield
    finally:
        _AUX_ACCUMULATE.reset(tok)


def aux_accumulating() -> bool:
    return _AUX_ACCUMULATE.get()


@contextlib.contextmanager
def token_mask(mask: Optional[Tensor]) -> Iterator[None]:
    """Within this context, SLIM layers update their clusters only from tokens where
    ``mask`` is true. ``mask`` has the leading shape of the layer inputs (e.g. the
    attention mask (batch, seq)); a layer whose input has another token count ignores it."""
    tok = _TOKEN_MASK.set(None if mask is None else mask.detach())
    try:
        yield
    finally:
        _TOKEN_MASK.reset(tok)


def _check_features(in_features, out_features) -> Tuple[int, int]:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
            raise ValueError(f"SlimLinear {name}={v!r} is invalid: expected an int >= 1")
    return int(in_features), int(out_features)


def _weight_kind(module: nn.Module) -> str:
    return type(getattr(module, "weight", None)).__name__


_BNB_WEIGHTS = ("Params4bit", "Int8Params")


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear with a floating-point weight the op can use as it is (bitsandbytes'
    Linear4bit / Linear8bitLt subclass nn.Linear but hold packed weights)."""
    return (isinstance(module, nn.Linear) and _weight_kind(module) not in _BNB_WEIGHTS
            and module.weight.is_floating_point())


def unsupported_base(module: nn.Module) -> Optional[str]:
    """Why SlimLinear cannot wrap ``module`` (None when it can)."""
    if _is_plain_linear(module):
        return None
    if isinstance(module, nn.Linear) and _weight_kind(module) not in _BNB_WEIGHTS:
        return f"its weight is {module.weight.dtype}, not floating point"
    linear_like = all(hasattr(module, a) for a in ("in_features", "out_features", "bias"))
    if linear_like and (_weight_kind(module) in _BNB_WEIGHTS
                        or callable(getattr(module, "dequantize", None))):
        return None
    return "it is not a supported linear layer"


def base_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of a base layer SlimLinear supports: the ``nn.Linear`` weight itself,
    or the dequantized weight of a quantized one (a new tensor, no gradient)."""
    if _is_plain_linear(module):
        return module.weight
    kind = _weight_kind(module)
    with torch.no_grad():
        if kind == "Params4bit":
            import bitsandbytes as bnb
            w = module.weight
            data, state = w.data, w.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                # bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval
                # forward; unpack a copy (the module keeps its packed weight)
                import copy
                data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                    data.clone(), copy.deepcopy(state))
            return bnb.functional.dequantize_4bit(data, state)
        if kind == "Int8Params":
            import bitsandbytes as bnb
            w = module.weight
            scb = getattr(w, "SCB", None)
            if scb is None:
                scb = module.state.SCB
            return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))
        return module.dequantize()


def _in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. when gradient checkpointing re-runs a
    forward: the cluster update must not run a second time then."""
    return torch._C._current_graph_task_id() != -1


class SlimLinear(nn.Module):
    """``y = x Wᵀ + b + s · Σ_{i<E_L} g_i(x) B'_i A'_i x`` with identity experts in the router.

    Build it with :meth:`from_linear` (wraps the linear as ``base_layer``, frozen) or directly
    as ``SlimLinear(in_features, out_features, bias, config)``. ``weight`` and ``bias`` are
    read-only views of the base layer's. A quantized base (bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt``, or any module with ``dequantize()``) is dequantized at each forward and
    the op runs on that weight: ``F.linear(x, dequantized W, b)`` plus the SLIM part (the base
    layer's own quantized kernels may round differently).

    Parameters: ``lora_A`` (E_L, r, K), ``lora_B`` (E_L, N, r) (zero init), ``router`` (E, K).
    Buffers: ``cluster_centers`` (C, K), ``cluster_vars`` (C, K) (fp32), ``cluster_initialized``;
    with ``distance_scale="spread"`` also ``distance_mean`` and ``distance_var`` (fp32 scalars:
    the running mean and variance of r, docs/method.md §2).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: Optional[SlimConfig] = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        in_features, out_features = _check_features(in_features, out_features)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, config, own_base=True)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: Optional[SlimConfig] = None, *,
                    own_base: bool = True) -> "SlimLinear":
        """Wrap ``linear`` as ``base_layer`` (same module, same tensors), frozen.

        ``linear`` is an ``nn.Linear`` or a quantized linear (see ``SUPPORTED_BASES``).
        ``own_base=False`` keeps the base out of this module's children (a PEFT tuner layer
        that holds several SLIM adapters over one ``base_layer`` owns it instead)."""
        why = unsupported_base(linear) if isinstance(linear, nn.Module) else "it is not an nn.Module"
        if why is not None:
            raise TypeError(
                f"SlimLinear.from_linear cannot wrap a {type(linear).__module__}."
                f"{type(linear).__qualname__}: {why}. Supported base layers: "
                f"{'; '.join(SUPPORTED_BASES)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, config, own_base=own_base)
        return self

    def _setup(self, base: nn.Module, config, own_base: bool) -> None:
        if config is None:
            config = SlimConfig()
        if not isinstance(config, SlimConfig):
            raise TypeError(f"config must be a SlimConfig, got {type(config).__name__}")
        self.config = config
        weight = base.weight
        self._quantized = not _is_plain_linear(base)
        if not self._quantized:
            # full_shape: a linear built under deepspeed.zero.Init is already partitioned
            out_features, in_features = _dist.full_shape(weight)
            dtype = weight.dtype
        else:  # quantized: the packed weight's shape is not (out, in)
            out_features, in_features = base.out_features, base.in_features
            dtype = getattr(base, "compute_dtype", None) or (
                base.bias.dtype if base.bias is not None else torch.float32)
        self.in_features, self.out_features = _check_features(in_features, out_features)
        for p in base.parameters():
            p.requires_grad_(False)
        if own_base:
            self.base_layer = base
        else:
            object.__setattr__(self, "_borrowed_base", base)
        c = config
        K, N, r = self.in_features, self.out_features, c.rank
        kw = dict(device=weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(c.num_lora_experts, r, K, **kw))
        self.lora_B = nn.Parameter(torch.zeros(c.num_lora_experts, N, r, **kw))
        self.router = nn.Parameter(torch.empty(c.num_experts, K, **kw))
        fkw = dict(device=weight.device, dtype=torch.float32)
        self.register_buffer("cluster_centers", torch.zeros(c.num_clusters, K, **fkw))
        self.register_buffer("cluster_vars", torch.ones(c.num_clusters, K, **fkw))
        self.register_buffer(
            "cluster_initialized", torch.zeros((), dtype=torch.bool, device=weight.device)
        )
        if c.distance_scale == "spread":  # fixed once built (config.BUILD_FIELDS)
            for n in DISTANCE_KEYS:
                self.register_buffer(n, torch.full((), DISTANCE_DEFAULTS[n], **fkw))
            self._register_load_state_dict_pre_hook(self._default_distance_keys)
        self._base_only = 0  # > 0 inside disable_slim (integrations/hf.py): the base linear only
        self._register_load_state_dict_pre_hook(self._forget_cached_flag)
        self._register_load_state_dict_pre_hook(self._old_base_keys)
        if own_base:
            self._register_state_dict_hook(SlimLinear._base_keys_out)
        self.reset_slim_parameters()

    # -- the base layer -------------------------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        """The wrapped base linear (as PEFT's tuner layers name it)."""
        base = self._modules.get("base_layer")
        return base if base is not None else self.__dict__["_borrowed_base"]

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (read-only here; packed for a quantized base)."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[Tensor]:
        """The base layer's bias (read-only here)."""
        return self.get_base_layer().bias

    @staticmethod
    def _base_keys_out(module, state_dict, prefix, local_metadata) -> None:
        # The base layer's tensors keep the names the plain model gives them (``q_proj.weight``,
        # not ``q_proj.base_layer.weight``): a checkpoint of a SLIM model loads into the base
        # model class, and checkpoints of layers that owned the weight load here.
        inner = prefix + "base_layer."
        for k in [k for k in state_dict if k.startswith(inner)]:
            state_dict[prefix + k[len(inner):]] = state_dict.pop(k)

    def _old_base_keys(self, state_dict, prefix, *args, **kwargs) -> None:
        # the inverse of _base_keys_out: ``<prefix>weight`` is the base layer's
        if "base_layer" not in self._modules:
            return
        for k in [k for k in state_dict if k.startswith(prefix)]:
            rest = k[len(prefix):]
            if rest.split(".", 1)[0] not in SLIM_KEYS + DISTANCE_KEYS \
                    and not rest.startswith("base_layer."):
                state_dict[prefix + "base_layer." + rest] = state_dict.pop(k)

    def _default_distance_keys(self, state_dict, prefix, *args, **kwargs) -> None:
        # A state dict of this layer's SLIM state saved without distance_mean / distance_var
        # (a layer built before distance_scale existed, or with "none") loads into a "spread"
        # layer with the defaults mu = 1, sigma² = 1: the paper's d, which its router was
        # trained with (docs/method.md §2). The EMA moves them from there.
        if prefix + "cluster_centers" not in state_dict:
            return  # not this layer's SLIM state (a partial state dict): nothing to fill in
        ref = self.cluster_centers
        for n in DISTANCE_KEYS:
            state_dict.setdefault(prefix + n, torch.full((), DISTANCE_DEFAULTS[n],
                                                         dtype=torch.float32, device=ref.device))

    # -- parameters ---------------------------------------------------------------------
    def reset_slim_parameters(self) -> None:
        """A like PEFT's LoRA (kaiming-uniform, a=sqrt(5)), B = 0, router ~ N(0, 0.02);
        clusters uninitialised."""
        self._init_cached: Optional[bool] = False
        # (centres, variances, initialised, (mu, var of r) or None): what the last updating
        # forward routed with, for a checkpointed re-run
        self._snapshot: Optional[Tuple[Tensor, Tensor, bool,
                                       Optional[Tuple[Tensor, Tensor]]]] = None
        self._eval_masks: Dict[torch.device, Tuple[Tensor, Tensor]] = {}
        self._aux_pending = False  # a forward ran since the last reset_aux_loss()
        self._last_balance: Optional[Tensor] = None  # load-balance term of the last forward
        self._stats: Optional[Tensor] = None  # [tokens, identity mass, identity top-1, d sum, d n]
        # a batch was kept out of the clusters (§2): (device flag, host copy, copy event)
        self._rejected: Optional[Tuple[Tensor, Tensor, object]] = None
        self._rejected_warned = False
        if self.lora_A.device.type == "meta":
            return
        with torch.no_grad():
            E_L, r, K = self.lora_A.shape
            nn.init.kaiming_uniform_(self.lora_A.view(E_L * r, K), a=math.sqrt(5))
            self.lora_B.zero_()
            nn.init.normal_(self.router, mean=0.0, std=0.02)
            self.cluster_centers.zero_()
            self.cluster_vars.fill_(1.0)
            self.cluster_initialized.fill_(False)
            for n in DISTANCE_KEYS:
                if n in self._buffers:
                    self._buffers[n].fill_(DISTANCE_DEFAULTS[n])
        self._init_key = self._flag_key()

    def _apply(self, fn, recurse=True):
        # Cluster statistics stay fp32 (the op requires it): a dtype cast of the model
        # (model.to(torch.bfloat16), .half()) moves them to the new device but keeps fp32.
        keep = {n: self._buffers.get(n)
                for n in ("cluster_centers", "cluster_vars") + DISTANCE_KEYS}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers.get(n)
            if old is not None and new is not None and new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device, dtype=torch.float32)
        return self

    def _forget_cached_flag(self, *args, **kwargs) -> None:
        self._init_cached = None
        self._snapshot = None

    def __getstate__(self):
        # copy.deepcopy and pickle work at any point of a training step: what one step keeps
        # for itself (the last forward's load-balance term, a graph node; the clusters saved
        # for a checkpointed re-run; the pending cluster warning) is not copied, so a copy
        # has no aux loss pending (docs/method.md §4) until its own next forward.
        # Nor is disable_slim's switch: a copy is a new layer, outside that context.
        state = self.__dict__.copy()  # (nn.Module.__getstate__ is missing in older torch)
        state.pop("_compiled_call_impl", None)
        state.update(_aux_pending=False, _last_balance=None, _snapshot=None, _rejected=None,
                     _base_only=0, _balance_n=0)
        return state

    def __setstate__(self, state) -> None:
        # a layer pickled by an older release lacks the newer per-step attributes
        for k, v in dict(_base_only=0, _rejected=None, _rejected_warned=False,
                         _quantized=False).items():
            state.setdefault(k, v)
        params = state.get("_parameters", {})
        if "weight" in params:  # pickled when the layer owned the weight (slim_kernels <= 0.2)
            base = nn.Linear.__new__(nn.Linear)
            nn.Module.__init__(base)
            base.weight, base.bias = params.pop("weight"), params.pop("bias", None)
            base.out_features, base.in_features = base.weight.shape
            state["_modules"]["base_layer"] = base
        super().__setstate__(state)

    def _flag_key(self) -> Tuple[int, int]:
        f = self.cluster_initialized
        return id(f), f._version

    def _clusters_ready(self) -> bool:
        # The flag is cached (reading it is a host sync) and re-read whenever the buffer was
        # written behind the layer's back (its version counter moved), e.g. by DDP's initial
        # broadcast of rank 0's buffers after rank 0 alone loaded a checkpoint: a stale flag
        # there sends the ranks into different collectives (init vs update) and hangs them.
        key = self._flag_key()
        if getattr(self, "_init_cached", None) is None or getattr(self, "_init_key", None) != key:
            self._init_cached = bool(self.cluster_initialized)
            self._init_key = key
        return self._init_cached

    @property
    def scaling(self) -> float:
        return self.config.scaling

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, lora_experts={c.num_lora_experts}, "
            f"identity_experts={c.num_identity_experts}, rank={c.rank}, top_k={c.top_k}, "
            f"clusters={c.num_clusters}, backend={c.backend!r}"
        )

    # -- dynamic merging ----------------------------------------------------------------
    def _masked_factors(self) -> Tuple[Tensor, Tensor]:
        c = self.config
        A, B = self.lora_A, self.lora_B
        if c.merge_drop <= 0.0 or not (self.training or c.merge_at_eval):
            return A, B
        E_L, N, K = c.num_lora_experts, self.out_features, self.in_features
        if self.training:
            rows, cols = merge_masks(E_L, N, K, c.merge_drop, device=A.device)
        else:
            dev = A.device
            if dev not in self._eval_masks:
                gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
                rows, cols = merge_masks(E_L, N, K, c.merge_drop, generator=gen)
                self._eval_masks[dev] = (rows.to(dev), cols.to(dev))
            rows, cols = self._eval_masks[dev]
        A = A * cols.to(A.dtype)[:, None, :]
        B = B * rows.to(B.dtype)[:, :, None]
        if c.merge_rescale:
            B = B / (1.0 - c.merge_drop)
        return A, B

    # -- forward ------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"SlimLinear input x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"SlimLinear input x must be floating point, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"SlimLinear input x has shape {tuple(x.shape)}: its last dim must be "
                f"in_features={self.in_features}"
            )
        w = self.lora_A
        if x.device != w.device and w.device.type != "meta":
            raise ValueError(
                f"SlimLinear input x is on {x.device} but the layer's weight is on "
                f"{w.device}"
            )

    def _check_config(self) -> None:
        # The shape fields of the config are fixed when the layer is built (SlimConfig's
        # docstring); the others are read at every forward and may change between forwards.
        c = self.config
        E_L, r, _ = _dist.full_shape(self.lora_A)
        built = dict(num_lora_experts=E_L, rank=r,
                     num_identity_experts=_dist.full_shape(self.router)[0] - E_L,
                     num_clusters=self.cluster_centers.shape[0],
                     distance_scale="spread" if "distance_mean" in self._buffers else "none")
        for name in BUILD_FIELDS:
            if getattr(c, name) != built[name]:
                raise ValueError(
                    f"SlimLinear: config.{name}={getattr(c, name)!r} but the layer was built "
                    f"with {name}={built[name]!r}: the shape fields {', '.join(SHAPE_FIELDS)} "
                    f"and distance_scale (which decides the layer's buffers) cannot change after "
                    f"the layer is built (build a new layer, or apply SLIM again, for another "
                    f"value)")

    def forward(self, x: Tensor) -> Tensor:
        if self._base_only:  # exactly what the wrapped base layer computes
            return self.get_base_layer()(x)
        self._check_input(x)
        self._check_config()
        c = self.config
        b = self.bias
        if self._quantized:  # dequantized for the op (docs/method.md §6: y = x Wᵀ + b + ...)
            W = base_weight(self.get_base_layer()).to(self.lora_A.dtype)
            b = None if b is None else b.detach()
        else:
            W = self.weight
        A, B = self._masked_factors()
        R = self.router
        dev_type = x.device.type
        if torch.is_autocast_enabled(dev_type):
            dt = torch.get_autocast_dtype(dev_type)
        else:
            dt = W.dtype
            if x.dtype != dt:
                raise TypeError(
                    f"SlimLinear input x has dtype {x.dtype} but the layer's weight is {dt}; "
                    f"cast x (or the model) so they match, or run under torch.autocast"
                )
        x_c = x.to(dt)
        W, b, A, B, R = (None if t is None else t.to(dt) for t in (W, b, A, B, R))

        lead = x.shape[:-1]
        K, N = self.in_features, self.out_features
        E_L, r = c.num_lora_experts, c.rank
        x2 = x_c.reshape(-1, K)
        T = x2.shape[0]
        recompute = _in_backward()
        updating = self.training and c.num_clusters > 0 and not recompute

        centers = inv_std = shift = None
        spread = None  # distance_scale="spread": (sigma, mu / sigma) the op is called with
        if c.num_clusters > 0:
            if recompute and self._snapshot is not None:
                cen, var, ready, dstat = self._snapshot
            else:
                ready = self._clusters_ready()
                cen, var = self.cluster_centers, self.cluster_vars
                dstat = None
                if c.distance_scale == "spread":
                    dstat = (self.distance_mean, self.distance_var)
                if updating:  # what this forward saw, for a checkpointed re-run
                    cen, var = cen.clone(), var.clone()
                    dstat = None if dstat is None else tuple(t.clone() for t in dstat)
                    self._snapshot = (cen, var, ready, dstat)
            if ready:
                centers, inv_std = cen, (var + c.cluster_eps).rsqrt()
                if dstat is not None:
                    # d = (r - mu) / sigma: 1/sigma folded into inv_std (every reduce is
                    # positively homogeneous), mu/sigma the shift of every cluster (§2)
                    sigma = (dstat[1] + c.cluster_eps).sqrt()
                    inv_std = inv_std / sigma
                    spread = (sigma, dstat[0] / sigma)
                    shift = spread[1].expand(c.num_clusters)

        x_lora = None
        if self.training and c.lora_dropout > 0:
            x_lora = F.dropout(x2, p=c.lora_dropout, training=True)

        y, gates, idx, dist, assign = slim_linear_op(
            x2, W, b,
            A.reshape(E_L * r, K), B.permute(1, 0, 2).reshape(N, E_L * r), R,
            num_lora_experts=E_L, top_k=c.top_k, scaling=c.scaling,
            yield_strength=c.yield_strength if c.num_identity_experts > 0 else 0.0,
            distance_reduce=c.distance_reduce, centers=centers, inv_std=inv_std,
            x_lora=x_lora, backend=c.backend, distance_shift=shift,
        )

        # The balance term is built in a checkpointed re-run too (and dropped there): non-reentrant
        # checkpointing needs the re-run to save the same tensors as the first forward.
        balance = self._balance_loss(gates, idx)
        if not recompute:
            mask = self._current_token_mask(T, x.device)
            if updating:
                self._update_clusters(x2, assign, mask, centers is not None, dist, spread)
            prev, n = self._last_balance, getattr(self, "_balance_n", 0)
            if _AUX_ACCUMULATE.get() and self._aux_pending and prev is not None \
                    and balance is not None:
                # the mean of the forwards' balance terms (accumulate_aux)
                self._last_balance = prev * (n / (n + 1)) + balance.to(prev.device) / (n + 1)
                self._balance_n = n + 1
            else:
                self._last_balance, self._balance_n = balance, 1
            self._aux_pending = True
            self._record(gates, idx, dist, mask, centers is not None)
        return y.reshape(*lead, N)

    def _current_token_mask(self, T: int, device) -> Optional[Tensor]:
        m = _TOKEN_MASK.get()
        if m is None or m.numel() != T:
            return None
        return m.reshape(-1).to(device=device, dtype=torch.bool)

    # -- sliding clustering ---------------------------------------------------------------
    @torch.no_grad()
    def _update_clusters(self, x2: Tensor, assign: Tensor, mask: Optional[Tensor],
                         had_clusters: bool, dist: Optional[Tensor] = None,
                         spread: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        # docs/method.md §2, "Non-finite tokens": padding tokens and tokens with a non-finite
        # entry never enter the statistics, and an update that would make a centre or a
        # variance (or, with distance_scale="spread", the mean or variance of r) non-finite is
        # dropped whole (the clusters stay as they were).
        # ``spread``: (sigma, mu/sigma) of the routing, to recover r = sigma (d + mu/sigma)
        # from the op's distance d (no second pass over x).
        c = self.config
        C = c.num_clusters
        xs = x2.detach()
        keep = torch.isfinite(xs).all(1)
        if mask is not None:
            keep = keep & mask
        if not had_clusters:
            self._init_clusters(xs[keep])  # (the init reads token counts on the host anyway)
            return
        # No host sync: the tokens left out go, as zeros, to an extra cluster C that is then
        # dropped, so every rank all-reduces the same tensor whatever it left out.
        xs = xs.masked_fill(~keep[:, None], 0.0)
        assign = assign.masked_fill(~keep, C)
        counts, sums, sumsq = (t[:C] for t in cluster_batch_stats(xs, assign, C + 1))
        K = sums.shape[1]
        parts = [counts, sums.reshape(-1), sumsq.reshape(-1)]
        if spread is not None:  # count, sum and sum of squares of r over the kept tokens
            sigma, sh = spread
            r = (dist.detach().double() + sh.double()) * sigma.double()
            keep_r = keep & torch.isfinite(r)
            r = r.masked_fill(~keep_r, 0.0)
            parts.append(torch.stack([keep_r.double().sum(), r.sum(), (r * r).sum()]))
        packed = torch.cat(parts)
        _dist.all_reduce_sum_(packed)
        counts = packed[:C]
        sums = packed[C: C + C * K].view(C, K)
        sumsq = packed[C + C * K: C + 2 * C * K].view(C, K)
        seen = counts > 0
        n = counts.clamp_min(1.0)[:, None]
        mean = sums / n
        var = (sumsq / n - mean * mean).clamp_min(0.0)
        mom = c.cluster_momentum
        old_c, old_v = self.cluster_centers, self.cluster_vars
        new_c = torch.where(seen[:, None], (1 - mom) * old_c.double() + mom * mean, old_c.double())
        new_v = torch.where(seen[:, None], (1 - mom) * old_v.double() + mom * var, old_v.double())
        new_c, new_v = new_c.to(old_c.dtype), new_v.to(old_v.dtype)
        # the same on every rank: computed from all-reduced statistics
        ok = torch.isfinite(new_c).all() & torch.isfinite(new_v).all()
        if spread is not None:
            n_r, s_r, ss_r = packed[C + 2 * C * K:]
            m_r = s_r / n_r.clamp_min(1.0)
            v_r = (ss_r / n_r.clamp_min(1.0) - m_r * m_r).clamp_min(0.0)
            old_m, old_dv = self.distance_mean, self.distance_var
            new_m = torch.where(n_r > 0, (1 - mom) * old_m.double() + mom * m_r, old_m.double())
            new_dv = torch.where(n_r > 0, (1 - mom) * old_dv.double() + mom * v_r,
                                 old_dv.double())
            new_m, new_dv = new_m.to(old_m.dtype), new_dv.to(old_dv.dtype)
            ok = ok & torch.isfinite(new_m) & torch.isfinite(new_dv)
            old_m.copy_(torch.where(ok, new_m, old_m))
            old_dv.copy_(torch.where(ok, new_dv, old_dv))
        old_c.copy_(torch.where(ok, new_c, old_c))
        old_v.copy_(torch.where(ok, new_v, old_v))
        self._note_rejected(~ok)

    def _note_rejected(self, bad: Tensor) -> None:
        """Warn once when a batch was kept out of the clusters, without a host sync: the flag
        is OR-ed on the device and copied to the host without blocking; the copy is read once
        it has arrived (on the CPU at once, on CUDA at a later training forward)."""
        if self._rejected_warned:
            return
        prev = self._rejected
        acc = bad if prev is None else prev[0] | bad
        host = torch.empty((), dtype=torch.bool, pin_memory=acc.is_cuda)
        host.copy_(acc, non_blocking=True)
        event = None
        if acc.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._rejected = (acc, host, event)
        for _, h, ev in [self._rejected] + ([prev] if prev is not None else []):
            if (ev is None or ev.query()) and bool(h):
                self._warn_rejected()
                return

    def _warn_rejected(self) -> None:
        if self._rejected_warned:
            return
        self._rejected_warned = True
        self._rejected = None
        warnings.warn(
            "slim_kernels: a training batch would have made a SlimLinear's cluster statistics "
            "non-finite (inputs too large for fp32 variances?), so the clusters were left as "
            "they were for that batch (docs/method.md §2); later such batches of this layer "
            "are skipped without a warning", RuntimeWarning, stacklevel=2)

    @torch.no_grad()
    def _init_clusters(self, xs: Tensor) -> None:
        """Centres: C distinct random tokens of the *global* first batch; variances: its
        per-channel variance. Needs at least max(C, 2) tokens over all ranks. A batch that
        would give non-finite centres or variances leaves the clusters uninitialised (§2).

        The global batch is every rank's tokens concatenated in rank order. Rank 0 draws C
        distinct indices into it (a generator seeded from ``torch.initial_seed()``, not the
        global RNG) and broadcasts them; the rank that holds a picked token contributes it and
        an all-reduce assembles the centres. So the ranks agree whatever their seeds, any rank
        may hold few or no tokens, and a single process fed the concatenated global batch
        (with rank 0's seed) picks exactly the same tokens: the init does not depend on how
        the batch is split across ranks. With distance_scale="spread" the mean and variance
        of r against the fresh clusters are set too (:meth:`_init_distance_stats`).
        """
        C = self.config.num_clusters
        T, K = xs.shape
        W, me = _dist.world_size(), _dist.rank()
        dev = xs.device
        xd = xs.double()
        counts = torch.zeros(W, dtype=torch.float64, device=dev)
        counts[me] = float(T)
        packed = torch.cat([counts, xd.sum(0), (xd * xd).sum(0)])
        _dist.all_reduce_sum_(packed)  # tokens per rank, sums and sums of squares
        per_rank = packed[:W].round().long().tolist()
        total = sum(per_rank)
        if total < max(C, 2):
            return  # stay uninitialised (on every rank); try again on the next batch
        n = packed[:W].sum()
        mean = packed[W: W + K] / n
        var = (packed[W + K:] / n - mean * mean).clamp_min(0.0)
        # the RNG is not the global one: a checkpointed re-run must draw the same numbers
        gen = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
        pick = torch.randperm(total, generator=gen)[:C].to(dev)
        _dist.broadcast_(pick)  # rank 0's draw (ranks may be seeded differently)
        local = pick - sum(per_rank[:me])
        mine = (local >= 0) & (local < T)
        centers = torch.zeros(C, K, dtype=torch.float32, device=dev)
        centers[mine] = xs[local[mine]].float()
        _dist.all_reduce_sum_(centers)  # exact: one rank holds each row, the others add 0
        var = var.float()
        # the same on every rank (all-reduced values): all stay uninitialised, or none
        if not bool(torch.isfinite(centers).all() & torch.isfinite(var).all()):
            self._warn_rejected()
            return
        vars_ = var[None, :].expand(C, K)
        dstat = None
        if self.config.distance_scale == "spread":
            dstat = self._init_distance_stats(xs, centers, vars_)
            if dstat is None:
                self._warn_rejected()
                return
        if dstat is not None:
            self.distance_mean.copy_(dstat[0])
            self.distance_var.copy_(dstat[1])
        self.cluster_centers.copy_(centers)
        self.cluster_vars.copy_(vars_)
        self.cluster_initialized.fill_(True)
        self._init_cached = True
        self._init_key = self._flag_key()

    def _init_distance_stats(self, xs: Tensor, centers: Tensor, vars_: Tensor
                             ) -> Optional[Tuple[Tensor, Tensor]]:
        """distance_scale="spread": the mean and population variance of r over the
        initialising (global) batch, r computed against the fresh clusters as the layer will
        route with them (inv_std = 1/sqrt(v + eps) in fp32); fp32 scalars, or None when they
        are not finite or no r is (then the whole initialisation waits for the next batch).
        Each rank contributes the count, sum and sum of squares of its tokens' finite r
        (all-reduced)."""
        c = self.config
        inv_std = (vars_ + c.cluster_eps).rsqrt()
        zero = torch.zeros(c.num_clusters, dtype=torch.float32, device=xs.device)
        r, _ = cluster_distance(xs, centers, inv_std, c.distance_reduce, zero)
        r = r.double()
        keep = torch.isfinite(r)
        r = r.masked_fill(~keep, 0.0)
        packed = torch.stack([keep.double().sum(), r.sum(), (r * r).sum()])
        _dist.all_reduce_sum_(packed)
        n, s, ss = packed
        if not bool(n > 0):  # every r overflowed (finite inputs): as a non-finite result
            return None
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        mean, var = mean.float(), var.float()
        if not bool(torch.isfinite(mean) & torch.isfinite(var)):
            return None
        return mean, var

    # -- aux losses and statistics --------------------------------------------------------
    def _record(self, gates: Tensor, idx: Tensor, dist: Tensor, mask: Optional[Tensor],
                had_clusters: bool) -> None:
        E_L = self.config.num_lora_experts
        with torch.no_grad():
            g = gates.detach().float()
            if mask is not None:
                g, d = g[mask], dist.detach().float()[mask]
            else:
                d = dist.detach().float()
            n = g.shape[0]
            ident_mass = g[:, E_L:].sum()
            top1 = (g.argmax(1) >= E_L).float().sum() if n else g.sum()
            stats = torch.stack([
                torch.tensor(float(n), device=g.device), ident_mass, top1,
                d.sum() if had_clusters else torch.zeros((), device=g.device),
                torch.tensor(float(n) if had_clusters else 0.0, device=g.device),
            ])
            self._stats = stats if self._stats is None else self._stats + stats.to(self._stats.device)

    def _balance_loss(self, gates: Tensor, idx: Tensor) -> Optional[Tensor]:
        c = self.config
        if c.balance_coef <= 0 or gates.shape[0] == 0:
            return None
        sel = torch.zeros_like(gates).scatter_(1, idx, 1.0)
        f = sel.mean(0)  # share of tokens whose top-k holds e
        P = gates.mean(0)  # mean gate of e
        return c.balance_coef * c.num_experts * (f.detach() * P).sum()

    def _l1_loss(self) -> Optional[Tensor]:
        c = self.config
        if c.l1_coef <= 0:
            return None
        r, N, K = c.rank, self.out_features, self.in_features
        return c.l1_coef * (self.lora_B.abs().sum() / (r * N) + self.lora_A.abs().sum() / (r * K))

    def slim_aux_loss(self) -> Optional[Tensor]:
        """This layer's auxiliary loss: the L1 term (computed now, from the parameters, so it
        has a gradient even when the forward ran under no_grad, as in reentrant gradient
        checkpointing) plus the load-balance term of the last forward. None when no forward
        ran since :meth:`reset_aux_loss` or when no term is on."""
        if not self._aux_pending:
            return None
        l1, bal = self._l1_loss(), self._last_balance
        if l1 is None:
            return bal
        return l1 if bal is None else l1 + bal.to(l1.device)

    def has_aux_loss(self) -> bool:
        """True when :meth:`slim_aux_loss` would return a tensor (cheap)."""
        c = self.config
        return self._aux_pending and (c.l1_coef > 0 or self._last_balance is not None)

    def reset_aux_loss(self) -> None:
        """Forget the last forward's aux terms (integrations call this before each model
        forward so that aux_loss(model) reflects that forward only)."""
        self._aux_pending = False
        self._last_balance = None
        self._balance_n = 0

    def routing_stats(self, reset: bool = False) -> Dict[str, float]:
        """Since the last reset: tokens seen, mean gate mass on identity experts, share of
        tokens whose top gate is an identity expert, mean out-of-domain distance (NaN until
        the clusters exist)."""
        s = self._stats
        if s is None:
            out = dict(tokens=0, identity_mass=float("nan"), identity_top1_share=float("nan"),
                       mean_distance=float("nan"))
        else:
            v = s.tolist()
            n = v[0]
            out = dict(
                tokens=int(n),
                identity_mass=v[1] / n if n else float("nan"),
                identity_top1_share=v[2] / n if n else float("nan"),
                mean_distance=v[3] / v[4] if v[4] else float("nan"),
            )
        if reset:
            self._stats = None
        return out


def slim_modules(model: nn.Module) -> Iterator[Tuple[str, SlimLinear]]:
    """(qualified name, layer) for every SlimLinear in ``model`` (itself included)."""
    for name, m in model.named_modules():
        if isinstance(m, SlimLinear):
            yield name, m


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the SLIM auxiliary losses (L1, load balance) of the last forward over all SLIM
    layers of ``model``; a zero tensor when there are none. Add it to the task loss."""
    total = None
    for _, m in slim_modules(model):
        a = m.slim_aux_loss()
        if a is not None:
            total = a if total is None else total + a.to(total.device)
    if total is None:
        p = next(iter(model.parameters()), None)
        total = torch.zeros((), device=p.device if p is not None else None)
    return total


def routing_stats(model: nn.Module, reset: bool = False) -> Dict[str, Dict[str, float]]:
    """Per SLIM layer: share of routing mass on identity experts, share of tokens whose top
    gate is an identity expert and mean out-of-domain distance, since the last reset."""
    return {name: m.routing_stats(reset=reset) for name, m in slim_modules(model)}
