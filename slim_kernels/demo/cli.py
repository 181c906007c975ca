"""``slim-kernels demo``: arguments, the run, and its outputs.

The report is written in this order, so nothing of a long run is lost to an optional piece
that is missing: the JSON (with the commit, versions and machine that produced it), then the
printed table, then the plot (skipped with a message when matplotlib is not installed).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, Optional

from ..provenance import provenance
from .methods import DEFAULT_METHODS  # imports no torch

logger = logging.getLogger("slim_kernels")

# tasks.NEW_TASK and tasks.NEW_TASKS (the embedded base's) and real_tasks.NEW_TASKS (a real
# model's), written out so that building the parser imports no torch (tasks.py does);
# tests/test_cli.py checks they agree.
NEW_TASK = "caesar"
NEW_TASKS = ("caesar", "symbols")
REAL_TASK = "vellish"
REAL_TASKS = ("vellish", "records")


def _json_default(o):
    return str(o)


def _nan_to_none(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    return o


def write_json(report: Dict, out_dir) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp = out / "demo_results.json"
    jp.write_text(json.dumps(_nan_to_none(report), indent=1, default=_json_default) + "\n")
    return str(jp)


def write_plot(report: Dict, out_dir) -> Optional[str]:
    """The plot, or None (with a message saying how to get it) without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed, so no plot was drawn; "
                       "pip install matplotlib (or the [demo] extra) to get demo_plot.png")
        return None
    pp = Path(out_dir) / "demo_plot.png"
    if report.get("real_model"):
        from .real_model import write_plot as plot
    else:
        from .benchmark import write_plot as plot
    plot(report, pp)
    return str(pp)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of SlimConfig fields, got {text!r}")
    return v


def _model_spec(text: str) -> str:
    if text != "smollm2" and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a directory (a local Hugging Face model folder) nor 'smollm2'")
    return text


def _base_dir(text: str) -> str:
    if not os.path.isfile(os.path.join(text, "config.json")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a tiny-base checkpoint folder (no config.json in it)")
    return text


def add_arguments(ap) -> None:
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated arms to run (default: %(default)s)")
    ap.add_argument("--steps", type=_positive_int, default=None,
                    help="fine-tuning steps (default: 120; 150 with --model)")
    ap.add_argument("--lr", type=_nonneg_float, default=1e-3,
                    help="learning rate of every arm (default: %(default)s, the embedded "
                         "base's; on SmolLM2 each arm's own lr was chosen by a rule: 3e-4 for "
                         "slim and PEFT LoRA, 3e-5 for full, docs/demo.md)")
    ap.add_argument("--batch-size", type=_positive_int, default=32,
                    help="sequences per step (default: %(default)s; at most 8 with --model)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data and init (default: %(default)s)")
    ap.add_argument("--eval-n", type=_positive_int, default=64,
                    help="held-out examples per task (default: %(default)s)")
    ap.add_argument("--eval-every", type=_positive_int, default=None,
                    help="steps between retention measurements (default: 30; with --model "
                         "only after the last step)")
    ap.add_argument("--threads", type=_positive_int, default=1,
                    help="torch intra-op threads (default: %(default)s)")
    ap.add_argument("--out", default="demo_out",
                    help="folder for demo_results.json and demo_plot.png (default: %(default)s)")
    ap.add_argument("--base", type=_base_dir, default=None,
                    help="another tiny-base checkpoint folder (default: the embedded base)")
    ap.add_argument("--slim", type=_json_object, default=None,
                    help="JSON of SlimConfig overrides for the SLIM arms, e.g. "
                         "'{\"yield_strength\": 4}' (default: none)")
    ap.add_argument("--model", type=_model_spec, default=None,
                    help="a local Hugging Face causal-LM folder, or 'smollm2', instead of the "
                         "embedded base (default: the embedded base)")
    ap.add_argument("--task", default=None, choices=list(NEW_TASKS + REAL_TASKS),
                    help=f"the new task: on the embedded base caesar (inputs = copy's) or "
                         f"symbols (unseen input symbols), default {NEW_TASK}; with --model "
                         f"vellish (translation into an invented language) or records (a "
                         f"record as JSON), default {REAL_TASK}")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_arguments(ap: argparse.ArgumentParser, a) -> list:
    """The arms to run; every bad value is an argparse error before any work starts (and
    before torch is imported: a bad value is rejected at once)."""
    from .methods import method_specs

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.task is None:
        a.task = REAL_TASK if a.model else NEW_TASK
    elif a.model and a.task not in REAL_TASKS:
        ap.error(f"argument --task: {a.task!r} is a task of the embedded base; with --model "
                 f"choose from {', '.join(REAL_TASKS)}")
    elif not a.model and a.task not in NEW_TASKS:
        ap.error(f"argument --task: {a.task!r} needs --model (a real model); on the embedded "
                 f"base choose from {', '.join(NEW_TASKS)}")
    try:
        specs = method_specs(a.slim, backend="torch")  # the names and the checked overrides
    except (ValueError, TypeError) as e:
        ap.error(f"argument --slim: {e}")
    unknown = [m for m in methods if m not in specs]
    if unknown or not methods:
        ap.error(f"argument --methods: unknown or empty {unknown or methods}; "
                 f"choose from {', '.join(specs)}")
    return methods


def run_from_args(a, methods) -> int:
    if a.model:
        from .real_model import format_table, run_real_model

        report = run_real_model(a.model, methods=methods, steps=a.steps or 150, lr=a.lr,
                                batch_size=min(a.batch_size, 8), seed=a.seed,
                                eval_n=a.eval_n, eval_every=a.eval_every or 0,
                                threads=a.threads, progress=not a.no_progress,
                                slim_overrides=a.slim, task=a.task)
    else:
        from .benchmark import format_table, run_benchmark

        report = run_benchmark(methods, steps=a.steps or 120, lr=a.lr, batch_size=a.batch_size,
                               seed=a.seed, eval_n=a.eval_n, eval_every=a.eval_every or 30,
                               threads=a.threads, progress=not a.no_progress,
                               base_path=a.base, slim_overrides=a.slim, task=a.task)
    report["provenance"] = provenance()
    jp = write_json(report, a.out)
    print(format_table(report))
    print(f"wrote {jp}")
    pp = write_plot(report, a.out)
    if pp:
        print(f"wrote {pp}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="slim-kernels demo",
                                 description="forgetting benchmark: LoRA vs SLIM vs ablations",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(ap)
    a = ap.parse_args(argv)
    return run_from_args(a, check_arguments(ap, a))


if __name__ == "__main__":
    raise SystemExit(main())
