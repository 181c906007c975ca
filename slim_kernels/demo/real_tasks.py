"""The real-model forgetting benchmark's data: a new task and a general-ability suite.

**New task, ``vellish``**: word-by-word translation of English word lists into an invented
language. A fixed lexicon maps 32 common English words to invented words (``dog -> vosk``);
a prompt is 3-5 lexicon words, the answer their translations in the same order::

    Translate into Vellish: dog river green eat -> vosk tamel dirgo fen

The base model cannot know the invented words, so it scores 0. Training and held-out lists are
split by a fixed hash of the list, so every held-out list is a combination never trained on
(every word is seen in training; the combination is new).

**Second new task, ``records``**: a format task of another kind. A record's three fields come
as ``key=value`` in a random order; the answer is the record as one line of JSON with the keys
in a fixed order and the age as a number::

    Record: city=Oslo; age=34; name=Maya
    JSON: {"name": "Maya", "age": 34, "city": "Oslo"}

Nothing is to be memorised (every value is copied from the prompt): what is learnt is the
format. Training and held-out records are split by a fixed hash of (name, age, city), so every
held-out record is a combination never trained on.

**General suite**, measured before and after fine-tuning:

- ``ppl``: perplexity on natural English prose that ships with every CPython install: the
  paragraphs of the Python reference manual's help topics (``pydoc_data.topics``), taken by a
  fixed rule (:func:`heldout_paragraphs`). Not written here and never trained on.
- ``mc``: multiple-choice facts and commonsense (:data:`MC_QUESTIONS`), scored like
  lm-evaluation-harness's ``acc``: the option whose tokens have the highest summed
  log-likelihood after the question wins.
- ``arith``: single-digit addition in a 3-shot prompt (``2 + 3 = 5`` ...), every pair
  ``a + b`` with 1 <= a, b <= 9 except the shots' own; exact match of the sum's tokens.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["LEXICON", "MC_QUESTIONS", "ARITH_SHOTS", "NAMES", "CITIES", "NEW_TASKS", "encode",
           "vellish_pairs", "records_pairs", "heldout_paragraphs", "arith_pairs", "mc_accuracy", "exact_match", "perplexity"]

# English word -> invented word. The invented words were made up for this benchmark (two or
# three syllables, no English word), and are fixed: changing them changes the task.
LEXICON: Dict[str, str] = {
    "dog": "vosk", "cat": "miren", "house": "tolvar", "river": "tamel", "tree": "brisk",
    "stone": "kelu", "bird": "pashi", "water": "ulmo", "fire": "dravo", "moon": "selka",
    "sun": "orim", "bread": "fanu", "road": "gesta", "hand": "lorn", "eye": "vidu",
    "child": "numa", "green": "dirgo", "red": "saffa", "big": "oskel", "small": "pim",
    "old": "rudo", "new": "welt", "cold": "brin", "warm": "tesh", "eat": "fen",
    "see": "galo", "run": "zunder", "sleep": "moru", "give": "hast", "take": "yeld",
    "and": "en", "not": "kaz",
}

PROMPT = "Translate into Vellish: {src} ->"

ARITH_SHOTS = ((2, 3), (6, 1), (4, 4))

# (question, correct answer, three distractors). Answers are scored as continuations with a
# leading space.
MC_QUESTIONS: List[Tuple[str, str, Tuple[str, str, str]]] = [
    ("The capital of France is", "Paris", ("Berlin", "Madrid", "Rome")),
    ("The capital of Japan is", "Tokyo", ("Beijing", "Seoul", "Bangkok")),
    ("The capital of Italy is", "Rome", ("Paris", "Vienna", "Lisbon")),
    ("The capital of Germany is", "Berlin", ("Munich", "Paris", "Warsaw")),
    ("The capital of the United Kingdom is", "London", ("Dublin", "Paris", "Edinburgh")),
    ("The largest planet in the solar system is", "Jupiter", ("Mars", "Venus", "Mercury")),
    ("The planet closest to the Sun is", "Mercury", ("Neptune", "Saturn", "Jupiter")),
    ("Water is made of hydrogen and", "oxygen", ("iron", "gold", "salt")),
    ("The chemical symbol for water is", "H2O", ("CO2", "NaCl", "O3")),
    ("The opposite of hot is", "cold", ("warm", "loud", "fast")),
    ("The opposite of up is", "down", ("left", "big", "red")),
    ("The day after Monday is", "Tuesday", ("Friday", "Sunday", "Thursday")),
    ("The month after January is", "February", ("March", "December", "June")),
    ("A week has seven", "days", ("years", "hours", "trees")),
    ("The color of the sky on a clear day is", "blue", ("green", "red", "black")),
    ("The color of grass is", "green", ("purple", "blue", "orange")),
    ("Ice is frozen", "water", ("sand", "milk", "glass")),
    ("Bees make", "honey", ("milk", "wool", "bread")),
    ("Cows give us", "milk", ("honey", "wood", "glass")),
    ("A baby dog is called a", "puppy", ("kitten", "calf", "foal")),
    ("A baby cat is called a", "kitten", ("puppy", "lamb", "chick")),
    ("The Sun rises in the", "east", ("west", "north", "south")),
    ("To see, we use our", "eyes", ("ears", "feet", "hands")),
    ("To hear, we use our", "ears", ("eyes", "knees", "teeth")),
    ("Fish live in", "water", ("trees", "sand", "fire")),
    ("Birds can", "fly", ("swim", "read", "talk")),
    ("The author of Romeo and Juliet is William", "Shakespeare", ("Wordsworth", "Blake", "Dickens")),
    ("The first man to walk on the Moon was Neil", "Armstrong", ("Young", "Collins", "Diamond")),
    ("The freezing point of water in Celsius is", "zero", ("fifty", "ten", "one hundred")),
    ("The longest river in Africa is the", "Nile", ("Amazon", "Thames", "Danube")),
    ("The largest ocean on Earth is the", "Pacific", ("Atlantic", "Indian", "Arctic")),
    ("A triangle has three", "sides", ("wheels", "legs", "doors")),
    ("People sleep in a", "bed", ("sink", "oven", "car")),
    ("You cut paper with", "scissors", ("a spoon", "a pillow", "soap")),
    ("When it rains, people open an", "umbrella", ("oven", "envelope", "orange")),
    ("The Earth goes around the", "Sun", ("Moon", "Mars", "comet")),
    ("Plants need sunlight and", "water", ("plastic", "metal", "sugar")),
    ("The currency of the United States is the", "dollar", ("euro", "yen", "pound")),
    ("The language spoken in Spain is", "Spanish", ("German", "Swedish", "Japanese")),
    ("Ten minus three equals", "seven", ("five", "nine", "two")),
]


def _split_of(key: str, task: str = "vellish") -> str:
    """'train' or 'test' by a fixed hash (1 in 4 items is held out)."""
    h = int(hashlib.sha256(f"{task}|{key}".encode()).hexdigest()[:8], 16)
    return "test" if h % 4 == 0 else "train"


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")


def vellish_pairs(n: int, split: str, seed: int) -> List[Tuple[str, str]]:
    """n (prompt, answer) pairs of the given split ('train' | 'test'), drawn with ``seed``.
    Test pairs are distinct; train pairs may repeat (a stream)."""
    _check_split(split)
    rng = random.Random(f"vellish:{split}:{seed}")
    words = list(LEXICON)
    out: List[Tuple[str, str]] = []
    seen = set()
    while len(out) < n:
        src = rng.sample(words, rng.randint(3, 5))
        key = " ".join(src)
        if _split_of(key) != split or (split == "test" and key in seen):
            continue
        seen.add(key)
        out.append((PROMPT.format(src=key), " " + " ".join(LEXICON[w] for w in src)))
    return out


NAMES = ("Maya", "Tom", "Anna", "Li", "Omar", "Sara", "Ivan", "Nora", "Paul", "Emma", "Raj",
         "Lena", "Jon", "Eva", "Ken", "Mia", "Hugo", "Zoe", "Ali", "Ruth", "Max", "Ida", "Sam",
         "Yuki")
CITIES = ("Oslo", "Paris", "Lima", "Cairo", "Tokyo", "Rome", "Delhi", "Quito", "Berlin", "Dakar",
          "Seoul", "Lagos", "Madrid", "Hanoi", "Prague", "Nairobi", "Vienna", "Havana", "Dublin",
          "Manila", "Athens", "Bogota", "Warsaw", "Perth")
RECORDS_PROMPT = "Record: {fields}\nJSON:"


def records_pairs(n: int, split: str, seed: int) -> List[Tuple[str, str]]:
    """n (prompt, answer) pairs of the ``records`` task (module docstring) of the given split,
    drawn with ``seed``. Test pairs are distinct; train pairs may repeat (a stream)."""
    _check_split(split)
    rng = random.Random(f"records:{split}:{seed}")
    out: List[Tuple[str, str]] = []
    seen = set()
    while len(out) < n:
        name, age, city = rng.choice(NAMES), rng.randint(18, 89), rng.choice(CITIES)
        key = f"{name}|{age}|{city}"
        if _split_of(key, "records") != split or (split == "test" and key in seen):
            continue
        seen.add(key)
        fields = [f"name={name}", f"age={age}", f"city={city}"]
        rng.shuffle(fields)
        out.append((RECORDS_PROMPT.format(fields="; ".join(fields)),
                    f' {{"name": "{name}", "age": {age}, "city": "{city}"}}'))
    return out


# new task name -> its pairs function (n, split, seed)
NEW_TASKS = {"vellish": vellish_pairs, "records": records_pairs}


def heldout_paragraphs(n: int = 24, min_chars: int = 300, max_chars: int = 700) -> List[str]:
    """``n`` prose paragraphs of the Python reference manual shipped in ``pydoc_data.topics``:
    topics in sorted order, paragraphs of ``min_chars``-``max_chars`` characters whose lines
    are plain sentences (no indentation, no markup-heavy lines, mostly letters), each once."""
    from pydoc_data.topics import topics

    paras: List[str] = []
    seen = set()
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if any(ln.startswith((" ", "\t", "*", "-", "=", ">")) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines).strip()
            if not (min_chars <= len(text) <= max_chars):
                continue
            letters = sum(ch.isalpha() or ch == " " for ch in text)
            if letters / len(text) < 0.9 or not text.endswith(".") or text in seen:
                continue
            seen.add(text)  # some topics repeat a paragraph
            paras.append(text)
    if len(paras) < n:
        raise RuntimeError(f"only {len(paras)} prose paragraphs in pydoc_data.topics (< {n})")
    step = len(paras) / n  # spread over the manual, not the first topics only
    return [paras[int(i * step)] for i in range(n)]


def arith_pairs() -> List[Tuple[str, str]]:
    shots = "".join(f"{a} + {b} = {a + b}\n" for a, b in ARITH_SHOTS)
    return [(f"{shots}{a} + {b} =", f" {a + b}") for a in range(1, 10) for b in range(1, 10)
            if (a, b) not in ARITH_SHOTS]


def encode(tok, text: str) -> List[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tok.encode(text, add_special_tokens=False))


def _padded(rows: Sequence[List[int]]):
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    att = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
    return ids, att


@torch.no_grad()
def _continuation_logprobs(model, tok, pairs: Sequence[Tuple[str, str]], batch_size: int = 16
                           ) -> List[Tuple[float, bool]]:
    """Per (context, continuation): (summed log-prob of the continuation's tokens, whether
    every one of them is the argmax, i.e. greedy exact match)."""
    out: List[Tuple[float, bool]] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        rows, spans = [], []
        for ctx, cont in chunk:
            c, a = encode(tok, ctx), encode(tok, cont)
            rows.append(c + a)
            spans.append((len(c), len(c) + len(a)))
        ids, att = _padded(rows)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
        for j, (s, e) in enumerate(spans):
            tgt = ids[j, s:e]
            lp = logp[j, s - 1:e - 1]
            out.append((float(lp.gather(1, tgt[:, None]).sum()),
                        bool((lp.argmax(-1) == tgt).all())))
    return out


def exact_match(model, tok, pairs: Sequence[Tuple[str, str]]) -> float:
    """Greedy exact match of each answer (teacher-forced argmax over the answer's tokens)."""
    model.eval()
    res = _continuation_logprobs(model, tok, pairs)
    return sum(ok for _, ok in res) / max(1, len(res))


def mc_accuracy(model, tok, questions=MC_QUESTIONS) -> float:
    model.eval()
    pairs, sizes = [], []
    for q, right, wrong in questions:
        opts = (right, *wrong)
        pairs += [(q, " " + o) for o in opts]
        sizes.append(len(opts))
    scores = [lp for lp, _ in _continuation_logprobs(model, tok, pairs)]
    ok, k = 0, 0
    for n in sizes:
        s = scores[k:k + n]
        ok += int(max(range(n), key=s.__getitem__) == 0)
        k += n
    return ok / max(1, len(sizes))


@torch.no_grad()
def perplexity(model, tok, texts: Sequence[str]) -> float:
    model.eval()
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([encode(tok, t)])
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        n += ids.shape[1] - 1
    return math.exp(nll / max(1, n))
