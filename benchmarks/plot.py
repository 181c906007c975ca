#!/usr/bin/env python
"""Redraw the plot of CSVs written by ``slim-kernels bench`` (one PNG per CSV, beside it).

    python benchmarks/plot.py benchmarks/results/bench_*_cpu_float32.csv [--out DIR]
    python benchmarks/plot.py results.csv --table          # also print the ratio tables
    python benchmarks/plot.py results.csv --markdown       # markdown table (README)

The figure (slim_kernels.bench.reporting.plot_csv): a row of panels per layer shape and mode;
time against the swept value, ratio to the base linear with the SLIM FLOP floor, peak memory.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("csv", nargs="+", help="CSV file(s) in the bench schema")
    p.add_argument("--out", default=None, help="folder for the PNGs (None: beside each CSV)")
    p.add_argument("--table", action="store_true", help="print the ratio-to-base tables")
    p.add_argument("--markdown", default=None, metavar="MODE", nargs="?",
                   const="forward+backward",
                   help="print a markdown ratio table for MODE (forward+backward if no MODE)")
    p.add_argument("--metric", default=None, choices=["time_ms", "cpu_ms", "peak_MB"],
                   help="of the tables, and of the plot's time panels (time_ms or cpu_ms); "
                        "None: cpu_ms when the CSV has it, else time_ms")
    a = p.parse_args(argv)
    for path in a.csv:
        if not os.path.isfile(path):
            p.error(f"argument csv: {path!r} is not a file")
    from slim_kernels.bench.reporting import markdown_table, plot_csv, read_csv, summary_table

    for path in a.csv:
        rows = read_csv(path)
        metric = a.metric or ("cpu_ms" if any(r["metric"] == "cpu_ms" for r in rows)
                              else "time_ms")
        print(f"wrote {plot_csv(path, a.out, metric=metric if metric != 'peak_MB' else None)}")
        if a.table:
            print(summary_table(rows, metric))
        if a.markdown:
            print(markdown_table(rows, a.markdown, metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
