"""Exact-match accuracy per task on held-out examples.

Method: teacher-forced argmax. One forward pass over ``prompt SEP answer EOS``; an example
counts as correct when the argmax prediction at every answer position (the answer characters
and the closing EOS) equals the gold token. This is *exactly* greedy-decoding exact match:
if every teacher-forced argmax is right, greedy decoding feeds itself the same gold prefix and
emits the same tokens, and if one is wrong, the first wrong one is also where greedy decoding
goes wrong. It costs one batched forward instead of one per generated token.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .tasks import ALL_TASKS, IGNORE_INDEX, TOKENIZER, generate_examples, make_batch

__all__ = ["heldout_set", "exact_match", "evaluate_tasks", "greedy_answer"]

EVAL_SEED = 12345


def heldout_set(tasks: Sequence[str] = ALL_TASKS, n: int = 256, seed: int = EVAL_SEED
                ) -> Dict[str, List[Tuple[str, str]]]:
    """``n`` held-out (test-split) examples per task, deterministic in ``seed``."""
    return {t: generate_examples(t, n, seed=seed, split="test") for t in tasks}


@torch.no_grad()
def exact_match(model, task: str, examples: Sequence[Tuple[str, str]], batch_size: int = 256
                ) -> float:
    """Share of ``examples`` whose whole answer (+EOS) is predicted right, teacher-forced."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            b = make_batch([(task, p, a) for p, a in chunk])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            pred = logits[:, :-1].argmax(-1)
            gold = b["labels"][:, 1:]
            mask = gold != IGNORE_INDEX
            ok = ((pred == gold) | ~mask).all(dim=1)
            correct += int(ok.sum())
    finally:
        model.train(was_training)
    return correct / max(1, len(examples))


def evaluate_tasks(model, tasks: Sequence[str] = ALL_TASKS, n: int = 256, seed: int = EVAL_SEED,
                   data: Optional[Dict[str, List[Tuple[str, str]]]] = None,
                   batch_size: int = 256) -> Dict[str, float]:
    """{task: exact-match accuracy in [0, 1]} on held-out examples (or on ``data``)."""
    data = data if data is not None else heldout_set(tasks, n, seed)
    return {t: exact_match(model, t, data[t], batch_size) for t in tasks}


@torch.no_grad()
def greedy_answer(model, task: str, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy-decode the model's answer to one prompt (for showing examples, not scoring)."""
    tok = TOKENIZER
    ids = [tok.bos_id, tok.tag_id(task)] + tok.encode(prompt) + [tok.sep_id]
    was_training = model.training
    model.eval()
    out: List[int] = []
    try:
        x = torch.tensor([ids])
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=x).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    finally:
        model.train(was_training)
    return tok.decode(out)
