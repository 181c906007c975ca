"""Recipe: an ordinary PEFT fine-tuning script; LoRA or SLIM is one config line.

    python python/train_peft.py --method slim --tiny
    python python/train_peft.py --method lora --model /path/to/local/llama --steps 200

Everything but the config is what a PEFT LoRA script already does: ``get_peft_model``,
``print_trainable_parameters``, a training loop on ``outputs.loss`` (for SLIM it already holds
the aux loss, docs/method.md §4), ``save_pretrained``. Load it back with
``PeftModel.from_pretrained(base, output_dir)``.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SyntheticLM, build_model, mean_loss, train_steps  # noqa: E402


def parse(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("lora", "slim"), default="slim")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="build a 2-layer Llama from a config")
    src.add_argument("--model", help="local Hugging Face model folder")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-2,
                   help="learning rate (default %(default)s: for the --tiny smoke model; on a real model "
                        "start at 3e-4 with SLIM's defaults, docs/demo.md)")
    p.add_argument("--output_dir", "--output-dir", default="runs/peft")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    from peft import LoraConfig, get_peft_model

    from slim_kernels.peft import SlimPeftConfig

    torch.manual_seed(args.seed)
    model = build_model(args)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # --- the one line that differs ------------------------------------------------------
    if args.method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
    else:
        config = SlimPeftConfig(rank=8, alpha=16, target_modules=targets, task_type="CAUSAL_LM")
    # -------------------------------------------------------------------------------------
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    trainable, _ = model.get_nb_trainable_parameters()

    ds = SyntheticLM(model.config.vocab_size, n=64, seq=16, seed=args.seed)
    first = mean_loss(model, ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    train_steps(model, loader, args.steps, args.lr)
    last = mean_loss(model, ds)
    model.save_pretrained(args.output_dir)
    print(f"{args.method}: loss {first:.4f} -> {last:.4f}; adapter in {args.output_dir}")
    return {"trainable": trainable, "loss_first": first, "loss_last": last}


if __name__ == "__main__":
    main()
