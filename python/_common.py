"""Shared bits of the recipes: a tiny Llama built from a config (offline) or a local model,
and a synthetic next-token dataset. Not part of the library."""
from __future__ import annotations

import argparse

import torch


def parse_recipe_args(doc: str, output_dir: str, argv=None) -> argparse.Namespace:
    """The command line the single-process recipes share."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="build a 2-layer Llama from a config")
    src.add_argument("--model", help="local Hugging Face model folder")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-2,
                   help="learning rate (default %(default)s: for the --tiny smoke model; on a real model "
                        "start at 3e-4 with SLIM's defaults, docs/demo.md)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(args):
    """A causal LM: ``--model PATH`` (a local Hugging Face folder; nothing is downloaded when
    HF_HUB_OFFLINE=1) or, with ``--tiny``, a 2-layer Llama built from a config."""
    import transformers as tf

    if args.model:
        return tf.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    return tf.LlamaForCausalLM(cfg)


class SyntheticLM(torch.utils.data.Dataset):
    """Arithmetic token sequences (start + step * i mod vocab) with some right padding: a task
    a small model learns in a few steps. Items: input_ids, attention_mask, labels."""

    def __init__(self, vocab: int, n: int = 256, seq: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lo = 3
        start = torch.randint(lo, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = lo + (start + step * torch.arange(seq)) % (vocab - lo)
        self.mask = torch.ones_like(self.ids)
        pad = torch.randint(0, seq // 4, (n,), generator=g)
        for i, p in enumerate(pad.tolist()):
            if p:
                self.mask[i, -p:] = 0
                self.ids[i, -p:] = 0
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def train_steps(model, loader, steps: int, lr: float, *, device=None, clip=None,
                progress: bool = False) -> list:
    """The PEFT recipes' training loop: AdamW on the trainable parameters for ``steps`` batches
    of ``loader`` (restarted when it runs out), on ``outputs.loss`` (for SLIM it already holds
    the aux loss). ``clip``: max gradient norm. Returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="train", unit="step")
    losses = []
    it = iter(loader)
    model.train()
    while len(losses) < steps:
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        if device is not None:
            b = {k: v.to(device) for k, v in b.items()}
        loss = model(**b).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return losses


def matched_lora_config(slim, model):
    """The LoRA baseline with SLIM's budget: a ``peft.LoraConfig`` of rank
    ``num_lora_experts * rank`` on the same target modules of ``model`` (SLIM's default for
    its model type when ``slim.target_modules`` is None), with the same scaling of the delta
    (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) and the same dropout as the
    ``SlimPeftConfig`` ``slim``."""
    import math

    from peft import LoraConfig

    from slim_kernels.integrations.peft import default_targets

    r = slim.num_lora_experts * slim.rank
    scale = slim.alpha / (math.sqrt(slim.rank) if slim.use_rslora else slim.rank)
    alpha = scale * (math.sqrt(r) if slim.use_rslora else r)
    targets = slim.target_modules
    if targets is None:
        targets = default_targets(getattr(getattr(model, "config", None), "model_type", None))
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return LoraConfig(r=r, lora_alpha=alpha, use_rslora=slim.use_rslora,
                      lora_dropout=slim.lora_dropout, target_modules=targets,
                      exclude_modules=slim.exclude_modules, task_type="CAUSAL_LM")


def mean_loss(model, ds, n: int = 64) -> float:
    model.eval()
    with torch.no_grad():
        b = {k: torch.stack([ds[i][k] for i in range(min(n, len(ds)))])
             for k in ("input_ids", "attention_mask", "labels")}
        return model(**b).loss.item()


# -- TRL recipes ----------------------------------------------------------------------------
def tiny_tokenizer(vocab: int = 128):
    """A word-level tokenizer over the words ``w3 .. w{vocab-1}`` (built here, no download)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    ids = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                      eos_token="<eos>")


def build_tokenizer(args):
    if args.model:
        import transformers as tf
        tok = tf.AutoTokenizer.from_pretrained(args.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    return tiny_tokenizer()


def words(ids) -> str:
    return " ".join(f"w{int(i)}" for i in ids)


def arithmetic_rows(n: int, seq: int, vocab: int = 128, seed: int = 0):
    """(start, step) arithmetic sequences mod vocab as token-id lists."""
    g = torch.Generator().manual_seed(seed)
    lo = 3
    start = torch.randint(lo, vocab, (n,), generator=g)
    step = torch.randint(1, 4, (n,), generator=g)
    return [(lo + (s + k * torch.arange(seq)) % (vocab - lo)).tolist()
            for s, k in zip(start.tolist(), step.tolist())]


def slim_peft_config(args, **over):
    """A SLIM adapter config for PEFT (``slim_kernels.peft``), as one passes a ``LoraConfig``."""
    from slim_kernels.peft import SlimPeftConfig

    kw = dict(rank=args.rank, alpha=2.0 * args.rank, num_lora_experts=4,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], l1_coef=1e-4,
              balance_coef=1e-3, task_type="CAUSAL_LM")
    kw.update(over)
    return SlimPeftConfig(**kw)


def trl_common(args, over=None) -> dict:
    """The TrainingArguments fields the TRL recipes share (CPU-friendly when --tiny), updated
    with ``over``."""
    return {**dict(output_dir=args.output_dir, max_steps=args.steps,
                per_device_train_batch_size=args.batch_size,
                gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
                report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
                seed=args.seed, use_cpu=not torch.cuda.is_available()), **(over or {})}


def train_and_save(trainer, args) -> dict:
    """Train, then save the SLIM adapter of the PeftModel the TRL trainer built."""
    trainer.train()
    model = trainer.model
    model.save_pretrained(args.output_dir)
    return {"trainer": trainer, "model": model, "path": args.output_dir}
