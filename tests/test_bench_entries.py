"""The benchmark suite: correctness of every baseline (a wrong baseline gives a wrong ratio),
the CSV schema, the plots, and pytest-benchmark timing entries.

The timing entries are marked ``benchmark`` and skipped unless ``--run-benchmarks``
(tests/conftest.py); run them with

    python -m pytest tests/test_bench_entries.py --run-benchmarks --benchmark-columns=median,iqr

No test here asserts a time: the machine is shared and noisy.
"""
import csv
import os

import pytest
import torch

from slim_kernels.bench.cases import MODES, Case, make_inputs
from slim_kernels.bench.measuring import flop_floor, run_bench, step
from slim_kernels.bench.providers import Skip, eager_route, providers_for
from slim_kernels.bench.reporting import (
    markdown_table, plot_csv, read_csv, summary_table, write_csv,
)

TINY = Case(K=48, N=40, T=37, num_lora_experts=3, num_identity_experts=2, rank=4,
                  top_k=2, num_clusters=3)
FAST_PROVIDERS = ["base", "eager_loop", "eager_dense", "peft_lora"]


def _grads(inp, leaves):
    return [None if t.grad is None else t.grad.detach().clone() for t in leaves]


def _reference_grads(inp, provider):
    """fp64 autograd gradients of the reference output w.r.t. x, A_all, B_all, router."""
    ref = make_inputs(inp.case, dtype=torch.float64, seed=0)
    leaves = [ref.x, ref.lora_A, ref.lora_B, ref.router]
    if provider == "base":
        y = torch.nn.functional.linear(ref.x, ref.weight, ref.bias)
    else:
        from slim_kernels.reference import slim_reference

        c = ref.case
        if provider == "peft_lora":
            y = torch.nn.functional.linear(ref.x, ref.weight, ref.bias) + \
                c.scaling * (ref.x @ ref.lora_A.t()) @ ref.lora_B.t()
        else:
            E_L, r, K, N = c.num_lora_experts, c.rank, c.K, c.N
            y, _, _, _ = slim_reference(
                ref.x, ref.weight, ref.bias, ref.lora_A.view(E_L, r, K),
                ref.lora_B.view(N, E_L, r).permute(1, 0, 2), ref.router, top_k=c.top_k,
                scaling=c.scaling, yield_strength=c.yield_strength,
                distance_reduce=c.distance_reduce, centers=ref.centers,
                cluster_vars=ref.cluster_vars, cluster_eps=ref.cluster_eps)
    y.backward(ref.dy)
    return y.detach(), _grads(ref, leaves)


def _check_provider(name, build):
    inp = make_inputs(TINY, dtype=torch.float32, seed=0)
    runner = build(inp)
    y = runner.fwd()
    ref_y, ref_g = _reference_grads(inp, name)
    scale = ref_y.abs().max().item()
    err = (y.double() - ref_y).abs().max().item()
    assert err <= 1e-5 * scale + 1e-6, f"{name}: forward max error {err:.3g} (scale {scale:.3g})"

    for t in runner.leaves:
        t.grad = None
    y.backward(inp.dy)
    if name == "peft_lora":
        # peft owns copies of A and B; compare dx and its LoRA grads
        lora = [p for p in runner.leaves[1:]]
        got = [inp.x.grad] + [p.grad for p in lora]
        by_shape = {tuple(g.shape): g for g in ref_g[1:3]}
        want = [ref_g[0]] + [by_shape[tuple(p.shape)] for p in lora]
    else:
        got = [inp.x.grad, inp.lora_A.grad, inp.lora_B.grad, inp.router.grad]
        want = ref_g
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or name == "base", f"{name}: grad {i} should be None"
            continue
        assert g is not None, f"{name}: grad {i} missing"
        s = w.abs().max().item() + 1e-12
        e = (g.double() - w).abs().max().item()
        assert e <= 1e-4 * s + 1e-6, f"{name}: grad {i} max error {e:.3g} (scale {s:.3g})"


def test_tiny_routing_is_not_degenerate():
    inp = make_inputs(TINY, dtype=torch.float64)
    gates, idx = eager_route(inp.x, inp.router, inp.centers, inp.inv_std, TINY)
    E_L = TINY.num_lora_experts
    sel_lora = (idx < E_L).any(1)
    # some tokens use LoRA experts, some are routed only to identity experts
    assert sel_lora.any() and (idx >= E_L).any()


@pytest.mark.parametrize("name", FAST_PROVIDERS + ["slim_*"])
def test_provider_matches_fp64_reference(name):
    builders, skipped = providers_for("cpu")
    if name == "slim_*":
        fused = [n for n in builders if n.startswith("slim_")]
        assert fused, "no slim_<backend> provider found (slim_torch always exists)"
        for n in fused:
            _check_provider(n, builders[n])
        return
    if name not in builders:
        pytest.skip(skipped.get(name, f"{name} unavailable"))
    try:
        _check_provider(name, builders[name])
    except Skip as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_compiled_dense_matches_fp64_reference():
    builders, _ = providers_for("cpu")
    try:
        _check_provider("compiled_dense", builders["compiled_dense"])
    except Skip as e:  # pragma: no cover
        pytest.skip(str(e))


def test_providers_pick_up_new_backends(monkeypatch):
    import slim_kernels.ops.dispatch as dispatch

    monkeypatch.setattr(dispatch, "available_backends", lambda: ["triton", "cpp", "torch"])
    builders, skipped = providers_for("cpu")
    assert "slim_cpp" in builders and "slim_torch" in builders
    assert "slim_triton" not in builders and "slim_triton" in skipped
    assert {"slim_triton_fused", "slim_triton_accumulate", "slim_triton_extended"} <= set(skipped)
    assert list(builders)[0] == "base"
    builders, _ = providers_for("cpu", ["slim_triton", "eager_loop"])
    assert set(builders) == {"base", "slim_triton", "eager_loop"}
    builders, _ = providers_for("cpu", ["slim_triton_accumulate"])
    assert set(builders) == {"base", "slim_triton_accumulate"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="the triton designs run on CPU under the Triton interpreter")
def test_design_providers_run_their_design(monkeypatch):
    """slim_triton_<design> forces its design in forward and backward (launch.DESIGN, left
    set for the backward that follows); slim_triton puts back the one the process started
    with; each matches the fp64 reference."""
    from slim_kernels.ops.backends.triton import launch

    monkeypatch.setattr(launch, "DESIGN", None)
    monkeypatch.delenv("SLIM_KERNELS_DESIGN", raising=False)
    seen = []
    real = launch.design_for
    monkeypatch.setattr(launch, "design_for",
                        lambda d, x, K, N: seen.append((d, real(d, x, K, N))) or seen[-1][1])
    names = ["slim_triton_accumulate", "slim_triton_extended", "slim_triton"]
    builders, _ = providers_for("cpu", names)
    for n in names:
        seen.clear()
        _check_provider(n, builders[n])
        want = {"slim_triton_accumulate": ("accumulate", "accumulate"),
                "slim_triton_extended": ("extended", "accumulate"),
                "slim_triton": ("fused", "fused")}[n]
        assert (dict(seen)["forward"], dict(seen)["backward"]) == want, (n, seen)


def test_flop_floor_matches_spec():
    c = Case(K=4096, N=4096, T=1)  # E_L·r = 128, E = 10
    assert flop_floor(c, "forward") == pytest.approx(1.0649, abs=1e-4)  # "about 6.5 %"
    assert flop_floor(c, "backward") == pytest.approx(1.1299, abs=1e-4)
    f, b = flop_floor(c, "forward"), flop_floor(c, "backward")
    assert flop_floor(c, "forward+backward") == pytest.approx((f + b) / 2)


def test_bench_tiny_run_writes_the_schema(tmp_path):
    cases = [Case(K=64, N=48, T=t, num_lora_experts=3, rank=4) for t in (16, 33)]
    # peft_lora is left out here only because importing peft (and transformers) takes ~15 s
    res = run_bench(cases, "T", providers=["eager_loop", "eager_dense", "slim_torch"], reps=2,
                          warmup=1, progress=False)
    path = write_csv(res.rows, str(tmp_path / "b.csv"))
    with open(path, newline="") as f:
        rd = csv.reader(f)
        header = next(rd)
        body = list(rd)
    assert header == ["kernel", "provider", "mode", "metric", "x", "y_50", "y_20", "y_80",
                      "device", "dtype", "versions"]
    rows = read_csv(path)
    assert len(body) == len(rows) > 0
    provs = {r["provider"] for r in rows}
    assert {"base", "slim_torch", "eager_loop", "eager_dense"} <= provs
    for r in rows:
        assert r["mode"] in MODES
        assert r["metric"] in ("time_ms", "cpu_ms", "peak_MB", "saved_MB")
        assert r["x"] in ("16", "33")
        assert r["device"] == "cpu" and r["dtype"] == "float32"
        # the provenance of the run: versions, machine and commit
        assert "torch=" in r["versions"] and "git=" in r["versions"] and "cpu=" in r["versions"]
        lo, mid, hi = float(r["y_20"]), float(r["y_50"]), float(r["y_80"])
        assert 0 <= lo <= mid <= hi
    # every provider has time and memory in every mode, saved_MB in forward
    for p in provs:
        for m in MODES:
            got = {r["metric"] for r in rows if r["provider"] == p and r["mode"] == m}
            assert {"time_ms", "cpu_ms", "peak_MB"} <= got
    # the base forward allocates its output (T x N fp32) and nothing else of note
    b = [r for r in rows if r["provider"] == "base" and r["mode"] == "forward"
         and r["metric"] == "peak_MB" and r["x"] == "33"][0]
    assert float(b["y_50"]) == pytest.approx(33 * 48 * 4 / 2**20, rel=0.01)
    table = summary_table(rows)
    assert "FLOP floor" in table and "slim_torch" in table
    assert "FLOP floor" in markdown_table(rows)
    png = plot_csv(path, str(tmp_path))
    assert png == str(tmp_path / "b.png") and os.path.getsize(png) > 1000
    assert sorted(os.listdir(tmp_path)) == ["b.csv", "b.png"]  # one figure per CSV


def test_cli_bench_parses_and_runs(tmp_path, capsys):
    from slim_kernels.cli import main

    rc = main(["bench", "--shapes", "40x24", "--T", "8", "--reps", "1", "--warmup", "1",
               "--providers", "eager_loop,slim_torch", "--modes", "forward",
               "--out", str(tmp_path), "--no-plot", "--no-progress", "--lora-experts", "2",
               "--rank", "4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "slim_torch" in out and "eager_loop" in out
    assert (tmp_path / "bench_T_cpu_float32.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_bench_cuda_without_gpu_says_so(tmp_path, capsys):
    from slim_kernels.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cuda", "--out", str(tmp_path), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "no CUDA device" in err
    assert not os.listdir(tmp_path)  # no work started


# ---------------------------------------------------------------------------------------
# pytest-benchmark entries (skipped unless --run-benchmarks)
# ---------------------------------------------------------------------------------------
_ENTRY_CASE = Case(K=1024, N=1024, T=256)
_ENTRY_PROVIDERS = ["base", "slim_torch", "eager_loop", "eager_dense", "peft_lora"]


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", _ENTRY_PROVIDERS)
def test_bench_entry(benchmark, provider, mode):
    builders, skipped = providers_for("cpu")
    if provider not in builders:
        pytest.skip(skipped.get(provider, "unavailable"))
    inp = make_inputs(_ENTRY_CASE)
    try:
        runner = builders[provider](inp)
    except Skip as e:
        pytest.skip(str(e))
    prep, timed = step(runner, mode, inp.dy)
    benchmark.group = f"slim_linear 1024x1024 T=256 {mode}"
    benchmark.pedantic(timed, setup=prep, rounds=10, warmup_rounds=2, iterations=1)

