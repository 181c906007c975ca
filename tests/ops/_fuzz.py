"""The fuzz worker of tests/ops/test_fuzz.py: random configs x random shapes x random NaN/inf
injections into x, x_lora, the weights, the cluster buffers and the distance shift, on every
backend that runs
on the CPU here (torch, cpp, triton under the interpreter), forward and backward, each held
to the non-finite contract of ``docs/method.md`` §1.5 and to the reference on the finite rows
(:func:`_harness.conform_rows`); with only bad tokens, the other tokens also against the
same call without them (:func:`_harness.check_other_tokens`).

Run in a subprocess, so that a crash fails the test instead of killing pytest:

    python tests/ops/_fuzz.py --first-seed 0 --cases 20      # seeds 0..19
    python tests/ops/_fuzz.py --first-seed 1000 --seconds 1200  # from seed 1000 for 20 min

Case n is drawn from ``random.Random(n)`` alone: a failing seed reruns the same case with
``--first-seed n --cases 1``. Each case line is printed (and flushed) before it runs, so the
last line before a crash names it. Exit status 0: every case held; 1: a case failed.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
import warnings

import torch

if not torch.cuda.is_available():  # before slim_kernels imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

if __package__:  # imported by tests/ops/test_fuzz.py
    from ._harness import (EPS, LOW, SUPPORTED, Case, Target, check_other_tokens,
                           conform_rows, drop_tokens, make_inputs, run_op, unrunnable)
else:  # run as a script: this checkout's slim_kernels and tests/ops
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(os.path.dirname(_here)), os.path.dirname(_here)]
    from ops._harness import (EPS, LOW, SUPPORTED, Case, Target, check_other_tokens,
                              conform_rows, drop_tokens, make_inputs, run_op, unrunnable)
from slim_kernels.reference import cluster_distance  # noqa: E402

NAN, INF = float("nan"), float("inf")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TARGETS = (Target("torch", "cpu"), Target("cpp", "cpu"), Target("triton", "cpu"))


def draw(seed: int):
    """(case, dtype, injections) of case ``seed``. An injection is (argument, value, rows or
    None, column or None): rows None = the whole tensor's chosen column, column None = the
    whole rows."""
    rng = random.Random(seed)
    E_L = rng.randint(1, 6)
    E_I = rng.choice([0, 1, 2, 3])
    E = E_L + E_I
    C = rng.choice([0, 1, 2, 3, 5])
    case = Case(
        T=rng.choice([1, 2, 7, 31, 64, 129, 200]), K=rng.randint(1, 48),
        N=rng.randint(1, 40), E_L=E_L, r=rng.randint(1, 8), E_I=E_I, C=C,
        top_k=rng.randint(1, E), scaling=rng.uniform(-2.0, 2.0),
        lam=rng.choice([0.0, rng.uniform(0.1, 3.0)]), reduce=rng.choice(["max", "mean", "rms"]),
        bias=rng.random() < 0.7, x_lora=rng.random() < 0.4, dgates=rng.random() < 0.5,
        router=rng.choice(["random"] * 4 + ["uniform"]), router_scale=rng.uniform(0.5, 4.0),
        centers=rng.choice(["far", "near"]), seed=seed,
    )
    if case.centers == "near" and case.C > case.T:
        case = case.but(centers="far")
    dtype = rng.choice(DTYPES)
    inj = []
    tokens = ["x"] + (["x_lora"] if case.x_lora else [])
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):  # bad tokens
        rows = rng.sample(range(case.T), rng.randint(1, min(3, case.T)))
        col = rng.randrange(case.K) if rng.random() < 0.6 else None
        inj.append((rng.choice(tokens), rng.choice([NAN, INF, -INF]), rows, col))
    weights = ["weight", "lora_A", "lora_B", "router"] + (["bias"] if case.bias else [])
    weights += ["centers", "vars"] if case.C else []
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):  # bad weights / buffers
        arg = rng.choice(weights)
        value = rng.choice([NAN, -1.0, -EPS, INF] if arg == "vars" else [NAN, INF, -INF])
        inj.append((arg, value, None, rng.random()))
    # a distance_shift (sometimes non-finite), from a generator of its own: the draws above,
    # hence every case without a shift, are those of the seeds before the shift existed
    more = random.Random(f"distance_shift {seed}")
    if case.C and more.random() < 0.4:
        case = case.but(shift=True)
        if more.random() < 0.3:
            inj.append(("distance_shift", more.choice([NAN, INF, -INF]), None, more.random()))
    return case, dtype, inj


def inject(inp, case, inj):
    """The inputs with the injections written in (copies), and the bad tokens."""
    out = dict(inp)
    bad = set()
    for arg, value, rows, col in inj:
        t = out[arg].clone()
        if rows is not None:  # a token input
            for r in rows:
                if col is None:
                    t[r] = value
                else:
                    t[r, col] = value
            bad.update(rows)
        else:  # one element of a weight or buffer, at a position drawn from col in [0, 1)
            t.view(-1)[int(col * t.numel())] = value
        out[arg] = t
        if arg == "vars":  # inv_std formed from the variances, as the layer does
            out["inv_std"] = (t + EPS).rsqrt()
    return out, sorted(bad)


def ambiguous(case, inp, dtype) -> torch.Tensor:
    """(T,) bool: finite tokens whose top-k or cluster choice the fp64 truth decides by less
    than the rounding of ``dtype`` (a backend may then choose otherwise, legitimately)."""
    rel = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)
    x = inp["x"].double()
    z = x @ inp["router"].double().t()
    amb = torch.zeros(case.T, dtype=torch.bool)
    if case.C:
        c = inp["centers"].double()
        sq = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        if case.C > 1:
            s2 = sq.sort(1).values
            scale = (x * x).sum(1) + (c * c).sum(1).max()
            amb |= (s2[:, 1] - s2[:, 0]) <= rel * scale
        if case.lam and case.E_I:
            d, _ = cluster_distance(x, inp["centers"], (inp["vars"].float() + EPS).rsqrt(),
                                    case.reduce, inp["distance_shift"])
            z[:, case.E_L:] += case.lam * d[:, None]
    if case.top_k < case.E:
        zs = z.sort(1, descending=True).values
        gap = zs[:, case.top_k - 1] - zs[:, case.top_k]
        amb |= (gap > 0) & (gap <= rel * (1 + z.abs().amax(1)))
    return amb & torch.isfinite(z).all(1)


def run_case(seed: int, targets, log) -> int:
    case, dtype, inj = draw(seed)
    clean = make_inputs(case, dtype)
    inp, bad_tokens = inject(clean, case, inj)
    desc = ", ".join(f"{a}={v}@{'rows ' + str(r) if r is not None else 'elem'}"
                     + ("" if c is None or r is None else f" col {c}") for a, v, r, c in inj)
    log(f"case {seed}: {dtype} T={case.T} K={case.K} N={case.N} E_L={case.E_L} r={case.r} "
        f"E_I={case.E_I} k={case.top_k} C={case.C} lam={case.lam:.3g} {case.reduce} "
        f"x_lora={case.x_lora} router={case.router} | {desc or 'clean'}")
    skip = ambiguous(case, clean, dtype)
    # bf16/fp16: the 2x rule's floor is one unit roundoff of the dtype. The drawn shapes are
    # tiny (T = 1), where a baseline can be luckily exact while storing an intermediate in
    # the dtype (dz, hg) costs any implementation that much (seed 1106: dR of the torch
    # backend, itself a baseline, 1e-3 off in fp16 where the fp16 reference was 2e-4 off)
    floor = torch.finfo(dtype).eps if dtype in LOW else 1e-5
    # errors relative to at least 1 per element: make_inputs draws every input of order 1,
    # and a drawn T = 1 can give an output that cancels to near 0 (seed 1715: d = r - 1 with
    # r = 1.00002 in fp32, where a relative error of d alone is meaningless)
    weights_bad = any(r is None for _, _, r, _ in inj)
    runs = 0
    for t in targets:
        if dtype not in SUPPORTED[t]:
            continue
        label = f"seed {seed} {t.id} {dtype}"
        got = run_op(t, case, inp)
        conform_rows(got, case, inp, label, skip=skip, floor=floor, unit=1.0)
        if bad_tokens and not weights_bad:
            bad = torch.zeros(case.T, dtype=torch.bool)
            bad[bad_tokens] = True
            assert (~torch.isfinite(got["y"][bad])).all(), f"{label}: a bad token's y is finite"
            alone_inp, alone_case = drop_tokens(clean, case, bad_tokens)
            if alone_case.T:
                alone = run_op(t, alone_case, alone_inp)
                check_other_tokens(got, alone, bad, dtype, label, skip=skip, unit=1.0)
        runs += 1
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=None, help="run this many seeds")
    ap.add_argument("--seconds", type=float, default=None,
                    help="run seeds until this much time is spent (the case in flight ends)")
    args = ap.parse_args(argv)
    if args.cases is None and args.seconds is None:
        ap.error("give --cases or --seconds")
    # the Triton interpreter computes in numpy, which warns on NaN arithmetic
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
    torch.set_num_threads(1)
    targets = [t for t in TARGETS if unrunnable(t) is None]
    skipped = [f"{t.id} ({unrunnable(t)})" for t in TARGETS if unrunnable(t) is not None]

    def log(msg):
        print(msg, flush=True)

    import slim_kernels
    log(f"fuzz: slim_kernels from {os.path.dirname(slim_kernels.__file__)}; "
        f"targets {', '.join(t.id for t in targets)}"
        + (f"; not here: {'; '.join(skipped)}" if skipped else ""))
    start = time.monotonic()
    seed, runs, cases = args.first_seed, 0, 0
    while True:
        if args.cases is not None and cases >= args.cases:
            break
        if args.seconds is not None and time.monotonic() - start >= args.seconds:
            break
        try:
            runs += run_case(seed, targets, log)
        except Exception:
            log(traceback.format_exc())
            log(f"FAIL seed {seed} (rerun: python {sys.argv[0]} --first-seed {seed} --cases 1)")
            return 1
        seed += 1
        cases += 1
    log(f"fuzz ok: {cases} cases, seeds {args.first_seed}..{seed - 1}, {runs} backend runs, "
        f"{time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
