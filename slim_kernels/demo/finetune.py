"""A generic fine-tuning loop for the forgetting benchmark.

``finetune`` takes a model whose trainable parameters are already chosen (full fine-tuning,
PEFT LoRA, SLIM via ``slim_kernels.apply_slim``: whatever has ``requires_grad=True`` is
trained), a function giving the next training batch, and optional hooks: ``extra_loss_fn``
adds an auxiliary loss (e.g. SLIM's summed load-balance / L1 terms) and ``callback`` is called
every ``eval_every`` steps (e.g. to measure held-out accuracy during training).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .tasks import GENERAL_TASKS, NEW_TASK, batch_stream

__all__ = ["FinetuneResult", "finetune", "new_task_batches", "set_full_finetune",
           "count_trainable"]


@dataclass
class FinetuneResult:
    losses: List[float] = field(default_factory=list)       # task loss per step
    extra_losses: List[float] = field(default_factory=list)  # auxiliary loss per step (0 if none)
    evals: List[Dict] = field(default_factory=list)         # {"step": s, **callback result}
    seconds: float = 0.0


def new_task_batches(batch_size: int = 32, seed: int = 0, task: str = NEW_TASK):
    """``train_batches_fn`` for the new task alone: a zero-argument function -> next batch."""
    it = batch_stream([task], batch_size, seed=seed, split="train")
    return lambda: next(it)


def set_full_finetune(model, modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj")) -> int:
    """Freeze everything but the weights of the named projections; returns the trainable count."""
    for n, p in model.named_parameters():
        p.requires_grad_(any(f".{m}." in f".{n}" for m in modules))
    return count_trainable(model)


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finetune(model, train_batches_fn: Callable[[], Dict[str, torch.Tensor]], steps: int,
             lr: float, *, weight_decay: float = 0.0, warmup: int = 0,
             schedule: str = "constant", max_grad_norm: Optional[float] = 1.0,
             extra_loss_fn: Optional[Callable[[torch.nn.Module], torch.Tensor]] = None,
             callback: Optional[Callable[[torch.nn.Module, int], Optional[Dict]]] = None,
             eval_every: int = 0, eval_at_start: bool = False, progress: bool = True,
             desc: str = "finetune", optimizer: Optional[torch.optim.Optimizer] = None
             ) -> FinetuneResult:
    """Train the parameters of ``model`` that require grad for ``steps`` steps.

    Each step: ``batch = train_batches_fn()``; ``loss = model(**batch).loss``
    (+ ``extra_loss_fn(model)`` when given); AdamW update (or ``optimizer``), with optional
    linear warmup and ``schedule`` = constant | cosine. ``callback(model, step)`` runs every
    ``eval_every`` steps, after the last step, and at step 0 when ``eval_at_start``; a dict it
    returns is stored in ``result.evals``. The model is left in train mode during steps and the
    callback is responsible for its own ``model.eval()`` (the demo's evaluate functions
    restore the mode themselves).
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters (requires_grad)")
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    res = FinetuneResult()

    def run_callback(step: int) -> None:
        if callback is None:
            return
        out = callback(model, step)
        if out is not None:
            res.evals.append({"step": step, **out})

    def lr_at(step: int) -> float:
        if warmup and step < warmup:
            return lr * (step + 1) / warmup
        if schedule == "cosine":
            t = (step - warmup) / max(1, steps - warmup)
            return lr * 0.5 * (1 + math.cos(math.pi * t))
        return lr

    t0 = time.time()
    if eval_at_start:
        run_callback(0)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = train_batches_fn()
        loss = model(**batch).loss
        total = loss
        extra = 0.0
        if extra_loss_fn is not None:
            e = extra_loss_fn(model)
            if e is not None:
                total = total + e
                extra = float(e.detach()) if torch.is_tensor(e) else float(e)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        res.losses.append(float(loss.detach()))
        res.extra_losses.append(extra)
        bar.set_postfix(loss=f"{res.losses[-1]:.4f}")
        s = step + 1
        if callback is not None and ((eval_every and s % eval_every == 0) or s == steps):
            run_callback(s)
            model.train()
    res.seconds = time.time() - t0
    return res


# ---------------------------------------------------------------------------------------------
# sanity check of the forgetting setup: python -m slim_kernels.demo.finetune --method full|lora


def _apply_method(model, method: str, lora_rank: int = 8):
    if method == "full":
        return model, set_full_finetune(model)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                         "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, cfg)
        return model, count_trainable(model)
    raise ValueError(f"unknown method {method!r}")


def forgetting_check(method: str = "full", steps: int = 300, lr: float = 1e-3,
                     batch_size: int = 32, seed: int = 0, eval_every: int = 50,
                     eval_n: int = 256, lora_rank: int = 8, threads: int = 1,
                     progress: bool = True, base_path=None) -> Dict:
    """Fine-tune the shipped base on the new task only; held-out accuracy before, during, after."""
    from .evaluate import evaluate_tasks, heldout_set
    from .model import load_base_model
    from .tasks import ALL_TASKS

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = heldout_set(ALL_TASKS, n=eval_n)
    model = load_base_model(base_path)
    model, n_train = _apply_method(model, method, lora_rank)
    before = evaluate_tasks(model, ALL_TASKS, data=data)
    res = finetune(model, new_task_batches(batch_size, seed=seed), steps, lr,
                   eval_every=eval_every, progress=progress, desc=method,
                   callback=lambda m, s: evaluate_tasks(m, ALL_TASKS, data=data))
    after = {t: res.evals[-1][t] for t in ALL_TASKS}
    gen_before = sum(before[t] for t in GENERAL_TASKS) / len(GENERAL_TASKS)
    gen_after = sum(after[t] for t in GENERAL_TASKS) / len(GENERAL_TASKS)
    return {"method": method, "trainable_params": n_train, "steps": steps, "lr": lr,
            "batch_size": batch_size, "seed": seed, "before": before, "after": after,
            "general_before": gen_before, "general_after": gen_after,
            "retention": gen_after / gen_before if gen_before else float("nan"),
            "evals": res.evals, "first_loss": res.losses[0], "last_loss": res.losses[-1],
            "seconds": res.seconds}


def main(argv=None) -> None:
    import argparse
    import json

    from .tasks import ALL_TASKS

    ap = argparse.ArgumentParser(description="fine-tune the demo base on the new task only and "
                                             "show what it forgets")
    ap.add_argument("--method", choices=["full", "lora"], default="full")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--base", default=None, help="base checkpoint dir (default: the shipped one)")
    a = ap.parse_args(argv)
    r = forgetting_check(a.method, a.steps, a.lr, a.batch_size, a.seed, a.eval_every,
                         lora_rank=a.lora_rank, base_path=a.base)
    cols = list(ALL_TASKS)
    print(f"{a.method}: {r['trainable_params']} trainable params, {a.steps} steps, lr {a.lr}, "
          f"{r['seconds']:.1f} s")
    print("step  " + " ".join(f"{c:>8}" for c in cols) + "  general")
    rows = [{"step": "before", **r["before"]}] + r["evals"]
    for row in rows:
        g = sum(row[t] for t in GENERAL_TASKS) / len(GENERAL_TASKS)
        print(f"{str(row['step']):>6}" + " ".join(f"{row[c]:8.3f}" for c in cols) + f"  {g:7.3f}")
    print(f"general-skill retention {r['retention']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
