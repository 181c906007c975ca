#!/usr/bin/env python
"""Draw the benchmark plots from a CSV written by ``slim-kernels bench``.

    python benchmarks/plot.py benchmarks/results/bench_T_cpu_float32.csv [--out DIR]
    python benchmarks/plot.py results.csv --table          # also print the ratio tables
    python benchmarks/plot.py results.csv --markdown       # markdown table (README)

Plots: time vs x per provider, overhead over the base linear with the SLIM FLOP floor,
peak memory; for CPU CSVs also process-CPU-time versions (see slim_kernels.bench.plot_csv).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="CSV file(s) in the bench schema")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: beside the CSV)")
    p.add_argument("--table", action="store_true", help="print the ratio-to-base tables")
    p.add_argument("--markdown", default=None, metavar="MODE", nargs="?",
                   const="forward+backward",
                   help="print a markdown ratio table for MODE (default forward+backward)")
    p.add_argument("--metric", default="time_ms", help="time_ms | cpu_ms | peak_MB")
    a = p.parse_args(argv)
    from slim_kernels.bench import markdown_table, plot_csv, read_csv, summary_table

    for path in a.csv:
        for f in plot_csv(path, a.out):
            print(f"plot: {f}")
        if a.table:
            print(summary_table(read_csv(path), a.metric))
        if a.markdown:
            print(markdown_table(read_csv(path), a.markdown, a.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
