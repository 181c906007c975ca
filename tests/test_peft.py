"""SLIM as a PEFT method (slim_kernels.peft): the LoRA user path with one config line changed."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import slim_kernels as sk  # noqa: E402
from slim_kernels.peft import SlimPeftConfig  # noqa: E402

from hf_models import batch, tiny_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**over):
    kw = dict(target_modules=["q_proj", "v_proj"], num_lora_experts=2, num_identity_experts=1,
              rank=2, top_k=2, num_clusters=2, backend="torch", task_type="CAUSAL_LM")
    kw.update(over)
    return SlimPeftConfig(**kw)


def _train_step(model, seed=1):
    ids, am, labels = batch(seed=seed)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()


def _logits(model):
    ids, am, _ = batch(seed=3)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am).logits


def test_one_config_line_lora_and_slim_through_the_same_script(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import train_peft
    finally:
        sys.path.pop(0)
    for method in ("lora", "slim"):
        out = tmp_path / method
        res = train_peft.main(["--method", method, "--tiny", "--output_dir", str(out)])
        assert res["trainable"] > 0 and res["loss_last"] < res["loss_first"], res
        assert (out / "adapter_config.json").exists()
        assert (out / "adapter_model.safetensors").exists()


def test_get_peft_model_trainable_and_save_load_bit_exact(tmp_path, capsys):
    base = tiny_model()
    model = get_peft_model(base, cfg())
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".slim_experts.default." in n for n in names)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "slim_experts" in n)
    assert "trainable params" in capsys.readouterr().out
    _train_step(model)
    layers = [m for _, m in sk.slim_modules(model)]
    assert len(layers) == 4 and all(bool(m.clusters.cluster_initialized) for m in layers)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("cluster_centers") for k in keys)
    assert not any("base_layer" in k or k.endswith("proj.weight") for k in keys), sorted(keys)[:4]

    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(_logits(loaded), want)
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_two_adapters_switch_delete_and_disable_equals_base():
    plain = _logits(tiny_model())
    model = get_peft_model(tiny_model(), cfg())
    model.add_adapter("other", cfg(target_modules=["q_proj"]))
    for name in ("default", "other"):
        model.set_adapter(name)
        for m in model.modules():
            if hasattr(m, "slim_experts") and name in m.slim_experts:
                with torch.no_grad():
                    m.slim_experts[name].lora_B.normal_()
    base_params = [p for n, p in model.named_parameters() if "slim_experts" not in n]
    assert not any(p.requires_grad for p in base_params)  # set_adapter keeps the base frozen
    model.set_adapter("default")
    a = _logits(model)
    model.set_adapter("other")
    b = _logits(model)
    assert not torch.equal(a, b) and not torch.equal(a, plain)
    model.set_adapter("default")
    assert torch.equal(_logits(model), a)
    with model.disable_adapter():
        assert torch.equal(_logits(model), plain)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert all("other" not in n for n, _ in model.named_parameters())
    assert torch.equal(_logits(model), a)


def test_target_matching_regex_all_linear_exclude():
    m = get_peft_model(tiny_model(), cfg(target_modules=r".*\.0\.self_attn\.(q|k)_proj"))
    wrapped = sorted(n.split("base_model.model.")[-1] for n, mod in m.named_modules()
                     if hasattr(mod, "slim_experts"))
    assert wrapped == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]
    m = get_peft_model(tiny_model(), cfg(target_modules="all-linear", exclude_modules=["down_proj"]))
    leaves = {n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if hasattr(mod, "slim_experts")}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}  # no lm_head


def test_merge_and_unload_refuses_unload_gives_the_base():
    plain = _logits(tiny_model())
    model = get_peft_model(tiny_model(), cfg())
    with pytest.raises(ValueError, match="per token|every token"):
        model.merge_and_unload()
    base = model.unload()
    assert not list(sk.slim_modules(base))
    assert torch.equal(_logits(base), plain)


def test_aux_loss_reaches_the_training_loss():
    # no clusters: two training forwards route alike
    model = get_peft_model(tiny_model(), cfg(balance_coef=0.5, l1_coef=0.01, num_clusters=0))
    ids, am, labels = batch()
    model.train()
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    aux = sk.aux_loss(model)
    assert aux.item() > 0 and aux.requires_grad
    with sk.integrations.hf.slim_aux_suppressed():
        task = model(input_ids=ids, attention_mask=am, labels=labels).loss
    torch.testing.assert_close(out.loss, task + aux, rtol=1e-6, atol=1e-6)
    with model.disable_adapter():  # the base model: no aux term
        base = model(input_ids=ids, attention_mask=am, labels=labels).loss
        assert sk.aux_loss(model).item() == 0


def test_untested_peft_version_registers_nothing():
    code = ("import peft; peft.__version__ = '9.9.0'\n"
            "try:\n    import slim_kernels.peft\nexcept ImportError as e:\n    print('ERR', e)\n"
            "from peft import mapping\n"
            "print('SLIM' in mapping.PEFT_TYPE_TO_CONFIG_MAPPING, 'SLIM' in mapping.PEFT_TYPE_TO_TUNER_MAPPING)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert "ERR" in r.stdout and "tested with peft 0.21.x but peft 9.9.0" in r.stdout, r.stdout + r.stderr
    assert r.stdout.strip().endswith("False False"), r.stdout


def test_stacking_slim_peft_on_a_lora_model_refuses_clearly():
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["k_proj"], r=2))
    with pytest.raises(ValueError, match="peft type|PEFT type|different"):
        model.add_adapter("slim", cfg())


def test_stacking_apply_slim_keeps_an_existing_lora_trainable():
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["k_proj"], r=2))
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    n_lora = sum(p.numel() for n, p in model.named_parameters() if n in lora)
    assert n_lora > 0
    sk.apply_slim(model, sk.SlimConfig(target_modules=("q_proj",), num_lora_experts=2,
                                       num_identity_experts=1, rank=2, num_clusters=2,
                                       backend="torch"), verbose=False)
    now = {n for n, p in model.named_parameters() if p.requires_grad}
    assert lora <= now  # never a silent freeze
    assert any("lora_router" in n or n.endswith("router") for n in now - lora)
    base = [n for n in now if "base_layer" in n or n.endswith("embed_tokens.weight")]
    assert not base
    with pytest.raises(TypeError, match="already carries a PEFT adapter"):
        sk.apply_slim(get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], r=2)),
                      sk.SlimConfig(target_modules=("q_proj",), backend="torch"), verbose=False)
