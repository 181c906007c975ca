"""FLOPs and DRAM bytes per call of each SLIM Triton kernel vs the base GEMM (computed from
the kernel cut, not measured). Bytes count each operand read once and each output written
once (the ideal for a tiled kernel whose re-reads hit L2); dot FLOPs count 2 per MAC on the
true (unpadded) sizes; "padded" adds the dot work the route kernels spend on padding
(E_L·r to a power of two >= 16, E to >= 16).

    python benchmarks/triton_flops.py [--T 8192 --K 4096 --N 4096 --E_L 8 --r 16 --E_I 2 --C 4]
"""
import argparse
import csv
import sys


def p2(n):
    return max(16, 1 << (n - 1).bit_length())


def table(T, K, N, E_L, r, E_I, C, top_k=2, bx=2):
    ER, E = E_L * r, E_L + E_I
    f4, i8 = 4, 8
    rows = []

    def add(name, direction, flops, flops_padded, read, write, note):
        rows.append(dict(kernel=name, direction=direction, gflop=flops / 1e9,
                         gflop_padded=flops_padded / 1e9, mb_read=read / 1e6,
                         mb_written=write / 1e6, mb_total=(read + write) / 1e6, note=note))

    base_f = 2 * T * N * K
    base_b = (T * K + N * K + N) * bx, T * N * bx
    add("base_gemm (F.linear)", "fwd", base_f, base_f, *base_b, "x Wᵀ + b")
    add("base_gemm dx", "bwd", base_f, base_f, (T * N + N * K) * bx, T * K * bx, "dy W")
    # route forward: [h | z] = x [A; R]ᵀ + C clusters; per element and cluster (reduce rms):
    # diff, square, sum, scale by inv_std², sum = 5 CUDA-core ops (max/mean: 6)
    cl = 5 * C * T * K
    add("route_fwd", "fwd", 2 * T * K * (ER + E) + cl, 2 * T * K * (p2(ER) + p2(E)) + cl,
        (T * K + (ER + E) * K) * bx + 2 * C * K * f4,
        T * ER * (f4 + bx) + T * E * f4 + T * top_k * i8 + T * (f4 + i8),
        f"x once; writes h (fp32), hg, gates, idx, d, assign; cluster math {cl / 1e9:.2f} GFLOP")
    add("fused_linear y", "fwd", 2 * T * N * (K + ER), 2 * T * N * (K + ER),
        (T * (K + ER) + N * (K + ER) + N) * bx, T * N * bx, "[x | hg][W | B]ᵀ + b")
    add("route_bwd", "bwd", 2 * T * N * ER, 2 * T * N * p2(ER),
        T * N * bx + N * ER * bx + T * ER * f4 + T * E * f4,
        T * (ER + E) * bx + T * ER * bx, "dy B; writes [dh | dz], hg")
    add("fused_linear dx", "bwd", 2 * T * K * (N + ER + E), 2 * T * K * (N + ER + E),
        (T * (N + ER + E) + K * (N + ER + E)) * bx, T * K * bx, "[dy | dh | dz][W; A; R]")
    add("fused_linear dB", "bwd", 2 * N * ER * T, 2 * N * ER * T,
        (T * N + T * ER) * bx, N * ER * bx, "dyᵀ hg")
    add("fused_linear dA,dR", "bwd", 2 * (ER + E) * K * T, 2 * (ER + E) * K * T,
        (T * (ER + E) + T * K) * bx, (ER + E) * K * bx, "[dh | dz]ᵀ x")
    return rows


def main():
    ap = argparse.ArgumentParser()
    for k, v in dict(T=8192, K=4096, N=4096, E_L=8, r=16, E_I=2, C=4).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = table(a.T, a.K, a.N, a.E_L, a.r, a.E_I, a.C)
    w = csv.DictWriter(open(a.out, "w", newline="") if a.out else sys.stdout,
                       fieldnames=list(rows[0]))
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})
    fwd = sum(r["gflop"] for r in rows if r["direction"] == "fwd" and "base" not in r["kernel"])
    bwd = sum(r["gflop"] for r in rows if r["direction"] == "bwd" and "base" not in r["kernel"])
    bf, = [r["gflop"] for r in rows if r["kernel"].startswith("base_gemm (")]
    mf = sum(r["mb_total"] for r in rows if r["direction"] == "fwd" and "base" not in r["kernel"])
    mb = sum(r["mb_total"] for r in rows if r["direction"] == "bwd" and "base" not in r["kernel"])
    bm = sum(r["mb_total"] for r in rows if r["kernel"].startswith("base"))
    print(f"# SLIM fwd {fwd:.1f} GFLOP vs base {bf:.1f} (+{100 * (fwd / bf - 1):.1f} %); "
          f"fwd+bwd {fwd + bwd:.1f} vs {2 * bf:.1f} (+{100 * ((fwd + bwd) / (2 * bf) - 1):.1f} %)",
          file=sys.stderr)
    print(f"# SLIM bytes fwd {mf:.0f} MB vs base {bm / 2:.0f} MB; fwd+bwd {mf + mb:.0f} MB vs "
          f"{bm:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
