"""FLOPs, DRAM bytes and the roofline time of every provider of the benchmark at the target
shapes, launch by launch (computed from the kernel cut, not measured): what each design must
reach on the GPU (``docs/benchmarks.md``, "Designs and their rooflines").

Bytes count each operand read once and each output written once (the ideal for a tiled kernel
whose re-reads hit L2), plus the fp32 partials of the split K loops (route forward, the split-K
weight-gradient GEMMs) written and read back; dot FLOPs count 2 per MAC on the true sizes
(tf32x3 cluster dots as their fp32 work). A launch's roofline time is max(FLOPs / peak,
bytes / bandwidth) with the H200 figures measured on this project's device (bf16 dense
~790 TFLOP/s on random data, device-to-device copy ~4.3 TB/s read + written); a provider's is
the sum over its launches (they run one after the other), without launch gaps. The L2 re-reads
of the route kernel's weights (A_all, R, the centres: once per token block) are listed
apart: at T = 8192 they are 2-4x the bytes of x, but from L2.

Providers: ``base`` (F.linear; backward dx = dy W), ``slim_triton_fused``,
``slim_triton_accumulate``, ``slim_triton_extended`` (the triton backend's designs; the
extended design's backward is accumulate's), ``peft_lora`` (PEFT LoRA of rank E_L·r, unfused:
lower bound, its elementwise scale and add counted once). The torch backend and the eager loop
are unfused references (several passes over x and y that depend on the routing) and are
measured only.

    python benchmarks/triton_flops.py [--T 8192 --K 4096 --N 4096 --E_L 8 --r 16 --E_I 2 --C 4]
                                      [--sms 132] [--out CSV] [--markdown]
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from slim_kernels.ops.backends.triton.launch import dhz_width, route_config  # noqa: E402
from slim_kernels.ops.backends.triton.tuning import route_split, split_k  # noqa: E402
from slim_kernels.provenance import provenance_string  # noqa: E402

PEAK_TFLOPS = 790.0  # H200 bf16 dense, measured on random data (device KINDS.md)
BANDWIDTH_TBS = 4.3  # H200 device-to-device copy, bytes read + written
LAUNCH_US = 0.0  # launch gaps are not in the roofline (CUDA graphs remove them)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
PROVIDERS = ("base", "slim_triton_fused", "slim_triton_accumulate", "slim_triton_extended",
             "peft_lora")


def launches(provider, T, K, N, E_L, r, E_I, C, top_k=2, bx=2, sms=132, db="gemm"):
    """[(direction, kernel, flops, bytes, l2_bytes, note)] of one training call (forward with
    no cluster statistics, as the benchmark's providers call the op; backward of dy). ``db``:
    how the fused design sums dB_all (``SLIM_KERNELS_DB``; the default at these shapes is
    gemm)."""
    ER, E = E_L * r, E_L + E_I
    f4, i8 = 4, 8
    out = []

    def add(direction, name, flops, nbytes, note="", l2=0):
        out.append((direction, name, flops, nbytes, l2, note))

    def gemm(direction, name, M, Nn, Kk, extra=0, note=""):
        add(direction, name, 2 * M * Nn * Kk, (M * Kk + Kk * Nn + M * Nn) * bx + extra, note)

    if provider == "base":
        gemm("fwd", "F.linear", T, N, K, N * bx, "x Wᵀ + b")
        gemm("bwd", "dx = dy W", T, K, N)
        return out
    if provider == "peft_lora":
        gemm("fwd", "F.linear", T, N, K, N * bx, "x Wᵀ + b")
        gemm("fwd", "lora_A", T, ER, K, note="h = x Aᵀ")
        gemm("fwd", "lora_B", T, N, ER, note="h Bᵀ")
        add("fwd", "scale, add", 2 * T * N, 5 * T * N * bx, "y + s (h Bᵀ): read 2, write 1 (+ scale)")
        gemm("bwd", "dx = dy W", T, K, N)
        add("bwd", "scale dy", T * N, 2 * T * N * bx)
        gemm("bwd", "dB = (s dy)ᵀ h", N, ER, T)
        gemm("bwd", "dh = (s dy) B", T, ER, N)
        gemm("bwd", "dA = dhᵀ x", ER, K, T)
        gemm("bwd", "dx += dh A", T, K, ER, 2 * T * K * bx)
        return out
    design = provider.rsplit("_", 1)[1]
    # route forward (every design): 128-token blocks, the K loop split to fill the SMs
    bt, bk = route_config(max(16, 1 << (ER - 1).bit_length()), interpret=False)[:2]
    S = route_split(T, K, bt, bk, sms)
    CP = max(16, 1 << (max(C, 1) - 1).bit_length())
    pw = max(16, 1 << (E - 1).bit_length()) + 3 * CP + 1
    partials = 2 * S * T * (ER + pw) * f4 if S > 1 else 0
    outs = T * (ER * (f4 + bx) + E * f4 + top_k * i8 + f4 + i8)
    xcopy = T * K * bx if design == "extended" else 0
    blocks = -(-T // bt)
    add("fwd", "route_fwd" + (f" (+ epilogue, {S} splits)" if S > 1 else ""),
        2 * T * K * (ER + E) + 3 * 2 * T * K * C, T * K * bx + partials + outs + xcopy,
        "x once" + (", fp32 partials written and read" if S > 1 else "")
        + (", x copied into [x | hg]" if xcopy else ""),
        l2=blocks * ((ER + E) * K * bx + 2 * C * K * f4))
    if design == "fused":
        gemm("fwd", "fused_linear y", T, N, K + ER, N * bx, "[x | hg][W | B]ᵀ + b, Triton")
    elif design == "accumulate":
        gemm("fwd", "cuBLAS y = hg Bᵀ + b", T, N, ER, N * bx)
        gemm("fwd", "cuBLAS y += x Wᵀ", T, N, K, T * N * bx, "beta = 1: y read in the epilogue")
    else:
        add("fwd", "copy B into [W | B]", 0, 2 * N * ER * bx)
        gemm("fwd", "cuBLAS y = [x | hg][W | B]ᵀ + b", T, N, K + ER, N * bx)
    W = dhz_width(ER, E)
    rb = T * N * bx + N * ER * bx + T * (ER + E) * f4 + T * (W + ER) * bx
    programs = -(-T // route_config(max(16, 1 << (ER - 1).bit_length()), interpret=False,
                                    backward=True)[0])
    if design != "fused" or db == "gemm":
        add("bwd", "route_bwd", 2 * T * N * ER, rb, "dy B; writes [dh | dz | 0], hg")
    elif db == "fused":  # one fp32 (N, E_L·r) partial per program, written and read by the sum
        add("bwd", "route_bwd + dB partials", 4 * T * N * ER, rb + 2 * programs * N * ER * f4,
            f"dy B and dyᵀ hg in one pass over dy; {programs} fp32 partials")
    else:
        add("bwd", "route_bwd + dB atomics", 4 * T * N * ER, rb + 2 * N * ER * f4,
            f"dy B and dyᵀ hg in one pass over dy; {programs} programs' fp32 atomics (in L2)",
            l2=programs * N * ER * f4)
    if design == "fused":
        s_b, s_ar = split_k(N, ER, T, sms), split_k(W, K, T, sms)
        if db == "gemm":
            gemm("bwd", f"fused_linear dB (split {s_b})", N, ER, T,
                 2 * s_b * N * ER * f4 if s_b > 1 else 0, "dyᵀ hg")
        gemm("bwd", "fused_linear dx", T, K, N + W, note="[dy | dh | dz 0][W; A; R]")
        gemm("bwd", f"fused_linear [dA; dR] (split {s_ar})", W, K, T,
             2 * s_ar * W * K * f4 if s_ar > 1 else 0, "[dh | dz | 0]ᵀ x")
    else:
        gemm("bwd", "cuBLAS dB = dyᵀ hg", N, ER, T)
        add("bwd", "cat [A; R]", 0, 2 * (ER + E) * K * bx)
        gemm("bwd", "cuBLAS dx = [dh | dz][A; R]", T, K, ER + E)
        gemm("bwd", "cuBLAS dx += dy W", T, K, N, T * K * bx, "beta = 1")
        gemm("bwd", "cuBLAS [dA; dR] = [dh | dz]ᵀ x", ER + E, K, T)
    return out


def roofline_us(flops, nbytes):
    return max(flops / (PEAK_TFLOPS * 1e12), nbytes / (BANDWIDTH_TBS * 1e12)) * 1e6 + LAUNCH_US


def summary(shape, **kw):
    """{provider: {"fwd"|"fwd+bwd": (GFLOP, MB, roofline µs)}} at one (K, N)."""
    K, N = shape
    res = {}
    for p in PROVIDERS:
        rows = launches(p, K=K, N=N, **kw)
        d = {}
        for mode, dirs in (("fwd", ("fwd",)), ("fwd+bwd", ("fwd", "bwd"))):
            sel = [x for x in rows if x[0] in dirs]
            d[mode] = (sum(x[2] for x in sel) / 1e9, sum(x[3] for x in sel) / 1e6,
                       sum(roofline_us(x[2], x[3]) for x in sel))
        res[p] = d
    return res


def markdown(T, **kw):
    lines = ["| provider | shape (K x N) | fwd GFLOP | fwd MB | fwd roofline µs (x base) | "
             "fwd+bwd GFLOP | fwd+bwd MB | fwd+bwd roofline µs (x base) |",
             "|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        s = summary(shape, T=T, **kw)
        b = s["base"]
        for p, d in s.items():
            f, fb = d["fwd"], d["fwd+bwd"]
            lines.append(f"| {p} | {shape[0]}x{shape[1]} | {f[0]:.0f} | {f[1]:.0f} | {f[2]:.0f} "
                         f"({f[2] / b['fwd'][2]:.3f}) | {fb[0]:.0f} | {fb[1]:.0f} | {fb[2]:.0f} "
                         f"({fb[2] / b['fwd+bwd'][2]:.3f}) |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    for k, v in dict(T=8192, E_L=8, r=16, E_I=2, C=4, sms=132).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", action="store_true", help="the per-provider table of the docs")
    ap.add_argument("--db-modes", action="store_true",
                    help="the fused design's backward bytes per way of summing dB (4096 x 4096)")
    a = ap.parse_args()
    kw = dict(E_L=a.E_L, r=a.r, E_I=a.E_I, C=a.C, sms=a.sms)
    if a.markdown:
        print(markdown(a.T, **kw))
        return
    if a.db_modes:
        for db in ("gemm", "fused", "atomic"):
            rows = [x for x in launches("slim_triton_fused", a.T, 4096, 4096, db=db, **kw)
                    if x[0] == "bwd"]
            print(f"dB by {db:6s}: {sum(x[3] for x in rows) / 1e6:.0f} MB, "
                  f"{sum(x[4] for x in rows) / 1e6:.0f} MB of fp32 atomics in L2")
        return
    prov = provenance_string()  # computed figures: the code they describe is what matters
    cols = ["provider", "shape", "direction", "kernel", "gflop", "mb", "roofline_us",
            "l2_mb", "note", "provenance"]
    w = csv.DictWriter(open(a.out, "w", newline="") if a.out else sys.stdout, fieldnames=cols)
    w.writeheader()
    for K, N in SHAPES:
        for p in PROVIDERS:
            for direction, name, flops, nbytes, l2, note in launches(p, a.T, K, N, **kw):
                w.writerow(dict(provider=p, shape=f"T={a.T},{K}x{N}", direction=direction,
                                kernel=name, gflop=f"{flops / 1e9:.3f}",
                                mb=f"{nbytes / 1e6:.3f}",
                                roofline_us=f"{roofline_us(flops, nbytes):.2f}",
                                l2_mb=f"{l2 / 1e6:.1f}", note=note, provenance=prov))
    print(markdown(a.T, **kw), file=sys.stderr)


if __name__ == "__main__":
    main()
