"""Recipe: SLIM in a transformers.Trainer run.

    python python/train_hf_trainer.py --tiny                 # 2-layer Llama from a config, offline
    python python/train_hf_trainer.py --model /path/to/local/llama --steps 200

What it shows: apply_slim on a causal LM, an unchanged Trainer (the SLIM aux loss reaches
outputs.loss through a hook; padding tokens do not move the clusters), save_slim, then
load_slim onto a fresh base model (bit-exact), and disable_slim for a before/after number.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SyntheticLM, build_model, mean_loss, parse_recipe_args  # noqa: E402

import slim_kernels as sk  # noqa: E402


def parse(argv=None):
    return parse_recipe_args(__doc__, "runs/slim_hf_trainer", argv)


def main(argv=None) -> dict:
    import transformers as tf

    args = parse(argv)
    model = build_model(args)
    ds = SyntheticLM(model.config.vocab_size, n=128, seq=24, seed=args.seed)

    config = sk.SlimConfig(num_lora_experts=4, num_identity_experts=2, rank=args.rank, alpha=2.0 * args.rank,
                           l1_coef=1e-4, balance_coef=1e-3)
    sk.apply_slim(model, config)  # prints: layers swapped, trainable share
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = mean_loss(model, ds)

    targs = tf.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, logging_steps=max(1, args.steps // 5),
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=args.seed,
        disable_tqdm=True,
    )
    tf.Trainer(model=model, args=targs, train_dataset=ds).train()
    after = mean_loss(model, ds)
    with sk.disable_slim(model):
        base = mean_loss(model, ds)
    print(f"loss: base model {base:.4f} | SLIM before training {before:.4f} | after {after:.4f}")

    path = os.path.join(args.output_dir, "slim_adapter")
    sk.save_slim(model, path)
    fresh = build_model(args)  # same base weights (same seed / same local folder)
    sk.load_slim(fresh, path)
    reloaded = mean_loss(fresh, ds)
    print(f"saved to {path}; reloaded loss {reloaded:.4f} (exact: {reloaded == after})")
    stats = sk.routing_stats(model)
    first = next(iter(stats))
    print(f"routing of {first}: {stats[first]}")
    return dict(base=base, before=before, after=after, reloaded=reloaded, path=path)


if __name__ == "__main__":
    main()
