"""The reference (``slim_kernels.reference``, the truth every backend is held to in tests/ops)
against hand computations and the properties ``docs/method.md`` §1-§2 states."""
import math

import numpy as np
import pytest
import torch

from slim_kernels.reference import cluster_distance, slim_reference, topk_softmax

D = torch.float64


def test_hand_computed_tiny_case():
    # K=3, N=2, one LoRA expert (r=1) and one identity expert, top_k=1.
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, -1.0, 0.0]], dtype=D)
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=D)
    b = torch.tensor([0.5, -0.5], dtype=D)
    A = torch.tensor([[[1.0, 1.0, 1.0]]], dtype=D)  # (1, 1, 3)
    B = torch.tensor([[[2.0], [-1.0]]], dtype=D)  # (1, 2, 1)
    R = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=D)  # z = (x0, x1)
    y, g, d, a = slim_reference(x, W, b, A, B, R, top_k=1, scaling=0.5)
    # token 0: z = (1, 2) -> identity wins -> y = base = (1.5, 4.5)
    # token 1: z = (1, -1) -> LoRA wins, g = 1, A x = 0 -> delta 0 ... use token with A x != 0
    assert torch.equal(y[0], torch.tensor([1.5, 4.5], dtype=D))
    assert torch.equal(g, torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D))
    x2 = torch.tensor([[3.0, 1.0, 1.0]], dtype=D)  # z = (3, 1): LoRA; A x = 5; B A x = (10, -5)
    y2, g2, _, _ = slim_reference(x2, W, b, A, B, R, top_k=1, scaling=0.5)
    # base = (3 + .5, 2 - .5) = (3.5, 1.5); + 0.5 * 1 * (10, -5) = (8.5, -1.0)
    assert torch.equal(y2, torch.tensor([[8.5, -1.0]], dtype=D))
    # top_k = 2: softmax over (3, 1): g = (e^2/(1+e^2), 1/(1+e^2))
    y3, g3, _, _ = slim_reference(x2, W, b, A, B, R, top_k=2, scaling=0.5)
    gl = math.exp(2) / (1 + math.exp(2))
    assert g3[0, 0].item() == pytest.approx(gl, rel=1e-14)
    assert torch.allclose(y3, torch.tensor([[3.5 + 5 * gl, 1.5 - 2.5 * gl]], dtype=D), rtol=1e-14)


def test_topk_tie_rule_lower_index_wins():
    z = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    g, idx = topk_softmax(z, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    assert g[0].tolist() == [0.0, 0.5, 0.5, 0.0, 0.0]
    assert g[1].tolist() == [0.5, 0.5, 0.0, 0.0, 0.0]


def make_case(T=37, K=45, N=29, E_L=3, E_I=2, r=5, dtype=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return dict(
        x=rnd(T, K), W=rnd(N, K) / math.sqrt(K), b=rnd(N), A=rnd(E_L, r, K) / math.sqrt(K),
        B=rnd(E_L, N, r), R=rnd(E_L + E_I, K), centers=torch.randn(4, K, generator=gen),
        vars=torch.rand(4, K, generator=gen) + 0.5,
    )


def test_all_identity_gives_exactly_the_base():
    c = make_case()
    R = c["R"].clone()
    R[:3] = 0.0
    R[3:] = 0.0
    R[3:, 0] = 1e6  # identity logits huge for x0 > 0 ...
    x = c["x"].clone()
    x[:, 0] = x[:, 0].abs() + 1.0
    y, g, _, _ = slim_reference(x, c["W"], c["b"], c["A"], c["B"], R, top_k=2, scaling=2.0)
    assert torch.all(g[:, :3] == 0)
    assert torch.equal(y, torch.nn.functional.linear(x, c["W"], c["b"]))


def test_dense_topk_is_soft_mixture():
    c = make_case(E_I=2)
    y, g, _, _ = slim_reference(c["x"], c["W"], c["b"], c["A"], c["B"], c["R"], top_k=5, scaling=1.5)
    p = torch.softmax(c["x"] @ c["R"].t(), -1)
    assert torch.allclose(g, p, rtol=1e-12, atol=0)
    delta = torch.einsum("tk,erk,enr->ten", c["x"], c["A"], c["B"])
    expect = torch.nn.functional.linear(c["x"], c["W"], c["b"]) + 1.5 * (p[:, :3, None] * delta).sum(1)
    assert torch.allclose(y, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k", [2, 4])
def test_out_of_domain_token_moves_mass_to_identity(top_k):
    torch.manual_seed(0)
    K = 16
    centers = torch.zeros(2, K)
    var = torch.ones(2, K)
    x_in = torch.randn(1, K, dtype=D) * 0.5
    x_out = torch.randn(1, K, dtype=D) * 2.0
    x = torch.cat([x_in, x_out])
    W = torch.randn(4, K, dtype=D)
    A = torch.randn(2, 3, K, dtype=D)
    B = torch.randn(2, 4, 3, dtype=D)
    R = torch.randn(4, K, dtype=D) * 0.02
    mass = []
    for lam in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
        _, g, d, _ = slim_reference(x, W, None, A, B, R, top_k=top_k, scaling=1.0,
                                    yield_strength=lam, centers=centers, cluster_vars=var)
        mass.append(g[:, 2:].sum(1))
    assert d[0] < 0 < d[1]
    ood = [m[1].item() for m in mass]
    ind = [m[0].item() for m in mass]
    if top_k == 4:  # dense: strictly more identity mass as lam grows
        assert all(a < b for a, b in zip(ood, ood[1:])), ood
    else:
        assert all(a <= b for a, b in zip(ood, ood[1:])), ood
    assert ood[0] < 0.9 and ood[-1] > 0.99, ood
    assert all(a >= b for a, b in zip(ind, ind[1:])), ind  # in-domain: identity yields
    assert ind[-1] < 0.2 * ind[0], ind


@pytest.mark.parametrize("reduce", ["max", "mean", "rms"])
def test_cluster_distance_matches_numpy(reduce):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 7, generator=g)
    c = torch.randn(3, 7, generator=g)
    v = torch.rand(3, 7, generator=g) + 0.1
    inv = (v + 1e-5).rsqrt()
    d, a = cluster_distance(x, c, inv, reduce)
    xn, cn, vn = x.double().numpy(), c.double().numpy(), v.double().numpy()
    sq = ((xn[:, None] - cn[None]) ** 2).sum(-1)
    an = sq.argmin(1)
    u = np.abs(xn - cn[an]) / np.sqrt(vn[an] + 1e-5)
    ref = {"max": u.max(1), "mean": u.mean(1), "rms": np.sqrt((u * u).mean(1))}[reduce] - 1
    assert (a.numpy() == an).all()
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_cluster_sums_gemm_equals_scatter_and_keeps_a_bad_row_to_itself():
    """The torch backend sums the cluster statistics with a scatter on the CPU and a one-hot
    GEMM elsewhere (no atomics): both give the same rows, a left-out token (row C) reaches no
    row, and a non-finite entry makes only its own cluster's row non-finite."""
    from slim_kernels.routing import cluster_sums

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 7, generator=g, dtype=torch.float64)
    rows = torch.randint(0, 5, (40,), generator=g)  # C = 4: row 4 is left out
    rows[:3] = torch.tensor([0, 1, 2])
    want = torch.stack([feats[rows == j].sum(0) for j in range(4)])
    for scatter in (True, False):
        torch.testing.assert_close(cluster_sums(feats, rows, 4, scatter), want,
                                   rtol=1e-12, atol=1e-12)
    bad = feats.clone()
    bad[1, 3] = float("nan")  # a token of cluster 1
    bad[rows == 4] = float("inf")  # left-out tokens: never counted
    for scatter in (True, False):
        got = cluster_sums(bad, rows, 4, scatter)
        fin = torch.isfinite(got).all(1)
        assert fin.tolist() == [True, False, True, True], scatter
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-12, atol=1e-12)
