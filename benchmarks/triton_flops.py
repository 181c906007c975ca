"""FLOPs and DRAM bytes per call of each SLIM Triton kernel vs the base GEMM (computed from
the kernel cut, not measured). Bytes count each operand read once and each output written
once (the ideal for a tiled kernel whose re-reads hit L2), plus the fp32 partials of split-K
and of the fused dB written and read back; dot FLOPs count 2 per MAC on the true (unpadded)
sizes; "padded" adds the dot work the route kernels spend on padding (E_L·r to a power of
two >= 16, E to >= 16).

Backward has three ways to sum dB_all = dyᵀ hg (``slim_kernels/ops/backends/triton/tuning.py``,
``SLIM_KERNELS_DB``): ``gemm`` (its own split-K GEMM: dy read three times in backward),
``fused`` (in route_bwd's pass over dy, one fp32 (N, E_L·r) partial per route_bwd program,
summed in order: dy read twice), ``atomic`` (fused, fp32 atomics into one buffer in L2: dy
read twice). The CSV holds the rows of --db (default gemm); stderr has the backward totals
and the passes over x and dy of all three.

    python benchmarks/triton_flops.py [--T 8192 --K 4096 --N 4096 --E_L 8 --r 16 --E_I 2 --C 4]
                                      [--db gemm|fused|atomic] [--sms 132] [--out CSV]
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from slim_kernels.ops.backends.triton.launch import route_config  # noqa: E402
from slim_kernels.ops.backends.triton.tuning import split_k  # noqa: E402
from slim_kernels.provenance import provenance_string  # noqa: E402


def p2(n):
    return max(16, 1 << (n - 1).bit_length())


def table(T, K, N, E_L, r, E_I, C, top_k=2, bx=2, db="gemm", sms=132):
    ER, E = E_L * r, E_L + E_I
    f4, i8 = 4, 8
    rows = []
    bt = route_config(p2(ER), interpret=False, backward=True, fp32=bx == 4)[0]
    programs = -(-T // bt)  # route_bwd programs

    def add(name, direction, flops, flops_padded, read, write, note, dy=0, x=0, l2_atomic=0):
        rows.append(dict(kernel=name, direction=direction, gflop=flops / 1e9,
                         gflop_padded=flops_padded / 1e9, mb_read=read / 1e6,
                         mb_written=write / 1e6, mb_total=(read + write) / 1e6,
                         dy_passes=dy, x_passes=x, mb_l2_atomics=l2_atomic / 1e6, note=note))

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
    rb_read = T * N * bx + N * ER * bx + T * ER * f4 + T * E * f4
    rb_write = T * (ER + E) * bx + T * ER * bx
    if db == "gemm":
        add("route_bwd", "bwd", 2 * T * N * ER, 2 * T * N * p2(ER), rb_read, rb_write,
            "dy B; writes [dh | dz], hg", dy=1)
        s_b = split_k(N, ER, T, sms)
        part = 2 * s_b * N * ER * f4 if s_b > 1 else 0
        add("fused_linear dB", "bwd", 2 * N * ER * T, 2 * N * ER * T,
            (T * N + T * ER) * bx + part / 2, N * ER * bx + part / 2,
            f"dyᵀ hg, split-K {s_b} (fp32 partials written and read)", dy=1)
    else:
        # the loop preamble reads h and the gates again for hg; dB: fp32 partials or atomics
        pre = T * ER * f4 + T * E * f4
        if db == "fused":
            part = programs * N * ER * f4
            add("route_bwd + dB", "bwd", 2 * T * N * ER * 2, 2 * T * N * p2(ER) * 2,
                rb_read + pre + part + N * ER * f4, rb_write + part + N * ER * f4 + N * ER * bx,
                f"dy B and dyᵀ hg in one pass; {programs} fp32 (N, E_L·r) partials written, "
                "summed in order", dy=1)
        else:
            add("route_bwd + dB", "bwd", 2 * T * N * ER * 2, 2 * T * N * p2(ER) * 2,
                rb_read + pre + N * ER * f4, rb_write + N * ER * f4 + N * ER * bx,
                f"dy B and dyᵀ hg in one pass; fp32 atomics of {programs} programs into one "
                "(N, E_L·r) buffer (L2)", dy=1, l2_atomic=programs * N * ER * f4)
    add("fused_linear dx", "bwd", 2 * T * K * (N + ER + E), 2 * T * K * (N + ER + E),
        (T * (N + ER + E) + K * (N + ER + E)) * bx, T * K * bx, "[dy | dh | dz][W; A; R]", dy=1)
    s_ar = split_k(ER + E, K, T, sms)
    part = 2 * s_ar * (ER + E) * K * f4 if s_ar > 1 else 0
    add("fused_linear dA,dR", "bwd", 2 * (ER + E) * K * T, 2 * (ER + E) * K * T,
        (T * (ER + E) + T * K) * bx + part / 2, (ER + E) * K * bx + part / 2,
        f"[dh | dz]ᵀ x, split-K {s_ar}", x=1)
    return rows


def _totals(rows):
    fwd = [r for r in rows if r["direction"] == "fwd" and "base" not in r["kernel"]]
    bwd = [r for r in rows if r["direction"] == "bwd" and "base" not in r["kernel"]]
    return dict(fwd_gflop=sum(r["gflop"] for r in fwd), bwd_gflop=sum(r["gflop"] for r in bwd),
                fwd_mb=sum(r["mb_total"] for r in fwd), bwd_mb=sum(r["mb_total"] for r in bwd),
                dy=sum(r["dy_passes"] for r in bwd), x=sum(r["x_passes"] for r in bwd),
                l2=sum(r["mb_l2_atomics"] for r in bwd))


def main():
    ap = argparse.ArgumentParser()
    for k, v in dict(T=8192, K=4096, N=4096, E_L=8, r=16, E_I=2, C=4, sms=132).items():
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--db", default="gemm", choices=("gemm", "fused", "atomic"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    shape = (a.T, a.K, a.N, a.E_L, a.r, a.E_I, a.C)
    rows = table(*shape, db=a.db, sms=a.sms)
    prov = provenance_string()  # computed figures: the code they describe is what matters
    for row in rows:
        row["provenance"] = prov
    w = csv.DictWriter(open(a.out, "w", newline="") if a.out else sys.stdout,
                       fieldnames=list(rows[0]))
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})
    t = _totals(rows)
    bf, = [r["gflop"] for r in rows if r["kernel"].startswith("base_gemm (")]
    bm = sum(r["mb_total"] for r in rows if r["kernel"].startswith("base"))
    print(f"# SLIM fwd {t['fwd_gflop']:.1f} GFLOP vs base {bf:.1f} "
          f"(+{100 * (t['fwd_gflop'] / bf - 1):.1f} %); fwd+bwd "
          f"{t['fwd_gflop'] + t['bwd_gflop']:.1f} vs {2 * bf:.1f} "
          f"(+{100 * ((t['fwd_gflop'] + t['bwd_gflop']) / (2 * bf) - 1):.1f} %)", file=sys.stderr)
    print(f"# SLIM bytes fwd {t['fwd_mb']:.0f} MB vs base {bm / 2:.0f} MB", file=sys.stderr)
    for db in ("gemm", "fused", "atomic"):
        tt = _totals(table(*shape, db=db, sms=a.sms))
        print(f"# backward, dB by {db:6s}: {tt['bwd_mb']:.0f} MB (base {bm / 2:.0f} MB), "
              f"dy read {tt['dy']}x, x read {tt['x']}x"
              + (f", {tt['l2']:.0f} MB of fp32 atomics in L2" if tt["l2"] else ""),
              file=sys.stderr)


if __name__ == "__main__":
    main()
