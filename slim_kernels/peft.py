"""SLIM as a PEFT method (``slim_kernels.integrations.peft``): ``SlimPeftConfig`` is used
with ``peft.get_peft_model`` exactly like ``LoraConfig``. SLIM is registered with PEFT as soon
as ``peft`` is imported (``slim_kernels._peft_hook``); importing this module registers it too
(tested PEFT versions only)."""
from .integrations.peft import (  # noqa: F401
    PEFT_TYPE, TRANSFORMERS_MODELS_TO_SLIM_TARGET_MODULES_MAPPING, SlimPeftConfig, SlimPeftLayer,
    SlimTuner, register,
)

__all__ = ["SlimPeftConfig", "SlimPeftLayer", "SlimTuner", "register", "PEFT_TYPE",
           "TRANSFORMERS_MODELS_TO_SLIM_TARGET_MODULES_MAPPING"]
