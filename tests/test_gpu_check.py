"""The device check (benchmarks/gpu_check.py) end to end in its dry mode: CPU, the Triton
interpreter, tiny shapes. Its first GPU run must not die of a Python error, so every section
runs here: each check reports, none raises or is skipped, and the correctness checks pass
(the timing targets are meaningless on a CPU and not asserted)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SLIM_KERNELS_DB", None)
    env.pop("SLIM_KERNELS_AUTOTUNE", None)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry",
                        "--out", str(tmp_path), "--budget", "3000"],
                       capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUMMARY" in r.stdout
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    bad = [row for row in rows if row["status"] in ("ERROR", "SKIP")]
    assert not bad, bad
    names = {(row["section"], row["name"]): row["status"] for row in rows}
    shapes = ("T=64,48x48", "T=64,48x80", "T=64,80x48")
    for s in shapes:
        for dt in ("bf16", "fp32"):
            for k in ("y", "dx", "dA", "dB", "dRouter"):
                assert names[("grads", f"{dt} {s} {k}")] == "PASS", (dt, s, k)
        assert ("linear", f"{s} triton / cublas") in names
        for mode in ("forward", "forward+backward"):
            assert (("ratio", f"{s} {mode} slim_triton / base") in names)
            assert (("ratio", f"{s} {mode} eager_loop / slim_triton") in names)
        assert names[("kernel", f"{s} dB partials: two runs differ (max abs)")] == "PASS"
        assert names[("kernel", f"{s} dB atomics error")] == "PASS"
        assert names[("kernel", f"{s} cluster stats: two runs differ (bits)")] == "PASS"
        assert names[("kernel", f"{s} cluster stats error (tf32x3 one-hot dots)")] == "PASS"
    assert ("ratio", f"{shapes[0]} forward+backward compiled_dense / slim_triton") in names
    for T in (1, 4):
        assert names[("decode", f"bf16 T={T},48x48 dB")] == "PASS"
    assert names[("wgrad_2g", "dB = dy^T hg error vs fp32")] == "PASS"
    for f in ("env.json", "tuned_configs.json"):
        assert (tmp_path / f).is_file(), f
