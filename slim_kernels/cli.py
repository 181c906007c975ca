"""``slim-kernels`` command line: info | example | bench | demo (the forgetting benchmark)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import slim_kernels as sk

    print(f"slim_kernels {sk.__version__}, torch {torch.__version__}")
    print(f"backends available here: {', '.join(sk.available_backends())}")
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
    p = argparse.ArgumentParser(prog="slim-kernels", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="versions and the backends that can run here")
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("example", help="train one SLIM layer for a few steps and show its routing")
    s.add_argument("--steps", type=int, default=30)
    s.set_defaults(func=_cmd_example)
    s = sub.add_parser(
        "bench", help="time and memory of the SLIM op against unfused baselines (CSV, plots)",
        description="Benchmark the SLIM op (every available backend) against the frozen base "
                    "linear, eager loop / dense einsum / torch.compile baselines and PEFT LoRA. "
                    "Writes one CSV, PNG plots and prints each provider's ratio to base.")
    from .bench.command import add_arguments

    add_arguments(s)
    s.set_defaults(func=_cmd_bench, parser=s)
    s = sub.add_parser("demo", help="forgetting benchmark: fine-tune the embedded base on a new "
                                    "task with LoRA, SLIM and ablations; table, plot, JSON")
    from .demo.cli import add_arguments as add_demo_arguments

    add_demo_arguments(s)
    s.set_defaults(func=_cmd_demo, parser=s)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
