"""Reporting: the CSV (one schema, :data:`CSV_COLUMNS`, with the provenance of the run in
its ``versions`` column), the ratio-to-base tables (text and markdown) and the plot.

Nothing here imports matplotlib until a plot is drawn.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

from .cases import BASELINE_PROVIDERS, MODES, case_from_kernel, parse_kernel, sweep_label, x_key
from .measuring import flop_floor

__all__ = ["CSV_COLUMNS", "markdown_table", "plot_csv", "ratio_rows", "read_csv",
           "speedup_table", "summary_table", "write_csv"]

# versions: slim_kernels.provenance.provenance_string() of the run (versions, machine, commit)
CSV_COLUMNS = ["kernel", "provider", "mode", "metric", "x", "y_50", "y_20", "y_80",
               "device", "dtype", "versions"]


def write_csv(rows: Iterable[Dict[str, object]], path: str,
              columns: Sequence[str] = CSV_COLUMNS) -> str:
    """Write ``rows`` (dicts with at least ``columns``) to ``path``; return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in columns})
    return path


def read_csv(path: str, columns: Sequence[str] = CSV_COLUMNS) -> List[Dict[str, str]]:
    """The rows of a CSV written by :func:`write_csv`; other columns are an error."""
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        if rd.fieldnames != list(columns):
            raise ValueError(f"{path}: columns {rd.fieldnames}, expected {list(columns)}")
        return list(rd)


def _text_table(table: List[List[str]], indent: str = "") -> List[str]:
    """Aligned columns, a rule under the header row."""
    w = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [indent + "  ".join(c.ljust(w[j]) for j, c in enumerate(r)).rstrip() for r in table]
    lines.insert(1, indent + "  ".join("-" * x for x in w))
    return lines


def _markdown(table: List[List[str]]) -> List[str]:
    head = table[0]
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(c) + " |" for c in table[1:]])


def _fixed(kernel: str) -> str:
    """The fixed shape fields of a ``kernel`` string: 'K=1024 N=1024 E_L=8 r=16' (T too
    when it is not swept)."""
    return " ".join(f"{a}={b}" for a, b in parse_kernel(kernel).items()
                    if b != "*" and a in ("K", "N", "T", "E_L", "r"))


def ratio_rows(rows: List[Dict[str, str]], metric: str = "time_ms") -> List[Dict[str, object]]:
    """Per (kernel, mode, x, provider): median, ratio to base (median over median) and the
    FLOP floor of SLIM at that point."""
    base = {(r["kernel"], r["mode"], r["x"]): float(r["y_50"]) for r in rows
            if r["metric"] == metric and r["provider"] == "base"}
    out = []
    for r in rows:
        if r["metric"] != metric:
            continue
        b = base.get((r["kernel"], r["mode"], r["x"]))
        case = case_from_kernel(r["kernel"], r["x"])
        out.append(dict(kernel=r["kernel"], mode=r["mode"], x=r["x"], provider=r["provider"],
                        y_50=float(r["y_50"]),
                        ratio=float(r["y_50"]) / b if b else float("nan"),
                        floor=flop_floor(case, r["mode"])))
    return out


def summary_table(rows: List[Dict[str, str]], metric: str = "time_ms") -> str:
    """Text tables: per kernel and mode, rows = providers, columns = x, cells =
    'ratio to base (median)'; a last row gives the SLIM FLOP floor."""
    rr = ratio_rows(rows, metric)
    lines: List[str] = []
    kernels = list(dict.fromkeys(r["kernel"] for r in rr))
    unit = "ms" if metric.endswith("_ms") else "MB"
    for k in kernels:
        for mode in MODES:
            sel = [r for r in rr if r["kernel"] == k and r["mode"] == mode]
            if not sel:
                continue
            xs = sorted(dict.fromkeys(r["x"] for r in sel), key=x_key)
            provs = list(dict.fromkeys(r["provider"] for r in sel))
            sweep_name = sweep_label(k)
            head = [f"{mode} [{metric}]"] + [f"{sweep_name}={x}" for x in xs]
            table = [head]
            for p in provs:
                cells = [p]
                for x in xs:
                    m = [r for r in sel if r["provider"] == p and r["x"] == x]
                    cells.append(f"{m[0]['ratio']:.2f}x ({m[0]['y_50']:.3g} {unit})" if m else "-")
                table.append(cells)
            if metric.endswith("_ms"):
                fl = ["FLOP floor (SLIM)"]
                for x in xs:
                    m = [r for r in sel if r["x"] == x]
                    fl.append(f"{m[0]['floor']:.2f}x" if m else "-")
                table.append(fl)
            lines += [k] + _text_table(table, indent="  ") + [""]
    return "\n".join(lines)


def markdown_table(rows: List[Dict[str, str]], mode: str = "forward+backward",
                   metric: str = "time_ms") -> str:
    """One markdown table per kernel for ``mode``: ratio to base, FLOP floor row."""
    rr = [r for r in ratio_rows(rows, metric) if r["mode"] == mode]
    out = []
    for k in dict.fromkeys(r["kernel"] for r in rr):
        sel = [r for r in rr if r["kernel"] == k]
        xs = sorted(dict.fromkeys(r["x"] for r in sel), key=x_key)
        sweep_name = sweep_label(k)
        what = {"time_ms": "wall time", "cpu_ms": "process CPU time",
                "peak_MB": "peak memory", "saved_MB": "saved activations"}.get(metric, metric)
        unit = "ms" if metric.endswith("_ms") else "MB"
        out.append(f"`{k}`, {mode}, {what}: ratio to `base` (median {unit} in brackets)\n")
        table = [["provider"] + [f"{sweep_name}={x}" for x in xs]]
        for p in dict.fromkeys(r["provider"] for r in sel):
            cells = [p]
            for x in xs:
                m = [r for r in sel if r["provider"] == p and r["x"] == x]
                cells.append(f"{m[0]['ratio']:.2f}x ({m[0]['y_50']:.3g})" if m else "-")
            table.append(cells)
        if metric.endswith("_ms"):
            table.append(["*FLOP floor (SLIM)*"]
                         + [f"{[r for r in sel if r['x'] == x][0]['floor']:.2f}x" for x in xs])
        out += _markdown(table) + [""]
    return "\n".join(out)


def speedup_table(rows: List[Dict[str, str]], mode: str = "forward+backward",
                  metric: str = "time_ms", markdown: bool = False) -> str:
    """For each fused provider (``slim_*``) and point: its ratio to base, the FLOP floor, and
    how many times faster it is than each unfused baseline (baseline median / its median;
    > 1 means the fused path wins)."""
    rr = [r for r in ratio_rows(rows, metric) if r["mode"] == mode]
    med = {(r["kernel"], r["x"], r["provider"]): r["y_50"] for r in rr}
    fused = [p for p in dict.fromkeys(r["provider"] for r in rr) if p.startswith("slim_")]
    others = [p for p in BASELINE_PROVIDERS[1:] if any(r["provider"] == p for r in rr)]
    head = ["point", "provider", "vs base", "FLOP floor"] + [f"{o} / it" for o in others]
    table = [head]
    for k in dict.fromkeys(r["kernel"] for r in rr):
        xs = sorted(dict.fromkeys(r["x"] for r in rr if r["kernel"] == k), key=x_key)
        sweep_name, fixed = sweep_label(k), _fixed(k)
        for x in xs:
            for p in fused:
                me = med.get((k, x, p))
                if me is None:
                    continue
                r0 = [r for r in rr if r["kernel"] == k and r["x"] == x and r["provider"] == p][0]
                cells = [f"{fixed} {sweep_name}={x}", p, f"{r0['ratio']:.2f}x",
                         f"{r0['floor']:.2f}x"]
                for o in others:
                    v = med.get((k, x, o))
                    cells.append(f"{v / me:.2f}x" if v else "-")
                table.append(cells)
    if markdown:
        return "\n".join(_markdown(table))
    return "\n".join(_text_table(table))




_STYLE = {"base": ("k", "-", "o"), "eager_loop": ("tab:red", "--", "s"),
          "eager_dense": ("tab:orange", "--", "^"), "compiled_dense": ("tab:purple", "--", "v"),
          "peft_lora": ("tab:gray", ":", "x")}
_FUSED_COLORS = ["tab:blue", "tab:green", "tab:cyan", "tab:olive"]
_METRIC_WORDS = {"time_ms": "wall", "cpu_ms": "process CPU"}


def plot_csv(path: str, outdir: Optional[str] = None, prefix: Optional[str] = None,
             metric: Optional[str] = None) -> str:
    """One figure of one CSV, ``<outdir>/<prefix>.png`` (default: beside the CSV, named
    after it); returns its path.

    A row of panels per layer shape and mode; columns: the time of each provider against the
    swept value (median, p20-p80 band), its ratio to ``base`` with the SLIM FLOP floor
    dotted, and the peak memory during the call. ``metric``: ``time_ms`` (wall) or
    ``cpu_ms`` (process CPU time); default ``cpu_ms`` when the CSV has it (on a shared
    machine it is the time that leaves out waiting for a core), else ``time_ms``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogFormatter

    rows = read_csv(path)
    if not rows:
        raise ValueError(f"{path}: no rows to plot")
    have = {r["metric"] for r in rows}
    metric = metric or ("cpu_ms" if "cpu_ms" in have else "time_ms")
    if metric not in _METRIC_WORDS or metric not in have:
        raise ValueError(f"{path}: no {metric!r} rows to plot (has {sorted(have)}); "
                         f"expected one of {sorted(_METRIC_WORDS)}")
    outdir = outdir or os.path.dirname(os.path.abspath(path))
    prefix = prefix or os.path.splitext(os.path.basename(path))[0]
    os.makedirs(outdir, exist_ok=True)
    ratio = {(r["kernel"], r["mode"], r["x"], r["provider"]): r["ratio"]
             for r in ratio_rows(rows, metric)}
    panels = [(k, m) for k in dict.fromkeys(r["kernel"] for r in rows)
              for m in MODES if any(r["kernel"] == k and r["mode"] == m for r in rows)]
    what = _METRIC_WORDS[metric]
    columns = [(metric, f"{what} ms (median, p20-p80)", True),
               ("ratio", f"{what} time / base", False)]
    if "peak_MB" in have:
        columns.append(("peak_MB", "peak MB during the call", True))
    fig, axes = plt.subplots(len(panels), len(columns), squeeze=False,
                             figsize=(4.4 * len(columns), 2.9 * len(panels) + 0.8))
    fused_i: Dict[str, int] = {}
    plain = FormatStrFormatter("%g")  # 64 rather than 2^6

    def style(p):
        if p in _STYLE:
            return _STYLE[p]
        i = fused_i.setdefault(p, len(fused_i))
        return (_FUSED_COLORS[i % len(_FUSED_COLORS)], "-", "D")

    for i, (k, mode) in enumerate(panels):
        here = [r for r in rows if r["kernel"] == k and r["mode"] == mode]
        xs = sorted(dict.fromkeys(r["x"] for r in here), key=x_key)
        numeric = all(x_key(x)[0] == 0 for x in xs)
        pos = {x: (float(x) if numeric else n) for n, x in enumerate(xs)}
        for j, (col, ylabel, logy) in enumerate(columns):
            ax = axes[i][j]
            sel = [r for r in here if r["metric"] == (metric if col == "ratio" else col)]
            for p in dict.fromkeys(r["provider"] for r in sel):
                mine = sorted((r for r in sel if r["provider"] == p), key=lambda r: pos[r["x"]])
                px = [pos[r["x"]] for r in mine]
                if col == "ratio":
                    py = [ratio.get((k, mode, r["x"], p), float("nan")) for r in mine]
                else:
                    py = [float(r["y_50"]) for r in mine]
                c, ls, mk = style(p)
                ax.plot(px, py, color=c, ls=ls, marker=mk, label=p, ms=4)
                if col == metric:
                    ax.fill_between(px, [float(r["y_20"]) for r in mine],
                                    [float(r["y_80"]) for r in mine], color=c, alpha=0.15, lw=0)
            if col == "ratio":
                fl = [flop_floor(case_from_kernel(k, x), mode) for x in xs]
                ax.plot([pos[x] for x in xs], fl, color="k", ls=":", lw=1,
                        label="FLOP floor (SLIM)")
                ax.axhline(1.0, color="k", lw=0.6)
                ax.set_ylim(bottom=0.0)
            if numeric:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(plain)
            else:
                ax.set_xticks(list(pos.values()), xs, rotation=20, fontsize=7)
            if logy:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
                # minor labels only where the axis spans little more than a decade
                ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False,
                                                          minor_thresholds=(1.2, 0.5)))
            ax.set_xlabel(sweep_label(k))
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{_fixed(k)}, {mode}", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = {}, []
    for ax in axes.flat:  # the union of the panels' legends, in first-seen order
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    ncol = min(len(labels), 4)
    fig.legend([handles[lab] for lab in labels], labels, loc="upper center", ncol=ncol,
               fontsize=8)
    dev, dt = rows[0]["device"], rows[0]["dtype"]
    fig.text(0.01, 0.003, f"SLIM linear, {dev} {dt}; {rows[0]['versions']}", fontsize=6)
    legend_h = (0.22 * math.ceil(len(labels) / ncol) + 0.1) / fig.get_figheight()
    fig.tight_layout(rect=(0, 0.15 / fig.get_figheight(), 1, 1 - legend_h))
    fn = os.path.join(outdir, f"{prefix}.png")
    fig.savefig(fn, dpi=100)
    plt.close(fig)
    return fn
