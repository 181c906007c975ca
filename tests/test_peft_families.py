"""SLIM through PEFT on the model families PEFT's LoRA tests cover, each a tiny model built
from a config (offline), with SlimPeftConfig's default target_modules (the model type's
attention and MLP projections): the wrapped modules, the base output at init, one training
step that reaches every expert (and the task head PEFT adds), and a bit-exact reload."""
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import PeftModel, get_peft_model  # noqa: E402

import slim_kernels as sk  # noqa: E402
from hf_models import tiny_other  # noqa: E402
from slim_kernels.peft import SlimPeftConfig, SlimPeftLayer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
_FALCON = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
# the last name component of the modules SLIM wraps by default, per family
WRAPPED = {
    "llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA, "gemma": _LLAMA,
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "gpt_neox": _FALCON, "falcon": _FALCON,
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
    "t5": {"q", "k", "v", "o", "wi", "wo"},
    "bert": {"query", "key", "value", "dense"},  # (not the pooler's dense)
    "vit": {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"},
}
HEADS = {"bert": "classifier", "vit": "classifier"}  # task heads trained with the adapter


def _out(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", list(WRAPPED))
def test_family_default_targets_train_and_reload(family, tmp_path):
    model, task, inputs = tiny_other(family)
    ref = _out(model, inputs)
    cfg = SlimPeftConfig(task_type=task, num_lora_experts=2, num_identity_experts=1, rank=2,
                         num_clusters=2, backend="torch",
                         modules_to_save=["classifier"] if task is None else None)
    pm = get_peft_model(model, cfg)
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, SlimPeftLayer)]
    assert {n.rpartition(".")[2] for n in wrapped} == WRAPPED[family]
    assert not any("pooler" in n or "lm_head" in n for n in wrapped)
    # B = 0: the base model's output (a base linear that rounds like F.linear: exactly)
    torch.testing.assert_close(_out(pm, inputs), ref, rtol=1e-6, atol=1e-6)
    head = HEADS.get(family)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("slim_experts" in n or (head and head in n) for n in trainable)
    if head:
        assert any(head in n for n in trainable)  # the task head trains, as with LoRA
        head_before = {n: p.detach().clone() for n, p in pm.named_parameters()
                       if head in n and p.requires_grad}
    pm.train()
    loss = pm(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    layers = [m for _, m in sk.slim_modules(pm)]
    assert len(layers) == len(wrapped)
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in layers)
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5).step()
    assert all(m.clusters.ready for m in layers)
    if head:
        assert any(not torch.equal(p, head_before[n]) for n, p in pm.named_parameters()
                   if n in head_before)
    want = _out(pm, inputs)
    assert not torch.equal(want, ref)
    pm.save_pretrained(tmp_path)
    fresh, _, _ = tiny_other(family)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(_out(loaded, inputs), want)
