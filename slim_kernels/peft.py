"""SLIM as a PEFT method (``slim_kernels.integrations.peft``): ``SlimPeftConfig`` is used
with ``peft.get_peft_model`` exactly like ``LoraConfig``. Importing this module registers
SLIM with PEFT (tested PEFT versions only)."""
from .integrations.peft import (  # noqa: F401
    PEFT_TYPE, SlimPeftConfig, SlimPeftLayer, SlimTuner, register,
)

__all__ = ["SlimPeftConfig", "SlimPeftLayer", "SlimTuner", "register", "PEFT_TYPE"]
