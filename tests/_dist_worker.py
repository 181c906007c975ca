"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/_dist_worker.py OUT_DIR [deepspeed]

Writes, per rank, ``ddp_rank{r}.pt`` and ``fsdp_rank{r}.pt`` into OUT_DIR; the test process
compares them with each other and with a single-process run (:func:`run_ddp_case` with
``world=1``, which this module also serves).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import train_torchrun as recipe  # noqa: E402
import slim_kernels as sk  # noqa: E402
from slim_kernels import SlimLinear  # noqa: E402
from slim_kernels.integrations.save_load import adapter_tensor_file  # noqa: E402

STEPS, BATCH_PER_RANK, SEQ, VOCAB = 5, 2, 12, 64
OUT_DIR = [""]  # set by main()
WORLD = 2  # the global batch is always WORLD * BATCH_PER_RANK sequences


def step_mask(step: int) -> torch.Tensor:
    """Padding mask of the step's *global* batch (True: real token). Step 0: rank 0's half is
    all padding, so the clusters initialise from rank 1's tokens only (T=0 on rank 0); step 1:
    rank 1's half is all padding (an EMA update with T=0 on rank 1); then random lengths."""
    n = WORLD * BATCH_PER_RANK
    m = torch.ones(n, SEQ, dtype=torch.bool)
    if step == 0:
        m[:BATCH_PER_RANK] = False
    elif step == 1:
        m[BATCH_PER_RANK:] = False
    else:
        g = torch.Generator().manual_seed(99 + step)
        lengths = torch.randint(1, SEQ + 1, (n,), generator=g)
        m = torch.arange(SEQ)[None, :] < lengths[:, None]
    return m


def cluster_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in recipe.unwrap(model).state_dict().items()
            if ".cluster_" in k}


def adapter_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in recipe.unwrap(model).named_parameters() if p.requires_grad}


def deepspeed_config(stage: int) -> Dict[str, object]:
    return {"train_micro_batch_size_per_gpu": BATCH_PER_RANK, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage,
                                  # partition even tiny parameters (default keeps < 1e5 whole)
                                  "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def resume_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A 'checkpoint' with initialised clusters (fixed random centres and variances)."""
    g = torch.Generator().manual_seed(4321)
    sd = model.state_dict()
    for k, v in sd.items():
        if k.endswith("cluster_centers"):
            sd[k] = torch.randn(v.shape, generator=g)
        elif k.endswith("cluster_vars"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("cluster_initialized"):
            sd[k] = torch.ones_like(v)
    return sd


def run_ddp_case(rank: int, world: int, engine: str = "ddp", forward_sync: bool = False,
                 checkpointing: bool = False, resume_on_rank0: bool = False):
    """Train STEPS steps on this rank's shard of the global batches; world=1 is the
    single-process run on the whole global batch (engine='none'). engine: none | ddp |
    zero2 | zero3 (DeepSpeed)."""
    base_context = None
    if engine == "zero3init":  # the base model is partitioned while it is built
        import deepspeed

        base_context = deepspeed.zero.Init(config_dict_or_path=deepspeed_config(3))
    model = recipe.build_model("mlp", seed=0, vocab=VOCAB, base_context=base_context)
    model.gradient_checkpointing = checkpointing
    if resume_on_rank0 and rank == 0:  # only rank 0 loads; DDP's init sync copies it over
        model.load_state_dict(resume_state(model))
    # ranks seeded differently on purpose (rank 0 like the single process): the cluster init
    # draws its tokens on rank 0 and broadcasts them, so the other seeds must not matter
    torch.manual_seed(1000 + rank)
    if engine == "ddp":
        kw = recipe.ddp_no_buffer_sync()
        if forward_sync:
            kw = {k: True for k in kw}
        model = nn.parallel.DistributedDataParallel(model, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ds = None
    if engine.startswith("zero"):
        import deepspeed

        ds, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params,
                                             config=deepspeed_config(int(engine[4])))
    losses = []
    for step in range(STEPS):
        ids = recipe.shard(recipe.global_batch(step, WORLD * BATCH_PER_RANK, SEQ, VOCAB), rank, world)
        mask = recipe.shard(step_mask(step), rank, world)
        loss = recipe.lm_loss(ds or model, ids, attention_mask=mask)  # apply_slim's hook
        losses.append(recipe.optimizer_step(loss, opt, ds, world))
    res = {"losses": losses, "clusters": cluster_buffers(model)}
    if engine in ("zero3", "zero3init"):
        import deepspeed

        layer = next(m for _, m in sk.slim_modules(model))
        res["partitioned"] = (layer.weight.numel(), layer.lora_A.numel())  # 0, 0 outside forward
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            res["params"] = adapter_params(model)
        slim_dir = os.path.join(OUT_DIR[0], f"{engine}_slim")
        sk.save_slim(model, slim_dir)  # every rank: gathers the partitions, rank 0 writes
        dist.barrier()
        if rank == 0:
            from safetensors.torch import load_file

            res["save_slim_file"] = load_file(adapter_tensor_file(slim_dir))
    else:
        res["params"] = adapter_params(model)
    if ds is not None and hasattr(ds, "destroy"):
        ds.destroy()  # as the recipe does: release ZeRO's hooks and group references now
    return res


def run_fsdp_case(rank: int, out: str) -> Dict[str, object]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    res: Dict[str, object] = {}
    model = recipe.build_model("mlp", seed=0, vocab=VOCAB)
    seen = []

    def pre_hook(mod, args):  # runs inside the block's forward, after FSDP2 has gathered
        seen.append((type(mod.weight).__name__, isinstance(mod.weight, DTensor),
                     tuple(mod.weight.shape), isinstance(mod.lora_A, DTensor)))

    for _, m in sk.slim_modules(model):
        m.register_forward_pre_hook(pre_hook)
    recipe.wrap(model, "fsdp2", torch.device("cpu"))
    layer = next(m for _, m in sk.slim_modules(model))
    res["outside"] = (isinstance(layer.weight, DTensor), tuple(layer.weight.to_local().shape),
                      tuple(layer.weight.shape), isinstance(layer.lora_A, DTensor),
                      isinstance(layer.clusters.cluster_centers, DTensor))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for step in range(12):
        ids = recipe.shard(recipe.global_batch(step, WORLD * BATCH_PER_RANK, SEQ, VOCAB), rank, WORLD)
        losses.append(recipe.optimizer_step(recipe.lm_loss(model, ids), opt, world=WORLD))
    res["losses"] = losses
    res["inside"] = seen[0]
    res["clusters"] = cluster_buffers(model)

    # save the full adapters (rank 0 writes), reload them into a fresh sharded model
    sd = recipe.full_adapter_state_dict(model)
    path = os.path.join(out, "fsdp_adapters.pt")
    if rank == 0:
        torch.save(sd, path)
    dist.barrier()
    probe = recipe.global_batch(1000, WORLD * BATCH_PER_RANK, SEQ, VOCAB)[:, :-1]
    model.eval()
    with torch.no_grad():
        res["y_before"] = recipe.logits_of(model, probe).detach().clone()

    fresh = recipe.build_model("mlp", seed=0, vocab=VOCAB)
    torch.manual_seed(7)
    for _, m in sk.slim_modules(fresh):  # different adapters, clusters uninitialised
        m.reset_slim_parameters()
        nn.init.normal_(m.lora_B, std=0.1)
    recipe.wrap(fresh, "fsdp2", torch.device("cpu"))
    recipe.load_adapter_state_dict(fresh, torch.load(path))
    fresh.eval()
    with torch.no_grad():
        res["y_after"] = recipe.logits_of(fresh, probe).detach().clone()
    res["sd_saved"] = sd
    res["sd_reloaded"] = recipe.full_adapter_state_dict(fresh)

    # the library's own format: save_slim on every rank (gathers the DTensors, rank 0
    # writes), load_slim onto a plain base model on every rank, then shard it
    slim_dir = os.path.join(out, "fsdp_slim")
    sk.save_slim(model, slim_dir)
    dist.barrier()
    torch.manual_seed(0)
    base = recipe.TinyLM(vocab=VOCAB)
    sk.load_slim(base, slim_dir)
    recipe.wrap(base, "fsdp2", torch.device("cpu"))
    base.eval()
    with torch.no_grad():
        res["y_load_slim"] = recipe.logits_of(base, probe).detach().clone()
    if rank == 0:
        from safetensors.torch import load_file

        res["save_slim_file"] = load_file(adapter_tensor_file(slim_dir))
    return res


def run_fsdp_bf16_case(rank: int) -> Dict[str, object]:
    """FSDP2 with a bf16 MixedPrecisionPolicy: the op sees bf16 gathered weights, the cluster
    buffers stay fp32 and identical on the ranks."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = recipe.build_model("mlp", seed=0, vocab=VOCAB)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in recipe.blocks_of(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for step in range(6):
        ids = recipe.shard(recipe.global_batch(step, WORLD * BATCH_PER_RANK, SEQ, VOCAB), rank, WORLD)
        loss = recipe.lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "clusters": cluster_buffers(model)}


def clusters_in_sync_checks(rank: int):
    """clusters_in_sync after real training (True), then with one ulp changed on rank 1 (False)."""
    from slim_kernels.integrations.distributed import clusters_in_sync

    model = recipe.build_model("mlp", seed=0, vocab=VOCAB)
    for step in range(2):
        recipe.lm_loss(model, recipe.shard(recipe.global_batch(step, WORLD * BATCH_PER_RANK, SEQ, VOCAB), rank, WORLD))
    ok = clusters_in_sync(model)
    layer = next(m for _, m in sk.slim_modules(model))
    if rank == 1:
        c = layer.clusters.cluster_centers
        c[0, 0] = torch.nextafter(c[0, 0], c[0, 0] + 1)
    return ok, clusters_in_sync(model)


def non_finite_global_batches():
    """Per step the global batch (WORLD * 16 tokens of 6 channels) and which tokens a rank
    feeds as they are (docs/method.md §2, "Non-finite tokens"): step 0 (the init) has NaN
    tokens on rank 1; step 1 an inf token on rank 0 and only NaN tokens on rank 1; step 2 finite
    tokens on rank 0 whose variance overflows fp32 (the whole update is dropped on every rank)."""
    g = torch.Generator().manual_seed(7)
    out = []
    for step in range(4):
        x = torch.randn(WORLD * 16, 6, generator=g)
        if step == 0:
            x[16 + 3, 2] = x[16 + 9, 0] = float("nan")
        elif step == 1:
            x[5, 1] = float("inf")
            x[16:] = float("nan")
        elif step == 2:
            x[:16] *= 1e30
        out.append(x)
    return out


def non_finite_layer(distance_scale: str = "none") -> SlimLinear:
    torch.manual_seed(0)
    return SlimLinear(6, 4, config=sk.SlimConfig(num_lora_experts=2, rank=2, num_clusters=3,
                                                 cluster_momentum=0.5, backend="torch",
                                                 distance_scale=distance_scale)).train()


def layer_state(layer: SlimLinear):
    """(centres, variances, initialised[, mean of r, variance of r]) of one layer."""
    st = (layer.clusters.cluster_centers.clone(), layer.clusters.cluster_vars.clone(),
          bool(layer.clusters.cluster_initialized))
    if layer.config.distance_scale == "spread":
        st += (layer.clusters.distance_mean.clone(), layer.clusters.distance_var.clone())
    return st


def non_finite_case(rank: int, world: int, distance_scale: str = "none"):
    """The clusters of one SlimLinear after each step, each rank feeding its shard."""
    layer = non_finite_layer(distance_scale)
    states = []
    for x in non_finite_global_batches():
        n = x.shape[0] // world
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer(x[rank * n:(rank + 1) * n])
            sk.step_clusters(layer)  # (the all-reduce)
        states.append(layer_state(layer))
    return states


def main() -> None:
    out = OUT_DIR[0] = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == WORLD, world
    if sys.argv[2:] == ["deepspeed"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # reuses the group above
        res = {e: run_ddp_case(rank, world, engine=e) for e in ("zero2", "zero3", "zero3init")}
        torch.save(res, os.path.join(out, f"ds_rank{rank}.pt"))
        recipe.shutdown(deepspeed_used=True)
        return
    res = run_ddp_case(rank, world)
    res["in_sync"] = clusters_in_sync_checks(rank)
    res["non_finite"] = non_finite_case(rank, world)
    res["non_finite_spread"] = non_finite_case(rank, world, "spread")
    res["forward_sync"] = run_ddp_case(rank, world, forward_sync=True)
    res["checkpointing"] = run_ddp_case(rank, world, checkpointing=True)
    res["resume"] = run_ddp_case(rank, world, resume_on_rank0=True)
    res["fsdp_bf16"] = run_fsdp_bf16_case(rank)
    torch.save(res, os.path.join(out, f"ddp_rank{rank}.pt"))
    torch.save(run_fsdp_case(rank, out), os.path.join(out, f"fsdp_rank{rank}.pt"))
    recipe.shutdown(deepspeed_used=False)


if __name__ == "__main__":
    main()
