"""lm-eval's command line with SLIM registered in PEFT first::

    python -m slim_kernels.integrations.lm_eval --model hf \\
        --model_args pretrained=<base dir>,peft=<adapter dir> --tasks <task>

The plain ``lm_eval`` command loads SLIM adapters by itself where slim_kernels is installed
(the install's hook registers SLIM when lm-eval imports peft: ``docs/huggingface.md``, "How
SLIM gets registered"). This module is for a Python where that hook does not run (slim_kernels
only on ``PYTHONPATH``, or ``SLIM_KERNELS_PEFT_HOOK=0``): it imports :mod:`slim_kernels.peft`,
then runs lm-eval's own ``cli_evaluate`` with the same arguments.
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
