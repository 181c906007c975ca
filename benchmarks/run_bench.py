#!/usr/bin/env python
"""Run the SLIM benchmark suite: the same as ``slim-kernels bench`` (same flags).

    python benchmarks/run_bench.py --quick                       # < 3 min on a 2-core CPU
    python benchmarks/run_bench.py --sweep T --out benchmarks/results
    python benchmarks/run_bench.py --device cuda --sweep T --out $OUT   # Llama-8B shapes, bf16

Writes ``<out>/bench_<sweep>_<device>_<dtype>.csv`` and ``<out>/bench_<sweep>_<device>_<dtype>.png``
and prints each provider's ratio to the base linear next to the SLIM FLOP floor. All logic is
in the ``slim_kernels.bench`` package; ``--help`` lists the flags.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slim_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
