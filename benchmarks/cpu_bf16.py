"""Training step time on the CPU in bf16 against fp32: SLIM (cpp and torch backends) and PEFT
LoRA of rank 128, on a small Llama (2 blocks, hidden 128, MLP 256, all seven projections),
B = 4 sequences of 64 tokens, AdamW, 1 thread.

Three precisions per arm: fp32; bf16 autocast (``torch.autocast("cpu", torch.bfloat16)``
around the forward, fp32 weights); bf16 weights (``model.to(torch.bfloat16)``). Reported:
the median step time over 5 steps after a warm-up step, and its ratio to the same arm in
fp32. The cpp backend computes in fp32 internally (bf16 blocks are converted after loading),
so bf16 saves it no arithmetic on a CPU without bf16 units.

    python benchmarks/cpu_bf16.py

Writes benchmarks/results/cpu_bf16.csv (provenance in every row).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch

import slim_kernels as sk
from slim_kernels.bench.reporting import write_csv
from slim_kernels.provenance import provenance_string

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the tiny HF models of the tests
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(arm: str, dtype):
    from hf_models import tiny_model

    torch.manual_seed(0)
    m = tiny_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    m = m.to(dtype)
    if arm.startswith("slim"):
        sk.apply_slim(m, sk.SlimConfig(backend=arm.split("_")[1],
                                       target_modules=tuple(TARGETS)), verbose=False)
    else:
        from peft import LoraConfig, get_peft_model
        m = get_peft_model(m, LoraConfig(r=128, lora_alpha=256, target_modules=TARGETS))
    return m.train()


def step_time(arm: str, precision: str, steps: int = 5) -> float:
    from hf_models import batch

    m = build(arm, torch.bfloat16 if precision == "bf16 weights" else torch.float32)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    ids, am, labels = batch(B=4, S=64, pad_last=0)
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16 autocast"
           else contextlib.nullcontext())
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with amp:
            loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    torch.set_num_threads(1)
    arms = [a for a in ("peft_lora_r128", "slim_cpp", "slim_torch")
            if not a.startswith("slim") or a.split("_")[1] in sk.available_backends()]
    rows = []
    for arm in arms:
        base = None
        for precision in ("fp32", "bf16 autocast", "bf16 weights"):
            t = step_time(arm, precision)
            base = base or t
            rows.append(dict(arm=arm, precision=precision, ms_per_step=round(t * 1e3, 1),
                             ratio_to_fp32=round(t / base, 2), provenance=provenance_string()))
            print(f"{arm:15s} {precision:14s} {t * 1e3:7.1f} ms  x{t / base:.2f} fp32", flush=True)
    path = os.path.join(HERE, "results", "cpu_bf16.csv")
    write_csv(rows, path, columns=list(rows[0]))
    print("wrote", path)


if __name__ == "__main__":
    main()
