"""Hugging Face integration: apply_slim, aux loss in outputs.loss, token mask, disable_slim,
every model family, Trainer. Tiny models from configs, offline."""
import copy
import math

import pytest
import torch
from torch import nn

import slim_kernels as sk
from hf_models import FAMILIES, V, batch, tiny_model

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# a wrapped module's SlimLinear (PEFT's layout: the adapter "default" of its SlimPeftLayer)
LAYER = ".slim_experts.default"

# num_clusters, cluster_momentum and yield_strength pinned: the tests' batches were sized for them
CFG = dict(num_lora_experts=2, num_identity_experts=2, rank=4, backend="torch", num_clusters=4,
           cluster_momentum=0.01, yield_strength=1.0)


def slim(model, **kw):
    add = kw.pop("add_aux_to_loss", True)
    return sk.apply_slim(model, sk.SlimConfig(**{**CFG, **kw}), verbose=False,
                         add_aux_to_loss=add)


def randomise_B(model, std=0.2, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in sk.slim_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_zero_B_equals_base_and_trains(family):
    model = tiny_model(family)
    ids, am, labels = batch()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
    slim(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am).logits
    assert torch.equal(out, ref)  # zero-initialised B: exactly the base model
    model.train()
    loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
    loss.backward()
    for name, p in model.named_parameters():
        is_slim = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "router")
        assert p.requires_grad == is_slim, name
        if is_slim:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    # B got a gradient, so one step moves the output
    assert any(m.lora_B.grad.abs().sum() > 0 for _, m in sk.slim_modules(model))


def test_phi3_fused_projections_wrapped_whole():
    model = tiny_model("phi3")
    slim(model)
    leaves = {n.rsplit(".", 1)[-1] for n in model.slim_summary.layers}
    assert leaves == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    qkv = model.model.layers[0].self_attn.qkv_proj.slim_experts["default"]  # (PEFT's layout)
    assert isinstance(qkv, sk.SlimLinear) and qkv.out_features == 32 + 2 * 2 * 8
    # naming only part of a fused group is an error, and names the module
    with pytest.raises(ValueError, match=r"qkv_proj.*fused"):
        slim(tiny_model("phi3"), target_modules=("q_proj", "o_proj"))
    # the fused name itself works too
    m2 = slim(tiny_model("phi3"), target_modules=("qkv_proj",))
    assert len(m2.slim_summary.layers) == 2


def test_summary_and_freeze(caplog, capsys):
    model = tiny_model("llama")
    total = sum(p.numel() for p in model.parameters())
    with caplog.at_level("INFO", logger="slim_kernels"):
        out = sk.apply_slim(model, sk.SlimConfig(**CFG))
    assert out is model
    s = model.slim_summary
    # the summary is logged (logger "slim_kernels"), not printed
    assert s.num_layers == 14 and "swapped 14" in caplog.text
    assert "swapped 14" not in capsys.readouterr().out
    n_slim = sum(m.lora_A.numel() + m.lora_B.numel() + m.router.numel()
                 for _, m in sk.slim_modules(model))
    assert s.trainable_params == n_slim and s.total_params == total + n_slim
    assert math.isclose(s.trainable_share, n_slim / (total + n_slim))
    # the same weight tensors are kept
    assert all(m.weight.requires_grad is False for _, m in sk.slim_modules(model))


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
            (getattr(model, "_slim_state", None), len(model._forward_hooks),
             len(model._forward_pre_hooks)))


def assert_unchanged(model, snap):
    mods, params, _ = _snapshot(model)
    assert mods == snap[0]
    assert params.keys() == snap[1].keys()
    for n, (rg, t) in params.items():
        assert rg == snap[1][n][0], n
        assert torch.equal(t, snap[1][n][1]), n
    assert (getattr(model, "_slim_state", None), len(model._forward_hooks),
            len(model._forward_pre_hooks)) == snap[2]


def test_errors_leave_model_unchanged():
    model = tiny_model("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"\['nope_proj'\] match no module.*q_proj"):
        slim(model, target_modules=("q_proj", "nope_proj"))
    assert_unchanged(model, snap)
    with pytest.raises(TypeError, match="config must be a SlimConfig"):
        sk.apply_slim(model, dict(rank=2))
    assert_unchanged(model, snap)
    slim(model)
    with pytest.raises(RuntimeError, match="already"):
        slim(model)


def test_gpt2_conv1d_is_wrapped_by_default_and_unsupported_targets_are_clear_errors():
    """GPT-2's Conv1D (weight stored (in, out)) is a base layer: the default targets of
    gpt2 wrap c_attn, c_proj and c_fc, start as the base exactly and train. A module that is no
    supported linear, or a name that matches nothing, is an error that changes nothing."""
    import transformers as tf

    def gpt2():
        torch.manual_seed(0)
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4,
                                                n_positions=32))

    model = gpt2()
    snap = _snapshot(model)
    with pytest.raises(TypeError, match=r"transformer\.wte.*Embedding.*not a supported linear"):
        slim(model, target_modules=("wte",))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="match no module"):
        slim(model, target_modules=("q_proj",))
    assert_unchanged(model, snap)
    ids, am, labels = batch()
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am).logits
    slim(model)
    assert sorted(model.slim_summary.layers) == sorted(
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=am).logits, ref)
    model.train()
    model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
    assert all(m.lora_B.grad.abs().sum() > 0 for _, m in sk.slim_modules(model))


def test_aux_loss_added_to_outputs_loss_in_training_only():
    model = tiny_model("llama")
    slim(model, l1_coef=0.05, balance_coef=0.01)
    randomise_B(model)
    ids, am, labels = batch()
    model.train()
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    aux = sk.aux_loss(model)
    assert aux.item() > 0
    # task loss recomputed from the logits
    task = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task + aux, rtol=1e-6, atol=1e-6)
    # tuple outputs too
    out_t = model(ids, am, labels=labels, return_dict=False)
    assert isinstance(out_t, tuple)
    # no labels: no loss, nothing added
    assert model(input_ids=ids, attention_mask=am).loss is None
    # eval mode: the pure task loss
    model.eval()
    ev = model(input_ids=ids, attention_mask=am, labels=labels)
    task_ev = nn.functional.cross_entropy(ev.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ev.loss, task_ev, rtol=1e-6, atol=1e-6)


def test_aux_switch_off():
    model = tiny_model("llama")
    slim(model, l1_coef=0.05, add_aux_to_loss=False)
    ids, am, labels = batch()
    out = model.train()(input_ids=ids, attention_mask=am, labels=labels)
    task = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task, rtol=1e-6, atol=1e-6)
    assert sk.aux_loss(model).item() > 0  # still there for logging


def test_aux_weighted_by_token_share_with_num_items_in_batch():
    model = tiny_model("llama")
    slim(model, l1_coef=0.05)
    ids, am, labels = batch()
    model.train()
    n_here = labels[:, 1:].ne(-100).sum()
    out = model(input_ids=ids, attention_mask=am, labels=labels, num_items_in_batch=3 * n_here)
    aux = sk.aux_loss(model)
    task = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                       reduction="sum") / (3 * n_here)
    torch.testing.assert_close(out.loss, task + aux / 3, rtol=1e-5, atol=1e-6)


def test_padding_does_not_move_clusters():
    torch.manual_seed(0)
    ids, am, labels = batch(pad_last=4)
    ids2 = ids.clone()
    ids2[-1, -4:] = 7  # other tokens at the padded positions
    states = []
    for x in (ids, ids2):
        model = slim(tiny_model("llama")).train()
        with sk.track_routing(model):
            for _ in range(2):  # init, then one EMA update
                model(input_ids=x, attention_mask=am)
        states.append([m.clusters.cluster_centers.clone() for _, m in sk.slim_modules(model)]
                      + [m.clusters.cluster_vars.clone() for _, m in sk.slim_modules(model)])
        # stats count real tokens only
        st = sk.routing_stats(model)["model.layers.0.mlp.down_proj" + LAYER]
        assert st["tokens"] == 2 * int(am.sum())
    for a, b in zip(*states):
        assert torch.equal(a, b)
    # attention_mask given positionally works as well
    model = slim(tiny_model("llama")).train()
    with sk.track_routing(model):
        model(ids, am)
    assert sk.routing_stats(model)["model.layers.0.mlp.up_proj" + LAYER]["tokens"] == int(am.sum())


def test_disable_slim_runs_base_exactly():
    model = tiny_model("llama")
    ids, am, labels = batch()
    base = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=am, labels=labels)
    slim(model, l1_coef=0.1)
    randomise_B(model)
    model.train()
    model(input_ids=ids, attention_mask=am)  # clusters initialised
    cen = [m.clusters.cluster_centers.clone() for _, m in sk.slim_modules(model)]
    model.eval()
    with torch.no_grad():
        with_slim = model(input_ids=ids, attention_mask=am).logits
        assert not torch.equal(with_slim, ref.logits)
        with sk.disable_slim(model):
            with sk.disable_slim(model):  # nests
                pass
            out = model(input_ids=ids, attention_mask=am, labels=labels)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
        assert torch.equal(model(input_ids=ids, attention_mask=am).logits, with_slim)
    # training mode: base loss exactly, no aux, clusters untouched
    model.train()
    with sk.disable_slim(model):
        out = model(input_ids=ids, attention_mask=am, labels=labels)
    assert torch.equal(out.loss, base.train()(input_ids=ids, attention_mask=am, labels=labels).loss)
    for c, (_, m) in zip(cen, sk.slim_modules(model)):
        assert torch.equal(c, m.clusters.cluster_centers)


def test_routing_stats_whole_model():
    model = slim(tiny_model("qwen2"), num_clusters=2)
    ids, am, _ = batch()
    model.train()
    with sk.track_routing(model):
        model(input_ids=ids, attention_mask=am)
        sk.step_clusters(model)
        model(input_ids=ids, attention_mask=am)
    st = sk.routing_stats(model, reset=True)
    assert set(st) == {n + LAYER for n in model.slim_summary.layers}
    for v in st.values():
        assert v["tokens"] == 2 * int(am.sum())
        assert 0.0 <= v["identity_mass"] <= 1.0 and 0.0 <= v["identity_top1_share"] <= 1.0
        assert math.isfinite(v["mean_distance"]) and v["distance_tokens"] == int(am.sum())
    assert all(v["tokens"] == 0 for v in sk.routing_stats(model).values())


def test_deepcopy_keeps_working_hooks():
    model = slim(tiny_model("llama"), l1_coef=0.1)
    twin = copy.deepcopy(model)
    layers = [m for _, m in sk.slim_modules(twin)]
    assert twin._slim_state is not model._slim_state
    assert all(a is b for a, b in zip(twin._slim_state.layers, layers))
    ids, am, labels = batch()
    a = model.train()(input_ids=ids, attention_mask=am, labels=labels).loss
    b = twin.train()(input_ids=ids, attention_mask=am, labels=labels).loss
    assert torch.equal(a, b)


def test_backward_inside_disable_slim_says_the_adapters_are_disabled():
    model = slim(tiny_model("llama"))
    randomise_B(model)
    ids, am, labels = batch()
    model.train()
    real_backward = torch.autograd.backward
    with sk.disable_slim(model):
        with sk.disable_slim(model):
            out = model(input_ids=ids, attention_mask=am, labels=labels)
        with pytest.raises(RuntimeError, match=r"does not have a grad_fn: the SLIM adapters are "
                                               r"disabled here \(inside slim_kernels\.disable_slim\)") as e:
            out.loss.backward()
        assert "does not require grad" in str(e.value.__cause__)
        # other errors pass through unchanged
        x = torch.ones(2, requires_grad=True)
        y = (x * x).sum()
        y.backward()
        with pytest.raises(RuntimeError, match="second time") as e:
            y.backward()
        assert "disable_slim" not in str(e.value)
    assert torch.autograd.backward is real_backward  # restored
    # where another parameter is trainable, training inside disable_slim works as before
    model.lm_head.weight.requires_grad_(True)
    with sk.disable_slim(model):
        model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
    assert model.lm_head.weight.grad is not None
    assert all(m.router.grad is None for _, m in sk.slim_modules(model))
    # outside the context, such a loss gets autograd's own error
    model.lm_head.weight.requires_grad_(False)
    with sk.disable_slim(model):
        out = model(input_ids=ids, attention_mask=am, labels=labels)
    with pytest.raises(RuntimeError, match="does not require grad") as e:
        out.loss.backward()
    assert "disable_slim" not in str(e.value)


def test_copy_made_inside_disable_slim_is_not_disabled():
    import pickle

    from slim_kernels.integrations.hf import slim_aux_suppressed

    model = slim(tiny_model("llama"), l1_coef=0.1, num_clusters=0)  # (forwards change nothing)
    randomise_B(model)
    ids, am, labels = batch()
    model.eval()
    with torch.no_grad():
        with_slim = model(input_ids=ids, attention_mask=am).logits
        with sk.disable_slim(model):
            base = model(input_ids=ids, attention_mask=am).logits
            for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
                assert torch.equal(twin(input_ids=ids, attention_mask=am).logits, with_slim)
                twin.train()  # and its hooks add the aux loss again
                with slim_aux_suppressed():
                    plain = twin(input_ids=ids, attention_mask=am, labels=labels).loss
                full = twin(input_ids=ids, attention_mask=am, labels=labels).loss
                torch.testing.assert_close(full, plain + sk.aux_loss(twin))
                assert sk.aux_loss(twin) > 0
            assert torch.equal(model(input_ids=ids, attention_mask=am).logits, base)
