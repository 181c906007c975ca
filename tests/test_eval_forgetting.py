"""python/eval_forgetting.py end to end on a tiny Llama saved to disk, two local lm-eval tasks
(multiple choice and rolling perplexity), 40 SLIM and LoRA training steps, offline."""
import importlib.util
import json
import math
import os

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = "toy_mc,toy_ppl"
SLIM = {"num_lora_experts": 2, "num_identity_experts": 1, "rank": 2, "alpha": 4.0,
        "num_clusters": 2, "backend": "torch", "target_modules": ["q_proj", "v_proj"]}


def _recipe():
    path = os.path.join(ROOT, "python", "eval_forgetting.py")
    spec = importlib.util.spec_from_file_location("eval_forgetting", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from hf_models import recipe_common, save_tiny_lm

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    common = recipe_common()
    arithmetic_rows, words = common.arithmetic_rows, common.words
    save_tiny_lm(tmp_path / "base")

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # the new task: continue an arithmetic sequence (prompt 5 words, completion 3)
    jsonl("train.jsonl", [{"prompt": words(r[:5]), "completion": words(r[5:8])}
                          for r in arithmetic_rows(48, 8, seed=1)])
    # the "general" tasks: a 2-way multiple choice and a rolling perplexity
    gen = arithmetic_rows(8, 10, seed=2)
    jsonl("mc.jsonl", [{"q": words(r[:5]), "gold": 0,
                        "choices": [words(r[5:]), words((x + 4) % 125 + 3 for x in r[5:])]}
                       for r in gen])
    jsonl("ppl.jsonl", [{"text": words(r)} for r in gen])
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tasks / "toy_mc.yaml").write_text(
        "task: toy_mc\n" + data.format(tmp_path / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n")
    (tasks / "toy_ppl.yaml").write_text(
        "task: toy_ppl\n" + data.format(tmp_path / "ppl.jsonl")
        + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return tmp_path


def _argv(tmp, **over):
    a = {"--model": tmp / "base", "--train-data": tmp / "train.jsonl", "--tasks": TASKS,
         "--include-path": tmp / "tasks", "--limit": 6, "--steps": 40, "--lr": 3e-2,
         "--batch-size": 8, "--heldout": 8, "--seed": 0, "--slim-config": json.dumps(SLIM),
         "--out": tmp / "out", "--device": "cpu", "--eval-batch-size": 4}
    a.update(over)
    return [str(x) for kv in a.items() for x in kv]


def test_eval_forgetting_end_to_end(setup):
    res = _recipe().main(_argv(setup))
    saved = json.load(open(res["path"]))
    assert set(saved["arms"]) == {"base", "slim", "lora"}
    assert saved["provenance"]["commit"] and "lm_eval" in saved["provenance"]["versions"]
    # the LoRA arm has SLIM's budget: rank 2 experts x rank 2, the same alpha / r, targets
    lora_cfg, slim_cfg = saved["arms"]["lora"]["config"], saved["arms"]["slim"]["config"]
    assert lora_cfg["r"] == 4 and lora_cfg["lora_alpha"] / 4 == slim_cfg["alpha"] / 2
    assert sorted(lora_cfg["target_modules"]) == sorted(slim_cfg["target_modules"])
    base = saved["arms"]["base"]
    for name, arm in saved["arms"].items():
        tasks = arm["lm_eval"]["tasks"]
        assert set(tasks) == {"toy_mc", "toy_ppl"}, (name, tasks)
        assert 0.0 <= tasks["toy_mc"]["acc,none"] <= 1.0
        assert math.isfinite(tasks["toy_ppl"]["word_perplexity,none"])
        assert tasks["toy_ppl"]["word_perplexity,none"] >= 1.0
        assert tasks["toy_ppl"]["bits_per_byte,none"] >= 0.0
        assert arm["lm_eval"]["n_samples"]["toy_mc"]["effective"] == 6
        new = arm["new_task"]
        assert new["heldout_rows"] == 8 and math.isfinite(new["heldout_loss"])
        assert 0.0 <= new["heldout_exact_match"] <= 1.0
        if name == "base":
            continue
        assert arm["trainable_params"] > 0
        assert os.path.exists(os.path.join(arm["adapter"], "adapter_model.safetensors"))
        # trained: the new task's held-out loss fell, and lm-eval saw the adapter (peft=)
        assert new["heldout_loss"] < base["new_task"]["heldout_loss"], name
        ppl, ppl0 = (a["lm_eval"]["tasks"]["toy_ppl"]["word_perplexity,none"]
                     for a in (arm, base))
        assert ppl != ppl0, name
        ret = arm["retention"]
        assert set(ret) == {"toy_mc", "toy_ppl"}
        assert ret["toy_ppl"]["word_perplexity,none"] == pytest.approx(ppl / ppl0)
        assert all(v is None or (math.isfinite(v) and v >= 0)
                   for t in ret.values() for v in t.values())


@pytest.mark.parametrize("flag,value,msg", [
    ("--methods", "slim,dora", "--methods"),
    ("--slim-config", '{"rank": 0}', "--slim-config"),
    ("--slim-config", '{"ranks": 2}', "ranks"),
    ("--tasks", "toy_mc,no_such_task", "no_such_task"),
    ("--train-data", "missing.jsonl", "--train-data"),
    ("--limit", "0", "--limit"),
    ("--heldout", "48", "--heldout"),
])
def test_eval_forgetting_bad_argument_names_it(setup, flag, value, msg):
    with pytest.raises(SystemExit) as e:
        _recipe().main(_argv(setup, **{flag: value}))
    assert msg in str(e.value) and "argument" in str(e.value), str(e.value)
    assert not (setup / "out" / "forgetting.json").exists()
