"""lm-eval's command line with SLIM registered in PEFT: evaluate a SLIM adapter with
``peft=<adapter dir>`` exactly as a LoRA adapter::

    python -m slim_kernels.integrations.lm_eval --model hf \\
        --model_args pretrained=<base dir>,peft=<adapter dir> --tasks <task>

lm-eval loads ``peft=`` adapters with ``PeftModel.from_pretrained``, which knows SLIM once
:mod:`slim_kernels.peft` is imported; the ``lm_eval`` command cannot import it itself, so this
module does and then runs lm-eval's own ``cli_evaluate`` with the same arguments. In Python,
``import slim_kernels.peft`` before ``lm_eval.simple_evaluate(model="hf", model_args=...)``.
"""
from __future__ import annotations

import sys


def main(argv=None) -> None:
    from . import peft as _slim_peft  # noqa: F401  (registers SLIM with PEFT)

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
