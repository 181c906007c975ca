"""Every backend against the fp64 reference (``docs/method.md`` §1-§2, stacked as in §6).

Each case of ``_harness.CASES`` runs forward and backward through ``slim_linear_op`` on every
target (backend x device) in every dtype the target runs, and is held to the reference by
``_harness.check``: outputs (y, gates, distance), gradients (dx, dx_lora, dA_all, dB_all,
dRouter, with an upstream gradient on the gates where the case has one), selected experts and
cluster assignments. Some cases assert more: see ``EXTRA``.
"""
import pytest
import torch
import torch.nn.functional as F

from slim_kernels.ops import slim_linear_op

from ._harness import (CASES, EPS, Case, Target, conform, dtypes, make_inputs, run_op,
                       skip_unsupported)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_output(t: Target, inp):
    """x Wᵀ + b as the target's own base path computes it (what an all-identity call must
    return bit for bit): the triton backend's fused design runs its fused linear, the
    extended design one GEMM over [x | 0] and [W | B_all], the others F.linear."""
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    if t.backend == "triton":
        from slim_kernels.ops.backends.triton import launch
        design = launch.design_for("forward", x, x.shape[1], w.shape[0])
        if design == "fused":
            out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
            return launch.fused_linear([(x, w.t())], out, b).cpu()
        if design == "extended":
            xh = torch.cat([x, torch.zeros_like(x[:, :inp["lora_A"].shape[0]])], 1)
            w_ext = torch.cat([w, inp["lora_B"]], 1)
            return F.linear(xh, w_ext, b).cpu()
    return F.linear(x, w, b).cpu()


def all_identity(t, case, inp, got, want):
    """Identity experts win every token: the LoRA gates are 0, y is the base output exactly
    and the LoRA factors get no gradient."""
    E_L = case.E_L
    assert (got["idx"] >= E_L).all()
    assert (got["gates"][:, :E_L] == 0).all()
    assert torch.equal(got["y"], base_output(t, inp)), "all-identity y differs from the base"
    assert (got["dA"] == 0).all() and (got["dB"] == 0).all()
    assert torch.equal(want["y"], F.linear(*(inp[k].cpu().double() for k in ("x", "weight", "bias"))))


def one_hot(t, case, inp, got, want):
    """top_k = 1: one gate of exactly 1 per token, and a softmax over one logit is constant,
    so the router gets no gradient even with an upstream gradient on the gates."""
    g = got["gates"]
    assert ((g > 0).sum(1) == 1).all() and torch.equal(g.sum(1), torch.ones_like(g[:, 0]))
    assert inp["dgates"] is not None and (got["dR"] == 0).all()


def uniform(t, case, inp, got, want):
    """All logits equal: the k lowest indices are kept, each with gate 1/k."""
    k, T = case.top_k, case.T
    assert torch.equal(got["idx"], torch.arange(k).expand(T, k))
    g = got["gates"]
    expect = torch.full((T, k), 1.0 / k, dtype=g.dtype)
    if k == 2:
        assert torch.equal(g[:, :k], expect)
    else:
        torch.testing.assert_close(g[:, :k], expect, rtol=1e-6, atol=0)
    assert (g[:, k:] == 0).all()


def tied_pairs(t, case, inp, got, want):
    """Experts 1 = 2 and 3 = 4 have equal logits: of a tied pair the lower index is kept
    first, and both orders occur in the case."""
    idx = got["idx"]
    for lo, hi in ((1, 2), (3, 4)):
        has_lo, has_hi = (idx == lo).any(1), (idx == hi).any(1)
        assert (has_lo | ~has_hi).all(), f"expert {hi} kept without its tie {lo}"
        both = has_lo & has_hi
        pos_lo = (idx == lo).int().argmax(1)
        pos_hi = (idx == hi).int().argmax(1)
        assert (pos_lo[both] < pos_hi[both]).all()
    # the tie rule decided something: some token keeps exactly one expert of a pair
    straddle = ((idx == 1).any(1) & ~(idx == 2).any(1)) | ((idx == 3).any(1) & ~(idx == 4).any(1))
    assert straddle.any()


def no_clusters(t, case, inp, got, want):
    """Without clusters the distance is exactly 0 and the assignment -1."""
    assert (got["d"] == 0).all() and (got["assign"] == -1).all()


def both_signs(t, case, inp, got, want):
    """Centres near some tokens and far from others: yielding pushes both ways."""
    assert (want["d"] < 0).any() and (want["d"] > 0).any()


def shifted(t, case, inp, got, want):
    """d = r - shift[j*]: the distance the same call gives without the shift, plus 1, minus
    the shift of each token's cluster (so the shift reached the kernel, per cluster); and
    yielding still pushes both ways."""
    plain = run_op(t, case.but(shift=False), {**inp, "distance_shift": None})
    assert torch.equal(plain["assign"], got["assign"])
    sh = inp["distance_shift"].cpu().to(got["d"].dtype)[got["assign"]]
    tol = 1e-12 if got["d"].dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got["d"], plain["d"] + 1 - sh, rtol=0, atol=tol * 10)
    assert len(set(inp["distance_shift"].tolist())) == case.C  # a distinct value per cluster
    if case.lam:
        both_signs(t, case, inp, got, want)


def shifted_no_yield(t, case, inp, got, want):
    """With lam = 0 the shift moves d but not the routing: the gates and y are those of the
    call without a shift, exactly."""
    plain = run_op(t, case.but(shift=False), {**inp, "distance_shift": None})
    for k in ("y", "gates", "idx", "assign", "dx", "dA", "dB", "dR"):
        assert torch.equal(got[k], plain[k]), k
    assert not torch.equal(got["d"], plain["d"])


EXTRA = {
    "reduce_max": both_signs, "reduce_mean": both_signs, "reduce_rms": both_signs,
    "all_identity": all_identity, "one_hot": one_hot, "uniform_k2": uniform,
    "uniform_k3": uniform, "tied_pairs": tied_pairs, "no_clusters": no_clusters,
    "no_bias_no_identity": no_clusters, "shift_max": shifted, "shift_mean": shifted,
    "shift_rms": shifted, "shift_x_lora": shifted, "shift_no_yield": shifted_no_yield,
}


@dtypes()
@pytest.mark.parametrize("name", list(CASES))
def test_case_matches_reference(target, name, dtype):
    skip_unsupported(target, dtype)
    case = CASES[name]
    inp = make_inputs(case, dtype, target.device)
    got = run_op(target, case, inp)
    want = conform(got, case, inp, f"{target.id} {name} {dtype}")
    if name in EXTRA:
        EXTRA[name](target, case, inp, got, want)


@pytest.mark.parametrize("x_lora", [False, True], ids=["x", "x_lora"])
def test_gradcheck_fp64(target, x_lora):
    """gradcheck of y and the gates in fp64 (tiny: every input element is perturbed). The
    distance d is a constant of the backward (``docs/method.md`` §2), so yielding is off; the
    clusters are still there."""
    skip_unsupported(target, torch.float64)
    case = Case(T=3, K=5, N=4, E_L=2, r=2, E_I=1, C=2, lam=0.0, x_lora=True, seed=16)
    inp = make_inputs(case, torch.float64, target.device)

    def f(x, A, B, R, *xl):
        y, gates, _, _, _ = slim_linear_op(
            x, inp["weight"], inp["bias"], A, B, R, num_lora_experts=case.E_L,
            top_k=case.top_k, scaling=case.scaling, centers=inp["centers"],
            inv_std=inp["inv_std"], x_lora=xl[0] if xl else None, backend=target.backend)
        return y, gates

    names = ("x", "lora_A", "lora_B", "router") + (("x_lora",) if x_lora else ())
    leaves = [inp[k].detach().clone().requires_grad_(True) for k in names]
    # the interpreter is slow (~10 s for the full Jacobian): there gradcheck's fast mode checks
    # vᵀJu for random u, v; every case of test_case_matches_reference compares its gradients
    # with the reference's autograd as well
    interp = target.backend == "triton" and target.device == "cpu"
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, fast_mode=interp)


def test_cluster_eps_is_the_layer_default():
    from slim_kernels.config import SlimConfig
    assert SlimConfig().cluster_eps == EPS
