"""Ahead-of-time compilation of the SLIM kernels for real GPUs, without a GPU.

``kernel_specs()`` lists every kernel at each block configuration the launchers use on a GPU
(``launch.route_config`` and ``tuning.linear_configs``), with the argument
specialisation Triton's JIT would apply at the benchmark shape (16-byte-aligned pointers,
integers divisible by 16 marked so, unit strides as the constant 1). ``compile_spec`` runs
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and ``resources``
reads the shared memory from the compiled metadata and the registers and spills from the
ptxas report (the bundled ptxas run with -v on the PTX, with the flags Triton uses).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from slim_kernels.ops.backends.triton import kernels as K
from slim_kernels.ops.backends.triton.launch import (_pad16, dhz_width, route_config,
                                                    route_epilogue_config, stats_config)
from slim_kernels.ops.backends.triton.tuning import (bucket, linear_configs, route_split, split_k,
                                                     stats_groups)

# the benchmark shape: T=8192, K=N=4096, E_L=8, r=16, E_I=2, top_k=2, C=4
BENCH = dict(T=8192, K=4096, N=4096, E_L=8, r=16, E_I=2, top_k=2, C=4)
SMEM_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block (bytes)


@dataclass
class Spec:
    name: str       # kernel name
    variant: str    # what the launch computes / config label
    fn: object      # the @triton.jit function
    args: Dict[str, object]   # runtime args: "*bf16"-style pointer types or example ints/floats
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    meta: Dict[str, object] = field(default_factory=dict)


def _signature(spec: Spec):
    """signature, constexprs, attrs as the JIT would specialise the example arguments."""
    sig, cons, attrs = {}, dict(spec.constexprs), {}
    names = spec.fn.arg_names
    plain = {names[i] if isinstance(i, int) else i
             for i in (getattr(spec.fn, "do_not_specialize", None) or ())}
    for i, n in enumerate(names):
        if n in spec.constexprs:
            sig[n] = "constexpr"
            continue
        v = spec.args[n]
        if isinstance(v, str):  # pointer
            sig[n] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif isinstance(v, int) and n in plain:  # not specialised: a plain i32
            sig[n] = "i32"
        elif isinstance(v, int):
            if v == 1:
                sig[n] = "constexpr"
                cons[n] = 1
            else:
                sig[n] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{n}: {v!r}")
    return sig, cons, attrs


def compile_spec(spec: Spec, arch: int):
    sig, cons, attrs = _signature(spec)
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=cons, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))


def _ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={sm_arch_from_capability(arch)}", p, "-o",
                            os.path.join(d, "k.o")], capture_output=True, text=True, check=True)
    log = r.stderr + r.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(n_regs=int(regs.group(1)) if regs else -1,
                spill_stores=int(spill.group(1)) if spill else 0,
                spill_loads=int(spill.group(2)) if spill else 0)


_DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)\b(.*)$")
_REF = re.compile(r"%[\w.$-]+")


def _strip_loc(text: str) -> str:
    return re.sub(r"\s*loc\([^()]*\)\s*$", "", text)


def i32_offset_products(ttir: str) -> List[str]:
    """The ``tt.addptr`` lines of ``ttir`` whose int32 offset is computed with an int32
    multiplication by a runtime integer argument (an index times a size or stride): what
    overflows once the product passes 2^31. Offsets that are int64, or int32 sums of
    bounded column indices and constants (at most one row long), are not listed."""
    defs: Dict[str, tuple] = {}
    int_args = set()
    for line in ttir.splitlines():
        if "tt.func" in line:
            int_args.update(m.group(1) for m in re.finditer(r"(%[\w.$-]+): i(?:32|64)\b", line))
        m = _DEF.match(line)
        if m:
            body = _strip_loc(m.group(3))
            operands, _, ty = body.partition(" : ")
            defs[m.group(1)] = (m.group(2), _REF.findall(operands), ty.strip(), line.strip())

    def reaches_arg(name, seen):
        if name in int_args:
            return True
        if name in seen or name not in defs:
            return False
        seen.add(name)
        return any(reaches_arg(o, seen) for o in defs[name][1])

    def bad(name, seen):
        if name in seen or name not in defs:
            return False
        seen.add(name)
        op, operands, ty, _ = defs[name]
        if op == "arith.muli" and re.search(r"\bi32\b|xi32>", ty) and any(
                reaches_arg(o, set()) for o in operands):
            return True
        return any(bad(o, seen) for o in operands)

    out = []
    for name, (op, operands, ty, line) in defs.items():
        if op != "tt.addptr" or len(operands) < 2:
            continue
        off_ty = ty.rsplit(",", 1)[-1].strip()
        if re.search(r"\bi32\b|xi32>", off_ty) and bad(operands[1], set()):
            out.append(line)
    return out


_LD_B16 = re.compile(r"\bld\.global(?:\.[\w:]+)*\.(?:b16|u16|s16)\b")
_LABEL = re.compile(r"^\s*(\$[\w$]+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$[\w$]+)\s*;")


def scalar_b16_loads(ptx: str, loops_only: bool = False) -> int:
    """How many global loads in ``ptx`` move one 2-byte element (``ld.global[...].b16``):
    what Triton emits for a bf16/fp16 operand whose rows are not known to be 16-byte aligned
    (a row stride or an extent that is not a multiple of 16 elements), instead of 16-byte
    async copies. ``loops_only``: only those inside a loop (between a label and a branch back
    to it), the K loops that stream the operands; an epilogue's per-thread load of a bias
    element is not one."""
    lines = ptx.splitlines()
    labels, in_loop = {}, [False] * len(lines)
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line)
        if b and b.group(1) in labels:  # a branch back: lines labels[..]..i are a loop body
            for j in range(labels[b.group(1)], i + 1):
                in_loop[j] = True
    return sum(1 for i, line in enumerate(lines)
               if _LD_B16.search(line) and (in_loop[i] or not loops_only))


def resources(compiled, arch: int) -> Dict[str, int]:
    out = _ptxas_report(compiled.asm["ptx"], arch)
    out["ld_b16"] = scalar_b16_loads(compiled.asm["ptx"])
    out["ld_b16_loop"] = scalar_b16_loads(compiled.asm["ptx"], loops_only=True)
    out["n_spills"] = out["spill_stores"] + out["spill_loads"]
    out["shared"] = int(compiled.metadata.shared)
    out["wgmma"] = int("wgmma" in compiled.asm["ptx"])
    out["mma_tf32"] = int(bool(re.search(r"mma\S*\.tf32", compiled.asm["ptx"])))
    out["i32_offsets"] = len(i32_offset_products(compiled.asm["ttir"]))
    return out


def _cdiv(a, b):
    return -(-a // b)


def _ptr(dt):
    return "*" + {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[dt]


def kernel_specs(dtype: str = "bf16", shape: Dict[str, int] = None,
                 lora_cols=(None,)) -> List[Spec]:
    """Every kernel at each block configuration used on a GPU, at ``shape`` (default BENCH).

    lora_cols: extra E_L·r widths for the route kernels (None = the shape's E_L·r). The
    fused linear: forward, dx, the two weight gradients (dB = dyᵀ hg and [dA; dR] =
    [dh | dz]ᵀ x, split-K as the launcher splits them on a 132-SM GPU) at every large-M
    configuration, and the decode forward and dx (T = 16) at every small-M one."""
    s = dict(BENCH if shape is None else shape)
    T, Kd, N, E_L, r, E_I, C = s["T"], s["K"], s["N"], s["E_L"], s["r"], s["E_I"], s["C"]
    E = E_L + E_I
    P = _ptr(dtype)
    half = dtype != "fp32"
    prec = "tf32" if half else "ieee"
    specs: List[Spec] = []
    for er in lora_cols:
        ER = E_L * r if er is None else er
        R = ER // E_L if er is None else er // E_L
        RP, EP = _pad16(ER), _pad16(E)
        bt, bk, w, st, hb = route_config(RP, interpret=False, fp32=not half)
        split = route_split(T, Kd, bt, bk, 132)
        k_chunk = _cdiv(_cdiv(Kd, split), bk) * bk
        # without a distance shift (distance_scale="none"), with one (the layer's "spread":
        # one value expanded, stride 0), and a training forward's: the shift and the
        # per-token input of the cluster statistics (a strided keep mask), also at the
        # layer's default of 16 clusters; the K loop split at T = 8192 on 132 SMs (PARTIAL)
        # and whole (T >= 16896); the extended design's [x | hg] (WRITE_X); the max reduce
        # (CUDA-core work per cluster) at 16 clusters
        variants = [(False, False, C, True, False, 2), (True, False, C, True, False, 2),
                    (True, True, C, True, False, 2), (True, True, 16, True, False, 2),
                    (True, True, 16, False, False, 2), (True, False, C, True, True, 2),
                    (True, True, 16, True, False, 0)]
        seen = set()
        for shift, stats, C_, partial, write_x, reduce in variants:
            partial = partial and split > 1  # (fp32's 32-token blocks need no split)
            if (shift, stats, C_, partial, write_x, reduce) in seen:
                continue
            seen.add((shift, stats, C_, partial, write_x, reduce))
            CP = _pad16(max(C_, 1))
            pw = EP + 3 * CP + 1
            label = (f"ER={ER},C={C_},BT={bt},BK={bk},HB={hb}" + (",SHIFT" if shift else "")
                     + (",STATS" if stats else "") + (f",SPLIT{split}" if partial else "")
                     + (",WRITE_X" if write_x else "") + ("" if reduce == 2 else ",MAX"))
            const = dict(ER=ER, R=R, E=E, E_L=E_L, TOPK=s["top_k"], C=C_, RP=hb, EP=EP, CP=CP,
                         REDUCE=reduce, YIELD=bool(C_ and E_I), HAS_SHIFT=shift, STATS=stats,
                         HAS_KEEP=stats, UPCAST=False, BLOCK_T=bt, BLOCK_K=bk)
            routing = dict(sh_ptr="*fp32", keep_ptr="*u8", gates_ptr="*fp32", idx_ptr="*i64",
                           dist_ptr="*fp32", assign_ptr="*i64", h_ptr="*fp32", hg_ptr=P,
                           sj_ptr="*i32", rr_ptr="*fp32", ph_ptr="*fp32", pr_ptr="*fp32",
                           x_ptr=P, c_ptr="*fp32", s_ptr="*fp32", T=T, K=Kd, stride_xt=Kd,
                           stride_c=Kd, stride_s=Kd, stride_sh=0, stride_keep=2,
                           stride_hg=Kd + ER if write_x else ER, stride_ps=T * ER,
                           stride_pr=pw, scaling=2.0, lam=1.0)
            specs.append(Spec(
                "route_fwd_kernel", label, K.route_fwd_kernel,
                dict(routing, xl_ptr=P, a_ptr=P, r_ptr=P, xc_ptr=P, k_chunk=k_chunk,
                     stride_xlt=Kd, stride_a=Kd, stride_r=Kd, stride_xc=Kd + ER),
                dict(const, HAS_XL=False, WRITE_X=write_x, PARTIAL=partial, DOT_PREC=prec,
                     CDOT_PREC="tf32x3"),
                w, st, meta=dict(split=split if partial else 1)))
            if partial and not write_x:
                et, ek, ew = route_epilogue_config(interpret=False)
                specs.append(Spec(
                    "route_epilogue_kernel", label.replace(f"BT={bt},BK={bk}", f"BT={et},BK={ek}"),
                    K.route_epilogue_kernel, dict(routing, SPLITS=split),
                    dict(const, BLOCK_T=et, BLOCK_K=ek), ew, 1))
        bt, bk, w, st, _ = route_config(RP, interpret=False, backward=True, fp32=not half)
        for db_mode in (0, 1, 2):  # dB: its own GEMM, fused with partials, fused with atomics
            specs.append(Spec(
                "route_bwd_kernel", f"ER={ER},BT={bt},BK={bk},DB={db_mode}", K.route_bwd_kernel,
                dict(dy_ptr=P, b_ptr=P, h_ptr="*fp32", gates_ptr="*fp32", dgates_ptr="*fp32",
                     dhz_ptr=P, hg_ptr=P, db_ptr="*fp32", T=T, N=N, stride_dyt=N,
                     stride_bn=ER, stride_dhz=dhz_width(ER, E), stride_dg=E,
                     stride_dbp=N * ER, scaling=2.0),
                dict(ER=ER, R=R, E=E, E_L=E_L, RP=RP, EP=_pad16(max(E, dhz_width(ER, E) - ER)),
                     EW=dhz_width(ER, E) - ER, HAS_DG=False, DB_MODE=db_mode,
                     UPCAST=False, DOT_PREC=prec, BLOCK_T=bt, BLOCK_K=bk),
                w, st, meta=dict(db_mode=db_mode)))
    # the cluster statistics of a training forward, at the launcher's groups (132 SMs), for
    # the shape's clusters and the layer's default 16
    bt, bk, w, st = stats_config(interpret=False)
    groups = stats_groups(T, Kd, bt, bk, 132)
    group_len = _cdiv(_cdiv(T, groups), bt) * bt
    for Cs in sorted({C, 16} - {0}):
        specs.append(Spec(
            "cluster_stats_kernel", f"C={Cs},BT={bt},BK={bk},G={groups}", K.cluster_stats_kernel,
            dict(x_ptr=P, c_ptr="*fp32", sj_ptr="*i32", rr_ptr="*fp32", out_ptr="*fp32",
                 T=T, K=Kd, group_len=group_len, stride_xt=Kd, stride_c=Kd,
                 stride_og=Cs * (2 * Kd + 3) if groups > 1 else 0, stride_oc=2 * Kd + 3),
            dict(C=Cs, CP=max(16, 1 << (Cs - 1).bit_length()), DOT_PREC="tf32x3", BLOCK_T=bt,
                 BLOCK_K=bk),
            w, st, meta=dict(groups=groups)))
    for dist in (False, True):  # the clusters' step at the layer's 16 clusters
        specs.append(Spec(
            "cluster_ema_kernel", f"C=16,DIST={int(dist)}", K.cluster_ema_kernel,
            dict(c_ptr="*fp32", v_ptr="*fp32", rej_ptr="*i64", st_ptr="*fp32", dm_ptr="*fp32",
                 dv_ptr="*fp32", inv_ptr="*fp32", sh_ptr="*fp32", C=16, K=Kd, stride_c=Kd,
                 stride_v=Kd, stride_st=2 * Kd + 3, stride_inv=Kd, stride_sh=1,
                 momentum=0.1, eps=1e-5),
            dict(HAS_DIST=dist, CP=16, BLOCK=1024), 8, 3))
    ER = E_L * r
    base = dict(a1_ptr=P, b1_ptr=P, a2_ptr=P, b2_ptr=P, a3_ptr=P, b3_ptr=P,
                bias_ptr=P, out_ptr=P, s_bias=1)  # a contiguous bias (launch passes 1 without)

    def linear(label, cfg, args, flags, meta=None, split=1, out=P):
        bm, bn, bk, gm, w, st = cfg
        M_, N_, K_ = args["M"], args["N"], args["K1"]
        a = dict(base, **args, out_ptr="*fp32" if split > 1 else out,
                 s_split=M_ * N_ if split > 1 else 0, SPLIT_K=split,
                 KEY_M=bucket(M_), KEY_N=bucket(N_), KEY_K=bucket(K_))
        f = dict(dict(HAS_2=False, HAS_3=False, HAS_BIAS=False, IS_FP64=False, UPCAST=False,
                      DOT_PREC=prec), **flags)
        specs.append(Spec(
            "fused_linear_kernel", f"{label},{bm}x{bn}x{bk},w{w},s{st}" + (
                f",split{split}" if split > 1 else ""), K.fused_linear_kernel,
            a, dict(f, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm), w, st,
            meta=dict(meta or {}, label=label, block_m=bm)))

    W = dhz_width(ER, E)  # backward's [dh | dz | 0] row: 144 at the benchmark shape

    def fwd(M_):  # y = [x | hg] [W | B_all]ᵀ + b   (W (N,K) read as Wᵀ: k stride 1)
        return dict(M=M_, N=N, K1=Kd, K2=ER, K3=ER, K2B=ER, K3B=ER,
                    s_a1m=Kd, s_a1k=1, s_b1k=1, s_b1n=Kd,
                    s_a2m=ER, s_a2k=1, s_b2k=1, s_b2n=ER,
                    s_a3m=ER, s_a3k=1, s_b3k=1, s_b3n=ER, s_om=N, s_on=1)

    def dx(M_):  # dx = [dy | dh | dz 0] [W ; A_all ; R]   (dhz is (T, W): dz padded to W - ER)
        return dict(M=M_, N=Kd, K1=N, K2=ER, K3=W - ER, K2B=ER, K3B=E,
                    s_a1m=N, s_a1k=1, s_b1k=Kd, s_b1n=1,
                    s_a2m=W, s_a2k=1, s_b2k=Kd, s_b2n=1,
                    s_a3m=W, s_a3k=1, s_b3k=Kd, s_b3n=1, s_om=Kd, s_on=1)

    fwd_flags = dict(HAS_2=True, HAS_BIAS=True)
    dx_flags = dict(HAS_2=True, HAS_3=True)
    # dB_all = dyᵀ hg (dy read transposed; the reduction runs over T)
    wg_b = dict(M=N, N=ER, K1=T, K2=T, K3=T, K2B=T, K3B=T, s_a1m=1, s_a1k=N, s_b1k=ER, s_b1n=1,
                s_a2m=1, s_a2k=N, s_b2k=ER, s_b2n=1, s_a3m=1, s_a3k=N, s_b3k=ER, s_b3n=1,
                s_om=ER, s_on=1)
    # [dA; dR; 0] = [dh | dz | 0]ᵀ x
    wg_ar = dict(M=W, N=Kd, K1=T, K2=T, K3=T, K2B=T, K3B=T, s_a1m=1, s_a1k=W, s_b1k=Kd,
                 s_b1n=1, s_a2m=1, s_a2k=W, s_b2k=Kd, s_b2n=1, s_a3m=1, s_a3k=W, s_b3k=Kd,
                 s_b3n=1, s_om=Kd, s_on=1)
    sms = 132
    for cfg in linear_configs(not half, decode=False):
        linear("fwd", cfg, fwd(T), fwd_flags, meta=dict(linear_fwd=True))
        linear("dx", cfg, dx(T), dx_flags)
        linear("wgrad_dB", cfg, wg_b, {}, split=split_k(N, ER, T, sms))
        linear("wgrad_dAR", cfg, wg_ar, {}, split=split_k(W, Kd, T, sms))
    Td = 16
    for cfg in linear_configs(not half, decode=True):
        linear("decode_fwd", cfg, fwd(Td), fwd_flags, split=split_k(Td, N, Kd, sms))
        linear("decode_dx", cfg, dx(Td), dx_flags, split=split_k(Td, Kd, N, sms))
    return specs


def quick_specs() -> List[Spec]:
    """The configurations the AOT test compiles (the benchmark shape, bf16): the route kernels
    (route forward whole and split, its epilogue, route_bwd with each way of summing dB), the
    cluster statistics, the first large-M fused-linear configuration as forward, as dx (the
    padded [dh | dz | 0] operands) and as the split-K [dA; dR] weight gradient, and the first
    decode one."""
    out, seen = [], set()
    for sp in kernel_specs("bf16"):
        if sp.name != "fused_linear_kernel":
            out.append(sp)
        elif (sp.meta["label"] in ("fwd", "dx", "wgrad_dAR", "decode_fwd")
              and sp.meta["label"] not in seen):
            seen.add(sp.meta["label"])
            out.append(sp)
    return out


def run(specs: List[Spec], archs=(80, 90)) -> List[Dict[str, object]]:
    rows = []
    for sp in specs:
        for arch in archs:
            t0 = time.perf_counter()
            k = compile_spec(sp, arch)
            compile_s = time.perf_counter() - t0  # cold only when the Triton cache was empty
            r = resources(k, arch)
            r["compile_s"] = round(compile_s, 2)
            r.update(kernel=sp.name, variant=sp.variant, arch=f"sm_{arch}",
                     num_warps=sp.num_warps, num_stages=sp.num_stages,
                     smem_limit=SMEM_LIMIT[arch])
            rows.append(r)
    return rows


def main(argv=None) -> int:
    """python benchmarks/triton_aot.py [--all] : one JSON object per compile."""
    import argparse
    import json
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true",
                    help="every variant and config (and E_L·r = 1024 route kernels)")
    a = ap.parse_args(argv)
    specs = (kernel_specs("bf16", lora_cols=(None, 1024)) + kernel_specs("fp32")
             if a.all else quick_specs())
    for row in run(specs):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: AOT compilation needs @triton.jit kernels")
    raise SystemExit(main())
