"""The triton backend's launchers (``docs/method.md`` §6): which device a launch runs on, which
block configuration it gets (autotuning keyed on size buckets, the configuration files with
no autotuning), which design runs, split-K (the GEMMs and route forward), and the ways
backward sums dB_all.

Device and configuration choices are checked on CPU by running the launchers with
``meta`` tensors and the kernels replaced by recorders (no GPU, no interpreter): each launch
records the device that ``torch.cuda.device`` made current and the arguments it got. The
numerics of split-K and of the fused dB run under the interpreter against the fp64
reference."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slim_kernels.ops.backends.triton import launch as tb
from slim_kernels.ops.backends.triton import tuning

from slim_kernels.reference import reference_cluster_stats

from ._harness import (CASES, LOW, Target, check, conform_rows, dtypes, make_inputs,
                       reference_lowp, run_backend, truth)

if tb._IMPORT_ERROR is not None:  # pragma: no cover
    pytest.skip(f"triton does not import: {tb._IMPORT_ERROR}", allow_module_level=True)

ARG_NAMES = {n: list(getattr(tb._k, n).arg_names)
             for n in ("route_fwd_kernel", "route_epilogue_kernel", "route_bwd_kernel",
                       "fused_linear_kernel", "cluster_stats_kernel")}


# ------------------------------------------------------------------------------------------
# a fake GPU: meta tensors, recording kernels, a recording torch.cuda.device
# ------------------------------------------------------------------------------------------
class FakeGPU:
    """Patches the launcher so that nothing runs: kernels and the autotuner record their
    launches (kernel name, current device, arguments by name)."""

    def __init__(self, monkeypatch, arch="sm_90", sms=132, capturing=False, design="fused"):
        self.current = []  # the device stack torch.cuda.device maintains
        self.launches = []
        self.autotuned = []
        gpu = self

        @contextlib.contextmanager
        def device(dev):
            gpu.current.append(torch.device(dev))
            try:
                yield
            finally:
                gpu.current.pop()

        class Kernel:
            def __init__(self, name, log):
                self.name, self.log = name, log

            def __getitem__(self, grid):
                def launch(*args, **kw):
                    named = dict(zip(ARG_NAMES[self.name], args), **kw)
                    self.log.append(SimpleNamespace(
                        name=self.name, device=gpu.current[-1] if gpu.current else None,
                        args=named, grid=grid))
                return launch

        class Autotuner(Kernel):
            best_config = None

            def __getitem__(self, grid):
                launch = super().__getitem__(grid)

                def run(*args, **kw):
                    launch(*args, **kw)
                    import triton
                    Autotuner.best_config = triton.Config(
                        {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},
                        num_warps=2, num_stages=2)
                return run

        kernels = SimpleNamespace(**{n: Kernel(n, self.launches) for n in ARG_NAMES})
        monkeypatch.setattr(tb, "_k", kernels)
        monkeypatch.setattr(tb, "_INTERPRET", False)
        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(tb, "_device_arch", lambda dev: arch)
        monkeypatch.setattr(tb, "_device_name", lambda dev: "Fake GPU")
        monkeypatch.setattr(tb, "_CONFIGS", {})
        monkeypatch.setattr(tb, "_DESIGNS", {})
        monkeypatch.setattr(tb, "DESIGN", design)
        monkeypatch.setattr(tb, "_num_sms", lambda dev: sms)
        monkeypatch.setattr(tb, "_capturing", lambda dev: gpu.capturing)
        monkeypatch.setattr(tb, "_linear_kernel",
                            lambda fp32: Autotuner("fused_linear_kernel", self.autotuned))
        monkeypatch.setattr(tb, "_TUNED_HERE", {})
        self.capturing = capturing

    def linear_launches(self):
        return ([x for x in self.launches if x.name == "fused_linear_kernel"]
                + list(self.autotuned))


def meta_call(T=37, K=45, N=29, E_L=3, r=5, E_I=2, dtype=torch.bfloat16, backward=True,
              stats=False):
    """forward (and backward) of the triton launcher on meta tensors; ``stats``: with the
    cluster statistics (and a strided stats_keep)."""
    m = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    ER, E = E_L * r, E_L + E_I
    x, W, b = m(T, K), m(N, K), m(N)
    A, B, R = m(ER, K), m(N, ER), m(E, K)
    cen, isd = m(2, K, dt=torch.float32), m(2, K, dt=torch.float32)
    keep = m(2 * T, dt=torch.bool)[::2] if stats else None
    y, gates, idx, d, assign, h, st = tb.forward(x, None, W, b, A, B, R, cen, isd, E_L, 2, 0.5,
                                                 1.0, "rms", None, stats, keep)
    assert st.shape == ((2, 2 * K + 3) if stats else (0, 2 * K + 3))
    if backward:
        tb.backward(m(T, N), None, x, None, W, A, B, R, gates, h, E_L, 0.5)
    return x


# ------------------------------------------------------------------------------------------
# the device guard
# ------------------------------------------------------------------------------------------
def test_every_launch_runs_on_the_inputs_device(monkeypatch):
    """Triton launches on the current device: forward and backward make it x's for every
    kernel (route, fused linear, autotuned or not)."""
    gpu = FakeGPU(monkeypatch)
    x = meta_call(stats=True)
    launches = gpu.launches + gpu.autotuned
    names = {x.name for x in launches}
    assert names == {"route_fwd_kernel", "route_bwd_kernel", "fused_linear_kernel",
                     "cluster_stats_kernel"}, names
    gpu.launches.clear()
    meta_call(T=5, K=4096, stats=True)  # one short token block: route forward split over K
    assert {x.name for x in gpu.launches} >= {"route_fwd_kernel", "route_epilogue_kernel"}
    for launch in gpu.launches:
        assert launch.device == x.device, (launch.name, launch.device)
    for launch in launches:
        assert launch.device == x.device, (launch.name, launch.device)
    assert gpu.current == []
    # and the fused linear called on its own
    out = torch.empty(5, 7, dtype=torch.bfloat16, device="meta")
    a, b = torch.empty(5, 3, dtype=out.dtype, device="meta"), torch.empty(3, 7,
                                                                          dtype=out.dtype,
                                                                          device="meta")
    n = len(gpu.autotuned)
    tb.fused_linear([(a, b)], out)
    assert gpu.autotuned[n].device == out.device


# ------------------------------------------------------------------------------------------
# configuration choice: bucketed autotuning, the table, SLIM_KERNELS_AUTOTUNE, CUDA graphs
# ------------------------------------------------------------------------------------------
def test_bucket():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 16, 17, 1000, 1024, 1025)] == [
        1, 1, 2, 4, 16, 32, 1024, 1024, 2048]
    assert tuning.bucket(10**6) == tuning.BUCKET_CAP == 32768
    assert tuning.tune_key(8191, 4096, 14336) == (8192, 4096, 16384)


def test_autotuning_is_keyed_on_buckets(monkeypatch):
    """Forwards at T = 1000 and 1024 share a key; T = 1025 gets the next bucket. The key
    arguments are buckets of M, N, K1 (T is K1 in the weight gradients)."""
    monkeypatch.delenv("SLIM_KERNELS_AUTOTUNE", raising=False)
    gpu = FakeGPU(monkeypatch)
    keys = []
    for T in (1000, 1024, 1025):
        n = len(gpu.autotuned)
        meta_call(T=T, K=64, N=96, backward=True)
        new = gpu.autotuned[n:]
        assert new and not [x for x in gpu.launches if x.name == "fused_linear_kernel"]
        for launch in new:
            a = launch.args
            assert (a["KEY_M"], a["KEY_N"], a["KEY_K"]) == tuning.tune_key(a["M"], a["N"],
                                                                           a["K1"])
        keys.append(new[0].args["KEY_M"])  # the forward: M = T
    assert keys == [1024, 1024, 2048]


@pytest.mark.parametrize("why", ["env", "capture"])
def test_no_autotuning_uses_the_table(monkeypatch, why):
    """SLIM_KERNELS_AUTOTUNE=0, or a CUDA-graph capture: nothing is benchmarked; every fused
    linear launch gets the configuration file's configuration for its key."""
    monkeypatch.delenv("SLIM_KERNELS_AUTOTUNE", raising=False)
    if why == "env":
        monkeypatch.setenv("SLIM_KERNELS_AUTOTUNE", "0")
    gpu = FakeGPU(monkeypatch, capturing=why == "capture")
    for T in (1, 4096):
        meta_call(T=T, K=4096, N=4096, E_L=8, r=16)
    assert gpu.autotuned == []
    launches = gpu.linear_launches()
    assert len(launches) == 2 * 4
    for launch in launches:
        a = launch.args
        key = (a["KEY_M"], a["KEY_N"], a["KEY_K"])
        want = tuning.table_config(tuning.load_configs("sm_90"), False, key, a["HAS_2"],
                                   a["HAS_3"], a["SPLIT_K"])
        got = tuple(a[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps",
                                   "num_stages"))
        assert got == want, (key, got, want)
    decode = [x for x in launches if x.args["M"] == 1]
    assert decode and all(x.args["BLOCK_M"] == 16 for x in decode)


def test_capture_reuses_what_autotuning_picked(monkeypatch):
    monkeypatch.delenv("SLIM_KERNELS_AUTOTUNE", raising=False)
    gpu = FakeGPU(monkeypatch)
    meta_call(T=300, backward=False)
    assert len(gpu.autotuned) == 1 and gpu.launches[-1].name == "route_fwd_kernel"
    gpu.capturing = True
    meta_call(T=300, backward=False)
    replay = gpu.launches[-1]
    assert replay.name == "fused_linear_kernel"
    assert (replay.args["BLOCK_M"], replay.args["num_warps"]) == (64, 2)  # the tuned config
    rows = tb.tuned_here()
    assert rows == [("sm_90", "half", "512,32,64,1,0,1", (64, 32, 16, 2, 2, 2))]


def test_env_var(monkeypatch):
    for v, on in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv("SLIM_KERNELS_AUTOTUNE", v)
        assert tuning.autotune_enabled() is on


def test_shipped_configuration_files():
    """The files in configs/: per architecture, unmeasured starting points (``measured``
    false, every design "unmeasured"); per device, what a device check measured. Every
    fused-linear configuration in them is one the autotuner can pick (so the AOT test
    compiled it), and every rule list ends with a rule without bounds."""
    files = sorted(tuning.CONFIG_DIR.glob("*.json"))
    assert {"sm_80.json", "sm_90.json"} <= {p.name for p in files}
    for path in files:
        data = json.loads(path.read_text())
        assert data["format"] == tuning.FORMAT, path
        arch_file = path.name.startswith("sm_")
        assert data["measured"] is (not arch_file), path
        assert (data["device"] is None) == arch_file, path
        if not arch_file:
            assert path.name == tuning.device_file_name(data["device"]), path
        for fam in ("half", "fp32"):
            entry = data["fused_linear"][fam]
            assert entry["rules"][-1][:2] == [None, None], path
            cfgs = [r[2] for r in entry["rules"]] + list(entry.get("exact", {}).values())
            for cfg in cfgs:
                assert tuple(cfg) in tuning.linear_configs(fam == "fp32"), (path, fam, cfg)
        for key, choice in data["designs"].items():
            allowed = {"fused", "accumulate", tuning.UNMEASURED}
            assert choice["forward"] in allowed and choice["backward"] in allowed, (path, key)
            if arch_file:
                assert choice["forward"] == choice["backward"] == tuning.UNMEASURED, (path, key)


def test_configuration_lookup(monkeypatch, tmp_path):
    """A GPU's own file first (SLIM_KERNELS_CONFIG_DIR, then configs/), else its
    architecture's, else the nearest lower architecture's; exact entries before rules."""
    monkeypatch.delenv("SLIM_KERNELS_CONFIG_DIR", raising=False)
    name = lambda arch, dev=None: Path(tuning.config_file(arch, dev)).name  # noqa: E731
    assert name("sm_90") == name("sm_90", "NVIDIA H200") == "sm_90.json"
    assert name("sm_89") == "sm_80.json" and name("sm_100") == "sm_90.json"
    assert name("sm_70") == "sm_80.json"
    cfg = tuning.load_configs("sm_90")
    assert tuning.table_config(cfg, False, (1, 4096, 4096))[0] == 16
    assert tuning.table_config(cfg, False, (8192, 128, 8192))[:2] == (64, 64)
    assert tuning.table_config(cfg, True, (8192, 4096, 4096)) == (64, 64, 32, 8, 4, 3)
    # a device file written as the device check writes it, found through the variable
    mine = tuning.device_file(cfg, "NVIDIA H200", "sm_90",
                              [("half", "8192,4096,4096,1,0,1", (128, 128, 64, 8, 8, 3))],
                              {"half/prefill/4096x4096": {"forward": "fused",
                                                          "backward": "accumulate"}},
                              {"triton": "3.6.0"}, "test")
    assert tuning.device_file_name("NVIDIA H200") == "NVIDIA_H200.json"
    (tmp_path / "NVIDIA_H200.json").write_text(tuning.dumps_configs(mine))
    monkeypatch.setenv("SLIM_KERNELS_CONFIG_DIR", str(tmp_path))
    assert name("sm_90", "NVIDIA H200") == "NVIDIA_H200.json"
    assert name("sm_90", "NVIDIA H100") == "sm_90.json"
    dev = tuning.load_configs("sm_90", "NVIDIA H200")
    assert dev["measured"] and dev["versions"] == {"triton": "3.6.0"}
    assert tuning.table_config(dev, False, (8192, 4096, 4096), True, False, 1) == (
        128, 128, 64, 8, 8, 3)
    assert tuning.table_config(dev, False, (8192, 4096, 4096), True, True, 1) == (
        128, 256, 64, 8, 8, 3)  # another key: the rules
    assert tuning.design_choice(dev, "forward", False, 8192, 4096, 4096)[0] == "fused"
    assert tuning.design_choice(dev, "backward", False, 8192, 4096, 4096)[0] == "accumulate"


def test_design_choice():
    """Unmeasured buckets get the documented default; a measured one its entry, looked up
    exact, then per family and token class, then "*"; "extended" never comes from a file."""
    cfg = {"path": "x.json", "designs": {
        "half/prefill/4096x4096": {"forward": "unmeasured", "backward": "unmeasured"},
        "half/decode/*": {"forward": "fused", "backward": "unmeasured"},
        "*": {"forward": "unmeasured", "backward": "fused"}}}
    pick = lambda d, T, K=4096, N=4096, fp32=False: tuning.design_choice(  # noqa: E731
        cfg, d, fp32, T, K, N)
    assert pick("forward", 8192) == ("accumulate", "default: half/prefill/4096x4096 unmeasured")
    assert tuning.DEFAULT_DESIGN == {"forward": "accumulate", "backward": "accumulate"}
    assert pick("forward", 16)[0] == "fused" and pick("forward", 64, K=14336)[0] == "fused"
    assert pick("backward", 16)[0] == "fused"  # "*"
    assert pick("forward", 65)[0] == "accumulate"
    assert tuning.design_key(True, 65, 14336, 4096) == "fp32/prefill/16384x4096"
    cfg["designs"]["*"]["forward"] = "extended"
    with pytest.raises(ValueError, match="extended"):
        pick("forward", 8192)


def test_design_dispatch(monkeypatch):
    """What each design launches: fused runs every GEMM on the Triton fused linear;
    accumulate and extended none (cuBLAS through torch), with extended writing [x | hg]
    from the route kernel. Unforced, a GPU whose file is unmeasured gets the default."""
    launched = {}
    for design in ("fused", "accumulate", "extended", None):
        gpu = FakeGPU(monkeypatch, design=design)
        meta_call(T=300, K=64, N=96, E_L=2, r=8)
        fwd = [x for x in gpu.launches if x.name == "route_fwd_kernel"]
        assert len(fwd) == 1 and fwd[0].args["WRITE_X"] == (design == "extended")
        if design == "extended":
            assert fwd[0].args["xc_ptr"].shape == (300, 64 + 16)
        launched[design] = len(gpu.linear_launches())
    assert launched == {"fused": 4, "accumulate": 0, "extended": 0, None: 0}
    monkeypatch.setattr(tb, "DESIGN", "extended")
    x = torch.empty(3, 4, device="meta")
    assert (tb.design_for("forward", x, 4, 5), tb.design_for("backward", x, 4, 5)) == (
        "extended", "accumulate")
    monkeypatch.setattr(tb, "DESIGN", "nonsense")
    with pytest.raises(ValueError, match="SLIM_KERNELS_DESIGN"):
        tb.design_for("forward", x, 4, 5)


# ------------------------------------------------------------------------------------------
# split-K
# ------------------------------------------------------------------------------------------
def test_split_k_choice():
    # [dA; dR; 0] at the benchmark shape on 132 SMs (E_L·r + E = 138 rows padded to 144):
    # 3 x 64 tiles, 128 steps over T each
    assert tuning.split_k(144, 4096, 8192, 132) == 2
    assert tuning.split_k(4096, 128, 8192, 132) == 3  # dB = dyᵀ hg
    assert tuning.split_k(1, 4096, 4096, 132) == 5  # decode forward
    assert tuning.split_k(8192, 4096, 4096, 132) == 1  # the forward: enough tiles
    assert tuning.split_k(138, 4096, 600, 132) == 1  # too short to split


def test_weight_gradients_split_on_a_big_gpu(monkeypatch):
    gpu = FakeGPU(monkeypatch, sms=132)
    meta_call(T=8192, K=4096, N=4096, E_L=8, r=16)
    by_m = {x.args["M"]: x for x in gpu.autotuned}
    assert by_m[144].args["SPLIT_K"] == 2  # [dA; dR; 0]
    assert by_m[8192].args["SPLIT_K"] == 1  # forward, dx


@pytest.mark.skipif(not tb._INTERPRET, reason="runs kernels under the Triton interpreter")
@dtypes()
@pytest.mark.parametrize("split", [2, 3])
def test_split_k_matches_reference(dtype, split):
    """Three strided segments, a strided bias, the first segment split in 2 or 3 (K1 = 70:
    the last split is partial); against fp64, with the unsplit kernel as the low-precision
    baseline (the same blocks, one accumulator)."""
    g = torch.Generator().manual_seed(0)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    M, N = 37, 29
    a1, b1 = f(70, M).t(), f(N, 70).t()  # transposed storage, like dyᵀ and Wᵀ
    a2, b2, a3, b3 = f(M, 9), f(9, N), f(M, 4), f(4, N)
    bias = f(2 * N)[::2]
    segs = [(a1, b1), (a2, b2), (a3, b3)]
    want = a1 @ b1 + a2 @ b2 + a3 @ b3 + bias
    lp = [(a.to(dtype), b.to(dtype)) for a, b in segs]
    outs = {}
    for s in (1, split):
        outs[s] = tb.fused_linear(lp, torch.empty(M, N, dtype=dtype), bias.to(dtype), split=s)
    e = (outs[split].double() - want).norm() / want.norm()
    if dtype in LOW:
        e1 = (outs[1].double() - want).norm() / want.norm()
        assert e <= 2 * e1 + 1e-5, (e, e1)
    else:
        assert e <= {torch.float64: 1e-12, torch.float32: 1e-5}[dtype], e


# ------------------------------------------------------------------------------------------
# route forward split over K: partials, then a second launch sums them and runs the epilogue
# ------------------------------------------------------------------------------------------
def test_route_split_choice():
    assert tuning.route_split(8192, 4096, 128, 64, 132) == 3
    assert tuning.route_split(8192, 14336, 128, 64, 132) == 3
    assert tuning.route_split(32768, 4096, 128, 64, 132) == 1  # 256 token blocks: enough
    assert tuning.route_split(1, 4096, 128, 64, 132) == 8  # decode: capped
    assert tuning.route_split(1, 128, 128, 64, 132) == 1  # 2 steps of K: too short to split
    # at least one program per SM at the target shapes (T = 8192, 132 SMs)
    bt, bk = tb.route_config(128, interpret=False)[:2]
    for K in (4096, 14336):
        assert -(-8192 // bt) * tuning.route_split(8192, K, bt, bk, 132) >= 132


def test_route_split_launches(monkeypatch):
    """At the target shape the route kernel runs 64 token blocks x 3 splits of K (multiples
    of BLOCK_K = 32: 43 steps, 43, 42), writing fp32 partials that a second launch over
    32-token blocks sums."""
    gpu = FakeGPU(monkeypatch, sms=132)
    meta_call(T=8192, K=4096, N=64, E_L=8, r=16, backward=False, stats=True)
    fwd, = [x for x in gpu.launches if x.name == "route_fwd_kernel"]
    epi, = [x for x in gpu.launches if x.name == "route_epilogue_kernel"]
    assert fwd.grid == (64, 1, 3) and fwd.args["PARTIAL"] and fwd.args["k_chunk"] == 43 * 32
    assert fwd.args["ph_ptr"].shape == (3, 8192, 128)
    assert fwd.args["pr_ptr"].shape == (3, 8192, 16 + 3 * 16 + 1)
    assert epi.grid == (256, 1) and epi.args["SPLITS"] == 3 and epi.args["STATS"]
    assert fwd.args["CDOT_PREC"] == "tf32x3" and fwd.args["CP"] == 16
    gpu.launches.clear()
    meta_call(T=32768, K=4096, N=64, E_L=8, r=16, backward=False)
    fwd, = [x for x in gpu.launches if x.name == "route_fwd_kernel"]
    assert fwd.grid == (256, 1, 1) and not fwd.args["PARTIAL"]
    assert not [x for x in gpu.launches if x.name == "route_epilogue_kernel"]


SPLIT_CASES = ("basic", "reduce_max", "reduce_mean", "shift_rms", "x_lora", "wide_70",
               "stats_keep", "T1", "no_clusters")


@pytest.mark.skipif(not tb._INTERPRET, reason="runs kernels under the Triton interpreter")
@dtypes(torch.float64, torch.float32, torch.bfloat16)
@pytest.mark.parametrize("name", SPLIT_CASES)
def test_route_split_matches_reference(monkeypatch, name, dtype):
    """Conformance cases with route forward's K loop split in 3 (K = 45 in 16-channel steps:
    the last split is partial; wide_70's K = 20 gives 2), held to the fp64 reference as
    test_conformance holds every backend (the interpreter's own choice is 1 split here)."""
    monkeypatch.setattr(tb, "route_split", lambda *a, **k: 3)
    case = CASES[name]
    inp = make_inputs(case, dtype)
    got = run_backend(Target("triton", "cpu"), case, inp)
    baselines = ()
    if dtype in LOW:
        monkeypatch.setattr(tb, "route_split", lambda *a, **k: 1)
        baselines = (reference_lowp(case, inp), run_backend(Target("triton", "cpu"), case, inp))
    check(got, truth(case, inp), dtype, baselines, f"triton split {name} {dtype}")


@pytest.mark.skipif(not tb._INTERPRET, reason="runs kernels under the Triton interpreter")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("arg,value", [("x", float("nan")), ("x", float("-inf")),
                                       ("centers", float("nan")), ("vars", -1.0)])
@pytest.mark.parametrize("name", ["reduce_max", "reduce_rms"])
@pytest.mark.parametrize("split", [1, 3])
def test_route_split_keeps_the_nonfinite_contract(monkeypatch, arg, value, name, split):
    """One pass and partial sums carry NaN and inf as the reference does (§1.5): the same
    rows non-finite, the others conforming, the same experts selected. For rms the expanded
    dots would give inf − inf = NaN where the reference has inf (NaN ranks a logit last, inf
    first): a block with a non-finite distance recomputes it term by term."""
    monkeypatch.setattr(tb, "route_split", lambda *a, **k: split)
    case = CASES[name]
    inp = make_inputs(case, torch.float32)
    t = inp[arg].clone()
    if arg == "x":
        t[4, 40] = value  # in the last split
    else:
        t[1, 2] = value  # in the first
    inp[arg] = t
    if arg == "vars":
        inp["inv_std"] = (t + 1e-5).rsqrt()
    got = run_backend(Target("triton", "cpu"), case, inp)
    conform_rows(got, case, inp, f"triton split {name} {arg}={value}")


# ------------------------------------------------------------------------------------------
# dB_all: its own GEMM, or summed in route backward (partials or atomics)
# ------------------------------------------------------------------------------------------
def test_db_mode_choice(monkeypatch):
    monkeypatch.delenv("SLIM_KERNELS_DB", raising=False)
    # the benchmark shape: 128 programs' (4096, 128) fp32 partials cost 8x the dy pass saved
    assert tuning.db_mode(8192, 4096, 128, 64, 2, True) == "gemm"
    assert tuning.db_mode(8192, 4096, 8, 64, 2, True) == "fused"  # narrow LoRA: cheaper
    monkeypatch.setenv("SLIM_KERNELS_DB", "fused")
    assert tuning.db_mode(8192, 4096, 128, 64, 2, True) == "fused"
    monkeypatch.setenv("SLIM_KERNELS_DB", "atomic")
    assert tuning.db_mode(8192, 4096, 128, 64, 2, False) == "atomic"
    # atomics only when non-deterministic algorithms are allowed
    assert tuning.db_mode(8192, 4096, 128, 64, 2, True) == "fused"
    monkeypatch.setenv("SLIM_KERNELS_DB", "nonsense")
    with pytest.raises(ValueError, match="SLIM_KERNELS_DB"):
        tuning.db_mode(1, 1, 1, 1, 2, True)


@pytest.mark.parametrize("env,deterministic,mode", [
    ("fused", True, 1), ("atomic", False, 2), ("atomic", True, 1), ("gemm", False, 0)])
def test_db_mode_reaches_the_kernel(monkeypatch, env, deterministic, mode):
    """SLIM_KERNELS_DB and torch.use_deterministic_algorithms decide the route-backward
    kernel's DB_MODE; with dB in route backward no dyᵀ hg GEMM is launched."""
    monkeypatch.setenv("SLIM_KERNELS_DB", env)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        gpu = FakeGPU(monkeypatch)
        meta_call(T=64, K=32, N=48, E_L=2, r=4)
    finally:
        torch.use_deterministic_algorithms(before)
    bwd, = [x for x in gpu.launches if x.name == "route_bwd_kernel"]
    assert bwd.args["DB_MODE"] == mode
    dB_gemms = [x for x in gpu.autotuned if (x.args["M"], x.args["N"]) == (48, 8)]
    assert len(dB_gemms) == (1 if mode == 0 else 0)


@pytest.mark.skipif(not tb._INTERPRET, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("db", ["fused", "atomic"])
@dtypes()
@pytest.mark.parametrize("name", list(CASES))
def test_fused_db_matches_reference(monkeypatch, db, name, dtype):
    """Every conformance case with dB_all summed inside route backward's pass over dy (the
    default on CPU is the separate GEMM for these small shapes: ``tuning.db_mode``), held to
    the fp64 reference as test_conformance holds every backend; bf16/fp16 by the 2x rule
    against the reference in that precision and the triton backend with the dB GEMM."""
    monkeypatch.setenv("SLIM_KERNELS_DB", db)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        case = CASES[name]
        inp = make_inputs(case, dtype)
        got = run_backend(Target("triton", "cpu"), case, inp)
        baselines = ()
        if dtype in LOW:
            monkeypatch.setenv("SLIM_KERNELS_DB", "gemm")
            baselines = (reference_lowp(case, inp),
                         run_backend(Target("triton", "cpu"), case, inp))
        check(got, truth(case, inp), dtype, baselines, f"triton {db} {name} {dtype}")
    finally:
        torch.use_deterministic_algorithms(before)


# ------------------------------------------------------------------------------------------
# cluster statistics: a second pass over x in token groups, partials summed in group order
# ------------------------------------------------------------------------------------------
def test_stats_groups_choice():
    # the target shape on 132 SMs: 65 programs per group (64 K blocks + the [1, r, r²] one)
    assert tuning.stats_groups(8192, 4096, 64, 64, 132) == 5
    assert tuning.stats_groups(8192, 14336, 64, 64, 132) == 2
    assert tuning.stats_groups(8192, 32768, 64, 64, 132) == 1  # 513 programs: enough
    assert tuning.stats_groups(500, 4096, 64, 64, 132) == 1  # too few tokens to split
    assert tuning.stats_groups(10**6, 64, 64, 64, 132) == 8  # capped


def test_stats_launches(monkeypatch):
    """With cluster_stats the route kernel gets STATS (and the strided keep mask as bytes,
    through its stride) and one cluster_stats launch follows on x's device: grid (K blocks
    + 1, groups), tf32x3 one-hot dots on a GPU, group partials (G, C, 2K + 3). Without it,
    neither."""
    gpu = FakeGPU(monkeypatch, sms=132)
    meta_call(T=8192, K=4096, N=64, E_L=2, r=4, backward=False, stats=True)
    fwd, = [x for x in gpu.launches if x.name == "route_fwd_kernel"]
    assert fwd.args["STATS"] and fwd.args["HAS_KEEP"] and fwd.args["stride_keep"] == 2
    assert fwd.args["keep_ptr"].dtype == torch.uint8
    assert fwd.args["sj_ptr"].dtype == torch.int32 and fwd.args["sj_ptr"].shape == (8192,)
    st, = [x for x in gpu.launches if x.name == "cluster_stats_kernel"]
    assert st.device == fwd.device
    assert st.grid == (4096 // 64 + 1, 5)
    assert st.args["group_len"] == 1664  # 26 tiles of 64 tokens; 5 groups cover 8192
    assert st.args["out_ptr"].shape == (5, 2, 2 * 4096 + 3)
    assert st.args["stride_og"] == 2 * (2 * 4096 + 3)
    assert st.args["DOT_PREC"] == "tf32x3" and st.args["CP"] == 16
    gpu.launches.clear()
    meta_call(T=8192, K=4096, N=64, E_L=2, r=4, backward=False, stats=False)
    fwd, = [x for x in gpu.launches if x.name == "route_fwd_kernel"]
    assert not fwd.args["STATS"] and not fwd.args["HAS_KEEP"]
    assert not [x for x in gpu.launches if x.name == "cluster_stats_kernel"]


def _stats_inputs(dtype, seed=0, T=70, K=37, C=4):
    """x (T, K), centres, inv_std, and route_fwd's per-token (sj, r) with a keep mask."""
    case = CASES["stats_keep"].but(T=T, K=K, C=C, seed=seed)
    inp = make_inputs(case, dtype)
    out = tb.route_forward(inp["x"], None, inp["lora_A"], inp["router"], inp["centers"],
                           inp["inv_std"], case.E_L, case.top_k, case.scaling, case.lam,
                           case.reduce, inp["distance_shift"], True, inp["stats_keep"])
    assign, (sj, r) = out[3], out[6]
    return case, inp, assign, sj, r


@pytest.mark.skipif(not tb._INTERPRET, reason="runs kernels under the Triton interpreter")
@dtypes()
@pytest.mark.parametrize("groups", [1, 2, 3, 5])
def test_stats_groups_match_reference(dtype, groups):
    """route_fwd's per-token j* (or -1: not kept) and r, then the statistics in 1..5 token
    groups (the last one partial), against the reference on the same x: the count exactly,
    the sums to the accumulation dtype's tolerance (fp32 for half x: x is exact in fp32)."""
    case, inp, assign, sj, r = _stats_inputs(dtype)
    keep = inp["stats_keep"]
    assert torch.equal(sj.long(), torch.where(keep, assign, -1))
    got = tb.cluster_statistics(inp["x"], inp["centers"], sj, r, groups=groups)
    want = reference_cluster_stats(inp["x"], inp["centers"], inp["inv_std"], assign,
                                   case.reduce, keep)
    assert got.dtype == want.dtype and got.shape == want.shape == (case.C, 2 * case.K + 3)
    assert torch.equal(got[:, 0], want[:, 0])
    assert bool((want[:, 0] > 0).all()), "every cluster should have tokens"
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    e = (got.double() - want.double()).norm() / want.double().norm()
    assert e <= tol, e


@pytest.mark.skipif(not tb._INTERPRET, reason="runs kernels under the Triton interpreter")
@dtypes(torch.float32, torch.bfloat16)
def test_stats_are_bit_identical_across_runs(monkeypatch, dtype):
    """The same call twice gives the same bits (no atomics; group partials summed in order),
    through the backend's forward, with the token groups forced to 3."""
    monkeypatch.setattr(tb, "stats_groups", lambda *a, **k: 3)
    case = CASES["stats_keep"].but(T=70, seed=31)
    inp = make_inputs(case, dtype)
    runs = [run_backend(Target("triton", "cpu"), case, inp)["stats"] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].view(torch.int32 if runs[0].dtype == torch.float32 else torch.int64).equal(
        runs[1].view(torch.int32 if runs[1].dtype == torch.float32 else torch.int64))


@pytest.mark.skipif(not tb._INTERPRET, reason="runs kernels under the Triton interpreter")
@dtypes(torch.float64, torch.float32, torch.bfloat16)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_bad_centre_or_r_poisons_its_own_row_only(dtype, groups, value):
    """A non-finite centre entry of cluster 1, with tokens assigned to every cluster (given
    directly: through the op a non-finite centre takes every token), makes row 1 non-finite
    and leaves every other row bit-identical to the clean call: no 0 · NaN through the
    one-hot dot. The same for a non-finite r of one token of cluster 2 (an inv_std that
    makes its r NaN): only row 2's Σr and Σr² change."""
    case, inp, assign, sj, r = _stats_inputs(dtype)
    x, cen = inp["x"], inp["centers"]
    assert all(bool((sj == j).any()) for j in range(case.C))
    clean = tb.cluster_statistics(x, cen, sj, r, groups=groups)
    assert bool(torch.isfinite(clean).all())

    bad_c = cen.clone()
    bad_c[1, 5] = value
    got = tb.cluster_statistics(x, bad_c, sj, r, groups=groups)
    others = torch.tensor([j != 1 for j in range(case.C)])
    assert torch.equal(got[others], clean[others])
    K = case.K
    bad_cols = torch.zeros(2 * K + 3, dtype=torch.bool)
    bad_cols[[1 + 5, 1 + K + 5]] = True
    assert bool((~torch.isfinite(got[1, bad_cols])).all())
    assert torch.equal(got[1, ~bad_cols], clean[1, ~bad_cols])

    bad_r = r.clone()
    t = int((sj == 2).nonzero()[0])
    bad_r[t] = value
    got = tb.cluster_statistics(x, cen, sj, bad_r, groups=groups)
    others = torch.tensor([j != 2 for j in range(case.C)])
    assert torch.equal(got[others], clean[others])
    assert bool((~torch.isfinite(got[2, -2:])).all())
    assert torch.equal(got[2, :-2], clean[2, :-2])


# ------------------------------------------------------------------------------------------
# the clusters' sliding update in one launch (the optimizer step, not the op)
# ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not tb._INTERPRET, reason="runs kernels under the Triton interpreter")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dist", [False, True], ids=["no_dist", "dist"])
@pytest.mark.parametrize("stats_kind", ["clean", "empty_cluster", "nonfinite"])
def test_cluster_ema_kernel_matches_torch(acc, dist, stats_kind):
    """cluster_ema_kernel against the definition, cluster_ema_torch, on the same state: the
    centres, variances, distance statistics, inv_std and shift within fp32 rounding, the
    rejected counter exactly; a cluster without tokens keeps its centre and variance; a
    non-finite statistic changes nothing but the counter. C = 5, K = 70 (not multiples of the
    block), the statistics a strided view."""
    from slim_kernels.ops.ema import cluster_ema_torch
    g = torch.Generator().manual_seed(7)
    C, K = 5, 70
    centers = torch.randn(C, K, generator=g)
    variances = torch.rand(C, K, generator=g) + 0.5
    n = torch.tensor([3.0, 0.0 if stats_kind == "empty_cluster" else 2.0, 5.0, 1.0, 4.0])
    mean = torch.randn(C, K, generator=g) * 0.3
    S1 = (n[:, None] * mean).to(acc)
    S2 = (n[:, None] * (mean.square() + torch.rand(C, K, generator=g))).to(acc)
    r = torch.rand(C, generator=g).to(acc) + 0.5
    stats = torch.cat([n.to(acc)[:, None], S1, S2, (n * r)[:, None], (n * r * r)[:, None]], 1)
    if stats_kind == "nonfinite":
        stats[2, 7] = float("nan")
    stats = torch.cat([stats, torch.zeros(C, 3, dtype=acc)], 1)[:, :2 * K + 3]  # strided rows
    assert not stats.is_contiguous()

    def state():
        s = dict(centers=centers.clone(), variances=variances.clone(),
                 rejected=torch.tensor(2, dtype=torch.int64),
                 inv_std=torch.zeros(C, K), shift=torch.zeros(C))
        s["distance_mean"] = torch.tensor(0.9) if dist else None
        s["distance_var"] = torch.tensor(0.2) if dist else None
        return s

    want, got = state(), state()
    args = lambda s: (s["centers"], s["variances"], s["rejected"], stats, 0.1,  # noqa: E731
                      s["distance_mean"], s["distance_var"], s["inv_std"], s["shift"], 1e-5)
    cluster_ema_torch(*args(want))
    tb.cluster_ema(*args(got))
    assert int(got["rejected"]) == int(want["rejected"]) == (3 if stats_kind == "nonfinite" else 2)
    for k in ("centers", "variances", "inv_std", "shift", "distance_mean", "distance_var"):
        if want[k] is not None:
            torch.testing.assert_close(got[k], want[k], rtol=2e-6, atol=1e-7, msg=k)
    if stats_kind != "clean":  # cluster 1 (no tokens), or all (rejected): unchanged
        rows = [1] if stats_kind == "empty_cluster" else list(range(C))
        assert torch.equal(got["centers"][rows], centers[rows])
        assert torch.equal(got["variances"][rows], variances[rows])
    if stats_kind == "clean":  # the update moved something
        assert not torch.equal(got["centers"], centers)
