"""SlimConfig: every knob of a SLIM layer, validated, with a JSON round trip.

Field names and defaults are part of the public contract (saved adapters store them):
``docs/method.md`` defines each one. Choices the paper leaves open (``docs/method.md`` §5)
are fields here so a user can switch them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

DISTANCE_REDUCES = ("max", "mean", "rms")
DISTANCE_SCALES = ("none", "spread")
BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
INT_FIELDS = ("num_lora_experts", "num_identity_experts", "rank", "top_k", "num_clusters")
FLOAT_FIELDS = ("alpha", "lora_dropout", "yield_strength", "cluster_momentum", "cluster_eps",
                "merge_drop", "l1_coef", "balance_coef")
BOOL_FIELDS = ("use_rslora", "merge_rescale", "merge_at_eval")
# the fields that fix the shapes of a layer's parameters and buffers
SHAPE_FIELDS = ("num_lora_experts", "num_identity_experts", "rank", "num_clusters")
# the fields fixed once a layer is built: the shape fields, and distance_scale (which decides
# whether the layer has the distance_mean / distance_var buffers)
BUILD_FIELDS = SHAPE_FIELDS + ("distance_scale",)


__all__ = ["SlimConfig", "DISTANCE_REDUCES", "DISTANCE_SCALES", "BACKENDS"]


def _is_bool(v: Any) -> bool:  # Python or NumPy bools
    return isinstance(v, bool) or (type(v).__module__ == "numpy"
                                   and type(v).__name__ in ("bool", "bool_"))


@dataclass(unsafe_hash=True)
class SlimConfig:
    """Configuration of a SLIM (Soft LoRA and Identity Mixture) layer.

    Experts: ``num_lora_experts`` LoRA experts of rank ``rank`` and ``num_identity_experts``
    identity experts (which add nothing), mixed per token by a top-``top_k`` softmax router.
    ``alpha / rank`` scales the LoRA delta (``alpha / sqrt(rank)`` with ``use_rslora``).

    Weight yielding: ``num_clusters`` sliding clusters of the training inputs give each token
    an out-of-domain distance d; identity logits get ``yield_strength * d``. ``num_clusters=0``
    or ``yield_strength=0`` turns yielding off. ``distance_reduce`` picks how the per-channel
    normalised distances are reduced (max | mean | rms); ``distance_scale`` how d is scaled:
    ``"none"`` (the paper's ``d = r - 1``) or ``"spread"`` (``d = (r - mu) / sigma``, mu and
    sigma the layer's running mean and standard deviation of r over its training tokens);
    ``cluster_momentum`` is the EMA rate, ``cluster_eps`` the variance floor.

    Dynamic merging: ``merge_drop`` is the overall drop ratio p of the LoRA delta, realised as
    random output rows of B and input columns of A, each dropped at ``1 - sqrt(1 - p)``;
    ``merge_rescale`` rescales by ``1/(1-p)``; ``merge_at_eval`` keeps a fixed seeded mask in
    eval mode (default: no mask in eval).

    Losses: ``l1_coef`` (L1 on the experts), ``balance_coef`` (Switch-style load balance).
    Learning rate (not a field of the config): with AdamW, start at 3e-4. On SmolLM2-135M the
    learning-rate rule of docs/demo.md chose 3e-4 for these defaults; 1e-3 learnt as much and
    kept less of the base (worst share kept 0.61 against 0.995 on the selection seed).
    ``target_modules``: the names of the modules :func:`slim_kernels.apply_slim` wraps (PEFT's
    matching: a name matches a module whose name is it or ends in ``.<name>``); None (the
    default): the model type's projections, every one of the attention and the MLP
    (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` on a Llama, ``qkv_proj o_proj
    gate_up_proj down_proj`` on a Phi-3, ``c_attn c_proj c_fc`` on a GPT-2, ...;
    ``slim_kernels.integrations.peft.TRANSFORMERS_MODELS_TO_SLIM_TARGET_MODULES_MAPPING``), and
    the Llama names on a model that is no transformers model.
    ``backend``: auto | triton | cuda | cpp | torch.

    Numbers may be Python or NumPy scalars (``np.int64``, ``np.float32``, ``np.bool_``); they
    are stored as Python ``int`` / ``float`` / ``bool``. A config is immutable and checked
    whole when it is built: :meth:`replace` gives a changed copy, checked the same way. To
    change a built layer's settings, assign such a copy (``layer.config =
    layer.config.replace(yield_strength=0.5)``); the layer checks that the shape fields
    (``num_lora_experts``, ``num_identity_experts``, ``rank``, ``num_clusters``) and
    ``distance_scale`` (which decides its buffers) are those it was built with.
    """

    num_lora_experts: int = 8
    num_identity_experts: int = 2
    rank: int = 16
    alpha: float = 32.0
    use_rslora: bool = False
    top_k: int = 2
    lora_dropout: float = 0.0
    num_clusters: int = 16
    yield_strength: float = 2.0
    distance_reduce: str = "rms"
    distance_scale: str = "none"
    cluster_momentum: float = 0.1
    cluster_eps: float = 1e-5
    merge_drop: float = 0.0
    merge_rescale: bool = False
    merge_at_eval: bool = False
    l1_coef: float = 0.0
    balance_coef: float = 0.0
    target_modules: Optional[Tuple[str, ...]] = None
    backend: str = "auto"

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_built", False):
            raise dataclasses.FrozenInstanceError(
                f"SlimConfig is immutable (it was checked whole when built): instead of "
                f"config.{name} = ..., use config.replace({name}=...), which checks the new "
                f"config, and assign that to the layer (layer.config = ...)")
        object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> "SlimConfig":
        """A copy with ``changes`` applied, checked whole (as a new config)."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ValueError(
                    f"SlimConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}"
                )

        def is_int(v: Any) -> bool:  # Python or NumPy integers, not bools
            return isinstance(v, numbers.Integral) and not _is_bool(v)

        def is_num(v: Any) -> bool:
            if not isinstance(v, numbers.Real) or _is_bool(v):
                return False
            try:
                return math.isfinite(v)
            except OverflowError:  # an int too large for a float
                return False

        for name in INT_FIELDS:
            need(is_int(getattr(self, name)), name, "an int")
            setattr(self, name, int(getattr(self, name)))
        for name in FLOAT_FIELDS:
            v = getattr(self, name)
            need(is_num(v), name, "a finite number")
            # NumPy scalars become Python ones (JSON, equality); Python ints stay ints
            setattr(self, name, int(v) if isinstance(v, numbers.Integral) else float(v))
        for name in BOOL_FIELDS:
            need(_is_bool(getattr(self, name)), name, "a bool")
            setattr(self, name, bool(getattr(self, name)))

        need(self.num_lora_experts >= 1, "num_lora_experts", "an int >= 1")
        need(self.num_identity_experts >= 0, "num_identity_experts", "an int >= 0")
        need(self.rank >= 1, "rank", "an int >= 1")
        need(self.alpha > 0, "alpha", "a number > 0")
        num_experts = self.num_lora_experts + self.num_identity_experts
        need(1 <= self.top_k <= num_experts, "top_k",
             f"an int in [1, num_lora_experts + num_identity_experts] = [1, {num_experts}]")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "a number in [0, 1)")
        need(self.num_clusters >= 0, "num_clusters", "an int >= 0")
        need(self.yield_strength >= 0, "yield_strength", "a number >= 0")
        need(self.distance_reduce in DISTANCE_REDUCES, "distance_reduce",
             f"one of {', '.join(DISTANCE_REDUCES)}")
        need(isinstance(self.distance_scale, str) and self.distance_scale in DISTANCE_SCALES,
             "distance_scale", f"one of {', '.join(DISTANCE_SCALES)}")
        need(0.0 < self.cluster_momentum <= 1.0, "cluster_momentum", "a number in (0, 1]")
        need(self.cluster_eps > 0, "cluster_eps", "a number > 0")
        need(0.0 <= self.merge_drop < 1.0, "merge_drop", "a number in [0, 1)")
        need(self.l1_coef >= 0, "l1_coef", "a number >= 0")
        need(self.balance_coef >= 0, "balance_coef", "a number >= 0")
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        need(self.target_modules is None or isinstance(self.target_modules, tuple)
             and len(self.target_modules) > 0
             and all(isinstance(t, str) and t for t in self.target_modules),
             "target_modules", "None or a non-empty tuple of module names (str)")
        need(self.backend in BACKENDS, "backend", f"one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "_built", True)

    # -- derived quantities -------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.num_lora_experts + self.num_identity_experts

    @property
    def scaling(self) -> float:
        """s = alpha / r (or alpha / sqrt(r) with use_rslora)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def yielding_enabled(self) -> bool:
        return self.num_clusters > 0 and self.yield_strength > 0 and self.num_identity_experts > 0

    @property
    def clustering_enabled(self) -> bool:
        """Clusters are tracked whenever they exist (even if lam=0, for routing_stats)."""
        return self.num_clusters > 0

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.target_modules is not None:
            d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SlimConfig":
        if not isinstance(d, Mapping):
            raise TypeError(f"SlimConfig.from_dict expects a dict of field values, got "
                            f"{type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ValueError(f"SlimConfig got unknown field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if "target_modules" in d and isinstance(d["target_modules"], list):
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)

    def to_json(self, path: Union[str, "os.PathLike[str]", None] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, "os.PathLike[str]"]) -> "SlimConfig":
        """From JSON text (starting with ``{`` or ``[``) or the path of a JSON file."""
        if isinstance(text_or_path, os.PathLike):
            text_or_path = os.fspath(text_or_path)
        if not isinstance(text_or_path, str):
            raise TypeError(f"SlimConfig.from_json expects JSON text or a file path (str), got "
                            f"{type(text_or_path).__name__}")
        text, where = text_or_path, "the JSON text"
        if not text.lstrip().startswith(("{", "[")):
            where = text_or_path
            with open(text_or_path, "r", encoding="utf-8") as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"SlimConfig.from_json: {where} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"SlimConfig.from_json: {where} holds a JSON {type(d).__name__}, "
                             f"expected an object of field values {{...}}")
        return cls.from_dict(d)
