"""Train a model with SLIM layers on many processes: torchrun + DDP, FSDP2 or DeepSpeed ZeRO.

    torchrun --nproc_per_node 2 python/train_torchrun.py --engine ddp   --steps 20
    torchrun --nproc_per_node 2 python/train_torchrun.py --engine fsdp2 --steps 20 --save out/slim
    torchrun --nproc_per_node 2 python/train_torchrun.py --engine zero3 --steps 20   # pip install deepspeed

On CPU it uses the gloo backend, on GPUs nccl (one process per GPU). The model is a small
causal LM built from blocks (``--model mlp``: our own residual MLP blocks; ``--model llama``:
a tiny transformers LlamaForCausalLM from a config) whose projections are swapped for
SlimLinear. Nothing is downloaded: the data are random tokens from a seeded generator.

What SLIM needs from a data-parallel engine (docs/method.md §2): nothing. Each SlimLinear
all-reduces its cluster statistics (counts, sums, sums of squares) over the default process
group inside its training forward, so every rank holds bit-identical clusters; the adapters
(``lora_A``, ``lora_B``, ``router``) are ordinary parameters that the engine synchronises.
DDP's per-forward buffer broadcast is therefore not needed (off here, which saves one
broadcast per step; on also works and changes nothing). At the end the recipe checks that
the clusters are bit-identical on all ranks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

import slim_kernels as sk
from slim_kernels import SlimConfig, SlimLinear
from slim_kernels.clusters import CLUSTER_KEYS, DISTANCE_KEYS
from slim_kernels.integrations.distributed import clusters_in_sync


# ----------------------------------------------------------------------------- the model
class Block(nn.Module):
    """A pre-norm residual MLP block: the unit that FSDP2 shards (``fully_shard`` per block)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up_proj = nn.Linear(d, hidden)
        self.down_proj = nn.Linear(hidden, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down_proj(F.gelu(self.up_proj(self.norm(h))))


class TinyLM(nn.Module):
    """Embedding -> ``layers`` Blocks -> norm -> LM head. ``.layers`` like HF decoders."""

    def __init__(self, vocab: int = 64, d: int = 32, hidden: int = 48, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.gradient_checkpointing = False  # re-run each block in backward (like HF)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # attention_mask (batch, seq), 1 = real token: no attention here, but apply_slim's
        # hook hands it to the SLIM layers so that padding does not move their clusters
        h = self.embed(input_ids)
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return self.lm_head(self.norm(h))


def tiny_llama(vocab: int = 64, d: int = 32, hidden: int = 48, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def add_slim(model: nn.Module, config: SlimConfig) -> nn.Module:
    """Swap the projections named in ``config.target_modules`` for SlimLinear, freeze the rest
    (quietly: every rank runs this)."""
    return sk.apply_slim(model, config, verbose=False)


def build_model(kind: str = "mlp", seed: int = 0, slim: Optional[SlimConfig] = None,
                base_context=None, backend: str = "torch", **sizes) -> nn.Module:
    """The same model on every rank: seeded construction (DDP broadcasts rank 0's anyway).
    ``base_context`` wraps the construction of the base model only (e.g.
    ``deepspeed.zero.Init(...)``, which partitions it as it is built); SLIM is added after."""
    torch.manual_seed(seed)
    with base_context if base_context is not None else contextlib.nullcontext():
        model = TinyLM(**sizes) if kind == "mlp" else tiny_llama(**sizes)
    if slim is None:
        targets = ("up_proj", "down_proj") if kind == "mlp" else None  # (None: all seven)
        slim = SlimConfig(num_lora_experts=4, num_identity_experts=1, rank=4, alpha=8.0,
                          top_k=2, num_clusters=3, cluster_momentum=0.1, backend=backend,
                          target_modules=targets)
    return add_slim(model, slim)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``fully_shard`` units): ``model.layers`` or HF's ``model.model.layers``."""
    inner = getattr(model, "model", model)
    return inner.layers


def logits_of(model: nn.Module, input_ids: torch.Tensor,
              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = model(input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


# ------------------------------------------------------------------------------ the data
def global_batch(step: int, global_bs: int, seq: int, vocab: int, seed: int = 1234) -> torch.Tensor:
    """The step's global batch of token ids (global_bs, seq+1), the same on every rank."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    # a learnable pattern: runs of (t, t+1, t+2, ...) from random starts
    start = torch.randint(0, vocab, (global_bs, 1), generator=g)
    return (start + torch.arange(seq + 1)) % vocab


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the global batch (rank 0 first): a single process
    that takes the whole global batch sees the ranks' tokens in rank order."""
    n = batch.shape[0] // world
    return batch[rank * n: (rank + 1) * n]


def lm_loss(model: nn.Module, ids: torch.Tensor,
            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token loss over all positions; ``attention_mask`` marks the real input tokens."""
    logits = logits_of(model, ids[:, :-1], attention_mask)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


# ------------------------------------------------------------------- adapters save/load
def is_adapter_key(model: nn.Module, key: str) -> bool:
    """SLIM state: a SlimLinear's lora_A / lora_B / router and its clusters' buffers
    (``clusters.cluster_centers``, ...), not the frozen base."""
    mod, _, leaf = key.rpartition(".")
    if leaf in ("lora_A", "lora_B", "router"):
        return isinstance(model.get_submodule(mod), SlimLinear)
    owner, _, part = mod.rpartition(".")
    return part == "clusters" and leaf in CLUSTER_KEYS + DISTANCE_KEYS \
        and isinstance(model.get_submodule(owner), SlimLinear)


def full_adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The SLIM adapters as full (unsharded) CPU tensors through torch.distributed.checkpoint
    (an alternative to ``sk.save_slim`` when you keep torch/DCP checkpoints); works for plain,
    DDP and FSDP2 models (collective: call it on every rank; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if is_adapter_key(unwrap(model), k)}


def load_adapter_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Load full adapter tensors (e.g. from :func:`full_adapter_state_dict`) into a plain,
    DDP or FSDP2 model; every rank passes the same dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------ training
def ddp_no_buffer_sync() -> Dict[str, bool]:
    """DDP kwargs that skip the per-forward buffer broadcast: SlimLinear all-reduces its own
    cluster statistics, so rank 0's buffers need not be copied every step. torch >= 2.13
    names it ``forward_sync_buffers`` (``broadcast_buffers`` is deprecated there)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def wrap(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            **ddp_no_buffer_sync())
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in blocks_of(model):
            fully_shard(block)
        fully_shard(model)
        return model
    if engine == "none":
        return model
    raise ValueError(f"--engine {engine!r}: expected ddp, fsdp2, zero2, zero3 or none")


def optimizer_step(loss: torch.Tensor, opt, ds=None, world: int = 1) -> float:
    """Backward and one optimizer step (through the DeepSpeed engine ``ds`` when given);
    returns the loss averaged over the ranks."""
    if ds is not None:
        ds.backward(loss)
        ds.step()
    else:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    g = loss.detach().clone()
    if world > 1:
        dist.all_reduce(g)
    return g.item() / world


def deepspeed_engine(model: nn.Module, stage: int, lr: float, batch_per_rank: int):
    """DeepSpeed ZeRO-``stage`` around ``model`` with a torch AdamW (no compiled DeepSpeed ops
    needed). On CPU set DS_ACCELERATOR=cpu (this recipe does) and use the gloo backend."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    cfg = {"train_micro_batch_size_per_gpu": batch_per_rank, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=lr),
                                           model_parameters=params, config=cfg)
    return engine


def train(engine: str = "ddp", model_kind: str = "mlp", steps: int = 10, batch_per_rank: int = 4,
          seq: int = 16, lr: float = 1e-2, seed: int = 0, vocab: int = 64,
          save: Optional[str] = None, log: bool = True, backend: str = "auto") -> Dict[str, object]:
    """Train; returns the global loss per step and (rank 0) the path of the saved adapters.
    Works without torchrun too (one process, ``engine='none'``)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(model_kind, seed=seed, vocab=vocab, backend=backend).to(device)
    ds = opt = None
    if engine in ("zero2", "zero3"):
        ds = deepspeed_engine(model, int(engine[-1]), lr, batch_per_rank)
    else:
        model = wrap(model, engine, device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    t0 = time.time()
    for step in range(steps):
        ids = shard(global_batch(step, batch_per_rank * world, seq, vocab), rank, world).to(device)
        loss = lm_loss(ds or model, ids) + sk.aux_loss(unwrap(model))
        losses.append(optimizer_step(loss, opt, ds, world))
        if log and rank == 0:
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    out: Dict[str, object] = {"losses": losses, "seconds": time.time() - t0, "world": world}
    # every rank must hold bit-identical clusters (the layers all-reduce their statistics)
    out["clusters_in_sync"] = clusters_in_sync(model)
    if log and rank == 0:
        print(f"clusters bit-identical on all {world} ranks: {out['clusters_in_sync']}", flush=True)
    if save:
        # every rank calls it: FSDP2 / ZeRO-3 shards are gathered, global rank 0 writes
        sk.save_slim(model, save)
        if rank == 0:
            print(f"saved the SLIM adapters to {save}/ (load with slim_kernels.load_slim)", flush=True)
        out["saved"] = save
    if ds is not None and hasattr(ds, "destroy"):
        # release ZeRO's hooks, partitioned buffers and its references to the process groups
        # now, not in whatever order the interpreter tears objects down at exit
        ds.destroy()
    return out


def shutdown(deepspeed_used: bool, ok: bool = True) -> None:
    """Tear the process groups down in order. Every rank first finishes its collectives (the
    barrier; skipped after an error, where a peer may never reach it). Then the groups are
    destroyed while the process is still whole: ``deepspeed.comm.destroy_process_group`` also
    drops DeepSpeed's own references to them, so no ProcessGroup is left for interpreter
    shutdown (CI once saw a native abort, "terminate called without an active exception",
    after a ZeRO-3 run had trained, checked and saved)."""
    import gc

    gc.collect()
    if ok:
        dist.barrier()
    if deepspeed_used:
        import deepspeed.comm as ds_comm

        if hasattr(ds_comm, "destroy_process_group"):
            ds_comm.destroy_process_group()
            return
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=("ddp", "fsdp2", "zero2", "zero3", "none"), default="ddp",
                    help="zero2/zero3: DeepSpeed ZeRO (pip install deepspeed)")
    ap.add_argument("--model", choices=("mlp", "llama"), default="mlp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-per-rank", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2,
                    help="learning rate (default %(default)s: for the built-in toy models; on a real model "
                         "start at 3e-4 with SLIM's defaults, docs/demo.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="SLIM op backend: auto | triton | cuda | cpp | torch")
    ap.add_argument("--save", default=None, help="folder for slim_kernels.save_slim (rank 0 writes)")
    ap.add_argument("--json", default=None, help="rank 0 writes the loss history here")
    args = ap.parse_args(argv)

    distributed = "RANK" in os.environ and args.engine != "none"
    if args.engine.startswith("zero") and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    ok = False
    try:
        out = train(args.engine, args.model, args.steps, args.batch_per_rank, args.seq,
                    args.lr, args.seed, save=args.save, backend=args.backend)
        if args.json and (not distributed or dist.get_rank() == 0):
            with open(args.json, "w") as f:
                json.dump(out, f)
        ok = True
    finally:
        if distributed and dist.is_initialized():
            shutdown(args.engine.startswith("zero"), ok)


if __name__ == "__main__":
    main()
