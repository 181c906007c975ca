"""SlimLinear: a frozen base linear plus a SLIM mixture of LoRA and identity experts.

The layer holds the trainable parameters and composes the parts that do the rest: the base
layer's handler (:mod:`slim_kernels.base_layers`: plain, bitsandbytes, dequantizable), the
sliding clusters (:mod:`slim_kernels.clusters`), the aux-loss and statistics tracker
(:mod:`slim_kernels.tracking`), and one op call (:mod:`slim_kernels.ops`) whose backend it
does not know. The module functions below work on whole models.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base_layers import SUPPORTED_BASES, base_handler, unsupported_base
from .clusters import CLUSTER_KEYS, DISTANCE_KEYS, SlidingClusters
from .config import BUILD_FIELDS, SlimConfig
from .ops.op import slim_linear_op_unchecked
from .routing import merge_masks
from .tracking import RoutingTracker, accumulate_aux, aux_accumulating, track_routing

__all__ = ["SlimLinear", "aux_loss", "routing_stats", "token_mask", "slim_modules", "slim_keys",
           "accumulate_aux", "aux_accumulating", "track_routing", "SLIM_KEYS"]

# the layer's own saved tensors, by name (the cluster ones' state-dict keys are under
# ``clusters.``; everything else is the base layer's)
SLIM_KEYS = ("lora_A", "lora_B", "router") + CLUSTER_KEYS
EVAL_MASK_SEED = 0x5115  # the fixed eval-mode merge mask (merge_at_eval=True)
_TOKEN_MASK: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar(
    "slim_token_mask", default=None)


def slim_keys(config: SlimConfig) -> Tuple[str, ...]:
    """The names of the layer's own saved tensors under ``config`` (:meth:`SlimLinear.slim_tensors`)."""
    return SLIM_KEYS + (DISTANCE_KEYS if config.distance_scale == "spread" else ())


@contextlib.contextmanager
def token_mask(mask: Optional[Tensor]) -> Iterator[None]:
    """Within this context (eager mode), SLIM layers collect the statistics their clusters move
    by only from tokens where ``mask`` is true; ``mask`` has the leading shape of the inputs
    (e.g. the attention mask).
    The Hugging Face integrations set each layer's ``token_keep`` instead (which works under
    torch.compile too)."""
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


class SlimLinear(nn.Module):
    """``y = x Wᵀ + b + s · Σ_{i<E_L} g_i(x) B'_i A'_i x`` with identity experts in the router.

    Build it with :meth:`from_linear` (wraps the linear as ``base_layer``, frozen) or as
    ``SlimLinear(in_features, out_features, bias, config)``. ``weight``/``bias`` are the base
    layer's. A quantized base is dequantized at each forward and the op runs on that weight.
    Parameters: ``lora_A`` (E_L, r, K), ``lora_B`` (E_L, N, r) (zero init), ``router`` (E, K);
    ``clusters`` holds the cluster buffers (state-dict keys ``clusters.cluster_centers``, ...).
    ``config`` is immutable: assign ``config.replace(...)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: Optional[SlimConfig] = None, *, device=None, dtype=None) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        self._setup(nn.Linear(int(in_features), int(out_features), bias, device=device,
                              dtype=dtype),
                    config, own_base=True)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: Optional[SlimConfig] = None, *,
                    own_base: bool = True) -> "SlimLinear":
        """Wrap ``linear`` (a supported base layer, :mod:`slim_kernels.base_layers`), frozen, as
        ``base_layer``; ``own_base=False`` keeps it out of the children (a PEFT tuner layer
        holding several SLIM adapters over one base owns it)."""
        why = unsupported_base(linear)
        if why is not None:
            raise TypeError(f"SlimLinear.from_linear cannot wrap a {type(linear).__module__}."
                            f"{type(linear).__qualname__}: {why}. Supported base layers: "
                            f"{'; '.join(SUPPORTED_BASES)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, config, own_base)
        return self

    def _setup(self, base: nn.Module, config: Optional[SlimConfig], own_base: bool) -> None:
        config = SlimConfig() if config is None else config
        if not isinstance(config, SlimConfig):
            raise TypeError(f"config must be a SlimConfig, got {type(config).__name__}")
        self._handler = base_handler(base)
        out_f, in_f = self._handler.shape(base)
        self.in_features, self.out_features = _check_features(in_f, out_f)
        base.requires_grad_(False)
        if own_base:
            self.base_layer = base
        else:
            object.__setattr__(self, "_borrowed_base", base)
        c, K, N, dev = config, self.in_features, self.out_features, base.weight.device
        kw = dict(device=dev, dtype=self._handler.dtype(base))
        self.lora_A = nn.Parameter(torch.empty(c.num_lora_experts, c.rank, K, **kw))
        self.lora_B = nn.Parameter(torch.zeros(c.num_lora_experts, N, c.rank, **kw))
        self.router = nn.Parameter(torch.empty(c.num_experts, K, **kw))
        self.clusters = SlidingClusters(c.num_clusters, K, c.distance_scale == "spread",
                                        c.cluster_eps, c.cluster_momentum, c.distance_reduce,
                                        dev)
        self.tracker = RoutingTracker(c.num_lora_experts)
        self._config = config
        self.disabled = 0  # > 0 inside disable_slim: the base layer only
        self.token_keep: Optional[Tensor] = None  # set per forward by the integrations
        self._eval_masks: Dict[torch.device, Tuple[Tensor, Tensor]] = {}
        self._register_state_dict_hook(_flat_keys)
        self._register_load_state_dict_pre_hook(_nested_keys, with_module=True)
        self.reset_slim_parameters()

    # -- config, base layer, state --------------------------------------------------------
    @property
    def config(self) -> SlimConfig:
        return self._config

    @config.setter
    def config(self, new: SlimConfig) -> None:
        if not isinstance(new, SlimConfig):
            raise TypeError(f"config must be a SlimConfig, got {type(new).__name__}")
        for name in BUILD_FIELDS:
            if getattr(new, name) != getattr(self._config, name):
                raise ValueError(
                    f"SlimLinear: the new config has {name}={getattr(new, name)!r} but the layer "
                    f"was built with {getattr(self._config, name)!r}: {', '.join(BUILD_FIELDS)} "
                    f"fix the layer's parameters and buffers (build a new layer instead)")
        self._config = new
        self.clusters.configure(new.cluster_eps, new.cluster_momentum, new.distance_reduce)

    def get_base_layer(self) -> nn.Module:
        base = self._modules.get("base_layer")
        return base if base is not None else self.__dict__["_borrowed_base"]

    @property
    def weight(self) -> Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.get_base_layer().bias

    @property
    def scaling(self) -> float:
        return self._config.scaling

    def slim_tensors(self) -> Dict[str, Tensor]:
        """The layer's own saved tensors by name (:func:`slim_keys`)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "router": self.router,
                **self.clusters.tensors()}

    def reset_slim_parameters(self) -> None:
        """A like PEFT's LoRA (kaiming-uniform, a=sqrt(5)), B = 0, router ~ N(0, 0.02);
        clusters uninitialised."""
        self.tracker.reset_aux()
        self._eval_masks.clear()
        if self.lora_A.device.type == "meta":
            return
        with torch.no_grad():
            E_L, r, K = self.lora_A.shape
            nn.init.kaiming_uniform_(self.lora_A.view(E_L * r, K), a=math.sqrt(5))
            self.lora_B.zero_()
            nn.init.normal_(self.router, mean=0.0, std=0.02)
        self.clusters.reset()

    def extra_repr(self) -> str:
        c = self._config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, lora_experts={c.num_lora_experts}, "
                f"identity_experts={c.num_identity_experts}, rank={c.rank}, top_k={c.top_k}, "
                f"clusters={c.num_clusters}, backend={c.backend!r}")

    def __getstate__(self):
        # a copy (deepcopy, pickle) is a new layer: outside the disable_slim context and the
        # model forward the original may be in
        return {**self.__dict__, "disabled": 0, "token_keep": None}

    # -- forward ----------------------------------------------------------------------------
    def factors(self) -> Tuple[Tensor, Tensor]:
        """A', B' (dynamic merging masks, docs/method.md §3)."""
        c, A, B = self._config, self.lora_A, self.lora_B
        if c.merge_drop <= 0.0 or not (self.training or c.merge_at_eval):
            return A, B
        E_L, N, K = c.num_lora_experts, self.out_features, self.in_features
        if self.training:
            rows, cols = merge_masks(E_L, N, K, c.merge_drop, device=A.device)
        else:
            if A.device not in self._eval_masks:
                gen = torch.Generator().manual_seed(EVAL_MASK_SEED)
                self._eval_masks[A.device] = tuple(
                    m.to(A.device) for m in merge_masks(E_L, N, K, c.merge_drop, generator=gen))
            rows, cols = self._eval_masks[A.device]
        A, B = A * cols.to(A.dtype)[:, None, :], B * rows.to(B.dtype)[:, :, None]
        return A, (B / (1.0 - c.merge_drop) if c.merge_rescale else B)

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self.get_base_layer()(x)
        p = self._parameters
        A, B, R = p["lora_A"], p["lora_B"], p["router"]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1 \
                or x.shape[-1] != self.in_features or x.device != A.device:
            _check_input(self, x)
        c, base, dev = self._config, self.get_base_layer(), x.device.type
        W, b = base.weight, base.bias
        if self._handler.quantized:  # dequantized for the op (docs/method.md §6)
            W, b = self._handler.weight(base).to(A.dtype), None if b is None else b.detach()
        elif self._handler.fan_in_fan_out:  # stored (in, out): the op reads the view's strides
            W = W.t()
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
        elif x.dtype != W.dtype:
            raise TypeError(f"SlimLinear input has dtype {x.dtype} but the layer's weight is "
                            f"{W.dtype}; cast one to the other, or run under torch.autocast")
        else:
            dt = W.dtype
        if c.merge_drop > 0.0:
            A, B = self.factors()
        if dt != A.dtype or dt != W.dtype or dt != x.dtype:  # (autocast)
            x, W, b, A, B, R = (None if t is None else t.to(dt) for t in (x, W, b, A, B, R))
        E_L, K, N = c.num_lora_experts, self.in_features, self.out_features
        x2 = x.reshape(-1, K)
        compiling = torch.compiler.is_compiling()
        recompute = not compiling and torch._C._current_graph_task_id() != -1
        training, tracker, C = self.training, self.tracker, c.num_clusters
        # (a meta tensor has a shape, no values: nothing to learn the clusters from)
        updating = training and C > 0 and not recompute and dev != "meta"
        centers = inv_std = shift = None
        if C > 0:
            clusters = self._modules["clusters"]
            routed = clusters.ready  # (for the statistics)
            centers, inv_std, shift = clusters.routing()
        keep = self._keep(x2.shape[0], compiling) if updating or tracker.tracking else None
        x_lora = F.dropout(x2, c.lora_dropout, True) if training and c.lora_dropout > 0 else None
        y, gates, idx, dist, _, _, cstats = slim_linear_op_unchecked(
            x2, W, b, A, B, R, E_L, c.top_k, c.scaling,
            c.yield_strength if c.num_identity_experts else 0.0, c.distance_reduce, centers,
            inv_std, x_lora, c.backend, shift, updating, keep if updating else None, True)
        # built in a checkpointed re-run too: non-reentrant checkpointing needs the re-run to
        # save the same tensors as the first forward
        balance = tracker.balance_loss(gates, idx, c.balance_coef) if c.balance_coef > 0 else None
        if not recompute:
            if updating:
                clusters.collect(x2, keep, cstats, compiling)
            tracker.after_forward(balance)
            if tracker.tracking:
                tracker.record(gates, dist, keep, C > 0 and routed)
        return y.reshape(*x.shape[:-1], N)

    def _keep(self, T: int, compiling: bool) -> Optional[Tensor]:
        m = self.token_keep
        if m is None and not compiling:
            m = _TOKEN_MASK.get()
        if m is None or m.numel() != T:
            return None
        return m.reshape(T).to(device=self.lora_A.device, dtype=torch.bool)

    # -- aux losses and statistics ------------------------------------------------------
    def slim_aux_loss(self) -> Optional[Tensor]:
        """The L1 term (from the parameters, so it has a gradient even when the forward ran
        under no_grad, as in reentrant checkpointing) plus the last forward's load-balance
        term; None when no forward ran since :meth:`reset_aux_loss` or no term is on."""
        c = self._config
        return self.tracker.aux_loss(c.l1_coef, self.lora_A, self.lora_B)

    def has_aux_loss(self) -> bool:
        return self.tracker.has_aux_loss(self._config.l1_coef)

    def reset_aux_loss(self) -> None:
        self.tracker.reset_aux()

    def routing_stats(self, reset: bool = False) -> Dict[str, float]:
        """Since the last reset, inside :func:`track_routing`: tokens, identity_mass,
        identity_top1_share, mean_distance (None until a token was routed with clusters),
        distance_tokens, and rejected_batches (batches the clusters left out, ever)."""
        return {**self.tracker.summary(reset), "rejected_batches": self.clusters.check_rejected()}


def _check_input(layer: SlimLinear, x) -> None:
    """Raise the error that says what is wrong with the input ``x`` of ``layer``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"SlimLinear input x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"SlimLinear input x must be floating point, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != layer.in_features:
        raise ValueError(f"SlimLinear input x has shape {tuple(x.shape)}: its last dim must "
                         f"be in_features={layer.in_features}")
    if layer.lora_A.device.type != "meta":
        raise ValueError(f"SlimLinear input x is on {x.device} but the layer's weight is on "
                         f"{layer.lora_A.device}")


# State-dict names: the base layer's tensors keep the plain model's names (a checkpoint of a
# standalone layer loads into nn.Linear), and every other key is the attribute path of its
# tensor (``lora_A``, ``clusters.cluster_centers``), so that tools which assign a loaded tensor
# by its path (transformers' adapter loader) find it. Flat cluster keys
# (``cluster_centers``, as earlier releases wrote them) still load.
def _flat_keys(module, state_dict, prefix, local_metadata) -> None:
    part = prefix + "base_layer."
    for k in [k for k in state_dict if k.startswith(part)]:
        state_dict[prefix + k[len(part):]] = state_dict.pop(k)


def _nested_keys(module: SlimLinear, state_dict, prefix, *args) -> None:
    cluster_keys = set(module.clusters.tensors())
    for k in [k for k in state_dict if k.startswith(prefix)]:
        head = k[len(prefix):].split(".", 1)[0]
        if head in cluster_keys:
            state_dict[prefix + "clusters." + k[len(prefix):]] = state_dict.pop(k)
        elif "base_layer" in module._modules and head not in SLIM_KEYS + (
                "base_layer", "clusters"):
            state_dict[prefix + "base_layer." + k[len(prefix):]] = state_dict.pop(k)


def _cluster_buffer(name: str) -> property:
    def get(self: SlimLinear) -> Tensor:
        return getattr(self.clusters, name)
    return property(get, doc=f"``clusters.{name}`` (read-only)")


for _name in CLUSTER_KEYS + DISTANCE_KEYS:
    setattr(SlimLinear, _name, _cluster_buffer(_name))


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
    """Per SLIM layer, what :meth:`SlimLinear.routing_stats` returns (recorded inside
    :func:`track_routing`)."""
    return {name: m.routing_stats(reset=reset) for name, m in slim_modules(model)}
