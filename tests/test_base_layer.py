"""SlimLinear wraps a base layer: nn.Linear, quantized linears (bitsandbytes, or any module
with ``dequantize()``); old state dicts (weight/bias on the layer itself) still load."""
import importlib.util

import pytest
import torch
from torch import nn

from slim_kernels import SlimConfig, SlimLinear
from slim_kernels.layer import SLIM_KEYS

CFG = SlimConfig(num_lora_experts=2, num_identity_experts=1, rank=2, top_k=2, num_clusters=2,
                 backend="torch")


class FakeQuantLinear(nn.Module):
    """int8 weight with a per-row scale: not an nn.Linear, dequantized on demand."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        scale = lin.weight.detach().abs().amax(1) / 127
        self.register_buffer("qweight", torch.round(lin.weight.detach() / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.weight = self.qweight  # the packed weight, as quantized layers expose it
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())

    def dequantize(self):
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(), self.bias)


def _trained(layer):
    torch.manual_seed(1)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_wraps_base_layer_weight_read_only():
    lin = nn.Linear(8, 6)
    layer = SlimLinear.from_linear(lin, CFG)
    assert layer.base_layer is lin and layer.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(6, 8))
    # the base's tensors keep their plain names in the state dict (checkpoints of a SLIM model
    # load into the base model class) and load back into the base layer
    sd = layer.state_dict()
    assert "weight" in sd and "bias" in sd and not any(k.startswith("base_layer.") for k in sd)
    other = SlimLinear(8, 6, True, CFG)
    other.load_state_dict(sd)
    assert torch.equal(other.base_layer.weight, lin.weight)


def test_state_dict_keys_are_attribute_paths_and_older_keys_load():
    """The base keeps the plain names; the clusters' keys are their attribute paths
    (``clusters.cluster_centers``: transformers' adapter loader assigns tensors by path). The
    nested base keys and the flat cluster keys of earlier releases load too."""
    torch.manual_seed(0)
    src = _trained(SlimLinear(8, 6, True, CFG))
    sd = src.state_dict()
    assert sorted(sd) == sorted(["weight", "bias", "lora_A", "lora_B", "router",
                                 "clusters.cluster_centers", "clusters.cluster_vars",
                                 "clusters.cluster_initialized"])
    x = torch.randn(5, 8)
    src.eval()
    for keys in (sd, {("base_layer." + k if k in ("weight", "bias") else k): v
                      for k, v in sd.items()},
                 {k.replace("clusters.", ""): v for k, v in sd.items()}):
        dst = SlimLinear(8, 6, True, CFG)
        dst.load_state_dict(keys)
        dst.eval()
        assert torch.equal(src(x), dst(x))


def test_conv1d_base_is_the_linear_with_the_transposed_weight():
    """transformers' Conv1D (GPT-2) stores its weight (in, out): the handler with
    fan_in_fan_out hands the op the transposed view (no copy), so a SLIM layer on a Conv1D
    computes what one on the equivalent nn.Linear does, forward and backward."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from slim_kernels.base_layers import base_handler, base_weight

    torch.manual_seed(0)
    conv = Conv1D(6, 8)  # (nf=out, nx=in): weight (8, 6)
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    assert base_handler(conv).fan_in_fan_out and not base_handler(lin).fan_in_fan_out
    assert base_weight(conv).data_ptr() == conv.weight.data_ptr()  # a view, not a copy
    a = SlimLinear.from_linear(conv, CFG)
    b = SlimLinear.from_linear(lin, CFG)
    assert (a.in_features, a.out_features) == (8, 6) and not conv.weight.requires_grad
    x = torch.randn(7, 8)
    a.eval()
    assert torch.equal(a(x), conv(x))  # B = 0: the base output exactly
    _trained(a)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if _is_slim_key(k)}, strict=False)
    for mode in (a.eval, a.train):
        mode(), b.train(a.training)
        xa, xb = torch.randn(5, 8, requires_grad=True), None
        xb = xa.detach().clone().requires_grad_()
        torch.testing.assert_close(a(xa), b(xb), rtol=1e-6, atol=1e-6)
        a(xa).square().sum().backward()
        b(xb).square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad, rtol=1e-5, atol=1e-6)


def test_assigning_a_cluster_buffer_loads_it():
    """A loader that assigns loaded tensors to their attribute paths (transformers'
    load_adapter) instead of calling load_state_dict: the statistics stay fp32, the routing
    tensors and the host's flag follow, exactly as after load_state_dict."""
    from slim_kernels import step_clusters

    torch.manual_seed(0)
    src = _trained(SlimLinear(8, 6, True, CFG)).train()
    src(torch.randn(30, 8))
    step_clusters(src)  # the clusters exist
    assert src.clusters.ready
    by_load = SlimLinear(8, 6, True, CFG)
    by_load.load_state_dict(src.state_dict())
    by_assign = SlimLinear(8, 6, True, CFG)
    by_assign.load_state_dict({k: v for k, v in src.state_dict().items()
                               if not k.startswith("clusters.")}, strict=False)
    assert not by_assign.clusters.ready
    for name, v in src.clusters.tensors().items():
        setattr(by_assign.clusters, name, v.to(torch.float64) if v.is_floating_point() else v)
    assert by_assign.clusters.ready and by_assign.clusters.cluster_centers.dtype == torch.float32
    x = torch.randn(5, 8)
    for layer in (src, by_load, by_assign):
        layer.eval()
    assert torch.equal(by_assign(x), src(x)) and torch.equal(by_load(x), src(x))
    assert not torch.equal(SlimLinear(8, 6, True, CFG).eval()(x), src(x))


def test_from_linear_unsupported_names_the_layer():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.conv\.Conv1d.*Supported base layers"):
        SlimLinear.from_linear(nn.Conv1d(4, 4, 1), CFG)
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(lin.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="not floating point"):
        SlimLinear.from_linear(lin, CFG)


def _is_slim_key(k: str) -> bool:
    """A state-dict key of the layer's own tensors (the cluster buffers' are under clusters.)."""
    return k.split(".", 1)[0] in SLIM_KEYS + ("clusters",)


def _check_quantized(base, deq: torch.Tensor, atol: float):
    torch.manual_seed(0)
    layer = SlimLinear.from_linear(base, CFG)
    x = torch.randn(7, base.in_features)
    layer.eval()
    # B = 0 at init: the base output, computed from the dequantized weight (exact), and the
    # base layer's own kernels (bitsandbytes' eval kernels round differently: atol)
    assert torch.equal(layer(x), nn.functional.linear(x, deq.float(), base.bias))
    torch.testing.assert_close(layer(x), base(x), atol=atol, rtol=0)
    _trained(layer)
    ref_lin = nn.Linear(base.in_features, base.out_features)
    ref_lin.weight.data, ref_lin.bias.data = deq.float().clone(), base.bias.detach().float().clone()
    ref = SlimLinear.from_linear(ref_lin, CFG)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if _is_slim_key(k)},
                        strict=False)
    ref.eval()
    # base output + SLIM part: the op on the dequantized weight equals the base layer's output
    # plus the delta the same experts give over an nn.Linear
    delta = ref(x) - ref_lin(x)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, deq.float(), base.bias) + delta,
                               atol=1e-6, rtol=1e-5)
    # one training step: the experts move, the base does not
    layer.train()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x).pow(2).mean().backward()
    opt.step()
    after = layer.state_dict()
    assert not torch.equal(before["lora_A"], after["lora_A"])
    for k in before:
        if not _is_slim_key(k):
            assert torch.equal(before[k], after[k]), k
    assert all(not p.requires_grad for p in base.parameters())


def test_fake_quantized_base():
    torch.manual_seed(0)
    base = FakeQuantLinear(nn.Linear(16, 12))
    _check_quantized(base, base.dequantize(), atol=1e-6)


bnb_missing = importlib.util.find_spec("bitsandbytes") is None


@pytest.mark.skipif(bnb_missing, reason="bitsandbytes is not installed (pip install "
                    "bitsandbytes; its CPU build runs these tests)")
@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_base(bits):
    import bitsandbytes as bnb

    from slim_kernels.base_layers import base_weight

    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    if bits == 4:
        q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False,
                                     has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone())
    q = q.to("cpu")  # quantizes
    assert not q.weight.is_floating_point()
    # bitsandbytes repacks a 4-bit weight (bf16 scales) for its CPU kernel at the first eval
    # forward: dequantize what the layer will hold from then on
    q.eval()
    q(torch.randn(2, 64))
    _check_quantized(q, base_weight(q), atol=2e-2)


def _quantize_projections(model, names=("q_proj", "v_proj"), bits=None):
    """Swap the named projections for quantized layers: FakeQuantLinear, or bitsandbytes."""
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in names and isinstance(mod, nn.Linear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            if bits is None:
                q = FakeQuantLinear(mod)
            else:
                import bitsandbytes as bnb
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False,
                                             quant_type="nf4")
                q = q.to("cpu")
            setattr(parent, name.rsplit(".", 1)[-1], q)
    return model


def _one_step_trains_experts_only(model):
    from hf_models import batch

    ids, am, labels = batch()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.5)
    model.train()
    loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p), n


@pytest.mark.parametrize("path", ["apply_slim", "peft"])
def test_fake_quantized_model_trains_one_step(path):
    from hf_models import tiny_model

    model = _quantize_projections(tiny_model())
    if path == "apply_slim":
        import slim_kernels as sk
        sk.apply_slim(model, SlimConfig(target_modules=("q_proj", "v_proj"), num_lora_experts=2,
                                        num_identity_experts=1, rank=2, num_clusters=2,
                                        backend="torch"), verbose=False)
    else:
        pytest.importorskip("peft")
        from peft import get_peft_model

        from slim_kernels.peft import SlimPeftConfig
        model = get_peft_model(model, SlimPeftConfig(
            target_modules=["q_proj", "v_proj"], num_lora_experts=2, num_identity_experts=1,
            rank=2, num_clusters=2, backend="torch"))
    _one_step_trains_experts_only(model)


@pytest.mark.skipif(bnb_missing, reason="bitsandbytes is not installed (pip install "
                    "bitsandbytes; its CPU build runs these tests)")
def test_bitsandbytes_4bit_model_trains_one_step_through_peft(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from hf_models import tiny_model
    from slim_kernels.peft import SlimPeftConfig

    model = get_peft_model(_quantize_projections(tiny_model(), bits=4), SlimPeftConfig(
        target_modules="all-linear", exclude_modules=["k_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"],
        num_lora_experts=2, num_identity_experts=1, rank=2, num_clusters=2, backend="torch"))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "slim_experts")]
    assert len(wrapped) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
    _one_step_trains_experts_only(model)


def test_slim_model_state_dict_follows_peft_and_resumes_onto_a_fresh_slim_model():
    """apply_slim injects PEFT's tuner layer, so a SLIM model's state dict names its base
    weights as a LoRA model's does (``q_proj.base_layer.weight``); a checkpoint of it loads
    onto a fresh SLIM model of the same config (Trainer's resume_from_checkpoint), all of it."""
    import slim_kernels as sk
    from hf_models import tiny_model

    def slim_model(seed):
        return sk.apply_slim(tiny_model(seed=seed), SlimConfig(
            num_lora_experts=2, num_identity_experts=1, rank=2, num_clusters=2,
            backend="torch"), verbose=False)

    plain = tiny_model()
    sd = slim_model(0).state_dict()
    wrapped = {k.replace(".weight", ".base_layer.weight") if "_proj." in k else k
               for k in plain.state_dict()}
    assert wrapped <= set(sd)
    fresh = slim_model(5)
    res = fresh.load_state_dict(sd)  # strict: every key
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
