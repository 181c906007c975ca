"""The non-finite contract (``docs/method.md`` §1.5) on every target, in every dtype it runs.

* A token with NaN or inf in x or x_lora (one element, a whole -inf row, an all-NaN token):
  nothing crashes; its output row is non-finite; every other token's outputs and input
  gradients are what the same call gives without the bad tokens; the weight gradients are
  non-finite (as the reference's: a GradScaler skips the step); the index slots are valid.
* NaN or ±inf in a weight or buffer (weight, bias, lora_A, lora_B, router, centers, the
  cluster variances inv_std is formed from, the distance_shift): the same rows are
  non-finite as in the reference, on every output and gradient, and the finite rows conform
  to it (:func:`_harness.conform_rows`).

tests/ops/test_fuzz.py draws such cases at random, in a subprocess.
"""
import os
import subprocess
import sys

import pytest
import torch

from ._harness import (CASES, EPS, bad_rows, check_other_tokens, conform_rows,
                       drop_tokens, dtypes, make_inputs, run_op, skip_unsupported,
                       valid_topk)

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # the Triton interpreter computes in numpy, which warns on NaN arithmetic
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
]

NAN, INF = float("nan"), float("inf")
# more tokens than the cpp backend's block of 128, so that bad tokens sit in two blocks
BIG = CASES["basic"].but(T=150, lam=0.7, reduce="max", seed=21)
BIG_XL = CASES["x_lora"].but(T=150, seed=22)
BAD = (0, 77, 149)  # the poisoned tokens

# name: (argument, what is written, where: "elem" = one element per bad token, "row")
TOKEN_INJECTIONS = {
    "x_nan": ("x", NAN, "elem"),
    "x_inf": ("x", INF, "elem"),
    "x_neginf_row": ("x", -INF, "row"),
    "x_nan_row": ("x", NAN, "row"),
    "x_lora_nan": ("x_lora", NAN, "elem"),
    "x_lora_inf": ("x_lora", -INF, "elem"),
}


def poison_tokens(inp, arg, value, where, rows=BAD):
    out = dict(inp)
    t = inp[arg].clone()
    for i, r in enumerate(rows):
        if where == "row":
            t[r] = value
        else:
            t[r, (7 * i + 3) % t.shape[1]] = value
    out[arg] = t
    return out


@dtypes()
@pytest.mark.parametrize("name", list(TOKEN_INJECTIONS))
def test_a_bad_token_leaves_the_others_alone(target, name, dtype):
    skip_unsupported(target, dtype)
    arg, value, where = TOKEN_INJECTIONS[name]
    case = BIG_XL if arg == "x_lora" else BIG
    clean = make_inputs(case, dtype, target.device)
    inp = poison_tokens(clean, arg, value, where)
    got = run_op(target, case, inp)
    label = f"{target.id} {name} {dtype}"
    conform_rows(got, case, inp, label)

    bad = torch.zeros(case.T, dtype=torch.bool)
    bad[list(BAD)] = True
    assert (~torch.isfinite(got["y"][bad])).all(), f"{label}: a bad token has a finite y entry"
    assert torch.equal(bad_rows(got["y"]), bad), label
    for k in ("dA", "dB", "dR"):
        assert bad_rows(got[k]).any(), f"{label}: {k} is finite (a GradScaler would not skip)"
    alone_inp, alone_case = drop_tokens(clean, case, BAD)
    alone = run_op(target, alone_case, alone_inp)
    # the cluster statistics count a token by its x: a bad x_lora leaves them as they were
    stats = run_op(target, case, clean)["stats"] if arg == "x_lora" else None
    check_other_tokens(got, alone, bad, dtype, label, stats=stats)


# (argument, value): an element of a weight or buffer, set in place
WEIGHT_INJECTIONS = [
    (arg, v) for arg in ("weight", "bias", "lora_A", "lora_B", "router", "centers")
    for v in (NAN, INF, -INF)
    # the cluster variances, from which inv_std = 1/sqrt(var + eps) is formed as the layer
    # does: NaN and negative give NaN, -eps gives +inf, +inf gives 0
] + [("vars", v) for v in (NAN, -1.0, -EPS, INF)] + [
    # a cluster's distance shift: its tokens' d is non-finite, and with yielding their
    # identity logits (so all their gates are NaN, §1.5)
    ("distance_shift", v) for v in (NAN, INF, -INF)]


def _wid(p):
    return f"{p[0]}-{p[1]}"


@dtypes(torch.float64, torch.float32, torch.bfloat16)
@pytest.mark.parametrize("inj", WEIGHT_INJECTIONS, ids=_wid)
@pytest.mark.parametrize("cname", ["reduce_max", "x_lora"])
def test_a_bad_weight_gives_the_reference_rows(target, cname, inj, dtype):
    skip_unsupported(target, dtype)
    arg, value = inj
    case = CASES[cname]
    if arg == "distance_shift":
        case = case.but(shift=True)
    inp = make_inputs(case, dtype, target.device)
    t = inp[arg].clone()
    # lora_A / lora_B: an element of the last LoRA expert (selected by few tokens, so the
    # cpp backend's sparse mode would have missed most rows)
    if arg == "lora_B":
        t[3, -1] = value
    elif t.dim() == 1:
        t[1] = value
    else:
        t[-1, 2] = value
    inp[arg] = t
    if arg == "vars":
        inp["inv_std"] = (t.cpu() + EPS).rsqrt().to(target.device)
    got = run_op(target, case, inp)
    conform_rows(got, case, inp, f"{target.id} {cname} {arg}={value} {dtype}")
    assert valid_topk(got["idx"], case.E)
    assert ((got["assign"] >= 0) & (got["assign"] < case.C)).all()
    if arg == "distance_shift":  # the poisoned cluster's tokens, and only they
        hit = got["assign"] == 1
        assert hit.any() and (~hit).any(), "the case does not exercise the poisoned cluster"
        assert torch.equal(~torch.isfinite(got["d"]), hit)
        assert torch.equal(~torch.isfinite(got["y"]).all(1), hit)


@dtypes(torch.float64, torch.float32, torch.bfloat16)
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_a_bad_shift_without_yielding_moves_only_the_distance(target, value, dtype):
    """lam = 0: a non-finite distance_shift makes its cluster's distances non-finite and
    nothing else (no 0 · NaN reaches the logits)."""
    skip_unsupported(target, dtype)
    case = CASES["shift_no_yield"]
    inp = make_inputs(case, dtype, target.device)
    t = inp["distance_shift"].clone()
    t[1] = value
    inp["distance_shift"] = t
    got = run_op(target, case, inp)
    conform_rows(got, case, inp, f"{target.id} shift={value} lam=0 {dtype}")
    hit = got["assign"] == 1
    assert hit.any() and torch.equal(~torch.isfinite(got["d"]), hit)
    for k in ("y", "gates", "dx", "dA", "dB", "dR"):
        assert bool(torch.isfinite(got[k]).all()), k


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


_LEAK = """
import torch
torch.manual_seed(0)
a = torch.randn(129, 41, dtype=torch.bfloat16)
a[5, 3] = float("nan")
b = torch.randn(41, 7, dtype=torch.bfloat16)
print((~torch.isfinite(a @ b)).any(1).nonzero().flatten().tolist())
"""


@pytest.mark.xfail(_has_amx(), strict=True,
                   reason="oneDNN's AMX bf16 matmul carries a NaN into the neighbouring row "
                          "(torch 2.13); the suite runs with ONEDNN_MAX_CPU_ISA capped below AMX")
def test_bf16_matmul_keeps_a_nan_in_its_row_without_the_cap():
    """Why tests/conftest.py caps oneDNN's ISA: without the cap, on a CPU with AMX, PyTorch's
    own bf16 matmul puts a NaN of row 5 into row 4 too, so no backend built on it can keep the
    non-finite contract in bf16 there. Strict: when a PyTorch release fixes it, this passes
    and fails the suite, and the cap (and docs/backends.md's note) should go."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", _LEAK], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[5]", f"rows with a non-finite output: {out.strip()}"
