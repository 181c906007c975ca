#!/usr/bin/env python
"""Run the SLIM benchmark suite (same flags as ``slim-kernels bench``).

    python benchmarks/run_bench.py --quick                       # < 3 min on a 2-core CPU
    python benchmarks/run_bench.py --sweep T --out benchmarks/results
    python benchmarks/run_bench.py --device cuda --sweep T --out $OUT   # Llama-8B shapes, bf16

Writes ``<out>/bench_<sweep>_<device>_<dtype>.csv`` (kernel, provider, mode, metric, x, y_50,
y_20, y_80, device, dtype, versions), PNG plots drawn from it, and prints each provider's
ratio to the base linear next to the SLIM FLOP floor. All logic is in slim_kernels/bench.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    args_ns = sys.argv[1:] if argv is None else argv
    if "--providers" in args_ns and any("slim_triton" in a for a in args_ns):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # only matters without CUDA
    from slim_kernels.bench import add_arguments, main_from_args

    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
