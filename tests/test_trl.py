"""TRL recipes (python/train_trl_{sft,dpo,grpo}.py) through SLIM-PEFT: they run, the SLIM aux
gradient is exactly the analytic L1 term once per optimizer step at gradient accumulation 1
and 2, the logged aux does not depend on the accumulation, DPO/GRPO keep one model resident
(the reference is the PEFT model with its adapter disabled)."""
import gc
import importlib.util
import os

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
import transformers  # noqa: E402

import slim_kernels as sk  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.join(os.path.dirname(__file__), "..", "python")
L1 = 0.5


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _GradGrab(transformers.TrainerCallback):
    def __init__(self):
        self.grads = None
        self.model = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None}


def _run(recipe, tmp_path, ga, l1):
    grab = _GradGrab()
    bs = 4 // ga
    res = load(f"train_trl_{recipe}").main(
        ["--tiny", "--steps", "1", "--batch-size", str(bs), "--grad-accum", str(ga), "--lr", "0",
         "--rank", "2", "--output-dir", str(tmp_path / f"{recipe}{ga}{l1}")],
        callbacks=[grab], config_over=dict(max_grad_norm=0.0), l1_coef=l1, balance_coef=0.0)
    return res, grab.grads


def _l1_value(model):
    total = 0.0
    layers = list(sk.slim_modules(model))
    assert len(layers) == 8  # one adapter: the reference is the disabled adapter, not a copy
    for _, m in layers:
        r, N, K = m.config.rank, m.out_features, m.in_features
        total += L1 * (m.lora_B.abs().sum().item() / (r * N) + m.lora_A.abs().sum().item() / (r * K))
    return total


@pytest.mark.parametrize("recipe", ["sft", "dpo", "grpo"])
def test_trl_recipe_aux_gradient_is_the_analytic_term(recipe, tmp_path):
    for ga in (1, 2):
        res, with_aux = _run(recipe, tmp_path, ga, L1)
        _, without = _run(recipe, tmp_path, ga, 0.0)
        model = res["model"]
        params = dict(model.named_parameters())
        checked = 0
        for n, g in with_aux.items():
            p = params[n]
            if n.endswith("lora_A"):
                E, r, K = p.shape
                want = L1 * torch.sign(p.detach()) / (r * K)  # d/dA of l1·|A|/(r·K), once per step
            elif n.endswith("lora_B"):
                E, N, r = p.shape
                want = L1 * torch.sign(p.detach()) / (r * N)
            else:
                want = torch.zeros_like(g)
            torch.testing.assert_close(g - without[n], want, rtol=1e-4, atol=1e-6,
                                       msg=f"{recipe} ga={ga} {n}")
            checked += n.endswith("lora_A")
        assert checked == 8  # 2 layers x q,k,v,o
        logged = [h["slim_aux_loss"] for h in res["trainer"].state.log_history
                  if "slim_aux_loss" in h]
        # the mean per micro-batch: the L1 value itself, whatever the accumulation (lr = 0)
        assert logged and logged[0] == pytest.approx(_l1_value(model), rel=1e-4), (ga, logged)
        assert os.path.exists(os.path.join(res["path"], "adapter_model.safetensors"))


def _models_alive():
    gc.collect()
    # causal LMs (each holds its own LlamaModel, a PreTrainedModel too)
    return sum(isinstance(o, transformers.PreTrainedModel) and type(o).__name__.endswith("ForCausalLM")
               for o in gc.get_objects())


@pytest.mark.parametrize("recipe", ["dpo", "grpo"])
def test_trl_reference_is_the_disabled_adapter_one_model_resident(recipe, tmp_path):
    before = _models_alive()
    calls = []
    import peft

    orig = peft.PeftModel.disable_adapter

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    peft.PeftModel.disable_adapter = spy
    try:
        res = load(f"train_trl_{recipe}").main(
            ["--tiny", "--steps", "1", "--batch-size", "4", "--output-dir", str(tmp_path)])
    finally:
        peft.PeftModel.disable_adapter = orig
    assert res["trainer"].ref_model is None
    assert calls, "the reference log-probabilities did not use disable_adapter()"
    assert _models_alive() - before == 1


def test_aux_of_every_forward_counts_inside_accumulate_aux():
    from slim_kernels.layer import accumulate_aux

    torch.manual_seed(0)
    layer = sk.SlimLinear(8, 6, True, sk.SlimConfig(num_lora_experts=2, num_identity_experts=1,
                                                     rank=2, num_clusters=0, balance_coef=1.0,
                                                     backend="torch"))
    xs = [torch.randn(5, 8), torch.randn(3, 8) * 3]
    single = []
    for x in xs:
        layer.reset_aux_loss()
        layer(x)
        single.append(layer.slim_aux_loss())
    layer.reset_aux_loss()
    with accumulate_aux():
        for x in xs:
            layer(x)
    torch.testing.assert_close(layer.slim_aux_loss(), (single[0] + single[1]) / 2)
    layer(xs[0])  # outside the context: the last forward only
    torch.testing.assert_close(layer.slim_aux_loss(), single[0])
