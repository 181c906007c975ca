"""Data parallel on CPU: 2 gloo ranks under torchrun (docs/method.md §2).

One torchrun launch of tests/_dist_worker.py runs the DDP and FSDP2 cases and saves what each
rank saw; the tests below compare the ranks with each other and with a single-process run on
the same global batches.

Why DDP and one process can agree exactly (up to fp32 rounding): each step's global batch is
split into contiguous per-rank shards, so the single process sees the ranks' tokens in rank
order; the loss is a mean over equal shards, so DDP's averaged gradient is the global one; the
cluster EMA uses all-reduced counts/sums/sums of squares, i.e. the global batch statistics;
and the cluster init picks C random indices into the *global* (concatenated) batch on rank 0,
so the single process with rank 0's seed picks the same tokens. Padding masks make one rank
hold no tokens at the init step and another at an update step.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import slim_kernels as sk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests")
sys.path.insert(0, HERE)

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _torchrun(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _torchrun([os.path.join(HERE, "_dist_worker.py"), str(out)])
    ddp = [torch.load(out / f"ddp_rank{r}.pt") for r in range(2)]
    fsdp = [torch.load(out / f"fsdp_rank{r}.pt") for r in range(2)]
    return ddp, fsdp


@pytest.fixture(scope="module")
def single():
    import _dist_worker as w

    return w.run_ddp_case(0, 1, engine="none")


def test_ddp_loss_equals_single_process_on_global_batch(ranks, single):
    ddp, _ = ranks
    torch.testing.assert_close(torch.tensor(ddp[0]["losses"]), torch.tensor(single["losses"]),
                               rtol=1e-5, atol=1e-6)
    for k, v in single["params"].items():
        torch.testing.assert_close(ddp[0]["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for k, v in single["clusters"].items():  # includes the init from the global batch
        if v.is_floating_point():
            torch.testing.assert_close(ddp[0]["clusters"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(ddp[0]["clusters"][k], v), k
    assert all(bool(v) for k, v in single["clusters"].items() if k.endswith("initialized"))


def test_cluster_buffers_bit_identical_across_ranks(ranks):
    ddp, fsdp = ranks
    for res in (ddp[0], ddp[0]["forward_sync"], fsdp[0]):
        assert res["clusters"]
    for a, b in ((ddp[0], ddp[1]), (ddp[0]["forward_sync"], ddp[1]["forward_sync"]),
                 (fsdp[0], fsdp[1])):
        for k in a["clusters"]:
            assert torch.equal(a["clusters"][k], b["clusters"][k]), k
    for k in ddp[0]["params"]:
        assert torch.equal(ddp[0]["params"][k], ddp[1]["params"][k]), k


def test_ddp_resume_loaded_on_rank0_only(ranks):
    """Rank 0 alone loads a checkpoint with initialised clusters; DDP's initial broadcast
    copies the buffers to rank 1 behind the layer's back. Rank 1 must notice (the cached
    'initialised' flag follows the buffer's version): before the fix it took the init path
    while rank 0 took the update path, mismatched collectives and crashed or hung."""
    import _dist_worker as w

    ddp, _ = ranks
    a, b = ddp[0]["resume"], ddp[1]["resume"]
    ref = w.run_ddp_case(0, 1, engine="none", resume_on_rank0=True)
    for k in a["clusters"]:
        assert torch.equal(a["clusters"][k], b["clusters"][k]), k
        if a["clusters"][k].is_floating_point():
            torch.testing.assert_close(a["clusters"][k], ref["clusters"][k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)


def test_clusters_in_sync_helper(ranks):
    ddp, _ = ranks
    for r in range(2):
        assert ddp[r]["in_sync"] == (True, False)  # in sync; then one ulp off on rank 1


def test_non_finite_tokens_on_one_rank_never_reach_the_clusters(ranks):
    """NaN/inf tokens on one rank, a rank with only NaN tokens, an overflowing shard on one
    rank: the ranks stay bit-identical and finite, and match one process fed the global
    batch without the non-finite tokens (the filter changes no collective)."""
    import _dist_worker as w

    ddp, _ = ranks
    a, b = ddp[0]["non_finite"], ddp[1]["non_finite"]
    kept = [x[torch.isfinite(x).all(1)] for x in w.non_finite_global_batches()]
    layer = w.non_finite_layer()
    for step, x in enumerate(kept):
        layer(x)
        sk.step_clusters(layer)
        assert int(layer.clusters.rejected_batches) == (step >= 2), step  # step 2 overflows
        for r, st in ((0, a[step]), (1, b[step])):
            for got, want in zip(st, (layer.clusters.cluster_centers, layer.clusters.cluster_vars,
                                      bool(layer.clusters.cluster_initialized))):
                if isinstance(want, bool):
                    assert got == want, (step, r)
                else:
                    assert torch.isfinite(got).all(), (step, r)
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"{step} {r}")
        assert all(torch.equal(u, v) for u, v in zip(a[step][:2], b[step][:2])), step
    assert a[2][2] and torch.equal(a[2][0], a[1][0]) and torch.equal(a[2][1], a[1][1])  # dropped
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert layer.clusters.check_rejected() == 1
    assert not torch.equal(a[3][0], a[2][0])  # and the next batch moves them again


def test_spread_statistics_identical_across_ranks_and_as_one_process(ranks):
    """distance_scale="spread": the count, sum and sum of squares of r travel in the cluster
    all-reduce (and the init's), so both ranks hold bit-identical means and variances of r,
    equal to one process fed the global batch without its non-finite tokens; the overflowing
    step drops the statistics of r with the clusters."""
    import _dist_worker as w

    ddp, _ = ranks
    a, b = ddp[0]["non_finite_spread"], ddp[1]["non_finite_spread"]
    kept = [x[torch.isfinite(x).all(1)] for x in w.non_finite_global_batches()]
    layer = w.non_finite_layer("spread")
    for step, x in enumerate(kept):
        layer(x)
        sk.step_clusters(layer)
        assert int(layer.clusters.rejected_batches) == (step >= 2), step  # step 2 overflows
        want = w.layer_state(layer)
        for r, st in ((0, a[step]), (1, b[step])):
            assert len(st) == 5 and st[2] == want[2], (step, r)
            for got, ref in zip(st[:2] + st[3:], want[:2] + want[3:]):
                assert torch.isfinite(got).all(), (step, r)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"{step} {r}")
        assert all(torch.equal(u, v) for u, v in zip(a[step][:2] + a[step][3:],
                                                     b[step][:2] + b[step][3:])), step
    assert not torch.equal(a[0][3], torch.tensor(1.0))  # initialised from the first batch
    assert torch.equal(a[2][3], a[1][3]) and torch.equal(a[2][4], a[1][4])  # dropped
    assert not torch.equal(a[3][3], a[2][3])  # and the next batch moves them again


def test_ddp_buffer_sync_on_or_off_changes_nothing(ranks):
    ddp, _ = ranks
    for r in range(2):
        off, on = ddp[r], ddp[r]["forward_sync"]
        assert off["losses"] == on["losses"]
        for k in off["clusters"]:
            assert torch.equal(off["clusters"][k], on["clusters"][k]), k


def test_ddp_gradient_checkpointing_updates_clusters_once(ranks):
    """Checkpointed blocks re-run forward in backward; the re-run must neither update the
    clusters again nor issue collectives: same clusters as without checkpointing."""
    ddp, _ = ranks
    for r in range(2):
        plain, ckpt = ddp[r], ddp[r]["checkpointing"]
        for k in plain["clusters"]:
            assert torch.equal(plain["clusters"][k], ckpt["clusters"][k]), k
        torch.testing.assert_close(torch.tensor(ckpt["losses"]), torch.tensor(plain["losses"]))


def test_fsdp2_bf16_mixed_precision_keeps_clusters_fp32_and_identical(ranks):
    ddp, _ = ranks
    a, b = ddp[0]["fsdp_bf16"], ddp[1]["fsdp_bf16"]
    for k in a["clusters"]:
        assert torch.equal(a["clusters"][k], b["clusters"][k]), k
        if k.endswith(("centers", "vars")):
            assert a["clusters"][k].dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(x["losses"])).all() for x in (a, b))


def test_fsdp2_gathers_base_weight_for_the_op_and_trains(ranks):
    _, fsdp = ranks
    for res in fsdp:
        # outside forward: sharded DTensors (base weight and adapters), buffers plain tensors
        is_dt, local_shape, global_shape, a_is_dt, buf_is_dt = res["outside"]
        assert is_dt and a_is_dt and not buf_is_dt
        assert local_shape[0] * 2 == global_shape[0]
        # inside forward: the unsharded, full base weight as a plain tensor
        tname, inside_dt, inside_shape, a_inside_dt = res["inside"]
        assert not inside_dt and not a_inside_dt and inside_shape == global_shape
        assert res["losses"][-1] < res["losses"][0] - 0.3, res["losses"]
    assert fsdp[0]["losses"] == fsdp[1]["losses"]


def test_fsdp2_saves_and_reloads_adapters(ranks):
    _, fsdp = ranks
    saved = fsdp[0]["sd_saved"]  # the full state dict lands on rank 0 (cpu_offload=True)
    names = {k.rsplit(".", 1)[1] for k in saved}
    assert names == {"lora_A", "lora_B", "router", "cluster_centers", "cluster_vars",
                     "cluster_initialized"}
    assert not any(k.endswith(("weight", "bias")) for k in saved)
    assert all(not hasattr(v, "to_local") and v.device.type == "cpu" for v in saved.values())
    for k, v in saved.items():
        assert torch.equal(v, fsdp[0]["sd_reloaded"][k]), k
    for res in fsdp:  # the reloaded model computes what the trained one did (clusters too)
        assert torch.equal(res["y_before"], res["y_after"])


def _as_model_keys(file):
    """save_slim's file keys (PEFT's: ``base_model.model.<module>.slim_experts.<t>``) as the
    model's state-dict keys (``<module>.slim_experts.default.<t>``)."""
    return {k[len("base_model.model."):].replace(".slim_experts.", ".slim_experts.default.", 1): v
            for k, v in file.items()}


def test_fsdp2_save_slim_gathers_and_load_slim_then_shard(ranks):
    """sk.save_slim on a sharded model: every rank calls it, the DTensors are gathered, rank 0
    writes the full tensors (it used to fail: '.numpy() is not supported for tensor
    subclasses'). load_slim onto a plain base, then fully_shard, reproduces the outputs."""
    _, fsdp = ranks
    file = _as_model_keys(fsdp[0]["save_slim_file"])
    saved = fsdp[0]["sd_saved"]
    assert set(file) == set(saved)
    for k, v in saved.items():
        assert torch.equal(file[k], v), k
    for res in fsdp:
        assert torch.equal(res["y_load_slim"], res["y_before"])


def _check_saved_slim(folder):
    """The recipe's --save folder loads onto a fresh base model with sk.load_slim."""
    import _dist_worker as w
    import slim_kernels as sk

    from slim_kernels.integrations.save_load import adapter_tensor_file

    assert os.path.isfile(adapter_tensor_file(folder)) and (folder / "adapter_config.json").is_file()
    torch.manual_seed(0)
    base = w.recipe.TinyLM(vocab=64)
    sk.load_slim(base, str(folder))
    assert any(bool(m.clusters.cluster_initialized) for _, m in sk.slim_modules(base))


def test_recipe_torchrun_smoke(tmp_path):
    save = tmp_path / "slim"
    log = tmp_path / "log.json"
    _torchrun([os.path.join(ROOT, "python", "train_torchrun.py"), "--engine", "fsdp2",
               "--steps", "3", "--batch-per-rank", "2", "--seq", "8",
               "--save", str(save), "--json", str(log)])
    import json

    out = json.loads(log.read_text())
    assert out["world"] == 2 and len(out["losses"]) == 3 and out["clusters_in_sync"]
    _check_saved_slim(save)


def _has_deepspeed():
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed (pip install deepspeed)")
def test_deepspeed_zero2_zero3_match_single_process(tmp_path, single):
    """DeepSpeed ZeRO-2 and ZeRO-3 (every parameter partitioned; also with the base model
    built under ``deepspeed.zero.Init``, then SLIM swapped in) on 2 CPU ranks (gloo):
    same losses, adapters and clusters as one process on the global batch; clusters
    bit-identical across ranks; under ZeRO-3 the layer's parameters are empty outside forward,
    so the op must have read the gathered base weight."""
    _torchrun([os.path.join(HERE, "_dist_worker.py"), str(tmp_path), "deepspeed"], timeout=500)
    ds = [torch.load(tmp_path / f"ds_rank{r}.pt") for r in range(2)]
    for engine in ("zero2", "zero3", "zero3init"):  # zero3init: base built under zero.Init
        a, b = ds[0][engine], ds[1][engine]
        torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(single["losses"]),
                                   rtol=1e-5, atol=1e-6)
        for k, v in single["params"].items():
            torch.testing.assert_close(a["params"][k], v, rtol=1e-4, atol=1e-5, msg=f"{engine} {k}")
            assert torch.equal(a["params"][k], b["params"][k]), (engine, k)
        for k, v in single["clusters"].items():
            assert torch.equal(a["clusters"][k], b["clusters"][k]), (engine, k)
            if v.is_floating_point():
                torch.testing.assert_close(a["clusters"][k], v, rtol=1e-5, atol=1e-6)
    assert ds[0]["zero3"]["partitioned"] == (0, 0)
    for engine in ("zero3", "zero3init"):  # save_slim gathers the ZeRO-3 partitions
        file = _as_model_keys(ds[0][engine]["save_slim_file"])
        for k, v in ds[0][engine]["params"].items():
            assert torch.equal(file[k], v), (engine, k)
        for k, v in ds[0][engine]["clusters"].items():
            assert torch.equal(file[k], v), (engine, k)
    assert ds[0]["zero3init"]["partitioned"] == (0, 0)


@pytest.mark.slow
@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed (pip install deepspeed)")
def test_recipe_torchrun_deepspeed_zero3_smoke(tmp_path):
    save = tmp_path / "slim"
    _torchrun([os.path.join(ROOT, "python", "train_torchrun.py"), "--engine", "zero3",
               "--steps", "2", "--batch-per-rank", "2", "--seq", "8", "--save", str(save)])
    _check_saved_slim(save)  # gathered, not empty partitions
