"""SlimLinear against docs/method.md: eval/train behaviour, clusters, masks, aux losses (also under
gradient checkpointing), errors, dtypes."""
import contextlib
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import slim_kernels as sk
from slim_kernels.reference import slim_reference
from slim_kernels.routing import merge_masks

# num_clusters, cluster_momentum and yield_strength pinned: these tests were sized for them
CFG = dict(num_lora_experts=3, num_identity_experts=2, rank=5, backend="torch", num_clusters=4,
           cluster_momentum=0.01, yield_strength=1.0)


def make_layer(K=45, N=29, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, dtype=dtype)
    layer = sk.SlimLinear.from_linear(lin, sk.SlimConfig(**{**CFG, **kw}))
    with torch.no_grad():  # non-zero B so the LoRA path shows
        layer.lora_B.normal_(0, 0.3)
        layer.router.normal_(0, 0.5)
    return lin, layer


def step(layer, x):
    """One training step's worth of the clusters: the forward, then the update an optimizer
    step would make (:func:`slim_kernels.step_clusters`)."""
    y = layer(x)
    sk.step_clusters(layer)
    return y


def test_from_linear_keeps_tensors_and_freezes():
    lin = nn.Linear(13, 7)
    layer = sk.SlimLinear.from_linear(lin, sk.SlimConfig(**CFG))
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (3, 5, 13) and layer.lora_B.shape == (3, 7, 5)
    assert layer.router.shape == (5, 13)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(13)  # kaiming_uniform(a=sqrt(5)) as PEFT's LoRA A
    assert layer.lora_A.abs().max() <= bound
    assert layer.clusters.cluster_centers.shape == (4, 13) and layer.clusters.cluster_vars.shape == (4, 13)
    assert layer.clusters.cluster_initialized.item() is False
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B", "router"}
    with pytest.raises(TypeError, match="nn.Linear"):
        sk.SlimLinear.from_linear(nn.Conv1d(3, 3, 1), sk.SlimConfig())


def test_zero_B_equals_base():
    lin = nn.Linear(13, 7)
    layer = sk.SlimLinear.from_linear(lin, sk.SlimConfig(**CFG)).train()
    x = torch.randn(3, 4, 13)
    assert torch.equal(layer(x), lin(x))


@pytest.mark.parametrize("reduce", ["max", "mean", "rms"])
@pytest.mark.parametrize("shape", [(45, 29, 5), (17, 40, 3), (64, 7, 12)])
def test_eval_matches_reference(reduce, shape):
    K, N, r = shape
    lin, layer = make_layer(K=K, N=N, rank=r, distance_reduce=reduce)
    x = torch.randn(2, 11, K, dtype=torch.float64)
    layer.train()
    step(layer, x)  # initialise the clusters
    step(layer, torch.randn(5, K, dtype=torch.float64))  # and move them once
    assert layer.clusters.cluster_initialized.item()
    layer.eval()
    y = layer(x)
    y0, *_ = slim_reference(x.reshape(-1, K), layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                            layer.router, top_k=2, scaling=layer.scaling, yield_strength=1.0,
                            distance_reduce=reduce, centers=layer.clusters.cluster_centers,
                            cluster_vars=layer.clusters.cluster_vars, cluster_eps=1e-5)
    torch.testing.assert_close(y, y0.reshape(2, 11, N), rtol=1e-12, atol=1e-12)


def test_train_matches_reference_with_masks_and_dropout():
    lin, layer = make_layer(merge_drop=0.4, merge_rescale=True, lora_dropout=0.2, distance_reduce="mean")
    layer.train()
    K = 45
    x = torch.randn(20, K, dtype=torch.float64)
    step(layer, x)  # init clusters
    cen, var = layer.clusters.cluster_centers.clone(), layer.clusters.cluster_vars.clone()
    x2 = torch.randn(20, K, dtype=torch.float64)
    torch.manual_seed(123)
    y = layer(x2)
    torch.manual_seed(123)  # replay the RNG: masks first, then dropout
    rows, cols = merge_masks(3, 29, K, 0.4)
    x_lora = nn.functional.dropout(x2, 0.2, training=True)
    A = layer.lora_A * cols.double()[:, None, :]
    B = layer.lora_B * rows.double()[:, :, None] / 0.6
    y0, *_ = slim_reference(x2, layer.weight, layer.bias, A, B, layer.router, top_k=2,
                            scaling=layer.scaling, yield_strength=1.0, distance_reduce="mean",
                            centers=cen, cluster_vars=var, x_lora=x_lora)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    assert torch.equal(cen, layer.clusters.cluster_centers)  # they move at the step
    sk.step_clusters(layer)
    assert not torch.equal(cen, layer.clusters.cluster_centers)


def test_merge_mask_statistics_and_product():
    p = 0.36  # rows and columns each dropped at 1 - sqrt(0.64) = 0.2
    g = torch.Generator().manual_seed(0)
    kept = []
    for _ in range(200):
        rows, cols = merge_masks(4, 30, 40, p, generator=g)
        kept.append((rows[:, :, None] * cols[:, None, :]).mean().item())
    assert abs(1 - np.mean(kept) - p) < 0.01
    rows, cols = merge_masks(1, 30, 40, p, generator=g)
    assert abs(1 - rows.mean().item() - 0.2) < 0.2 and set(rows.unique().tolist()) <= {0.0, 1.0}
    A = torch.randn(5, 40, dtype=torch.float64)
    B = torch.randn(30, 5, dtype=torch.float64)
    Bm, Am = B * rows[0, :, None].double(), A * cols[0, None, :].double()
    full = B @ A
    full[rows[0] == 0, :] = 0
    full[:, cols[0] == 0] = 0
    assert torch.equal(Bm @ Am, full)


def test_masks_resampled_each_training_forward_and_eval_modes():
    lin, layer = make_layer(merge_drop=0.5)
    x = torch.randn(8, 45, dtype=torch.float64)
    layer.train()
    A1, _ = layer.factors()
    A2, _ = layer.factors()
    assert not torch.equal(A1, A2)
    layer.eval()
    A3, _ = layer.factors()
    assert torch.equal(A3, layer.lora_A)  # default: no mask in eval
    layer.config = layer.config.replace(merge_at_eval=True)
    A4, _ = layer.factors()
    A5, _ = layer.factors()
    assert torch.equal(A4, A5) and not torch.equal(A4, layer.lora_A)  # fixed seeded mask
    assert layer(x).shape == (8, 29)


def test_cluster_init_and_ema_match_numpy():
    K, C, mom = 6, 3, 0.25
    lin, layer = make_layer(K=K, N=5, num_clusters=C, cluster_momentum=mom, dtype=torch.float32)
    layer.train()
    x1 = torch.randn(50, K)
    step(layer, x1)
    cen0 = layer.clusters.cluster_centers.numpy().copy()
    # init: C distinct tokens of the batch as centres; batch variance for every cluster
    matches = [np.where(np.all(x1.numpy() == c, axis=1))[0] for c in cen0]
    assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches}) == C
    np.testing.assert_allclose(layer.clusters.cluster_vars.numpy(), np.tile(x1.double().numpy().var(0), (C, 1)), rtol=1e-5)
    var0 = layer.clusters.cluster_vars.numpy().astype(np.float64)
    x2 = torch.randn(64, K) * 1.5 + 0.3
    step(layer, x2)
    xn = x2.double().numpy()
    assign = ((xn[:, None] - cen0[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    exp_c, exp_v = cen0.astype(np.float64).copy(), var0.copy()
    for j in range(C):
        sel = xn[assign == j]
        if len(sel):
            exp_c[j] = (1 - mom) * exp_c[j] + mom * sel.mean(0)
            exp_v[j] = (1 - mom) * exp_v[j] + mom * sel.var(0)
    np.testing.assert_allclose(layer.clusters.cluster_centers.numpy(), exp_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.clusters.cluster_vars.numpy(), exp_v, rtol=1e-5, atol=1e-6)
    # frozen in eval
    layer.eval()
    before = layer.clusters.cluster_centers.clone()
    step(layer, x2 * 3)
    assert torch.equal(before, layer.clusters.cluster_centers)


def test_padding_tokens_do_not_move_clusters():
    lin, layer = make_layer(K=6, N=5, num_clusters=2, cluster_momentum=0.5, dtype=torch.float32)
    layer.train()
    step(layer, torch.randn(10, 6))
    before = layer.clusters.cluster_centers.clone()
    x = torch.randn(2, 5, 6) * 100
    with sk.token_mask(torch.zeros(2, 5, dtype=torch.bool)):
        step(layer, x)
    assert torch.equal(before, layer.clusters.cluster_centers)
    with sk.token_mask(torch.ones(2, 5, dtype=torch.bool)):
        step(layer, x)
    assert not torch.equal(before, layer.clusters.cluster_centers)


def test_clusters_move_once_per_step_whatever_the_micro_batches():
    """Gradient accumulation: the forwards of a step all route with the clusters of the step
    before, and the step moves them by the statistics of all their tokens, as one forward of
    the same tokens does (docs/method.md §2)."""
    x = torch.randn(3, 40, 6) * 1.3 + 0.2
    states = []
    for parts in (1, 3):
        _, layer = make_layer(K=6, N=5, num_clusters=3, cluster_momentum=0.4,
                              dtype=torch.float64)
        layer.train()
        step(layer, torch.randn(30, 6, dtype=torch.float64))  # initialise
        before = _cluster_state(layer)
        outs = [layer(chunk) for chunk in x.reshape(-1, 6).double().chunk(parts)]
        assert all(torch.equal(a, b) for a, b in zip(before[:2], _cluster_state(layer)[:2]))
        sk.step_clusters(layer)
        states.append((_cluster_state(layer), torch.cat(outs)))
        sk.step_clusters(layer)  # nothing pending: no change
        assert all(torch.equal(a, b)
                   for a, b in zip(states[-1][0][:2], _cluster_state(layer)[:2]))
    (one, y1), (three, y3) = states
    torch.testing.assert_close(one[0], three[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(one[1], three[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y1, y3, rtol=1e-12, atol=1e-12)  # routed alike within the step


def test_an_optimizer_step_moves_the_clusters_and_none_warns():
    """Any torch.optim optimizer's step moves the clusters of every layer with statistics
    pending; training forwards without any step say so, once."""
    _, layer = make_layer(K=6, N=5, num_clusters=2, dtype=torch.float32)
    layer.train()
    opt = torch.optim.SGD([layer.router], lr=0.0)
    layer(torch.randn(10, 6))
    assert not layer.clusters.ready
    opt.step()
    assert layer.clusters.ready
    before = layer.clusters.cluster_centers.clone()
    layer(torch.randn(10, 6) + 3)
    import slim_kernels.clusters as cl
    assert cl._PENDING == [layer.clusters]  # held (alive) until the step
    opt.step()
    assert not torch.equal(before, layer.clusters.cluster_centers) and not cl._PENDING
    with pytest.warns(RuntimeWarning, match="without an optimizer step"):
        for _ in range(cl._WARN_AFTER):
            layer(torch.randn(4, 6))


# --- non-finite tokens never reach the clusters (docs/method.md §2) ---------------------------
def _cluster_state(layer):
    return (layer.clusters.cluster_centers.clone(), layer.clusters.cluster_vars.clone(),
            bool(layer.clusters.cluster_initialized))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("no_grad", [False, True])
def test_non_finite_token_never_enters_the_clusters(bad, no_grad):
    """One bad token in a training forward (also under no_grad, a step a GradScaler would skip)
    moves the clusters exactly as the batch without it would; later batches stay finite."""
    torch.manual_seed(0)
    x0, x1, x2 = torch.randn(40, 6), torch.randn(30, 6) * 2 + 1, torch.randn(20, 6)
    x1_bad = x1.clone()
    x1_bad[7, 3] = bad
    layers = []
    for x in (x1_bad, torch.cat([x1[:7], x1[8:]])):
        lin, layer = make_layer(K=6, N=5, num_clusters=3, cluster_momentum=0.3,
                                dtype=torch.float32)
        layer.train()
        step(layer, x0)  # initialise
        before = layer.clusters.cluster_centers.clone()
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            step(layer, x)
        assert not torch.equal(before, layer.clusters.cluster_centers)  # the finite tokens moved them
        layers.append(layer)
    bad_layer, ref = layers
    assert torch.isfinite(bad_layer.clusters.cluster_centers).all() and torch.isfinite(bad_layer.clusters.cluster_vars).all()
    assert torch.equal(bad_layer.clusters.cluster_centers, ref.clusters.cluster_centers)
    assert torch.equal(bad_layer.clusters.cluster_vars, ref.clusters.cluster_vars)
    y, y_ref = bad_layer(x2), ref(x2)  # the next clean batch
    assert torch.isfinite(y).all() and torch.equal(y, y_ref)


def test_non_finite_first_batch_initialises_from_its_finite_tokens():
    x = torch.randn(30, 6)
    x_bad = x.clone()
    x_bad[[2, 11], 0] = float("nan")
    x_bad[5, 4] = float("inf")
    keep = torch.ones(30, dtype=torch.bool)
    keep[[2, 5, 11]] = False
    states = []
    for batch in (x_bad, x[keep]):
        _, layer = make_layer(K=6, N=5, num_clusters=4, dtype=torch.float32)
        layer.train()
        step(layer, batch)
        states.append(_cluster_state(layer))
    (c, v, ready), (c_ref, v_ref, _) = states
    assert ready and torch.isfinite(c).all() and torch.isfinite(v).all()
    assert torch.equal(c, c_ref) and torch.equal(v, v_ref)
    # a batch with fewer than C finite tokens leaves the clusters uninitialised
    _, layer = make_layer(K=6, N=5, num_clusters=4, dtype=torch.float32)
    layer.train()
    x_bad = x.clone()
    x_bad[3:] = float("nan")
    step(layer, x_bad)
    assert not layer.clusters.cluster_initialized.item() and not layer.clusters.ready
    step(layer, x)
    assert layer.clusters.cluster_initialized.item() and torch.isfinite(layer.clusters.cluster_centers).all()


def test_overflowing_batch_leaves_the_clusters_unchanged_and_warns_once():
    """Finite tokens whose variance overflows fp32: the update is dropped whole."""
    _, layer = make_layer(K=6, N=5, num_clusters=2, cluster_momentum=0.5, dtype=torch.float32)
    layer.train()
    huge = torch.randn(20, 6) * 1e30
    with pytest.warns(RuntimeWarning, match="cluster statistics non-finite") as rec:
        step(layer, huge)  # the init would overflow: stays uninitialised
        assert not layer.clusters.cluster_initialized.item()
        step(layer, torch.randn(20, 6))
        assert layer.clusters.cluster_initialized.item()
        before = _cluster_state(layer)
        step(layer, huge)
        with torch.no_grad():
            step(layer, huge)
    assert len([w for w in rec if "cluster statistics" in str(w.message)]) == 1
    after = _cluster_state(layer)
    assert all(torch.equal(a, b) for a, b in zip(before[:2], after[:2]))
    assert int(layer.clusters.rejected_batches) == 2  # the two EMA steps left out
    step(layer, torch.randn(20, 6))  # a normal batch moves them again
    assert not torch.equal(before[0], layer.clusters.cluster_centers)
    assert torch.isfinite(layer.clusters.cluster_vars).all()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_updates_once_and_grads_match(use_reentrant):
    lin, layer = make_layer(merge_drop=0.3, lora_dropout=0.1)
    layer.train()
    x = torch.randn(16, 45, dtype=torch.float64)
    step(layer, x)  # init
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x2 = torch.randn(16, 45, dtype=torch.float64, requires_grad=True)

    torch.manual_seed(7)
    y = layer(x2)
    (y.square().sum()).backward()
    sk.step_clusters(layer)
    ref_grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router)] + [x2.grad.clone()]
    after_plain = layer.clusters.cluster_centers.clone()

    layer.load_state_dict(state)
    for p in (layer.lora_A, layer.lora_B, layer.router):
        p.grad = None
    x2.grad = None
    torch.manual_seed(7)
    y = checkpoint(layer, x2, use_reentrant=use_reentrant)
    (y.square().sum()).backward()
    sk.step_clusters(layer)
    grads = [p.grad for p in (layer.lora_A, layer.lora_B, layer.router)] + [x2.grad]
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # moved exactly once (as in the plain run), not twice
    assert torch.equal(layer.clusters.cluster_centers, after_plain)


def test_aux_losses():
    lin, layer = make_layer(l1_coef=0.5, balance_coef=0.1)
    layer.train()
    x = torch.randn(30, 45, dtype=torch.float64)
    layer(x)
    c = layer.config
    l1 = 0.5 * (layer.lora_B.abs().sum() / (5 * 29) + layer.lora_A.abs().sum() / (5 * 45))
    with torch.no_grad():
        _, g, idx, _, _ = sk.slim_linear_op(
            x, layer.weight, layer.bias, layer.lora_A.reshape(15, 45),
            layer.lora_B.permute(1, 0, 2).reshape(29, 15), layer.router, num_lora_experts=3,
            top_k=2, scaling=c.scaling, yield_strength=1.0, centers=None, backend="torch")
    f = torch.zeros(30, 5, dtype=torch.float64).scatter_(1, idx, 1.0).mean(0)
    bal = 0.1 * 5 * (f * g.mean(0)).sum()
    total = sk.aux_loss(layer)
    torch.testing.assert_close(total, l1 + bal)
    total.backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0
    model = nn.Sequential(nn.Linear(3, 3))
    z = sk.aux_loss(model)
    assert z.item() == 0.0 and z.dim() == 0


# --- aux losses under gradient checkpointing ------------------------------------------
# SlimLinear builds its L1 and load-balance terms on every forward, recomputation included:
# non-reentrant checkpointing needs the same saved tensors in the forward and the
# recomputation, and under reentrant checkpointing (first forward in no_grad) the L1 term
# still needs its gradient.
def _run_aux_checkpointed(reentrant, **kw):
    torch.manual_seed(0)
    lin = nn.Linear(12, 9, dtype=torch.float64)
    layer = sk.SlimLinear.from_linear(lin, sk.SlimConfig(num_lora_experts=3, rank=2, backend="torch", **kw))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    layer.train()
    x = torch.randn(4, 5, 12, dtype=torch.float64, requires_grad=True)
    out = []
    for step in range(2):  # cluster init, then one EMA update
        layer.zero_grad()
        y = layer(x) if reentrant is None else checkpoint(layer, x, use_reentrant=reentrant)
        loss = y.pow(2).mean() + sk.aux_loss(layer)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router)],
                    layer.clusters.cluster_centers.clone(), layer.clusters.cluster_vars.clone()))
    return out


@pytest.mark.parametrize("reentrant", [False, True])
def test_l1_and_balance_under_checkpointing(reentrant):
    kw = dict(l1_coef=0.1, balance_coef=0.0 if reentrant else 0.05)
    ref = _run_aux_checkpointed(None, **kw)
    got = _run_aux_checkpointed(reentrant, **kw)
    for (l0, g0, c0, v0), (l1, g1, c1, v1) in zip(ref, got):
        assert torch.equal(l0, l1)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.equal(c0, c1) and torch.equal(v0, v1)  # clusters moved exactly once


def test_l1_has_gradient_when_forward_ran_in_no_grad():
    layer = sk.SlimLinear.from_linear(nn.Linear(6, 4), sk.SlimConfig(num_lora_experts=2, rank=2,
                                                                     l1_coef=0.1, backend="torch"))
    assert layer.slim_aux_loss() is None
    with torch.no_grad():
        layer(torch.randn(3, 6))
    aux = layer.slim_aux_loss()
    assert aux.requires_grad
    aux.backward()
    assert layer.lora_A.grad.abs().sum() > 0
    layer.reset_aux_loss()
    assert layer.slim_aux_loss() is None and not layer.has_aux_loss()


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_token_counts(T):
    lin, layer = make_layer()
    layer.train()
    x = torch.randn(T, 45, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (T, 29)
    y.sum().backward()
    assert not layer.clusters.cluster_initialized.item()  # needs >= C tokens
    x3 = torch.randn(2, 0, 45, dtype=torch.float64)
    assert layer(x3).shape == (2, 0, 29)
    layer.eval()
    y1 = layer(torch.randn(1, 45, dtype=torch.float64))
    assert y1.shape == (1, 29)


def test_gradcheck_layer_fp64():
    lin, layer = make_layer(K=7, N=5, rank=3, num_clusters=0)
    layer.eval()
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    params = (layer.lora_A, layer.lora_B, layer.router)

    def f(x, A, B, R):
        return torch.func.functional_call(layer, {"lora_A": A, "lora_B": B, "router": R}, (x,))

    assert torch.autograd.gradcheck(f, (x,) + params)


def test_bad_inputs_raise_clear_errors():
    lin, layer = make_layer(dtype=torch.float32)
    with pytest.raises(ValueError, match="in_features=45"):
        layer(torch.randn(3, 44))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(3, 45, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype torch.float64 but the layer's weight is torch.float32"):
        layer(torch.randn(3, 45, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([1.0] * 45)
    with pytest.raises(TypeError, match="SlimConfig"):
        sk.SlimLinear.from_linear(nn.Linear(3, 3), {"rank": 2})
    layer.config = layer.config.replace(
        backend="cpp" if "cpp" not in sk.available_backends() else "triton")
    if layer.config.backend not in sk.available_backends():
        with pytest.raises(RuntimeError, match="cannot run"):
            layer(torch.randn(3, 45))


def test_sizes_and_shape_fields_errors_name_the_argument():
    for args, name in (((0, 4), "in_features=0"), ((4, 0), "out_features=0"),
                       ((4.0, 3), "in_features=4.0"), ((True, 3), "in_features=True")):
        with pytest.raises(ValueError, match=rf"SlimLinear {name} is invalid: expected an int >= 1"):
            sk.SlimLinear(*args)
    with pytest.raises(ValueError, match="in_features=0"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "Initializing zero-element tensors is a no-op"
        sk.SlimLinear.from_linear(nn.Linear(0, 4))
    layer = sk.SlimLinear(np.int64(6), np.int32(4), config=sk.SlimConfig(**CFG))
    assert (layer.in_features, layer.out_features) == (6, 4) and type(layer.in_features) is int
    # a config is immutable, checked whole when built; a changed copy is assigned to the
    # layer, which refuses one whose shape fields differ from those it was built with ...
    x = torch.randn(3, 6)
    layer = sk.SlimLinear(6, 4, config=sk.SlimConfig(**CFG))
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"config\.replace\(alpha=\.\.\.\)"):
        layer.config.alpha = -1.0
    for field, value in (("rank", 2), ("num_lora_experts", 4), ("num_identity_experts", 0),
                         ("num_clusters", 7), ("distance_scale", "spread")):
        with pytest.raises(ValueError, match=rf"the new config has {field}={value!r} but the "
                                             rf"layer was built with"):
            layer.config = layer.config.replace(**{field: value})
    for bad in (dict(alpha=-1.0), dict(cluster_momentum=float("nan")), dict(cluster_eps=-1.0),
                dict(merge_drop=1.0), dict(balance_coef=float("nan"))):
        with pytest.raises(ValueError, match=f"SlimConfig.{next(iter(bad))}="):
            layer.config.replace(**bad)
    with pytest.raises(TypeError, match="config must be a SlimConfig"):
        layer.config = {"alpha": 2.0}
    # ... the others take effect at the next forward
    layer.eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    y, base = layer(x), nn.functional.linear(x, layer.weight, layer.bias)
    layer.config = layer.config.replace(alpha=layer.config.alpha * 2)
    torch.testing.assert_close(layer(x), 2 * y - base)


def test_routing_stats_and_no_lora_mixture():
    lin, layer = make_layer(num_identity_experts=0, top_k=2)
    layer.train()
    step(layer, torch.randn(10, 45, dtype=torch.float64))  # not recorded: outside track_routing
    assert sk.routing_stats(layer)[""]["tokens"] == 0
    with sk.track_routing(layer):
        layer(torch.randn(10, 45, dtype=torch.float64))
    st = sk.routing_stats(layer, reset=True)[""]
    assert st["tokens"] == 10 and st["identity_mass"] == 0.0
    assert st["distance_tokens"] == 10 and st["mean_distance"] is not None
    assert sk.routing_stats(layer)[""]["tokens"] == 0
    assert not layer.tracker.tracking


def test_routing_stats_skip_bad_tokens_and_say_when_no_distance():
    """A NaN token never reaches the statistics (as it never reaches the clusters), padding
    tokens neither; before the clusters exist there is no distance to average (None)."""
    lin, layer = make_layer(num_clusters=4)
    layer.train()
    x = torch.randn(3, 45, dtype=torch.float64)
    with sk.track_routing(layer):
        layer(x)  # 3 tokens < 4 clusters: no clusters yet
        st = sk.routing_stats(layer, reset=True)[""]
        assert st["tokens"] == 3 and st["mean_distance"] is None and st["distance_tokens"] == 0
        step(layer, torch.randn(16, 45, dtype=torch.float64))  # initialises the clusters
        sk.routing_stats(layer, reset=True)
        bad = torch.randn(6, 45, dtype=torch.float64)
        bad[2, 5] = float("nan")
        with sk.token_mask(torch.tensor([True, True, True, True, True, False])):
            layer(bad)
        for _ in range(5):
            layer(torch.randn(6, 45, dtype=torch.float64))
    st = sk.routing_stats(layer)[""]
    assert st["tokens"] == 4 + 5 * 6 and st["distance_tokens"] == 34
    assert all(math.isfinite(st[k]) for k in ("identity_mass", "identity_top1_share",
                                                "mean_distance"))


def test_autocast_runs_in_the_autocast_dtype():
    lin, layer = make_layer(dtype=torch.float32)
    layer.eval()
    x = torch.randn(4, 45)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y32 = layer(x)
    assert (y.float() - y32).abs().max() < 0.1 * y32.abs().max()


# --- dtypes: casting the model ------------------------------------------------------------
def test_cast_keeps_cluster_buffers_fp32():
    """``model.to(torch.bfloat16)`` / ``.half()`` casts the weights and LoRA factors but keeps
    the cluster buffers fp32 and unrounded (the op takes fp32 centers and inv_std), and the
    cast model runs forward and backward."""
    torch.manual_seed(0)
    layer = sk.SlimLinear.from_linear(nn.Linear(8, 6), sk.SlimConfig(num_lora_experts=2, rank=2,
                                                                     backend="torch")).train()
    layer(torch.randn(10, 8))  # initialise the clusters
    layer.eval()  # (a training forward would move the clusters)
    cen = layer.clusters.cluster_centers.clone()
    for dt in (torch.bfloat16, torch.float16):
        m = layer.to(dt)
        assert m is layer
        assert layer.weight.dtype == dt and layer.lora_A.dtype == dt
        assert layer.clusters.cluster_centers.dtype == torch.float32 and layer.clusters.cluster_vars.dtype == torch.float32
        assert torch.equal(layer.clusters.cluster_centers, cen)
        y = layer(torch.randn(4, 8, dtype=dt))
        y.float().sum().backward()
    layer.float()
    assert layer.lora_B.dtype == torch.float32 and torch.equal(layer.clusters.cluster_centers, cen)


# --- distance_scale (docs/method.md §2) ---------------------------------------------------------
class _OpSpy:
    """Wraps the op the layer calls (slim_kernels.layer.slim_linear_op_unchecked): records each
    call's arguments by name and its first five outputs (y, gates, idx, distance, assign)."""

    def __init__(self, monkeypatch):
        import inspect

        import slim_kernels.layer as L

        self.calls = []
        real = L.slim_linear_op_unchecked
        names = list(inspect.signature(real).parameters)

        def spy(*args, **kw):
            out = real(*args, **kw)
            given = {**dict(zip(names, args)), **kw}  # (copies: buffers move at the step)
            given = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v
                     for k, v in given.items()}
            self.calls.append((given, [t.detach().clone() for t in out[:5]]))
            return out

        monkeypatch.setattr(L, "slim_linear_op_unchecked", spy)


def _r(x, layer, centers=None, vars_=None):
    """r = reduce_k |x_k - c_{j*,k}| / sqrt(v_{j*,k} + eps) in fp64 by the reference, against the
    layer's clusters (or the given ones); inv_std formed in fp32 as the layer forms it."""
    from slim_kernels.reference import cluster_distance as ref_distance

    cen = layer.clusters.cluster_centers if centers is None else centers
    var = layer.clusters.cluster_vars if vars_ is None else vars_
    d, assign = ref_distance(x.double(), cen, (var + layer.config.cluster_eps).rsqrt(),
                             layer.config.distance_reduce)
    return d + 1.0, assign


def test_distance_scale_none_calls_the_op_as_before(monkeypatch):
    """distance_scale="none" (the default): no distance buffer; the op gets the shift 1 for
    every cluster (d = r - 1, the paper's) and inv_std = 1/sqrt(v + eps)."""
    lin, layer = make_layer(K=8, N=5, dtype=torch.float32)
    assert not any("distance" in k for k in layer.state_dict())
    spy = _OpSpy(monkeypatch)
    layer.train()
    x = torch.randn(30, 8)
    step(layer, x)
    var = layer.clusters.cluster_vars.clone()  # what the next forward routes with
    step(layer, x)
    kw, out = spy.calls[-1]
    assert torch.equal(kw["distance_shift"], torch.ones(4))
    assert torch.equal(kw["inv_std"], (var + 1e-5).rsqrt())
    layer.eval()
    layer(x)
    kw, (_, _, _, d, _) = spy.calls[-1]
    assert torch.equal(kw["distance_shift"], torch.ones(4))
    assert torch.equal(kw["inv_std"], (layer.clusters.cluster_vars + 1e-5).rsqrt())
    r, _ = _r(x, layer)
    torch.testing.assert_close(d.double(), r - 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduce", ["max", "mean", "rms"])
def test_spread_init_and_ema_match_a_hand_computation(reduce):
    """fp64 layer: mu and var of r at the cluster init (the initialising batch against the fresh
    clusters), then one EMA step with cluster_momentum from the next batch's r (against the
    clusters it routed with), leaving out a padding token and a non-finite one."""
    K, C, mom = 7, 3, 0.25
    lin, layer = make_layer(K=K, N=5, num_clusters=C, cluster_momentum=mom,
                            distance_scale="spread", distance_reduce=reduce)
    assert layer.clusters.distance_mean.dtype == layer.clusters.distance_var.dtype == torch.float32
    assert layer.clusters.distance_mean.shape == layer.clusters.distance_var.shape == ()
    assert (layer.clusters.distance_mean.item(), layer.clusters.distance_var.item()) == (1.0, 1.0)  # defaults
    layer.train()
    x1 = torch.randn(40, K, dtype=torch.float64)
    step(layer, x1)
    assert layer.clusters.cluster_initialized.item()
    r1, _ = _r(x1, layer)
    mu0, var0 = r1.mean(), r1.var(unbiased=False)
    torch.testing.assert_close(layer.clusters.distance_mean.double(), mu0, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.clusters.distance_var.double(), var0, rtol=1e-6, atol=0)
    mu0, var0 = layer.clusters.distance_mean.double(), layer.clusters.distance_var.double()  # as stored (fp32)

    cen, var = layer.clusters.cluster_centers.clone(), layer.clusters.cluster_vars.clone()
    x2 = torch.randn(3, 10, K, dtype=torch.float64) * 1.7 + 0.4
    x2[0, 4, 2] = float("nan")
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 7:] = False
    with sk.token_mask(mask):
        step(layer, x2)
    keep = mask.reshape(-1) & torch.isfinite(x2.reshape(-1, K)).all(1)
    r2, _ = _r(x2.reshape(-1, K)[keep], layer, cen, var)
    want_mu = (1 - mom) * mu0 + mom * r2.mean()
    want_var = (1 - mom) * var0 + mom * r2.var(unbiased=False)
    torch.testing.assert_close(layer.clusters.distance_mean.double(), want_mu, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.clusters.distance_var.double(), want_var, rtol=1e-6, atol=0)
    # eval freezes them
    before = (layer.clusters.distance_mean.clone(), layer.clusters.distance_var.clone())
    layer.eval()
    layer(x2 * 3)
    assert torch.equal(before[0], layer.clusters.distance_mean) and torch.equal(before[1], layer.clusters.distance_var)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spread_distance_and_identity_logits(monkeypatch, dtype):
    """The op gets inv_std / sigma and the shift mu / sigma for every cluster; the layer's
    routed distance is (r - mu) / sigma, sigma = sqrt(var + eps), and the identity logits move
    by lam (r - mu) / sigma (the gates and y of the reference with that distance)."""
    from slim_kernels.reference import topk_softmax

    K, lam = 9, 1.7
    lin, layer = make_layer(K=K, N=6, dtype=dtype, num_clusters=3, cluster_momentum=0.3,
                            distance_scale="spread", yield_strength=lam, top_k=2)
    layer.train()
    step(layer, torch.randn(50, K, dtype=dtype))
    step(layer, torch.randn(50, K, dtype=dtype) * 2)
    spy = _OpSpy(monkeypatch)
    layer.eval()
    x = torch.randn(25, K, dtype=dtype) * 1.5
    y = layer(x)
    kw, (_, gates, _, d, assign) = spy.calls[-1]
    mu, var = layer.clusters.distance_mean.double(), layer.clusters.distance_var.double()
    sigma = (var + 1e-5).sqrt()
    shift = kw["distance_shift"]
    assert shift.shape == (3,) and shift.dtype == torch.float32
    torch.testing.assert_close(shift.double(), (mu / sigma).expand(3), rtol=1e-6, atol=0)
    torch.testing.assert_close(kw["inv_std"].double(),
                               (layer.clusters.cluster_vars.double() + 1e-5).rsqrt() / sigma,
                               rtol=1e-6, atol=0)
    r, a = _r(x, layer)
    assert torch.equal(assign, a)
    want_d = (r - mu) / sigma
    assert (want_d < 0).any() and (want_d > 0).any()
    tol = 1e-5 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(d.double(), want_d, rtol=tol, atol=tol)
    # the identity logits: z + lam * d on E_L.. only, then top-k and softmax
    z = (x.double() @ layer.router.double().t())
    z[:, 3:] += lam * want_d[:, None]
    want_g, _ = topk_softmax(z, 2)
    torch.testing.assert_close(gates.double(), want_g, rtol=tol, atol=tol)
    y0, *_ = slim_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.router,
                            top_k=2, scaling=layer.scaling, yield_strength=lam,
                            centers=layer.clusters.cluster_centers,
                            cluster_vars=(layer.clusters.cluster_vars + 1e-5) * sigma.float() ** 2 - 1e-5,
                            distance_shift=(mu / sigma).float().expand(3))
    torch.testing.assert_close(y.double(), y0.double(), rtol=tol, atol=tol)


def test_spread_layer_refuses_a_state_without_its_statistics():
    """A "none" layer's state dict lacks distance_mean / distance_var: a "spread" layer does not
    load it (strict), and says which keys are missing."""
    lin, none = make_layer(K=8, N=5, num_clusters=2)
    spread = sk.SlimLinear.from_linear(lin, sk.SlimConfig(**{**CFG, "num_clusters": 2,
                                                           "distance_scale": "spread"}))
    with pytest.raises(RuntimeError, match="distance_mean"):
        spread.load_state_dict(none.state_dict())


def test_spread_state_dict_round_trip_copies_and_errors():
    import copy
    import pickle

    lin, layer = make_layer(K=8, N=5, distance_scale="spread", cluster_momentum=0.5)
    layer.train()
    step(layer, torch.randn(30, 8, dtype=torch.float64))
    step(layer, torch.randn(30, 8, dtype=torch.float64) + 1)
    sd = layer.state_dict()
    assert {"clusters.distance_mean", "clusters.distance_var"} <= set(sd)
    _, other = make_layer(K=8, N=5, distance_scale="spread", seed=3)
    other.load_state_dict(sd)
    for k in ("distance_mean", "distance_var", "cluster_centers"):
        assert torch.equal(getattr(other.clusters, k), getattr(layer.clusters, k)), k
    for c in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(c.clusters.distance_mean, layer.clusters.distance_mean)
        assert torch.equal(c.clusters.distance_var, layer.clusters.distance_var)
        c.eval()
        layer.eval()
        x = torch.randn(4, 8, dtype=torch.float64)
        assert torch.equal(c(x), layer(x))
    # a "none" layer rejects the statistics under strict loading (unexpected keys)
    _, none = make_layer(K=8, N=5)
    with pytest.raises(RuntimeError, match="distance_mean"):
        none.load_state_dict(sd)
    # distance_scale decides the buffers: fixed once the layer is built
    with pytest.raises(ValueError, match="new config has distance_scale='none' but the layer "
                                         "was built with 'spread'"):
        layer.config = layer.config.replace(distance_scale="none")
    with pytest.raises(ValueError, match="new config has distance_scale='spread'"):
        none.config = none.config.replace(distance_scale="spread")


def test_spread_cast_keeps_statistics_fp32():
    lin, layer = make_layer(K=8, N=5, dtype=torch.float32, distance_scale="spread")
    layer.to(torch.bfloat16)
    assert layer.clusters.distance_mean.dtype == layer.clusters.distance_var.dtype == torch.float32
    layer.train()
    step(layer, torch.randn(20, 8, dtype=torch.bfloat16))
    step(layer, torch.randn(20, 8, dtype=torch.bfloat16))
    assert torch.isfinite(layer.clusters.distance_var) and layer.clusters.distance_var > 0


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_spread_gradient_checkpointing_updates_once(use_reentrant):
    """A checkpointed re-run routes with the statistics the first forward saw (they move at
    the step) and does not collect again: same gradients and statistics as without
    checkpointing."""
    lin, layer = make_layer(distance_scale="spread", cluster_momentum=0.5, yield_strength=2.0)
    layer.train()
    step(layer, torch.randn(16, 45, dtype=torch.float64))  # init
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x2 = torch.randn(16, 45, dtype=torch.float64, requires_grad=True)
    y = layer(x2)
    y.square().sum().backward()
    sk.step_clusters(layer)
    ref = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router)] + [x2.grad.clone()]
    after = (layer.clusters.distance_mean.clone(), layer.clusters.distance_var.clone())
    assert not torch.equal(after[0], state["clusters.distance_mean"])

    layer.load_state_dict(state)
    for p in (layer.lora_A, layer.lora_B, layer.router):
        p.grad = None
    x2.grad = None
    y = checkpoint(layer, x2, use_reentrant=use_reentrant)
    y.square().sum().backward()
    sk.step_clusters(layer)
    grads = [p.grad for p in (layer.lora_A, layer.lora_B, layer.router)] + [x2.grad]
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.clusters.distance_mean, after[0]) and torch.equal(layer.clusters.distance_var, after[1])


def test_spread_overflow_drops_the_whole_update():
    """An update whose statistics would not be finite is dropped whole: clusters and the
    statistics of r stay as they were (docs/method.md §2, "Non-finite tokens")."""
    lin, layer = make_layer(K=6, N=5, num_clusters=2, dtype=torch.float32,
                            distance_scale="spread")
    layer.train()
    step(layer, torch.randn(20, 6))
    before = [t.clone() for t in (layer.clusters.cluster_centers, layer.clusters.cluster_vars,
                                  layer.clusters.distance_mean, layer.clusters.distance_var)]
    step(layer, torch.randn(20, 6) * 1e30)  # counted on the device, no host sync
    after = (layer.clusters.cluster_centers, layer.clusters.cluster_vars,
             layer.clusters.distance_mean, layer.clusters.distance_var)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.warns(RuntimeWarning, match="non-finite"):  # said where the host reads it
        assert sk.routing_stats(layer)[""]["rejected_batches"] == 1
    step(layer, torch.randn(20, 6))
    assert not torch.equal(before[2], layer.clusters.distance_mean)


def test_fp32_statistics_keep_a_far_channel_exact():
    """The op's statistics are sums of x - c (the centre a token was routed to), in fp32: a
    channel whose mean is far from 0 (3000, spread 1) still gets its variance to 1e-4, where
    the plain fp32 E[x²] - E[x]² loses it entirely (the reason the sums are shifted; fp64 is
    not needed)."""
    torch.manual_seed(0)
    _, layer = make_layer(K=4, N=3, num_clusters=1, cluster_momentum=1.0, dtype=torch.float32)
    layer.train()
    step(layer, torch.randn(64, 4) + 3000.0)  # initialises
    x = torch.randn(256, 4) + 3000.0
    step(layer, x)  # momentum 1: the variances become this batch's
    want = x.double().var(0, unbiased=False)
    got = layer.clusters.cluster_vars[0].double()
    assert ((got - want).abs() / want).max() < 1e-4, (got, want)
    naive = (x * x).mean(0) - x.mean(0) ** 2  # fp32, unshifted
    assert ((naive.double() - want).abs() / want).max() > 0.05
