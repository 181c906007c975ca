"""Synthetic tasks for the forgetting benchmark: a character tokenizer, seeded generators, batches.

Every example is one short sequence::

    BOS <tag> p r o m p t SEP a n s w e r EOS

The task tag token tells the model which skill is asked for. The loss (and the accuracy) is
taken on the answer characters and the closing EOS only.

General skills (the base model is pretrained on these, :data:`GENERAL_TASKS`):

- ``copy``    a random lowercase word of 3-10 letters, answered unchanged.
- ``reverse`` a random lowercase word of 3-10 letters, answered reversed.
- ``add``     ``a+b`` with 0 <= a, b <= 99, answered with the decimal sum written least
  significant digit first (``57+68`` -> ``521``), so each answer digit needs only its digit
  pair and the carry it just wrote (learnable by a tiny model in a few thousand steps).
- ``sort``    3-10 random digits, answered in ascending order.
- ``recall``  3-5 key/value pairs ``k1v1k2v2..`` (letter keys, digit values) and ``:k``,
  answered with the value of key ``k``.

The new downstream task (:data:`NEW_TASK`, never seen in pretraining):

- ``caesar``  a random lowercase word of 3-10 letters, answered with each letter shifted 3
  places along the alphabet (``xyz`` -> ``abc``). It uses the same letters and length range
  as ``copy``/``reverse`` but a mapping the base never learned: the base scores about 0 on it,
  and learning it pulls the letter-to-letter map away from identity, which is what makes a
  plain fine-tune forget the general skills.

Held-out data: each (task, prompt) pair is put in the "train" or "test" split by a fixed hash
(CRC32, 1 in 8 goes to test), so held-out examples are prompts the model never trained on,
whatever the seeds (this matters for ``add``, whose prompt space is small).
"""
from __future__ import annotations

import random
import string
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "CharTokenizer",
    "TOKENIZER",
    "GENERAL_TASKS",
    "NEW_TASK",
    "ALL_TASKS",
    "GENERATORS",
    "MAX_SEQ_LEN",
    "IGNORE_INDEX",
    "split_of",
    "generate_examples",
    "encode_example",
    "collate",
    "make_batch",
    "batch_stream",
]

IGNORE_INDEX = -100
MAX_SEQ_LEN = 40  # longest encoded example is 24 tokens; positions up to 64 in the model

GENERAL_TASKS: Tuple[str, ...] = ("copy", "reverse", "add", "sort", "recall")
NEW_TASK = "caesar"
ALL_TASKS: Tuple[str, ...] = GENERAL_TASKS + (NEW_TASK,)

CAESAR_SHIFT = 3
TEST_FRACTION_MOD = 8  # 1 prompt in 8 is held out


class CharTokenizer:
    """A fixed character-level vocabulary with special and task-tag tokens.

    ids: 0 PAD, 1 BOS, 2 EOS, 3 SEP, then one tag token per task (``<copy>`` ...), then the
    characters: digits, lowercase letters, and ``+ = : , - |`` and space.
    """

    PAD, BOS, EOS, SEP = "<pad>", "<bos>", "<eos>", "<sep>"
    CHARS = string.digits + string.ascii_lowercase + "+=:,-| "

    def __init__(self, tasks: Sequence[str] = ALL_TASKS):
        self.specials = [self.PAD, self.BOS, self.EOS, self.SEP]
        self.tags = [f"<{t}>" for t in tasks]
        self.itos: List[str] = self.specials + self.tags + list(self.CHARS)
        self.stoi: Dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = (self.stoi[s] for s in self.specials)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def tag_id(self, task: str) -> int:
        return self.stoi[f"<{task}>"]

    def encode(self, text: str) -> List[int]:
        """Characters to ids (plain characters only; raises KeyError on anything else)."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise KeyError(f"character {e.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Ids to text; special and tag tokens are dropped unless ``skip_special=False``."""
        n_special = len(self.specials) + len(self.tags)
        out = []
        for i in ids:
            i = int(i)
            if i < n_special:
                if not skip_special:
                    out.append(self.itos[i])
                continue
            out.append(self.itos[i])
        return "".join(out)


TOKENIZER = CharTokenizer()

# ---------------------------------------------------------------------------------------------
# generators: rng -> (prompt, answer)


def _word(rng: random.Random, lo: int = 3, hi: int = 10) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def gen_copy(rng: random.Random) -> Tuple[str, str]:
    w = _word(rng)
    return w, w


def gen_reverse(rng: random.Random) -> Tuple[str, str]:
    w = _word(rng)
    return w, w[::-1]


def gen_add(rng: random.Random) -> Tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}", str(a + b)[::-1]


def gen_sort(rng: random.Random) -> Tuple[str, str]:
    d = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 10)))
    return d, "".join(sorted(d))


def gen_recall(rng: random.Random) -> Tuple[str, str]:
    n = rng.randint(3, 5)
    keys = rng.sample(string.ascii_lowercase, n)
    vals = [rng.choice(string.digits) for _ in range(n)]
    q = rng.randrange(n)
    return "".join(k + v for k, v in zip(keys, vals)) + ":" + keys[q], vals[q]


def caesar(text: str, shift: int = CAESAR_SHIFT) -> str:
    a = ord("a")
    return "".join(chr(a + (ord(c) - a + shift) % 26) for c in text)


def gen_caesar(rng: random.Random) -> Tuple[str, str]:
    w = _word(rng)
    return w, caesar(w)


GENERATORS: Dict[str, Callable[[random.Random], Tuple[str, str]]] = {
    "copy": gen_copy,
    "reverse": gen_reverse,
    "add": gen_add,
    "sort": gen_sort,
    "recall": gen_recall,
    "caesar": gen_caesar,
}


def split_of(task: str, prompt: str) -> str:
    """'test' for 1 prompt in 8 (fixed CRC32 hash of task and prompt), else 'train'."""
    h = zlib.crc32(f"{task}\x00{prompt}".encode())
    return "test" if h % TEST_FRACTION_MOD == 0 else "train"


def generate_examples(task: str, n: int, seed: int = 0, split: Optional[str] = "train",
                      rng: Optional[random.Random] = None) -> List[Tuple[str, str]]:
    """``n`` (prompt, answer) pairs of ``task``, deterministic in ``seed`` (or the given rng).

    ``split`` = 'train' | 'test' keeps only prompts of that hash split; None keeps all.
    """
    if task not in GENERATORS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(GENERATORS)}")
    rng = rng if rng is not None else random.Random(f"{task}:{seed}")
    gen = GENERATORS[task]
    out: List[Tuple[str, str]] = []
    while len(out) < n:
        p, a = gen(rng)
        if split is None or split_of(task, p) == split:
            out.append((p, a))
    return out


# ---------------------------------------------------------------------------------------------
# encoding and batching


def encode_example(task: str, prompt: str, answer: str,
                   tok: CharTokenizer = TOKENIZER) -> Tuple[List[int], List[int]]:
    """(input ids, labels) for one example; labels are IGNORE_INDEX outside the answer+EOS."""
    head = [tok.bos_id, tok.tag_id(task)] + tok.encode(prompt) + [tok.sep_id]
    tail = tok.encode(answer) + [tok.eos_id]
    ids = head + tail
    if len(ids) > MAX_SEQ_LEN:
        raise ValueError(f"example of {len(ids)} tokens exceeds MAX_SEQ_LEN={MAX_SEQ_LEN}")
    return ids, [IGNORE_INDEX] * len(head) + tail


def collate(encoded: Sequence[Tuple[List[int], List[int]]], pad_id: int = TOKENIZER.pad_id
            ) -> Dict[str, torch.Tensor]:
    """Right-pad encoded examples into input_ids / labels / attention_mask (int64).

    Right padding keeps position ids 0.. for every row, so the default positions of a HF
    causal LM are right without passing position_ids. ``labels`` are aligned with
    ``input_ids`` (the HF convention: the model shifts them internally).
    """
    L = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids)
        labels[i, :n] = torch.tensor(lab)
        attn[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attn}


def make_batch(examples: Sequence[Tuple[str, str, str]], tok: CharTokenizer = TOKENIZER
               ) -> Dict[str, torch.Tensor]:
    """Batch from (task, prompt, answer) triples."""
    return collate([encode_example(t, p, a, tok) for t, p, a in examples], tok.pad_id)


def batch_stream(tasks: Sequence[str], batch_size: int, seed: int = 0, split: str = "train",
                 weights: Optional[Sequence[float]] = None):
    """Endless iterator of batches mixing ``tasks`` (uniformly, or by ``weights``).

    Deterministic in ``seed``: one ``random.Random`` picks the task of every example and
    draws it, so the same seed gives the same sequence of batches.
    """
    rng = random.Random(f"stream:{seed}")
    tasks = list(tasks)
    while True:
        picks = rng.choices(tasks, weights=weights, k=batch_size)
        ex = []
        for t in picks:
            (p, a), = generate_examples(t, 1, split=split, rng=rng)
            ex.append((t, p, a))
        yield make_batch(ex)
