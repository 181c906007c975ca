"""lm-eval on a SLIM adapter through PEFT: the real ``lm_eval`` command with ``--model hf
--model_args pretrained=<dir>,peft=<adapter dir>``, offline, on a local task (SLIM is
registered by the install's hook when lm-eval imports peft: no wrapper)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("peft")



def _setup(tmp_path):
    import torch
    from hf_models import recipe_common, save_tiny_lm
    from peft import get_peft_model

    from slim_kernels.peft import SlimPeftConfig

    common = recipe_common()
    arithmetic_rows, words = common.arithmetic_rows, common.words
    base = save_tiny_lm(tmp_path / "base")
    model = get_peft_model(base, SlimPeftConfig(
        target_modules=["q_proj", "v_proj"], num_lora_experts=2, num_identity_experts=1, rank=2,
        num_clusters=2, backend="torch", task_type="CAUSAL_LM"))
    for m in model.modules():
        if hasattr(m, "slim_experts"):
            torch.nn.init.normal_(m.slim_experts["default"].lora_B, std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    rows = []
    for r in arithmetic_rows(12, 6):
        rows.append({"q": words(r[:5]), "choices": [words(r[5:]), words([r[5] + 7])], "gold": 0})
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "slim_toy.yaml").write_text(
        "task: slim_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'toy.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n")


def _acc(tmp_path, model_args, out):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SLIM_KERNELS_PEFT_HOOK")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")  # the console script
    r = subprocess.run(
        [lm_eval, "--model", "hf",
         "--model_args", model_args, "--tasks", "slim_toy", "--include_path",
         str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4", "--output_path",
         str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    assert res, r.stdout[-2000:]
    return json.load(open(res[0]))["results"]["slim_toy"]["acc,none"]


def test_lm_eval_peft_argument_loads_a_slim_adapter(tmp_path):
    _setup(tmp_path)
    base = _acc(tmp_path, f"pretrained={tmp_path / 'base'}", tmp_path / "out_base")
    slim = _acc(tmp_path, f"pretrained={tmp_path / 'base'},peft={tmp_path / 'adapter'}",
                tmp_path / "out_slim")
    assert 0.0 <= base <= 1.0 and 0.0 <= slim <= 1.0
    # the adapter was applied (its random B changes the model's choices on this task)
    assert slim != base, (base, slim)
