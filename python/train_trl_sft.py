"""Recipe: SLIM with TRL's SFTTrainer, through PEFT (``slim_kernels.peft``).

    python python/train_trl_sft.py --tiny
    python python/train_trl_sft.py --model /path/to/local/llama --steps 200

``sk.with_slim_aux(trl.SFTTrainer)`` adds the SLIM aux loss (docs/method.md §4) to the loss
SFTTrainer computes itself (its fused LM head never reads ``outputs.loss``), once per optimizer
step under gradient accumulation, and logs it as ``slim_aux_loss``.
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


def main(argv=None, *, callbacks=None, config_over=None, **peft_over) -> dict:
    import datasets
    import torch
    import trl

    args = parse_recipe_args(__doc__, "runs/slim_trl_sft", argv)
    torch.manual_seed(args.seed)
    rows = [{"text": words(r)} for r in arithmetic_rows(64, 12, seed=args.seed)]
    trainer = sk.with_slim_aux(trl.SFTTrainer)(
        model=build_model(args), peft_config=slim_peft_config(args, **peft_over),
        args=trl.SFTConfig(max_length=16, **trl_common(args, config_over)),
        train_dataset=datasets.Dataset.from_list(rows), processing_class=build_tokenizer(args),
        callbacks=callbacks)
    return train_and_save(trainer, args)


if __name__ == "__main__":
    main()
