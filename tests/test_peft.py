"""SLIM as a PEFT method (slim_kernels.peft): the LoRA user path with one config line changed."""
import json
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
    from slim_kernels.integrations.hf import slim_aux_suppressed

    with slim_aux_suppressed():
        task = model(input_ids=ids, attention_mask=am, labels=labels).loss
    torch.testing.assert_close(out.loss, task + aux, rtol=1e-6, atol=1e-6)
    with model.disable_adapter():  # the base model: no aux term
        base = model(input_ids=ids, attention_mask=am, labels=labels).loss
        assert sk.aux_loss(model).item() == 0


def test_untested_peft_version_registers_nothing():
    # (the import hook off: it would register SLIM at `import peft`, before the version is
    # faked; tests/test_peft_loading.py covers the hook on an untested version)
    code = ("import peft; peft.__version__ = '9.9.0'\n"
            "try:\n    import slim_kernels.peft\nexcept ImportError as e:\n    print('ERR', e)\n"
            "from peft import mapping\n"
            "print('SLIM' in mapping.PEFT_TYPE_TO_CONFIG_MAPPING, 'SLIM' in mapping.PEFT_TYPE_TO_TUNER_MAPPING)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT,
                                         "SLIM_KERNELS_PEFT_HOOK": "0"})
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


# -- LoRA's vocabulary -------------------------------------------------------------------------
def _wrapped(model):
    return sorted(n.split("base_model.model.")[-1] for n, m in model.named_modules()
                  if hasattr(m, "slim_experts"))


def test_lora_names_modules_to_save_and_layers_to_transform(tmp_path):
    """``SlimPeftConfig(r=8, lora_alpha=16, modules_to_save=[...], layers_to_transform=[0])``:
    LoRA's names of rank and alpha, a trained and saved extra module, only layer 0 wrapped."""
    c = SlimPeftConfig(r=8, lora_alpha=16, modules_to_save=["lm_head"], layers_to_transform=[0],
                       target_modules=["q_proj", "v_proj"], num_lora_experts=2,
                       num_identity_experts=1, num_clusters=2, backend="torch",
                       task_type="CAUSAL_LM")
    assert (c.rank, c.alpha, c.r, c.lora_alpha) == (8, 16, 8, 16)
    assert "r" not in c.to_dict() and c.to_dict()["rank"] == 8
    model = get_peft_model(tiny_model(), c)
    assert _wrapped(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    head = [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert head == ["base_model.model.lm_head.modules_to_save.default.weight"]
    _train_step(model)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model(), tmp_path)), want)
    assert torch.equal(_logits(sk.load_slim(tiny_model(), str(tmp_path))), want)
    with pytest.raises(ValueError, match=r"r=4 and rank=8: r is LoRA's name for rank"):
        SlimPeftConfig(r=4, rank=8)
    with pytest.raises(ValueError, match="layers_pattern is set but layers_to_transform is not"):
        SlimPeftConfig(layers_pattern="layers")
    with pytest.raises(ValueError, match="layers_to_transform and layers_pattern cannot be used "
                                         "when target_modules is a str"):
        SlimPeftConfig(target_modules=".*q_proj", layers_to_transform=[0])


def test_rank_and_alpha_patterns_set_each_layer(tmp_path):
    """rank_pattern / alpha_pattern give a module's experts another rank or alpha (the same
    matching as LoRA's); the adapter saves and loads with them."""
    model = get_peft_model(tiny_model(), cfg(rank_pattern={"q_proj": 4},
                                             alpha_pattern={r"layers\.1\.self_attn\.v_proj": 9.0}))
    layers = {n.split("base_model.model.")[-1].rsplit(".slim_experts", 1)[0]: m
              for n, m in sk.slim_modules(model)}
    for name, m in layers.items():
        r = 4 if name.endswith("q_proj") else 2
        alpha = 9.0 if name == "model.layers.1.self_attn.v_proj" else 32.0
        assert m.lora_A.shape[1] == r and m.config.rank == r and m.config.alpha == alpha, name
    _train_step(model)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model(), tmp_path)), want)
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]=0 is invalid"):
        cfg(rank_pattern={"q_proj": 0})


@pytest.mark.parametrize("bias", ["all", "slim_only", "lora_only"])
def test_bias_trains_the_base_biases_and_saves_them(tmp_path, bias):
    model = get_peft_model(tiny_model("qwen2"), cfg(bias=bias))  # qwen2: q/k/v have biases
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n in trainable if n.endswith(".bias")}
    assert biases and all("proj" in n for n in biases)
    if bias != "all":
        assert model.peft_config["default"].bias == "slim_only"
        assert all(n.rsplit(".", 2)[0].endswith(("q_proj", "v_proj")) for n in biases)
    _train_step(model)
    want = _logits(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert any(k.endswith(".bias") for k in load_file(tmp_path / "adapter_model.safetensors"))
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_model("qwen2"), tmp_path)), want)
    with pytest.raises(ValueError, match=r"bias='some' is invalid: expected one of none, all, "
                                         r"slim_only"):
        cfg(bias="some")


def test_init_lora_weights():
    plain = _logits(tiny_model())
    g = get_peft_model(tiny_model(), cfg(init_lora_weights="gaussian"))
    assert torch.equal(_logits(g), plain)  # B = 0 still
    a = next(m for _, m in sk.slim_modules(g)).lora_A
    assert abs(a.std().item() - 1 / 2) < 0.2  # N(0, 1/r), r = 2
    f = get_peft_model(tiny_model(), cfg(init_lora_weights=False))
    assert not torch.equal(_logits(f), plain)  # B random: not the base at the start
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported: it "
                                         "initialises one LoRA from the base weight"):
        cfg(init_lora_weights="pissa")


@pytest.mark.parametrize("field, value, why", [
    ("use_dora", True, "no single merged weight to normalise"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "not bare parameters"),
    ("loftq_config", {"loftq_bits": 4}, "LoftQ initialises one LoRA"),
    ("lora_bias", True, "experts have no bias term"),
    ("trainable_token_indices", [1, 2], "trainable tokens are not implemented for SLIM"),
    ("layer_replication", [[0, 1]], "not implemented for SLIM"),
])
def test_lora_fields_slim_cannot_honour_are_refused_saying_why(field, value, why):
    with pytest.raises(ValueError, match=rf"SlimPeftConfig cannot honour {field}=.*: .*{why}"):
        cfg(**{field: value})
    cfg(**{field: LoraConfig().__dict__[field]})  # LoRA's default asks for nothing: accepted


def test_unknown_fields_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"unknown field 'rnak'.*Known fields: .*rank"):
        cfg(rnak=4)


def test_seq_cls_trains_its_head_as_lora_does(tmp_path):
    """task_type SEQ_CLS: PEFT adds the classifier head to modules_to_save, so it trains and
    is saved with the adapter, as with a LoraConfig."""
    import transformers as tf

    def clf():
        torch.manual_seed(0)
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(
            vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0))

    model = get_peft_model(clf(), cfg(task_type="SEQ_CLS"))
    assert "score" in model.peft_config["default"].modules_to_save
    head = {n: p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and ".score." in n}
    assert head
    ids, am, _ = batch()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, attention_mask=am, labels=torch.tensor([0, 2])).loss.backward()
    opt.step()
    assert all(not torch.equal(p, head[n]) for n, p in model.named_parameters() if n in head)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clf(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=am).logits, want)


def test_phi3_default_targets_wrap_its_fused_projections():
    """The default target_modules come from a per-model-type mapping: on Phi-3 the fused
    qkv_proj and gate_up_proj are wrapped, as every projection is on the same-size Llama."""
    model = get_peft_model(tiny_model("phi3"), cfg(target_modules=None))
    assert {n.rsplit(".", 1)[-1] for n in _wrapped(model)} == {
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    llama = get_peft_model(tiny_model("llama"), cfg(target_modules=None))
    assert {n.rsplit(".", 1)[-1] for n in _wrapped(llama)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    _train_step(model)
    assert all(m.lora_B.abs().sum() > 0 for _, m in sk.slim_modules(model))


def test_add_weighted_adapter_and_mixed_models_are_refused_clearly():
    model = get_peft_model(tiny_model(), cfg())
    model.add_adapter("other", cfg())
    with pytest.raises(ValueError, match="cannot be combined with add_weighted_adapter: each "
                                         "adapter routes every token"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="peft_type.*SLIM.*not compatible with the "
                                         "`PeftMixedModel`"):
        get_peft_model(tiny_model(), cfg(), mixed=True)


def test_save_pretrained_records_integrity_and_the_loading_note(tmp_path):
    """PEFT's own save_pretrained writes the integrity record (from the tensor file it just
    wrote), the note in adapter_config.json and in README.md; it refuses NaN factors before
    writing anything."""
    model = get_peft_model(tiny_model(), cfg())
    _train_step(model)
    model.save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert len(meta["slim_integrity"]["tensors"]) == 4 * 6
    assert "import slim_kernels.peft" in (tmp_path / "a" / "README.md").read_text()
    assert not list((tmp_path / "a").glob("*.tmp-*"))
    layer = next(m for _, m in sk.slim_modules(model))
    with torch.no_grad():
        layer.lora_B.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.self_attn\.q_proj': tensor "
                                         r"'lora_B' holds non-finite values .*not saved"):
        model.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
