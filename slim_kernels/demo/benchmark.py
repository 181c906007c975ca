"""The forgetting benchmark behind ``slim-kernels demo``.

Fine-tune the embedded base (``load_base_model()``) on the new task alone with several
methods, every one with the same steps, learning rate, batches (same data stream) and seed,
and measure on held-out examples (teacher-forced exact match, :mod:`.evaluate`):

- the new task's accuracy before and after (``caesar``, or ``symbols`` with ``--task``: see
  :mod:`.tasks`);
- every general skill's accuracy before and after, and the **retention**: the mean over the
  general skills of ``after / before``. ``recall`` is *excluded* from the retention (the base
  is at chance on it, about 0.4, so its ratio measures noise, not forgetting); it is still
  measured and shown per skill;
- the same every ``eval_every`` steps (retention over training);
- for SLIM methods, ``routing_stats`` per task and per layer after training: the share of the
  routing mass on identity experts for general-skill tokens vs new-task tokens (the diagnostic
  of weight yielding).

Methods (:func:`method_specs`):

- ``lora``: plain LoRA built with slim_kernels itself (``SlimConfig(num_lora_experts=1,
  num_identity_experts=0, top_k=1, num_clusters=0)``), rank ``E_L * r`` of the SLIM
  defaults (8 * 16 = 128), alpha = 2 * rank (same scaling 2.0 as SLIM), on the same seven
  projections. Budget match: LoRA's A/B factors have exactly as many parameters as SLIM's
  eight experts; SLIM additionally has its router (10 x in_features per projection, 3 % more
  trainable parameters), which is not matched.
- ``slim``: ``SlimConfig()`` defaults (8 LoRA + 2 identity experts, r 16, top-2, 16 clusters,
  momentum 0.1, yield 2.0, merge_drop 0.0 = dynamic merging off, l1 0).
- ``slim-spread``: the defaults with ``distance_scale="spread"``.
- ablations: ``slim-no-identity`` (num_identity_experts=0, so no yielding either),
  ``slim-no-yield`` (num_clusters=0), ``slim+merge`` (merge_drop=0.3: the defaults have
  merging off, so the "with merging" arm is this variant; compare it with ``slim``).
- ``lora-r128``, ``lora-r16``: LoRA through PEFT's ``LoraConfig`` (alpha = 2r) on the same
  projections (optional, ``--methods``).
- ``full``: full fine-tuning of the same projections (optional, ``--methods``).

Each method costs 13-65 s of CPU at the default size (120 steps, 64 held-out examples per task,
eval every 30 steps); the whole demo took 264 s of CPU here (under 5 minutes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..config import SlimConfig
from .evaluate import EVAL_SEED, exact_match, heldout_set
from .finetune import finetune, new_task_batches
from .methods import DEFAULT_METHODS, method_specs, prepare_arm
from .tasks import ALL_TASKS, GENERAL_TASKS, NEW_TASK, NEW_TASKS

__all__ = ["RETENTION_TASKS", "retention", "run_benchmark", "format_table", "write_plot"]

# general skills that count in the retention: recall is excluded, the base is at chance on it
RETENTION_TASKS = tuple(t for t in GENERAL_TASKS if t != "recall")

def retention(before: Dict[str, float], after: Dict[str, float],
              tasks: Sequence[str] = RETENTION_TASKS) -> float:
    """Mean over ``tasks`` of after / before (tasks the base scores 0 on are skipped)."""
    ratios = [after[t] / before[t] for t in tasks if before[t] > 0]
    return sum(ratios) / len(ratios) if ratios else float("nan")


def _eval_all(model, data, tasks=None, routing: bool = False):
    """Accuracy per task (every task of ``data`` by default); with ``routing``, also SLIM
    routing stats per task and layer."""
    from ..layer import routing_stats, track_routing

    tasks = list(data) if tasks is None else tasks
    acc, route = {}, {}
    for t in tasks:
        if routing:
            with track_routing(model):
                routing_stats(model, reset=True)
                acc[t] = exact_match(model, t, data[t])
                route[t] = routing_stats(model, reset=True)
        else:
            acc[t] = exact_match(model, t, data[t])
    return (acc, route) if routing else acc


def _routing_summary(route: Dict[str, Dict[str, Dict[str, float]]], task: str = NEW_TASK) -> Dict:
    """Per layer: identity mass on the new task vs the mean over the retention skills."""
    if not route:
        return {}
    layers = list(next(iter(route.values())).keys())
    per_layer = {}
    for name in layers:
        new = route[task][name]["identity_mass"]
        gen = [route[t][name]["identity_mass"] for t in RETENTION_TASKS]
        gd = [route[t][name]["mean_distance"] for t in RETENTION_TASKS]
        gd = [v for v in gd if v is not None]
        per_layer[name] = {"identity_mass_new": new, "identity_mass_general": sum(gen) / len(gen),
                           "distance_new": route[task][name]["mean_distance"],
                           "distance_general": sum(gd) / len(gd) if gd else float("nan")}

    def mean(key):
        v = [d[key] for d in per_layer.values() if d[key] is not None and not math.isnan(d[key])]
        return sum(v) / len(v) if v else float("nan")

    by_task = {}
    for t, layers_t in route.items():
        v = [d["identity_mass"] for d in layers_t.values() if not math.isnan(d["identity_mass"])]
        dv = [d["mean_distance"] for d in layers_t.values()
              if d["mean_distance"] is not None and not math.isnan(d["mean_distance"])]
        by_task[t] = {"identity_mass": sum(v) / len(v) if v else float("nan"),
                      "distance": sum(dv) / len(dv) if dv else float("nan")}
    n_more = sum(1 for d in per_layer.values()
                 if d["identity_mass_general"] > d["identity_mass_new"])
    return {"per_layer": per_layer, "by_task": by_task,
            "mean_identity_mass_new": mean("identity_mass_new"),
            "mean_identity_mass_general": mean("identity_mass_general"),
            "mean_distance_new": mean("distance_new"),
            "mean_distance_general": mean("distance_general"),
            "layers_general_more_identity": n_more, "layers": len(per_layer)}


def run_method(name: str, spec, load_model: Callable, data: Dict, *, steps: int, lr: float,
               batch_size: int, seed: int, eval_every: int, progress: bool = True,
               before: Optional[Dict[str, float]] = None, task: str = NEW_TASK,
               slim_config: Optional[SlimConfig] = None) -> Dict:
    """Fine-tune a fresh copy of the base with one method; accuracies before/during/after.
    ``slim_config``: the SLIM arm's config, whose projections the full and LoRA arms train
    (default ``SlimConfig()``)."""
    t_wall, t_cpu = time.time(), time.process_time()
    random.seed(seed)
    torch.manual_seed(seed)
    model = load_model()
    if before is None:
        before = _eval_all(model, data)
    model, n_train = prepare_arm(model, spec, slim_config or SlimConfig(backend="torch"))
    is_slim = isinstance(spec, SlimConfig)

    def cb(m, step):
        acc = _eval_all(m, data)
        return {**acc, "retention": retention(before, acc)}

    res = finetune(model, new_task_batches(batch_size, seed=seed, task=task), steps, lr,
                   eval_every=eval_every, callback=cb, progress=progress, desc=name)
    after, route = _eval_all(model, data, routing=is_slim) if is_slim else (_eval_all(model, data), {})
    out = {
        "method": name,
        "config": spec.to_dict() if is_slim else (
            "full fine-tuning of the projections" if spec == "full" else
            f"PEFT LoraConfig(r={spec.r}, lora_alpha={spec.lora_alpha}) on the projections"),
        "trainable_params": n_train,
        "before": before, "after": after,
        "new_task_acc": after[task],
        "retention": retention(before, after),
        "curve": [{"step": 0, **before, "retention": 1.0}] + res.evals,
        "first_loss": res.losses[0], "last_loss": res.losses[-1],
        "routing": _routing_summary(route, task),
        "routing_raw": route,
        "wall_s": time.time() - t_wall, "cpu_s": time.process_time() - t_cpu,
    }
    return out


def run_benchmark(methods: Sequence[str] = DEFAULT_METHODS, *, steps: int = 120,
                  lr: float = 1e-3, batch_size: int = 32, seed: int = 0, eval_n: int = 64,
                  eval_every: int = 30, threads: int = 1, progress: bool = True,
                  base_path=None, slim_overrides: Optional[Dict] = None,
                  task: str = NEW_TASK) -> Dict:
    """All methods on the embedded base (or the checkpoint at ``base_path``), fine-tuned on
    the new task ``task`` (caesar, or symbols: see :mod:`.tasks`)."""
    from .model import load_base_model

    torch.set_num_threads(threads)
    t_wall, t_cpu = time.time(), time.process_time()
    specs = method_specs(slim_overrides)
    unknown = [m for m in methods if m not in specs]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(specs)}")
    if task not in NEW_TASKS:
        raise ValueError(f"unknown new task {task!r}; known: {list(NEW_TASKS)}")
    data = heldout_set(tuple(GENERAL_TASKS) + (task,), n=eval_n, seed=EVAL_SEED)
    base = load_base_model(base_path)
    before = _eval_all(base, data)
    results = []
    for name in methods:
        results.append(run_method(name, specs[name], lambda: load_base_model(base_path), data,
                                  steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                  eval_every=eval_every, progress=progress, before=before,
                                  task=task, slim_config=specs["slim"]))
    return {
        "settings": {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                     "eval_n": eval_n, "eval_every": eval_every, "threads": threads,
                     "new_task": task, "retention_tasks": list(RETENTION_TASKS),
                     "slim_overrides": slim_overrides or {},
                     "base": str(base_path) if base_path else "embedded"},
        "base": before,
        "methods": results,
        "wall_s": time.time() - t_wall, "cpu_s": time.process_time() - t_cpu,
    }


def format_table(report: Dict) -> str:
    """The printed table: one row per method (plus the base)."""
    skills = list(GENERAL_TASKS)
    new = report["settings"]["new_task"]
    head = (f"{'method':<17}{'params':>9}{new:>8}{'retain':>8}" + "".join(f"{s:>8}" for s in skills)
            + f"{'id/new':>8}{'id/gen':>8}{'cpu s':>7}{'wall s':>7}")
    lines = [head, "-" * len(head)]
    b = report["base"]
    lines.append(f"{'base':<17}{'-':>9}{b[new]:8.3f}{1.0:8.3f}" + "".join(f"{b[s]:8.3f}" for s in skills))
    for r in report["methods"]:
        a = r["after"]
        rt = r.get("routing") or {}
        idn = rt.get("mean_identity_mass_new", float("nan"))
        idg = rt.get("mean_identity_mass_general", float("nan"))
        lines.append(f"{r['method']:<17}{r['trainable_params']:>9,}{a[new]:8.3f}{r['retention']:8.3f}"
                     + "".join(f"{a[s]:8.3f}" for s in skills)
                     + f"{idn:8.3f}{idg:8.3f}{r['cpu_s']:7.0f}{r['wall_s']:7.0f}")
    s = report["settings"]
    lines.append(f"retain = mean over {', '.join(s['retention_tasks'])} of after/before "
                 f"(recall excluded: base at chance); id/new, id/gen = mean identity-expert "
                 f"gate mass on {new} vs general-skill tokens (SLIM arms)")
    lines.append(f"{s['steps']} steps, lr {s['lr']}, batch {s['batch_size']}, seed {s['seed']}, "
                 f"{s['eval_n']} held-out examples per task; total {report['cpu_s']:.0f} s CPU, "
                 f"{report['wall_s']:.0f} s wall")
    return "\n".join(lines)


def write_plot(report: Dict, path) -> None:
    """Two panels: retention vs new-task accuracy per method; retention over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import label_points

    new = report["settings"]["new_task"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    points, colors = [], []
    for r in report["methods"]:
        points.append((r["after"][new], r["retention"]))
        colors.append(ax1.scatter(*points[-1], s=50).get_facecolor()[0])
        steps = [c["step"] for c in r["curve"]]
        ax2.plot(steps, [c["retention"] for c in r["curve"]], marker=".", label=r["method"])
    ax1.axhline(0.9, color="grey", ls=":", lw=1)
    ax1.set_xlabel(f"new-task ({new}) accuracy")
    ax1.set_ylabel("general-skill retention (share of base)")
    ax1.set_xlim(-0.05, 1.05)
    ax1.set_ylim(-0.05, 1.1)
    ax1.set_title("learn more (right) vs forget less (up)")
    ax2.set_xlabel("fine-tuning step")
    ax2.set_ylabel("retention")
    ax2.set_ylim(-0.05, 1.1)
    ax2.set_title("retention over training")
    ax2.legend(fontsize=7)
    s = report["settings"]
    fig.suptitle(f"{s['base']} base, new task {new}, {s['steps']} steps, lr {s['lr']}, seed {s['seed']}", fontsize=9)
    fig.tight_layout()
    label_points(ax1, points, [r["method"] for r in report["methods"]], colors)
    fig.savefig(path, dpi=110)
    plt.close(fig)
