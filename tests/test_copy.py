"""copy.deepcopy and pickle of a SlimLinear and of a model with SLIM applied, at any point of a
training step (EMA and best-model snapshots): after forward, after backward, with the
load-balance term on, under gradient checkpointing, in eval. A copy holds the same parameters
and buffers and trains on its own; it has no aux loss pending until its own next forward
(docs/method.md §4)."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import slim_kernels as sk

CFG = dict(num_lora_experts=3, num_identity_experts=2, rank=4, backend="torch")


def _copies(obj, pickled=True):
    return [copy.deepcopy(obj)] + ([pickle.loads(pickle.dumps(obj))] if pickled else [])


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
        assert sa[k].data_ptr() != sb[k].data_ptr(), k  # a copy, not shared


def _layer(balance_coef):
    torch.manual_seed(0)
    layer = sk.SlimLinear(16, 8, config=sk.SlimConfig(**CFG, balance_coef=balance_coef,
                                                      l1_coef=0.01)).train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    layer(torch.randn(32, 16))
    sk.step_clusters(layer)  # clusters initialised
    return layer


def _check_layer_copies(layer, x):
    for twin in _copies(layer):
        _assert_same_state(layer, twin)
        assert twin.slim_aux_loss() is None  # nothing pending in the copy
        # nor cluster statistics: a copy made on one rank joins no collective at a step
        assert not twin.clusters.host.has_pending and not twin.clusters.pending.any()
        twin.train()
        loss = twin(x).square().mean() + sk.aux_loss(twin)
        loss.backward()
        assert twin.lora_A.grad is not None and twin.clusters.ready
        twin.eval()
        layer_mode = layer.training
        with torch.no_grad():
            assert torch.isfinite(twin(x)).all()
        layer.train(layer_mode)


@pytest.mark.parametrize("balance_coef", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["plain", "reentrant", "non_reentrant", "no_grad", "eval"])
def test_layer_copies_at_every_point_of_a_step(balance_coef, mode):
    layer = _layer(balance_coef)
    x = torch.randn(24, 16, requires_grad=True)
    _check_layer_copies(layer, x)  # before the step
    if mode == "eval":
        layer.eval()
    ctx = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with ctx:
        if mode in ("reentrant", "non_reentrant"):
            y = checkpoint(layer, x, use_reentrant=mode == "reentrant")
        else:
            y = layer(x)
    _check_layer_copies(layer, x)  # after forward
    if y.requires_grad:
        (y.square().mean() + sk.aux_loss(layer)).backward()  # the original still trains
        assert layer.router.grad is not None
        _check_layer_copies(layer, x)  # after backward
        layer.zero_grad()
    _check_layer_copies(layer, x)


pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_model_copies_at_every_point_of_a_step(checkpointing):
    from hf_models import batch, tiny_model

    model = sk.apply_slim(tiny_model("llama"), sk.SlimConfig(
        num_lora_experts=2, num_identity_experts=2, rank=4, backend="torch", balance_coef=0.1,
        l1_coef=0.01), verbose=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, am, labels = batch()

    def check(model):
        # transformers' gradient_checkpointing_enable installs a hook that is a local function,
        # which pickle cannot store (a plain model without SLIM fails the same way)
        for twin in _copies(model, pickled=not checkpointing):
            _assert_same_state(model, twin)
            twin.train()
            out = twin(input_ids=ids, attention_mask=am, labels=labels)
            out.loss.backward()  # trains on its own, aux loss included, hooks working
            assert all(m.router.grad is not None for _, m in sk.slim_modules(twin))
            assert twin._slim_state.layers[0] is next(iter(sk.slim_modules(twin)))[1]

    model.train()
    check(model)
    out = model(input_ids=ids, attention_mask=am, labels=labels)
    check(model)  # after forward
    out.loss.backward()
    check(model)  # after backward
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    check(model)  # in eval
