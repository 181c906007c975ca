"""benchmarks/forgetting_sweep.py's bookkeeping on a synthetic log: the learning-rate rule of
docs/demo.md (score, ties, incomplete grids), the per-seed dominance verdicts, the held-out
table at the chosen lrs, and the demo JSON it keeps. No run is made here."""
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("forgetting_sweep",
                                                  ROOT / "benchmarks" / "forgetting_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(method, lr, new, worst, seed=0, role="select", task="vellish", label="lr-grid"):
    return {"label": label, "role": role, "bench": "real", "task": task, "seed": seed,
            "lr": lr, "method": method, "new_task_acc": new, "worst": worst, "ppl_ratio": 1.0,
            "kept": {"ppl": worst, "mc": 1.0, "arith": 1.0}}


def _args(log, **kw):
    return SimpleNamespace(log=str(log), label="lr-grid", tasks="vellish",
                           select_task="vellish", arms="lora-r16,slim,full", json=None, **kw)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_rule_scores_caps_kept_at_one_and_breaks_ties_to_the_lower_lr(sweep, tmp_path):
    assert sweep.lr_score({"new_task_acc": 0.5, "worst": 1.3}) == 0.75  # kept capped at 1
    rows = [
        # lora-r16: 1e-4 and 3e-4 tie at 0.75; the lower wins
        _row("lora-r16", 3e-5, 0.0, 0.9), _row("lora-r16", 1e-4, 0.6, 0.9),
        _row("lora-r16", 3e-4, 0.9, 0.6), _row("lora-r16", 1e-3, 1.0, 0.1),
        # slim: kept above the base earns nothing, so 1e-3 (1.0, 0.95) beats 3e-4 (0.9, 1.2)
        _row("slim", 3e-5, 0.0, 1.0), _row("slim", 1e-4, 0.5, 1.0),
        _row("slim", 3e-4, 0.9, 1.2), _row("slim", 1e-3, 1.0, 0.95),
        # full: its own grid, one point missing: no choice
        _row("full", 3e-6, 0.1, 1.0), _row("full", 1e-5, 0.5, 0.9), _row("full", 3e-5, 0.9, 0.2),
        # another seed, label or an error row never counts
        _row("slim", 3e-5, 1.0, 1.0, seed=1), _row("slim", 1e-4, 1.0, 1.0, label="other"),
        {"label": "lr-grid", "role": "select", "task": "vellish", "seed": 0, "lr": 1e-4,
         "method": "lora-r16", "error": "RuntimeError: boom"},
    ]
    log = tmp_path / "log.jsonl"
    _write(log, rows)
    ch = sweep.chosen_lrs(_args(log))
    assert {arm: v[0] for arm, v in ch.items()} == {"lora-r16": 1e-4, "slim": 1e-3}
    out = tmp_path / "chosen.json"
    assert sweep.choose_lr(SimpleNamespace(**{**vars(_args(log)), "json": str(out)})) == 0
    assert json.loads(out.read_text()) == {"lora-r16": 1e-4, "slim": 1e-3}


@pytest.mark.parametrize("s, b, word", [
    ((0.9, 0.95), (0.8, 0.5), "dominates"),
    ((0.9, 0.5), (0.9, 0.5), "ties"),
    ((0.9, 0.5), (0.9, 0.4), "dominates"),       # one of them equal
    ((0.8, 0.95), (0.9, 0.5), "trades off against"),
    ((0.8, 0.4), (0.9, 0.5), "is dominated by"),
])
def test_dominance_verdicts(sweep, s, b, word):
    v = sweep.dominance({"new_task_acc": s[0], "worst": s[1]}, {"new_task_acc": b[0], "worst": b[1]})
    assert v.format("B").startswith(word + " B (new ")


def test_heldout_reports_only_runs_at_the_chosen_lr(sweep, tmp_path, capsys):
    rows = [_row(m, lr, 0.5, 0.5) for m in ("lora-r16", "slim") for lr in sweep.LR_GRID]
    rows[1]["new_task_acc"] = 1.0   # lora-r16 chooses 1e-4
    rows[7]["new_task_acc"] = 1.0   # slim chooses 1e-3
    rows += [_row("slim", 1e-3, 0.95, 0.97, seed=1, role="report"),
             _row("lora-r16", 1e-4, 0.90, 0.60, seed=1, role="report"),
             _row("lora-r16", 3e-4, 0.99, 0.99, seed=1, role="report")]  # not its chosen lr
    log = tmp_path / "log.jsonl"
    _write(log, rows)
    assert sweep.heldout(SimpleNamespace(**{**vars(_args(log)), "arms": "lora-r16,slim"})) == 0
    out = capsys.readouterr().out
    assert "| lora-r16 | 0.0001 | 0.900 / 0.600" in out and "0.990" not in out
    assert "- vellish seed 1: SLIM dominates lora-r16 (new +0.050, worst kept +0.370)" in out
    assert "| slim | 0.001 | 1 | 0.950 | 1.00–1.00x the base | 1.00 | 1.00 | 0.970 |" in out


def test_the_readme_demo_table_is_what_the_committed_json_prints(sweep, tmp_path, capsys):
    """The README's and docs/demo.md's caesar table is regenerated from the committed JSON;
    --keep drops only the raw routing counts."""
    committed = ROOT / "docs" / "results" / "demo_caesar_seed0.json"
    assert sweep.demo_json(SimpleNamespace(json=str(committed), keep=None)) == 0
    table = capsys.readouterr().out.splitlines()[:-1]  # (the last line: commit and machine)
    assert len(table) == 12 and table[0].startswith("method ")  # + rule, base, 7 arms, 2 notes
    for doc in ("README.md", "docs/demo.md"):
        assert "\n".join(table) in (ROOT / doc).read_text(), doc
    rep = json.loads(committed.read_text())
    assert rep["provenance"]["commit"] and "routing_raw" not in rep["methods"][0]
    rep["methods"][0]["routing_raw"] = {"counts": [1] * 99}
    src, kept = tmp_path / "demo_results.json", tmp_path / "kept.json"
    src.write_text(json.dumps(rep))
    assert sweep.demo_json(SimpleNamespace(json=str(src), keep=str(kept))) == 0
    k = json.loads(kept.read_text())
    del rep["methods"][0]["routing_raw"]
    assert k == rep


def test_each_task_chooses_on_its_own_runs_with_the_grid_given(sweep, tmp_path, capsys):
    """``--select-task each`` (the embedded rule): caesar's lrs come from caesar's seed-0 runs,
    symbols' from symbols'; ``--grid`` replaces the default grid."""
    grid = (1e-4, 3e-4, 1e-3, 3e-3)
    rows = []
    for task, best in (("caesar", 3e-3), ("symbols", 3e-4)):
        rows += [_row("slim", lr, 1.0 if lr == best else 0.2, 0.5, task=task) for lr in grid]
        rows.append(_row("slim", best, 0.9, 0.8, seed=1, role="report", task=task))
    log = tmp_path / "log.jsonl"
    _write(log, rows)
    out = tmp_path / "chosen.json"
    a = SimpleNamespace(**{**vars(_args(log)), "tasks": "caesar,symbols", "select_task": "each",
                           "arms": "slim", "grid": ",".join(map(str, grid)), "grid_full": None,
                           "json": str(out)})
    assert sweep.choose_lr(a) == 0
    assert json.loads(out.read_text()) == {"caesar": {"slim": 3e-3}, "symbols": {"slim": 3e-4}}
    # the default grid lacks 3e-3: no choice there, and the command says so by its code
    assert sweep.choose_lr(SimpleNamespace(**{**vars(a), "grid": None, "json": None})) == 1
    capsys.readouterr()
    assert sweep.heldout(a) == 0
    text = capsys.readouterr().out
    assert "| slim | 0.003 | 0.900 / 0.800 (ppl x1.00) | 0.900 / 0.800 |" in text  # caesar
    assert "| slim | 0.0003 | 0.900 / 0.800 (ppl x1.00) | 0.900 / 0.800 |" in text  # symbols
