"""Recipe: SLIM in a plain PyTorch training loop.

    python python/train_plain_loop.py --tiny
    python python/train_plain_loop.py --model /path/to/local/llama --steps 200

The loop is an ordinary one: ``loss = model(**batch).loss``; the SLIM aux loss is already in
it (apply_slim installed a hook; ``add_aux_to_loss=False`` turns that off and you add
``sk.aux_loss(model)`` yourself). ``sk.aux_loss(model)`` also gives it for logging.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SyntheticLM, build_model, mean_loss, parse_recipe_args  # noqa: E402

import slim_kernels as sk  # noqa: E402


def parse(argv=None):
    return parse_recipe_args(__doc__, "runs/slim_plain_loop", argv)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    model = build_model(args)
    ds = SyntheticLM(model.config.vocab_size, n=128, seq=24, seed=args.seed)
    sk.apply_slim(model, sk.SlimConfig(num_lora_experts=4, rank=args.rank, alpha=2.0 * args.rank,
                                       l1_coef=1e-4, balance_coef=1e-3))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    before = mean_loss(model, ds)

    params = [p for p in model.parameters() if p.requires_grad]  # SLIM parameters only
    opt = torch.optim.AdamW(params, lr=args.lr)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    it = iter(loader)
    model.train()
    for step in range(args.steps):
        for _ in range(args.grad_accum):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            out = model(**batch)  # outputs.loss = task loss + SLIM aux loss
            (out.loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {out.loss.item():.4f}  slim aux {sk.aux_loss(model).item():.5f}")
    after = mean_loss(model, ds)
    with sk.disable_slim(model):
        base = mean_loss(model, ds)
    print(f"loss: base model {base:.4f} | SLIM before training {before:.4f} | after {after:.4f}")
    path = os.path.join(args.output_dir, "slim_adapter")
    sk.save_slim(model, path)
    print(f"saved to {path}")
    return dict(base=base, before=before, after=after, path=path)


if __name__ == "__main__":
    main()
