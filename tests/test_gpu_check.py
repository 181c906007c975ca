"""The device check (benchmarks/gpu_check.py) on CPU. Its first GPU run must not die of a Python
error, so every section runs here in the dry mode (the Triton interpreter, tiny shapes): each
section reports, none raises or is skipped, every correctness check passes (the timing targets
are meaningless on a CPU and not asserted), the files are written and the last line is the
VERDICT. The plan mode runs the real run's launches on meta tensors and counts the distinct
Triton compiles a cold run makes: they must fit the run's 5 minutes."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "smoke", "grads", "ratio", "kernel", "decode", "big", "fp32", "compile")


def _run(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("SLIM_KERNELS_DB", "SLIM_KERNELS_AUTOTUNE", "SLIM_KERNELS_DESIGN",
              "SLIM_KERNELS_CONFIG_DIR", "TRITON_INTERPRET"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args,
                        "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_gpu_check_dry_run(tmp_path):
    r = _run(tmp_path, "--dry", "--budget", "3000")
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"VERDICT correctness=PASS fwd=[0-9.]+/1\.10 fwd\+bwd=[0-9.]+/1\.16 "
                        r"best=slim_triton\w*", last), last
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    bad = [row for row in rows if row["status"] in ("ERROR", "SKIP")]
    assert not bad, bad
    assert {row["section"] for row in rows} >= set(SECTIONS) - {"env"}
    correctness = [row for row in rows if row["kind"] == "correctness"]
    assert correctness and all(row["status"] == "PASS" for row in correctness), [
        row for row in correctness if row["status"] != "PASS"]
    names = {(row["section"], row["name"]) for row in rows}
    for design in ("fused", "accumulate", "extended"):
        for variant in ("bf16 plain+dgates", "bf16 x_lora+strided", "fp16 plain+dgates",
                        "fp32 plain+dgates"):
            for k in ("y", "dx", "dA", "dB", "dR", "cluster stats"):
                assert ("smoke", f"{design} {variant} {k}") in names, (design, variant, k)
        assert ("smoke", f"{design} bf16 x_lora+strided dx_lora") in names
        assert ("grads", f"{design} bf16 T=32,32x32 dB") in names
    assert ("smoke", "ema kernel vs torch: centers") in names
    shapes = ("T=32,32x32", "T=32,32x48", "T=32,48x32")
    providers = ("slim_triton", "slim_triton_fused", "slim_triton_accumulate",
                 "slim_triton_extended")
    for s in shapes:
        for mode in ("forward", "forward+backward"):
            for p in providers:  # the ratio of every design, and how each was timed
                assert ("ratio", f"{s} {mode} {p} / base") in names, (s, mode, p)
                assert ("ratio", f"{s} {mode} {p} back-to-back ms/call") in names
            for p in ("slim_torch", "peft_lora", "eager_loop"):
                assert ("ratio", f"{s} {mode} {p} / base") in names, (s, mode, p)
        assert ("kernel", f"{s} cublas y = [x|hg][W|B]^T + b ms") in names
        assert ("kernel", f"{s} cluster stats: two runs differ (bits)") in names
    assert ("ratio", f"{shapes[0]} forward slim_triton peak MB") in names
    for T in (1, 16):
        assert ("decode", f"fused bf16 T={T} dB") in names
    assert ("big", "dB = dy^T hg error vs fp32") in names
    assert ("fp32", "accumulate fp32 T=32,32x32 dx") in names
    assert ("compile", "compiled vs eager dx") in names
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["verdict"] == last
    assert set(summary["sections"]) == set(SECTIONS)
    assert (tmp_path / "env.json").is_file()


def test_gpu_check_plan_fits_five_minutes(tmp_path):
    """The cold compile count of the real run (its launches on meta tensors, as on an H200):
    every kernel the run launches is compiled at least once, and the estimate of the compile
    time leaves the run's other work (~100 s: imports, the timed calls, the child process,
    torch.compile) inside the 280 s budget."""
    r = _run(tmp_path, "--plan")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert f"PLAN compiles={plan['compiles']}" in r.stdout
    assert set(plan["per_kernel"]) >= {"route_fwd_kernel", "route_epilogue_kernel",
                                       "route_bwd_kernel", "fused_linear_kernel",
                                       "cluster_stats_kernel", "cluster_ema_kernel"}
    assert plan["compiles"] <= 80, plan["per_kernel"]
    assert plan["compile_seconds_estimate"] + 100 <= plan["budget"], plan
