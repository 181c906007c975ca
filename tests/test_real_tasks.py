"""The real-model benchmark's data (slim_kernels/demo/real_tasks.py): splits, texts, scoring."""
import pytest
import torch

from slim_kernels.demo import real_tasks as R


def test_vellish_split_is_disjoint_and_translates_word_by_word():
    test = R.vellish_pairs(64, "test", 12345)
    train = R.vellish_pairs(4000, "train", 0)
    assert len({p for p, _ in test}) == 64
    assert not {p for p, _ in test} & {p for p, _ in train}
    inv = {v: k for k, v in R.LEXICON.items()}
    assert len(inv) == len(R.LEXICON)  # the mapping is one-to-one
    for p, a in test + train[:200]:
        src = p[len("Translate into Vellish: "):-len(" ->")].split()
        assert 3 <= len(src) <= 5 and a.startswith(" ")
        assert [inv[w] for w in a.split()] == src
    assert R.vellish_pairs(10, "train", 1) != R.vellish_pairs(10, "train", 2)
    with pytest.raises(ValueError, match="split='dev'"):
        R.vellish_pairs(1, "dev", 0)


def test_records_split_is_disjoint_and_the_answer_is_the_records_json():
    import json

    test = R.records_pairs(64, "test", 12345)
    train = R.records_pairs(4000, "train", 0)

    def record(prompt):
        assert prompt.startswith("Record: ") and prompt.endswith("\nJSON:")
        fields = dict(f.split("=") for f in prompt[len("Record: "):-len("\nJSON:")].split("; "))
        return fields["name"], int(fields["age"]), fields["city"]

    held, seen = {record(p) for p, _ in test}, {record(p) for p, _ in train}
    assert len(held) == 64 and not held & seen  # every held-out record is new
    orders = set()
    for p, a in test + train[:300]:
        name, age, city = record(p)
        assert a.startswith(" ") and list(json.loads(a)) == ["name", "age", "city"]
        assert json.loads(a) == {"name": name, "age": age, "city": city}
        orders.add(tuple(f.split("=")[0] for f in p[len("Record: "):-len("\nJSON:")].split("; ")))
    assert len(orders) == 6  # the fields come in every order
    assert R.records_pairs(10, "train", 1) != R.records_pairs(10, "train", 2)
    with pytest.raises(ValueError, match="split='dev'"):
        R.records_pairs(1, "dev", 0)
    assert set(R.NEW_TASKS) == {"vellish", "records"}


def test_general_suite_data():
    paras = R.heldout_paragraphs(24)
    assert len(paras) == 24 == len(set(paras)) and paras == R.heldout_paragraphs(24)
    assert all(300 <= len(p) <= 700 and p.endswith(".") for p in paras)
    ap = R.arith_pairs()
    assert len(ap) == 81 - len(R.ARITH_SHOTS)
    assert all(p.count("\n") == 3 and int(a) == eval(p.rsplit("\n", 1)[1].rstrip("=")) for p, a in ap)
    for q, right, wrong in R.MC_QUESTIONS:
        assert len({right, *wrong}) == 4


class _Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 for c in text]


class _Model(torch.nn.Module):
    """Predicts, after any token t, the token `favour` (and uniform otherwise)."""

    def __init__(self, favour):
        super().__init__()
        self.favour = favour

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, 50)
        logits[..., self.favour] = 5.0
        return type("O", (), {"logits": logits})()


def test_scoring_picks_the_likeliest_and_counts_exact_matches():
    tok = _Tok()
    fav = ord("a") % 50
    assert R.exact_match(_Model(fav), tok, [("x", "aa"), ("x", "ab")]) == 0.5
    qs = [("q", "aaa", ("b", "c", "d")), ("q", "e", ("aa", "f", "g"))]
    assert R.mc_accuracy(_Model(fav), tok, qs) == 0.5  # 'aaa' wins, then 'aa' beats 'e'
    ppl = R.perplexity(_Model(fav), tok, ["aaaa"])
    p = torch.softmax(torch.tensor([5.0] + [0.0] * 49), 0)[0]
    assert ppl == pytest.approx(float(1 / p), rel=1e-5)
