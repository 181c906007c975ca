"""``slim-kernels`` command line: info | example | bench | demo (the forgetting benchmark).

Building the parser imports no torch, so ``--help`` and ``--version`` answer at once; each
command imports what it needs when it runs. Every bad option is an argparse error (exit 2)
naming it, before any work starts. Messages go to stderr through the ``slim_kernels``
logger; the command's own output (tables, ``wrote <file>``) to stdout.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import List, Optional

from ._version import __version__

# reStructuredText inline markup of docstrings: ``code``, :func:`name`, `text`
_RST = re.compile(r"(?::[a-z]+:)?`{1,2}([^`]+)`{1,2}")


def plain(text: str) -> str:
    """``text`` with its reStructuredText inline markup taken out, for the terminal."""
    return _RST.sub(r"\1", text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to every option's help unless the help already says its
    default in words (options whose default depends on the device or on other options), and
    shows descriptions and help written in reStructuredText as plain text."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "%(default)" in h or "(default" in h or "default:" in h:
            return h
        return super()._get_help_string(action)

    def _format_text(self, text):
        return super()._format_text(plain(text))

    def _expand_help(self, action):
        return plain(super()._expand_help(action))


class _Parser(argparse.ArgumentParser):
    """The top-level parser. argparse reports a missing command before an unknown option
    (``slim-kernels --frobnicate``: "the following arguments are required: COMMAND"), so
    the command is optional to argparse and both are checked here, unknown arguments first,
    by the parser of the command they were given to."""

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        commands = self._subparsers_action().choices
        if extras:
            which = "option" if all(e.startswith("-") for e in extras) else "argument"
            msg = f"unknown {which}{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"
            if ns.command is None:
                self.error(f"{msg} (commands: {', '.join(commands)}; `{self.prog} COMMAND "
                           f"--help` lists a command's options)")
            commands[ns.command].error(f"{msg} (see {commands[ns.command].prog} --help)")
        if ns.command is None:
            self.error(f"expected a command: {', '.join(commands)}")
        return ns

    def _subparsers_action(self):
        return next(a for a in self._actions if isinstance(a, argparse._SubParsersAction))


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
    p = _Parser(prog="slim-kernels", description=__doc__.split("\n\n")[0],
                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help, description=None):
        return sub.add_parser(name, help=help, description=description or help,
                              formatter_class=HelpFormatter)

    s = command("info", "versions, the backends that can run here, and why the others cannot")
    s.set_defaults(func=_cmd_info)
    s = command("example", "train one SLIM layer for a few steps and show its routing")
    from .bench.command import int_at_least

    s.add_argument("--steps", type=int_at_least(1), default=30, help="training steps")
    s.set_defaults(func=_cmd_example)
    s = command(
        "bench", "time and memory of the SLIM op against unfused baselines (CSV, plot)",
        "Benchmark the SLIM op (every available backend) against the frozen base linear, "
        "eager loop / dense einsum / torch.compile baselines and PEFT LoRA. Writes one CSV "
        "and one plot, and prints each provider's ratio to base.")
    from .bench.command import add_arguments

    add_arguments(s)
    s.set_defaults(func=_cmd_bench, parser=s)
    s = command("demo", "forgetting benchmark: fine-tune the embedded base on a new task with "
                        "LoRA, SLIM and ablations; table, plot, JSON")
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
