"""Write benchmarks/triton_resources.csv: registers, spills and shared memory of every SLIM
Triton kernel at every block configuration the launchers use on a GPU, for sm_80 and sm_90,
compiled ahead of time (no GPU needed; ptxas report + compiled metadata), the count of
int32 index x stride pointer offsets in the TTIR (``triton_aot.i32_offset_products``; 0), the
scalar 2-byte global loads in the PTX (``ld_b16``; ``ld_b16_loop``: inside loops, 0), and the
seconds each cold compile took on this machine (``compile_s``, a fresh Triton cache). The
``triton`` column records the compiler version: run it with the Triton a GPU image carries
(3.6 on this project's H200 image).

    python benchmarks/triton_resources.py [--out benchmarks/triton_resources.csv]
"""
import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "triton_resources.csv"))
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # interpreted kernels cannot compile
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        raise SystemExit(subprocess.call([sys.executable, __file__, "--out", a.out], env=env))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # a fresh Triton cache: every compile is cold, so compile_s is what a cold device run pays
    import tempfile
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="slim_triton_cache_")
    sys.path.insert(0, str(ROOT))
    import triton
    import triton_aot as aot
    from slim_kernels.provenance import provenance_string

    prov = provenance_string()

    specs = aot.kernel_specs("bf16", lora_cols=(None, 1024)) + aot.kernel_specs("fp32")
    dtypes = ["bf16"] * len(aot.kernel_specs("bf16", lora_cols=(None, 1024)))
    dtypes += ["fp32"] * (len(specs) - len(dtypes))
    cols = ["kernel", "variant", "dtype", "arch", "num_warps", "num_stages", "n_regs",
            "spill_stores", "spill_loads", "n_spills", "shared", "smem_limit", "wgmma",
            "i32_offsets", "ld_b16", "ld_b16_loop", "compile_s", "shape", "triton",
            "provenance"]
    shape = "T={T},K={K},N={N},E_L={E_L},r={r},E_I={E_I},C={C}".format(**aot.BENCH)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for sp, dt in zip(specs, dtypes):
            for row in aot.run([sp]):
                row.update(dtype=dt, shape=shape, triton=triton.__version__, provenance=prov)
                w.writerow({k: row[k] for k in cols})
                f.flush()
                print(",".join(str(row[k]) for k in cols[:17]), flush=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
