"""``slim-kernels`` command line: info | example | bench | demo (the forgetting benchmark).

Building the parser imports no torch, so ``--help`` and ``--version`` answer at once; each
command imports what it needs when it runs. Every bad option is an argparse error (exit 2)
naming it, before any work starts. Messages go to stderr through the ``slim_kernels``
logger; the command's own output (tables, ``wrote <file>``) to stdout.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from ._version import __version__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to every option's help unless the help already says its
    default in words (options whose default depends on the device or on other options)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or "(default" in h or "default:" in h:
            return h
        return super()._get_help_string(action)


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (pytest and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Show the package's messages (``logging.getLogger("slim_kernels")``) on stderr."""
    log = logging.getLogger("slim_kernels")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("slim-kernels: %(levelname)s: %(message)s"))
        log.addHandler(h)
    log.setLevel(level)


def _cmd_info(args: argparse.Namespace) -> int:
    import importlib.util

    import slim_kernels as sk

    available = sk.available_backends()  # first: it says which torch to install when none is
    import torch

    from .ops.backends import NAMES, _ext
    from .ops.dispatch import unavailable_reason

    print(f"slim_kernels {sk.__version__}, torch {torch.__version__}")
    print(f"backends available here: {', '.join(available)}")
    missing = [n for n in NAMES if n not in available]
    if missing:
        print("not available here:")
    for name in missing:
        # the root cause first: a CPU torch or a missing package makes the rest moot
        if name == "cuda" and torch.version.cuda is None:
            why = (f"torch {torch.__version__} is a CPU build; the cuda backend needs a CUDA "
                   f"torch and slim_kernels._C built on it")
        elif name == "triton" and importlib.util.find_spec("triton") is None:
            why = "triton is not installed (pip install triton; it runs on CUDA GPUs)"
        else:
            why = unavailable_reason(name)
        print(f"  {name}: {why}")
    print(f"slim_kernels._C: {_ext.origin() or 'not loaded (see cpp above)'}")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def _cmd_example(args: argparse.Namespace) -> int:
    from .quickstart import main as quickstart

    quickstart(steps=args.steps)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.command import main_from_args

    return main_from_args(args, args.parser)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.cli import check_arguments, run_from_args

    return run_from_args(args, check_arguments(args.parser, args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slim-kernels", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", help="versions and the backends that can run here",
                       formatter_class=HelpFormatter)
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("example", help="train one SLIM layer for a few steps and show its routing",
                       formatter_class=HelpFormatter)
    from .bench.command import int_at_least

    s.add_argument("--steps", type=int_at_least(1), default=30, help="training steps")
    s.set_defaults(func=_cmd_example)
    s = sub.add_parser(
        "bench", help="time and memory of the SLIM op against unfused baselines (CSV, plot)",
        description="Benchmark the SLIM op (every available backend) against the frozen base "
                    "linear, eager loop / dense einsum / torch.compile baselines and PEFT LoRA. "
                    "Writes one CSV and one plot, and prints each provider's ratio to base.",
        formatter_class=HelpFormatter)
    from .bench.command import add_arguments

    add_arguments(s)
    s.set_defaults(func=_cmd_bench, parser=s)
    s = sub.add_parser("demo", help="forgetting benchmark: fine-tune the embedded base on a new "
                                    "task with LoRA, SLIM and ablations; table, plot, JSON",
                       formatter_class=HelpFormatter)
    from .demo.cli import add_arguments as add_demo_arguments

    add_demo_arguments(s)
    s.set_defaults(func=_cmd_demo, parser=s)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:  # torch is not a dependency: say which to install
        if e.name != "torch":
            raise
        from ._build import TORCH_MISSING

        print(f"slim-kernels: error: {TORCH_MISSING}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
