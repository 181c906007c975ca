"""Recipe: SLIM with TRL's GRPOTrainer, through PEFT (``slim_kernels.peft``).

    python python/train_trl_grpo.py --tiny
    python python/train_trl_grpo.py --model /path/to/local/llama --steps 200

The reward is a toy one (how often the completion continues the prompt's arithmetic
sequence); with ``beta > 0`` the KL reference is the model with its adapter disabled
(``disable_adapter()``): no second model. ``sk.with_slim_aux`` adds the SLIM aux loss
(docs/method.md §4) of every forward of the loss.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    arithmetic_rows, build_model, build_tokenizer, parse_recipe_args, slim_peft_config,
    train_and_save, trl_common, words,
)

import slim_kernels as sk  # noqa: E402


def continues_sequence(prompts, completions, **kwargs):
    """Share of completion words that continue the prompt's arithmetic sequence."""
    out = []
    for p, c in zip(prompts, completions):
        ids = [int(w[1:]) for w in p.split() if w[1:].isdigit()]
        got = [int(w[1:]) for w in c.split() if w.startswith("w") and w[1:].isdigit()]
        step, last, ok = ids[-1] - ids[-2], ids[-1], 0
        for g in got:
            ok += g == last + step
            last = g
        out.append(ok / max(1, len(got)))
    return out


def main(argv=None, *, beta: float = 0.04, callbacks=None, config_over=None,
         **peft_over) -> dict:
    import datasets
    import torch
    import trl

    args = parse_recipe_args(__doc__, "runs/slim_trl_grpo", argv)
    torch.manual_seed(args.seed)
    rows = [{"prompt": words(r)} for r in arithmetic_rows(16, 5, seed=args.seed)]
    cfg = trl.GRPOConfig(num_generations=2, max_completion_length=4, beta=beta,
                         **trl_common(args, config_over))
    trainer = sk.with_slim_aux(trl.GRPOTrainer)(
        model=build_model(args), peft_config=slim_peft_config(args, **peft_over),
        reward_funcs=continues_sequence, args=cfg,
        train_dataset=datasets.Dataset.from_list(rows), processing_class=build_tokenizer(args),
        callbacks=callbacks)
    return train_and_save(trainer, args)


if __name__ == "__main__":
    main()
