"""torch.compile of a training step with SLIM against the same model with PEFT's LoRA: compile
time, graphs and graph breaks.

A tiny Llama (2 blocks, hidden 32, all seven projections adapted), compiled with
``torch.compile(model, backend=...)``; three training steps at sequence length 9, then two at
13 (dynamic shapes: one recompile expected) and one at 17. Reported per arm (``apply_slim``,
SLIM through PEFT, PEFT LoRA rank 128): the wall time of the first step (tracing and
compiling forward and backward), of the first step at the new length, the graphs compiled
and the graph breaks. Each arm runs in its own process, with an empty compile cache.

    python benchmarks/compile_time.py                     # inductor
    python benchmarks/compile_time.py --backend aot_eager

Writes benchmarks/results/compile_time_<backend>.csv (provenance in every row).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ("apply_slim", "peft_slim", "peft_lora")


def run_arm(arm: str, backend: str) -> dict:
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from hf_models import batch
    from test_call_cost import _hf_model

    torch.set_num_threads(1)
    model = _hf_model(arm).train()
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for S in (9, 9, 9, 13, 13, 17):
        ids, am, labels = batch(S=S, pad_last=2)
        t0 = time.perf_counter()
        compiled(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return dict(arm=arm, backend=backend, first_step_s=round(times[0], 2),
                steady_step_s=round(times[2], 4), new_length_step_s=round(times[3], 2),
                graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # (one arm, in-process)
    a = p.parse_args(argv)
    if a.arm:
        print("RESULT " + json.dumps(run_arm(a.arm, a.backend)))
        return
    from slim_kernels.bench.reporting import write_csv
    from slim_kernels.provenance import provenance_string

    rows = []
    for arm in ARMS:
        with tempfile.TemporaryDirectory() as cache:  # no arm reuses another's compiled code
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=cache)
            out = subprocess.run([sys.executable, __file__, "--backend", a.backend, "--arm", arm],
                                 capture_output=True, text=True, check=True, env=env).stdout
        row = json.loads(next(line for line in out.splitlines()
                              if line.startswith("RESULT "))[len("RESULT "):])
        rows.append(row)
        print(row, flush=True)
    lora = next(r for r in rows if r["arm"] == "peft_lora")
    for r in rows:
        r["first_step_ratio_to_lora"] = round(r["first_step_s"] / lora["first_step_s"], 2)
        r["provenance"] = provenance_string()
    path = os.path.join(HERE, "results", f"compile_time_{a.backend}.csv")
    write_csv(rows, path, columns=list(rows[0]))
    print("wrote", path)


if __name__ == "__main__":
    main()
