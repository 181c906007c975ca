"""Recipe: SLIM with TRL's DPOTrainer, through PEFT (``slim_kernels.peft``).

    python python/train_trl_dpo.py --tiny
    python python/train_trl_dpo.py --model /path/to/local/llama --steps 200

No second model: given ``peft_config`` (and ``ref_model=None``) DPOTrainer computes the reference
log-probabilities with the adapter disabled (``disable_adapter()``, the base model exactly).
``sk.with_slim_aux`` adds the SLIM aux loss (docs/method.md §4) of the policy forwards.
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


def preference_rows(n: int, seed: int):
    """Prompt: the start of an arithmetic sequence; chosen: its continuation; rejected: the
    continuation reversed."""
    rows = []
    for r in arithmetic_rows(n, 10, seed=seed):
        rows.append({"prompt": words(r[:6]), "chosen": words(r[6:]),
                     "rejected": words(r[6:][::-1])})
    return rows


def main(argv=None, *, callbacks=None, config_over=None, **peft_over) -> dict:
    import datasets
    import torch
    import trl

    args = parse_recipe_args(__doc__, "runs/slim_trl_dpo", argv)
    torch.manual_seed(args.seed)
    trainer = sk.with_slim_aux(trl.DPOTrainer)(
        model=build_model(args), ref_model=None,
        peft_config=slim_peft_config(args, **peft_over),
        args=trl.DPOConfig(max_length=16, **trl_common(args, config_over)),
        train_dataset=datasets.Dataset.from_list(preference_rows(32, args.seed)),
        processing_class=build_tokenizer(args),
        callbacks=callbacks)
    return train_and_save(trainer, args)


if __name__ == "__main__":
    main()
