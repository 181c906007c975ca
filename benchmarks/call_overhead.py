"""What one layer call costs the host around its kernels: a SlimLinear against a PEFT LoRA layer
of rank 128 and a plain nn.Linear, at a shape where the kernels cost almost nothing (K = N = 64,
T = 4), in training mode (docs/method.md §6, "Cost of a call").

Every round times each provider once (in rotating order), `--calls` calls each: forward, and
forward + backward from a fixed dy. Reported: the median microseconds per call over the rounds
and its ratio to PEFT LoRA's in the same run. SLIM runs with its defaults but 4 clusters
(initialised before timing, so the calls are the steady state: statistics collected, no host
sync), routing statistics off, with the cpp backend and with the torch backend.

    python benchmarks/call_overhead.py                      # 1 and 2 threads
    python benchmarks/call_overhead.py --threads 1 --rounds 9

Writes benchmarks/results/call_overhead.csv (provenance in every row).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from torch import nn

import slim_kernels as sk
from slim_kernels.bench.reporting import write_csv
from slim_kernels.provenance import provenance_string

K = N = 64
T = 4
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "call_overhead.csv")


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


def providers():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    out = {"linear": nn.Linear(K, N).train()}
    peft = get_peft_model(_One(), LoraConfig(r=128, lora_alpha=256, target_modules=["proj"]))
    out["peft_lora_r128"] = peft.base_model.model.proj.train()
    for backend in ("cpp", "torch"):
        if backend not in sk.available_backends():
            continue
        layer = sk.SlimLinear.from_linear(nn.Linear(K, N), sk.SlimConfig(
            num_clusters=4, backend=backend)).train()
        layer(torch.randn(64, K))
        sk.step_clusters(layer)  # the clusters exist: the steady state from here on
        assert layer.clusters.ready
        out[f"slim_{backend}"] = layer
    return out


def _calls(layer, mode, x, dy, n):
    if mode == "fwd":
        for _ in range(n):
            layer(x)
    else:
        for _ in range(n):
            layer(x).backward(dy)


def measure(threads: int, rounds: int, calls: int):
    torch.set_num_threads(threads)
    layers = providers()
    x, dy = torch.randn(T, K), torch.randn(T, N)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        times = {name: [] for name in layers}
        names = list(layers)
        for name in names:  # warm-up
            _calls(layers[name], mode, x, dy, calls // 10 + 1)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                _calls(layers[name], mode, x, dy, calls)
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
            for m in layers.values():  # the optimizer step a training loop would make
                for p in m.parameters():
                    p.grad = None
            sk.step_clusters()
        med = {name: statistics.median(v) for name, v in times.items()}
        for name in names:
            rows.append(dict(provider=name, mode=mode, threads=threads,
                             us_per_call=round(med[name], 2),
                             ratio_to_peft_lora=round(med[name] / med["peft_lora_r128"], 3),
                             ratio_to_linear=round(med[name] / med["linear"], 3),
                             rounds=rounds, calls=calls, provenance=provenance_string()))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="torch threads, comma-separated")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=2000, help="calls per provider per round")
    p.add_argument("--csv", default=OUT)
    a = p.parse_args(argv)
    # the timed loops make thousands of training forwards between two steps, on purpose
    warnings.filterwarnings("ignore", message=".*without an optimizer step")
    rows = []
    for t in (int(v) for v in a.threads.split(",")):
        rows += measure(t, a.rounds, a.calls)
    for r in rows:
        print(f"{r['threads']} thr  {r['mode']:8s} {r['provider']:15s} {r['us_per_call']:8.1f} us"
              f"  x{r['ratio_to_peft_lora']:.2f} PEFT LoRA  x{r['ratio_to_linear']:.2f} linear")
    write_csv(rows, a.csv, columns=list(rows[0]))
    print("wrote", a.csv)


if __name__ == "__main__":
    main()
