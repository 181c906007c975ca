"""The SLIM Triton kernels (``docs/method.md`` §6). Pure kernels: no torch, no launch logic.

Six kernels:

* ``route_fwd_kernel``: one pass over x. Per block of BLOCK_T tokens (and per RP-wide block
  of h columns: one block up to E_L·r = 128, more above, each recomputing the small routing
  part so the h accumulator stays in registers) the K loop computes
  ``[h | z] = x [A_all; R]ᵀ`` (h from x_lora when given, loaded in the same loop) and, for
  the C clusters, the squared distances and the reduce of ``|x - c| * inv_std`` the call
  asks for: tensor-core dots for the squared distances and the rms reduce (the expanded
  form, measured from the first centre), CUDA cores for max and mean
  (:func:`_route_accumulate`). The epilogue (:func:`_route_finish`) picks j*, forms
  ``d = r - shift[j*]`` (the constant 1 without a shift), adds yielding to the identity
  logits, does top-k (rank-count, NaN last, ties to the lower index), the softmax over the
  kept experts, and writes gates, topk_idx, distance, assign, h (fp32) and
  ``hg = s * g ⊙ h`` (x dtype) for the GEMM that follows. When the token blocks alone leave
  SMs idle the K loop is split over a third grid axis (PARTIAL) and the program writes its
  fp32 partial sums instead;
* ``route_epilogue_kernel``: the second launch of a split route forward: the partials summed
  in split order (deterministic), then the same epilogue;
* ``cluster_stats_kernel``: when asked for, the per-cluster statistics of the sliding update
  (count, sums and sums of squares of ``x - c_{j*}``, of r), a second pass over x after the
  route kernel has chosen j* (it writes j*-or-not-kept and r per token for it). Deterministic:
  per-program partials over a few token groups, summed in a fixed order.
* ``fused_linear_kernel``: ``out = Σ_seg a_seg b_seg (+ bias)`` over up to three K
  segments with arbitrary strides (the bias's too), fp32 accumulation, grouped program
  ordering, optional split-K of the first segment into fp32 partials. Used for
  ``y = [x | hg][W | B_all]ᵀ + b``, ``dx = [dy | dh | dz][W; A_all; R]`` and the weight
  gradients (transposed strides; split-K when the output has few tiles), in the ``fused``
  design.
* ``route_bwd_kernel``: ``dhg = dy B_all`` (K loop over N) and the epilogue to
  ``dg``, ``dz`` (softmax backward), ``dh = s g ⊙ dhg`` and ``hg`` (recomputed from h);
  optionally ``dB_all = dyᵀ hg`` summed in the same pass over dy.
* ``cluster_ema_kernel``: the clusters' sliding update at the optimizer step (not part of
  the op): the statistics applied to the centres, variances and routing tensors in one launch.

The token count T is not specialised on (``do_not_specialize``): T = 1, a multiple of 16 and
any other T share one compiled route, route-backward and statistics kernel (T only bounds
masks there), so decode and odd batch sizes cost no extra compiles.

Offsets: every product of an index and a stride is int64 (an index that can reach T, N, K
or E_L·r, times a stride); only offsets bounded by one row's length stay int32.

UPCAST (constexpr) is set when the interpreter runs bf16/fp16: the interpreter's half
arithmetic is wrong, so tiles are converted to fp32 right after tl.load. On a GPU the dot
inputs stay native. DOT_PREC is "ieee" for fp32/fp64 inputs (no tf32 rounding). The
interpreter also truncates fp32 -> bf16 on stores; ``_cast`` rounds to nearest even first.
"""
import triton
import triton.language as tl


@triton.jit
def _cast(v, ty: tl.constexpr, UPCAST: tl.constexpr):
    """v.to(ty). Under the interpreter (UPCAST) fp32 -> bf16 truncates instead of rounding to
    nearest even, so round the fp32 bits first (exactly what the GPU's cvt.rn does)."""
    if UPCAST:
        if ty == tl.bfloat16:
            b = v.to(tl.float32).to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            v = b.to(tl.float32, bitcast=True)
    return v.to(ty)


@triton.jit
def _expand_gates(g, ecol, hcol, R: tl.constexpr, E_L: tl.constexpr):
    """(BT, EP) gates -> (BT, RP): column c of h gets the gate of its expert c // R.
    Padded columns (c >= E_L·R) get 0. A static loop over the LoRA experts: no one-hot matrix
    held in registers (that spilled at E_L·r = 1024)."""
    out = tl.zeros((g.shape[0], hcol.shape[0]), dtype=g.dtype)
    chunk = hcol // R
    for e in tl.static_range(E_L):
        ge = tl.sum(tl.where(ecol[None, :] == e, g, 0.0), axis=1)
        out = tl.where(chunk[None, :] == e, ge[:, None], out)
    return out


@triton.jit
def _chunk_sums(v, ecol, hcol, R: tl.constexpr, E_L: tl.constexpr):
    """(BT, RP) -> (BT, EP): column e gets the sum of v over expert e's R columns."""
    out = tl.zeros((v.shape[0], ecol.shape[0]), dtype=v.dtype)
    chunk = hcol // R
    for e in tl.static_range(E_L):
        se = tl.sum(tl.where(chunk[None, :] == e, v, 0.0), axis=1)
        out = tl.where(ecol[None, :] == e, se[:, None], out)
    return out


@triton.jit
def _route_accumulate(
    x_ptr, xl_ptr, a_ptr, r_ptr, c_ptr, s_ptr, xc_ptr,
    rows64, tmask, wmask, hcol, ecol, ccol, k_lo, k_hi,
    stride_xt, stride_xlt, stride_a, stride_r, stride_c, stride_s, stride_xc,
    ER: tl.constexpr, E: tl.constexpr, C: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr,
    CP: tl.constexpr, HAS_XL: tl.constexpr, REDUCE: tl.constexpr, STATS: tl.constexpr,
    WRITE_X: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    CDOT_PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The K loop of route forward over channels [k_lo, k_hi): returns (acc_h, acc_z, c_sq,
    c_red, c_nan, x_nf), all sums over the channels (so that K chunks add up):

    * acc_h (BLOCK_T, RP) = x_lora A_allᵀ for this program's RP columns, acc_z = x Rᵀ;
    * c_sq (BLOCK_T, CP) = ||x − c_j||² − ||x − o||² with the origin o = c_0 (the first
      centre): the argmin over j of the squared distance needs no per-token constant, and
      measuring from c_0 instead of 0 keeps the cancellation of the expanded form small (a
      channel with a large mean and a small spread costs nothing). Tensor-core dot:
      (x − o)·(−2(c − o))ᵀ plus Σ(c − o)² per cluster;
    * c_red: REDUCE 2 (rms) Σ((x − c_j) s_j)², expanded the same way into two dots,
      (x − o)²·(s²)ᵀ and (x − o)·(−2(c − o)s²)ᵀ, plus Σ(c − o)²s²; REDUCE 1 (mean) Σ|x − c_j| s_j
      and REDUCE 0 (max) max |x − c_j| s_j on CUDA cores (an absolute value has no dot form),
      with c_nan the sum of the NaN terms the max drops (added back in the epilogue, so d is
      NaN as with torch.amax, §1.5);
    * x_nf (BLOCK_T,) = Σ(x − x): 0 iff the row is finite (STATS only).

    Cluster dots run in CDOT_PREC ("tf32x3" on a GPU: three tf32 passes, about fp32
    accuracy; x is exact in tf32 for bf16 x; "ieee" under the interpreter and for fp64).
    With WRITE_X, the x tiles of the rows in ``wmask`` are also stored at xc_ptr (the
    extended-K design's [x | hg] buffer): one more write of x, no more reads. Masked channels
    load x = c = 0."""
    kk = tl.arange(0, BLOCK_K)
    hcol64 = hcol.to(tl.int64)
    ecol64 = ecol.to(tl.int64)
    ccol64 = ccol.to(tl.int64)
    stride_c64 = tl.cast(stride_c, tl.int64)
    stride_s64 = tl.cast(stride_s, tl.int64)
    acc_h = tl.zeros((BLOCK_T, RP), dtype=ACC)
    acc_z = tl.zeros((BLOCK_T, EP), dtype=ACC)
    c_sq = tl.zeros((BLOCK_T, CP), dtype=ACC)
    c_red = tl.zeros((BLOCK_T, CP), dtype=ACC)
    c_nan = tl.zeros((BLOCK_T, CP), dtype=ACC)
    c_cc = tl.zeros((CP,), dtype=ACC)  # Σ (c − o)², then Σ (c − o)² s² for rms
    c_cs = tl.zeros((CP,), dtype=ACC)
    x_nf = tl.zeros((BLOCK_T,), dtype=ACC)
    cmask = ccol < C
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + kk
        kmask = ks < k_hi
        xm = tmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xt + ks[None, :], mask=xm, other=0.0)
        if WRITE_X:
            tl.store(xc_ptr + rows64[:, None] * stride_xc + ks[None, :], x,
                     mask=wmask[:, None] & kmask[None, :])
        a = tl.load(a_ptr + hcol64[:, None] * stride_a + ks[None, :],
                    mask=(hcol[:, None] < ER) & kmask[None, :], other=0.0)
        rt = tl.load(r_ptr + ecol64[:, None] * stride_r + ks[None, :],
                     mask=(ecol[:, None] < E) & kmask[None, :], other=0.0)
        if HAS_XL:
            xl = tl.load(xl_ptr + rows64[:, None] * stride_xlt + ks[None, :], mask=xm, other=0.0)
        else:
            xl = x
        if UPCAST:
            x = x.to(tl.float32)
            xl = xl.to(tl.float32)
            a = a.to(tl.float32)
            rt = rt.to(tl.float32)
        acc_h = tl.dot(xl, tl.trans(a), acc_h, input_precision=DOT_PREC, out_dtype=ACC)
        acc_z = tl.dot(x, tl.trans(rt), acc_z, input_precision=DOT_PREC, out_dtype=ACC)
        if C > 0:
            xf = x.to(ACC)
            if STATS:
                x_nf += tl.sum(xf - xf, axis=1)  # NaN for a NaN or ±inf entry, else 0
            cm = cmask[:, None] & kmask[None, :]
            cen = tl.load(c_ptr + ccol64[:, None] * stride_c64 + ks[None, :], mask=cm,
                          other=0.0).to(ACC)
            org = tl.load(c_ptr + ks, mask=kmask, other=0.0).to(ACC)  # the origin c_0
            xd = xf - org[None, :]
            cd = tl.where(cm, cen - org[None, :], 0.0)
            c_sq = tl.dot(xd, tl.trans(-2.0 * cd), c_sq, input_precision=CDOT_PREC,
                          out_dtype=ACC)
            c_cc += tl.sum(cd * cd, axis=1)
            if REDUCE == 2:
                isd = tl.load(s_ptr + ccol64[:, None] * stride_s64 + ks[None, :], mask=cm,
                              other=0.0).to(ACC)
                s2 = isd * isd
                c_red = tl.dot(xd * xd, tl.trans(s2), c_red, input_precision=CDOT_PREC,
                               out_dtype=ACC)
                c_red = tl.dot(xd, tl.trans(-2.0 * cd * s2), c_red, input_precision=CDOT_PREC,
                               out_dtype=ACC)
                c_cs += tl.sum(cd * cd * s2, axis=1)
            else:
                # CUDA-core work per element and cluster: masked K columns load x = c = 0
                # (diff 0); masked token rows are never stored
                for c in tl.static_range(C):
                    cr = tl.load(c_ptr + c * stride_c64 + ks, mask=kmask, other=0.0).to(ACC)
                    sr = tl.load(s_ptr + c * stride_s64 + ks, mask=kmask, other=0.0).to(ACC)
                    u = tl.abs(xf - cr[None, :]) * sr[None, :]
                    sel = ccol[None, :] == c
                    if REDUCE == 0:
                        c_red = tl.where(sel, tl.maximum(c_red, tl.max(u, axis=1)[:, None]),
                                         c_red)
                        c_nan = tl.where(sel, c_nan + tl.sum(tl.where(u != u, u, 0.0),
                                                             axis=1)[:, None], c_nan)
                    else:
                        c_red = tl.where(sel, c_red + tl.sum(u, axis=1)[:, None], c_red)
    if C > 0:
        c_sq += c_cc[None, :]
        if REDUCE == 2:
            c_red += c_cs[None, :]
    return acc_h, acc_z, c_sq, c_red, c_nan, x_nf


@triton.jit
def _rms_exact(x_ptr, c_ptr, s_ptr, rows64, tmask, jstar, K, stride_xt, stride_c, stride_s,
               ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k ((x_k − c_{j*,k}) s_{j*,k})² per token, term by term (the centre and inv_std rows
    of each token's own j* gathered): what the expanded dots give, but with the reference's
    NaN or inf where a term is non-finite (the dots can turn inf into inf − inf = NaN, and
    NaN ranks a logit last where inf ranks it first, §1.5). Only for a block that has a
    non-finite distance."""
    kk = tl.arange(0, BLOCK_K)
    j64 = jstar.to(tl.int64)
    out = tl.zeros((BLOCK_T,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + kk
        m = tmask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xt + ks[None, :], mask=m, other=0.0)
        c = tl.load(c_ptr + j64[:, None] * tl.cast(stride_c, tl.int64) + ks[None, :], mask=m,
                    other=0.0)
        sv = tl.load(s_ptr + j64[:, None] * tl.cast(stride_s, tl.int64) + ks[None, :], mask=m,
                     other=0.0)
        u = (x.to(ACC) - c.to(ACC)) * sv.to(ACC)
        out += tl.sum(u * u, axis=1)
    return out


@triton.jit
def _route_finish(
    acc_h, z, c_sq, c_red, c_nan, x_nf,
    x_ptr, c_ptr, s_ptr,
    sh_ptr, keep_ptr, gates_ptr, idx_ptr, dist_ptr, assign_ptr, h_ptr, hg_ptr, sj_ptr, rr_ptr,
    rows64, tmask, wmask, hcol, ecol, ccol, K, stride_xt, stride_c, stride_s,
    stride_sh, stride_keep, stride_hg,
    scaling, lam,
    ER: tl.constexpr, R: tl.constexpr, E: tl.constexpr, E_L: tl.constexpr,
    TOPK: tl.constexpr, C: tl.constexpr, EP: tl.constexpr, CP: tl.constexpr,
    REDUCE: tl.constexpr, YIELD: tl.constexpr, HAS_SHIFT: tl.constexpr,
    STATS: tl.constexpr, HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The route epilogue on the summed accumulators of :func:`_route_accumulate`: the
    cluster choice, the distance, yielding, top-k, the softmax, and the stores of gates,
    topk_idx, distance, assign (rows in ``wmask``), h and hg (this program's columns).
    x, the centres and inv_std are read again only for a block whose rms distance is not
    finite somewhere (:func:`_rms_exact`)."""
    if C > 0:
        # j* = first minimum, a non-finite squared distance counting as -inf (§1.5): no NaN
        # enters the comparisons, so j* is always a valid cluster
        sqm = tl.where(c_sq - c_sq == 0.0, c_sq, float("-inf"))
        sqm = tl.where(ccol[None, :] < C, sqm, float("inf"))
        mn = tl.min(sqm, axis=1)
        jstar = tl.min(tl.where(sqm == mn[:, None], ccol[None, :], CP), axis=1)
        pick = ccol[None, :] == jstar[:, None]
        red = tl.sum(tl.where(pick, c_red, 0.0), axis=1)
        if REDUCE == 0:
            red += tl.sum(tl.where(pick, c_nan, 0.0), axis=1)
        elif REDUCE == 1:
            red = red / K
        else:
            bad = (red - red != 0.0) & tmask
            if tl.max(bad.to(tl.int32), axis=0) > 0:
                red = tl.where(bad, _rms_exact(x_ptr, c_ptr, s_ptr, rows64, tmask, jstar, K,
                                               stride_xt, stride_c, stride_s, ACC, BLOCK_T,
                                               BLOCK_K), red)
            # the expanded sum can round below 0 where x = c; NaN stays NaN (NaN < 0 is false)
            red = tl.sqrt(tl.where(red < 0.0, 0.0, red) / K)
        if HAS_SHIFT:
            # d = r - shift[j*]: the picked cluster's value selected (not multiplied), so a
            # non-finite shift of another cluster does not reach this token (§1.5)
            sh = tl.load(sh_ptr + ccol.to(tl.int64) * tl.cast(stride_sh, tl.int64),
                         mask=ccol < C, other=0.0).to(ACC)
            d = red - tl.sum(tl.where(pick, sh[None, :], 0.0), axis=1)
        else:
            d = red - 1.0
        if YIELD:
            ident = (ecol[None, :] >= E_L) & (ecol[None, :] < E)
            z = tl.where(ident, z + lam * d[:, None], z)
        tl.store(dist_ptr + rows64, d.to(dist_ptr.dtype.element_ty), mask=wmask)
        tl.store(assign_ptr + rows64, jstar.to(tl.int64), mask=wmask)
        if STATS:
            kept = x_nf == 0.0
            if HAS_KEEP:
                kv = tl.load(keep_ptr + rows64 * tl.cast(stride_keep, tl.int64), mask=tmask,
                             other=0)
                kept = kept & (kv != 0)
            tl.store(sj_ptr + rows64, tl.where(kept, jstar, -1).to(tl.int32), mask=wmask)
            tl.store(rr_ptr + rows64, red.to(rr_ptr.dtype.element_ty), mask=wmask)
    else:
        tl.store(dist_ptr + rows64, tl.zeros((BLOCK_T,), dtype=dist_ptr.dtype.element_ty),
                 mask=wmask)
        tl.store(assign_ptr + rows64, tl.full((BLOCK_T,), -1, dtype=tl.int64), mask=wmask)

    # ---- top-k by rank count (§1.3, §1.5): rank_i = #{j ranked before i}, where a number
    # ranks before NaN, larger before smaller, equal values (and NaNs) by lower index: a
    # total order, so the ranks are a permutation and every idx slot is written once
    isnan = z != z
    zf = tl.where(isnan, float("-inf"), z)
    rank = tl.zeros((BLOCK_T, EP), dtype=tl.int32)
    for j in tl.static_range(E):
        onej = ecol[None, :] == j
        zj = tl.sum(tl.where(onej, zf, 0.0), axis=1)[:, None]
        nj = tl.sum(tl.where(onej, isnan.to(tl.int32), 0), axis=1)[:, None] > 0
        beats = (isnan & ~nj) | ((isnan == nj) & ((zj > zf) | ((zj == zf) & (ecol[None, :] > j))))
        rank += beats.to(tl.int32)
    keep = (rank < TOPK) & (ecol[None, :] < E)
    zk = tl.where(keep, zf, float("-inf"))
    m = tl.max(zk, axis=1)
    p = tl.where(keep, tl.exp(zk - m[:, None]), 0.0)
    g = tl.where(keep, p / tl.sum(p, axis=1)[:, None], 0.0)
    # a token with any non-finite logit gets NaN for every gate
    bad = tl.sum(((z - z != 0.0) & (ecol[None, :] < E)).to(tl.int32), axis=1) > 0
    g = tl.where(bad[:, None], float("nan"), g)

    gmask = wmask[:, None] & (ecol[None, :] < E)
    tl.store(gates_ptr + rows64[:, None] * E + ecol[None, :],
             g.to(gates_ptr.dtype.element_ty), mask=gmask)
    tl.store(idx_ptr + rows64[:, None] * TOPK + rank,
             tl.zeros((BLOCK_T, EP), dtype=tl.int64) + ecol[None, :],
             mask=wmask[:, None] & keep)

    # ---- h and hg = s * g ⊙ h (each r-chunk by its gate) ------------------------------
    hmask = tmask[:, None] & (hcol[None, :] < ER)
    tl.store(h_ptr + rows64[:, None] * ER + hcol[None, :], acc_h, mask=hmask)
    gexp = _expand_gates(g.to(ACC), ecol, hcol, R, E_L)
    hg = (scaling * gexp) * acc_h
    tl.store(hg_ptr + rows64[:, None] * tl.cast(stride_hg, tl.int64) + hcol[None, :],
             _cast(hg, hg_ptr.dtype.element_ty, UPCAST), mask=hmask)


@triton.jit(do_not_specialize=["T"])
def route_fwd_kernel(
    x_ptr, xl_ptr, a_ptr, r_ptr, c_ptr, s_ptr, sh_ptr, keep_ptr, xc_ptr,
    gates_ptr, idx_ptr, dist_ptr, assign_ptr, h_ptr, hg_ptr, sj_ptr, rr_ptr,
    ph_ptr, pr_ptr,
    T, K, k_chunk,
    stride_xt, stride_xlt, stride_a, stride_r, stride_c, stride_s, stride_sh, stride_keep,
    stride_xc, stride_hg, stride_ps, stride_pr,
    scaling, lam,
    ER: tl.constexpr, R: tl.constexpr, E: tl.constexpr, E_L: tl.constexpr,
    TOPK: tl.constexpr, C: tl.constexpr,
    RP: tl.constexpr, EP: tl.constexpr, CP: tl.constexpr,
    HAS_XL: tl.constexpr, REDUCE: tl.constexpr, YIELD: tl.constexpr, HAS_SHIFT: tl.constexpr,
    STATS: tl.constexpr, HAS_KEEP: tl.constexpr, WRITE_X: tl.constexpr,
    PARTIAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    CDOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """See the module docstring. Grid (cdiv(T, BLOCK_T), column blocks of h, splits of K).

    PARTIAL = False (one split): the whole K loop, then the epilogue (:func:`_route_finish`).
    PARTIAL = True: program (t, j, s) sums channels [s·k_chunk, (s+1)·k_chunk) and stores
    fp32 (fp64) partials for :func:`route_epilogue_kernel`: its h columns into
    ``ph[s, t, :]`` (row stride ER), and, from column block 0 only, the routing sums into
    ``pr[s, t, :]`` (row stride ``stride_pr``): z at [0, EP), the cluster squared
    distances at [EP, EP + CP), the reduce at [EP + CP, EP + 2CP), its NaN terms at
    [EP + 2CP, EP + 3CP) and x's non-finite flag at EP + 3CP. ``stride_ps``: the elements
    between two splits of ph (T·ER); pr's split stride is T·stride_pr.

    With STATS (clusters given and their statistics asked for) the epilogue also writes, per
    token, what :func:`cluster_stats_kernel` needs: ``sj`` (int32) = j* when the token is
    kept (``keep[t]``, read through its stride, when HAS_KEEP; and every entry of x_t finite,
    checked in the K loop), else -1; and ``rr`` = r, the reduced distance before the
    shift (acc dtype). 8 bytes per token written, 1 read (the keep mask)."""
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)  # which RP-wide block of h columns this program owns
    pid_s = tl.program_id(2)  # which chunk of K (PARTIAL)
    ACC = h_ptr.dtype.element_ty  # fp32 (fp64 for fp64 x)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rows < T
    wmask = rows < tl.where(pid_h == 0, T, 0)  # routing outputs: written by column block 0
    rows64 = rows.to(tl.int64)
    hcol = pid_h * RP + tl.arange(0, RP)
    ecol = tl.arange(0, EP)
    ccol = tl.arange(0, CP)
    if PARTIAL:
        k_lo = pid_s * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, K)
    else:
        k_lo = 0
        k_hi = K
    acc_h, z, c_sq, c_red, c_nan, x_nf = _route_accumulate(
        x_ptr, xl_ptr, a_ptr, r_ptr, c_ptr, s_ptr, xc_ptr,
        rows64, tmask, wmask, hcol, ecol, ccol, k_lo, k_hi,
        stride_xt, stride_xlt, stride_a, stride_r, stride_c, stride_s, stride_xc,
        ER, E, C, RP, EP, CP, HAS_XL, REDUCE, STATS, WRITE_X, UPCAST, DOT_PREC,
        CDOT_PREC, ACC, BLOCK_T, BLOCK_K)
    if PARTIAL:
        s64 = pid_s.to(tl.int64)
        ph = ph_ptr + s64 * tl.cast(stride_ps, tl.int64)
        tl.store(ph + rows64[:, None] * ER + hcol[None, :], acc_h,
                 mask=tmask[:, None] & (hcol[None, :] < ER))
        pr = pr_ptr + (s64 * T + rows64) * tl.cast(stride_pr, tl.int64)  # (BLOCK_T,) rows
        tl.store(pr[:, None] + ecol[None, :], z, mask=wmask[:, None])
        if C > 0:
            tl.store(pr[:, None] + EP + ccol[None, :], c_sq, mask=wmask[:, None])
            tl.store(pr[:, None] + (EP + CP) + ccol[None, :], c_red, mask=wmask[:, None])
            tl.store(pr[:, None] + (EP + 2 * CP) + ccol[None, :], c_nan, mask=wmask[:, None])
            tl.store(pr + (EP + 3 * CP), x_nf, mask=wmask)
    else:
        _route_finish(acc_h, z, c_sq, c_red, c_nan, x_nf, x_ptr, c_ptr, s_ptr,
                      sh_ptr, keep_ptr, gates_ptr, idx_ptr, dist_ptr, assign_ptr, h_ptr, hg_ptr,
                      sj_ptr, rr_ptr, rows64, tmask, wmask, hcol, ecol, ccol, K, stride_xt,
                      stride_c, stride_s, stride_sh, stride_keep, stride_hg, scaling, lam,
                      ER, R, E, E_L, TOPK, C, EP, CP, REDUCE, YIELD, HAS_SHIFT, STATS, HAS_KEEP,
                      UPCAST, ACC, BLOCK_T, BLOCK_K)


@triton.jit(do_not_specialize=["T"])
def route_epilogue_kernel(
    ph_ptr, pr_ptr, x_ptr, c_ptr, s_ptr, sh_ptr, keep_ptr,
    gates_ptr, idx_ptr, dist_ptr, assign_ptr, h_ptr, hg_ptr, sj_ptr, rr_ptr,
    T, K, SPLITS,
    stride_xt, stride_c, stride_s, stride_sh, stride_keep, stride_hg, stride_ps, stride_pr,
    scaling, lam,
    ER: tl.constexpr, R: tl.constexpr, E: tl.constexpr, E_L: tl.constexpr,
    TOPK: tl.constexpr, C: tl.constexpr,
    RP: tl.constexpr, EP: tl.constexpr, CP: tl.constexpr,
    REDUCE: tl.constexpr, YIELD: tl.constexpr, HAS_SHIFT: tl.constexpr,
    STATS: tl.constexpr, HAS_KEEP: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Route forward split over K, second launch: sums the SPLITS partials of
    :func:`route_fwd_kernel` (PARTIAL) in split order (deterministic; the max reduce by max)
    and runs the epilogue. Grid (cdiv(T, BLOCK_T), column blocks of h)."""
    pid = tl.program_id(0)
    pid_h = tl.program_id(1)
    ACC = h_ptr.dtype.element_ty
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rows < T
    wmask = rows < tl.where(pid_h == 0, T, 0)
    rows64 = rows.to(tl.int64)
    hcol = pid_h * RP + tl.arange(0, RP)
    ecol = tl.arange(0, EP)
    ccol = tl.arange(0, CP)
    hmask = tmask[:, None] & (hcol[None, :] < ER)
    acc_h = tl.zeros((BLOCK_T, RP), dtype=ACC)
    z = tl.zeros((BLOCK_T, EP), dtype=ACC)
    c_sq = tl.zeros((BLOCK_T, CP), dtype=ACC)
    c_red = tl.zeros((BLOCK_T, CP), dtype=ACC)
    c_nan = tl.zeros((BLOCK_T, CP), dtype=ACC)
    x_nf = tl.zeros((BLOCK_T,), dtype=ACC)
    stride_pr64 = tl.cast(stride_pr, tl.int64)
    for s in range(0, SPLITS):
        s64 = tl.cast(s, tl.int64)
        ph = ph_ptr + s64 * tl.cast(stride_ps, tl.int64)
        acc_h += tl.load(ph + rows64[:, None] * ER + hcol[None, :], mask=hmask, other=0.0)
        pr = pr_ptr + (s64 * T + rows64) * stride_pr64  # (BLOCK_T,) rows
        z += tl.load(pr[:, None] + ecol[None, :], mask=tmask[:, None], other=0.0)
        if C > 0:
            c_sq += tl.load(pr[:, None] + EP + ccol[None, :], mask=tmask[:, None], other=0.0)
            red = tl.load(pr[:, None] + (EP + CP) + ccol[None, :], mask=tmask[:, None],
                          other=0.0)
            if REDUCE == 0:
                c_red = tl.maximum(c_red, red)
            else:
                c_red += red
            c_nan += tl.load(pr[:, None] + (EP + 2 * CP) + ccol[None, :], mask=tmask[:, None],
                             other=0.0)
            x_nf += tl.load(pr + (EP + 3 * CP), mask=tmask, other=0.0)
    _route_finish(acc_h, z, c_sq, c_red, c_nan, x_nf, x_ptr, c_ptr, s_ptr,
                  sh_ptr, keep_ptr, gates_ptr, idx_ptr, dist_ptr, assign_ptr, h_ptr, hg_ptr,
                  sj_ptr, rr_ptr, rows64, tmask, wmask, hcol, ecol, ccol, K, stride_xt,
                  stride_c, stride_s, stride_sh, stride_keep, stride_hg, scaling, lam,
                  ER, R, E, E_L, TOPK, C, EP, CP, REDUCE, YIELD, HAS_SHIFT, STATS, HAS_KEEP,
                  UPCAST, ACC, BLOCK_T, BLOCK_K)


@triton.jit
def _add_nonfinite(acc, v, j, ccol):
    """acc (CP, W) += the non-finite entries of v (W,), one token's row, in row j (-1: none):
    selected, never multiplied, so a NaN or inf reaches its own cluster's row only (a one-hot
    dot would spread it as 0 · NaN). One token at a time, so nothing large is held in
    registers: this runs only in a program that saw a non-finite value."""
    return tl.where((ccol[:, None] == j) & (v - v != 0.0)[None, :], acc + v[None, :], acc)


@triton.jit
def _onehot_dot(acc, ohT, v, DOT_PREC: tl.constexpr):
    """acc (CP, W) += ohT v over the finite entries of v (BT, W): ohT (CP, BT) is the 0/1
    one-hot of the tokens' clusters (a zero column for a token not kept, whose row of v is 0).
    The non-finite entries count as 0 here; :func:`_add_nonfinite` adds them after the loop."""
    return tl.dot(ohT, tl.where(v - v != 0.0, 0.0, v), acc, input_precision=DOT_PREC,
                  out_dtype=acc.dtype)


@triton.jit
def _stats_x_tile(x_ptr, c_ptr, sj_ptr, rows, t_hi, ks, kmask, stride_xt, stride_c64, ACC):
    """(j, D) of one tile: the tokens' j (-1: not kept, or past the group) and
    D = x - c_j (BT, BK) in the acc dtype, 0 where j = -1 or the channel is past K. x and c
    go straight to the acc dtype (fp32 for half x: no half arithmetic, which the interpreter
    also gets wrong)."""
    j = tl.load(sj_ptr + rows, mask=rows < t_hi, other=-1)
    m = (j >= 0)[:, None] & kmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :], mask=m, other=0.0)
    c = tl.load(c_ptr + j.to(tl.int64)[:, None] * stride_c64 + ks[None, :], mask=m, other=0.0)
    return j, x.to(ACC) - c.to(ACC)


@triton.jit
def _stats_r_tile(sj_ptr, rr_ptr, rows, t_hi, vcol, ACC):
    """(j, v) of one tile: v (BT, 16) = [1, r, r², 0...] of a kept token, 0 otherwise."""
    j = tl.load(sj_ptr + rows, mask=rows < t_hi, other=-1)
    kept = j >= 0
    r = tl.load(rr_ptr + rows, mask=kept, other=0.0).to(ACC)
    v = tl.where(vcol[None, :] == 0, 1.0,
                 tl.where(vcol[None, :] == 1, r[:, None],
                          tl.where(vcol[None, :] == 2, (r * r)[:, None], 0.0)))
    return j, tl.where(kept[:, None], v, 0.0).to(ACC)


@triton.jit
def _row_bad(bad, v):
    """bad (BT,) int32 |= whether a row of v has a non-finite entry."""
    return tl.maximum(bad, tl.max((v - v != 0.0).to(tl.int32), axis=1))


@triton.jit(do_not_specialize=["T"])
def cluster_stats_kernel(
    x_ptr, c_ptr, sj_ptr, rr_ptr, out_ptr,
    T, K, group_len,
    stride_xt, stride_c, stride_og, stride_oc,
    C: tl.constexpr, CP: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The per-cluster statistics of the sliding update (``docs/method.md`` §2;
    :func:`slim_kernels.reference.reference_cluster_stats`), one row per cluster:
    ``[n, Σ(x - c) (K), Σ(x - c)² (K), Σr, Σr²]`` over the kept tokens assigned to it, from
    what route_fwd wrote per token (``sj`` = j* or -1 when not kept, ``rr`` = r). A second
    pass over x, after the route kernel has chosen j*.

    Grid (cdiv(K, BLOCK_K) + 1, G). Program (k, g) walks the tokens of group g
    ([g·group_len, (g+1)·group_len)) in order, BLOCK_T at a time, and accumulates for its
    BLOCK_K channels ``(C, BLOCK_K)`` sums of ``D = x - c_{sj}`` (c gathered per token, from
    L1/L2) and of D², each with one one-hot dot per tile (ohT (CP, BLOCK_T) times D). The
    last program of a group (k = cdiv(K, BLOCK_K)) sums the columns [1, r, r²] the same way.
    Each program writes its rows once: into the output when G = 1, else into partial g of a
    (G, C, 2K + 3) buffer that the launcher sums over g in a fixed order. No atomics: the same
    bits every run.

    Non-finite values (a non-finite centre, an inv_std that makes r NaN, an overflowing
    square) are left out of the dots (0 · NaN would reach every cluster's row) and flagged;
    a program that saw one walks its tokens again, one at a time, and adds them to their own
    cluster's row only. That second walk happens only then (the layer drops such an update).

    Cost at T = 8192, K = 4096, C = 16, bf16 x, 132 SMs (launcher: BLOCK_K = 64, G = 5):
    one read of x (64 MiB; the centres' (C, BLOCK_K) slice stays in L1), 8·T = 64 KiB of
    sj/r written by route_fwd and read per program from L2, the (C, 2K + 3) fp32 output
    (0.5 MiB) and G partials (2.5 MiB) written and read once by the sum: 2 launches (this
    kernel and the sum; 1 when G = 1). The dots are one-hot (CP = 16 rows) against fp32 D:
    "tf32x3" on a GPU (3 tensor-core passes, ~fp32 accuracy: the one-hot is exact in tf32
    and D = D_hi + D_lo), "ieee" under the interpreter and for fp64.
    """
    pid_k = tl.program_id(0)
    pid_g = tl.program_id(1)
    ACC = out_ptr.dtype.element_ty
    ccol = tl.arange(0, CP)
    tt = tl.arange(0, BLOCK_T)
    # every index x stride product in int64
    t_lo = pid_g.to(tl.int64) * group_len
    t_hi = tl.minimum(t_lo + group_len, T)
    K64 = tl.cast(K, tl.int64)
    stride_c64 = tl.cast(stride_c, tl.int64)
    o_rows = out_ptr + pid_g.to(tl.int64) * stride_og + ccol.to(tl.int64)[:, None] * stride_oc
    rmask = ccol[:, None] < C
    bad = tl.zeros((BLOCK_T,), dtype=tl.int32)
    if pid_k < tl.cdiv(K, BLOCK_K):
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < K
        acc_s = tl.zeros((CP, BLOCK_K), dtype=ACC)
        acc_q = tl.zeros((CP, BLOCK_K), dtype=ACC)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            j, D = _stats_x_tile(x_ptr, c_ptr, sj_ptr, t0 + tt, t_hi, ks, kmask, stride_xt,
                                 stride_c64, ACC)
            Q = D * D
            ohT = (ccol[:, None] == j[None, :]).to(ACC)
            acc_s = _onehot_dot(acc_s, ohT, D, DOT_PREC)
            acc_q = _onehot_dot(acc_q, ohT, Q, DOT_PREC)
            bad = _row_bad(bad, Q)  # Q is non-finite wherever D is
        if tl.max(bad, axis=0) > 0:
            for t in range(t_lo, t_hi):
                j = tl.load(sj_ptr + t)
                # j broadcast first: the interpreter rejects a tensor & scalar mask
                m = kmask & ((ks * 0 + j) >= 0)
                xr = tl.load(x_ptr + t * stride_xt + ks, mask=m, other=0.0)
                cr = tl.load(c_ptr + j.to(tl.int64) * stride_c64 + ks, mask=m, other=0.0)
                d = xr.to(ACC) - cr.to(ACC)
                acc_s = _add_nonfinite(acc_s, d, j, ccol)
                acc_q = _add_nonfinite(acc_q, d * d, j, ccol)
        om = rmask & kmask[None, :]
        tl.store(o_rows + 1 + ks[None, :], acc_s, mask=om)
        tl.store(o_rows + 1 + K64 + ks[None, :], acc_q, mask=om)
    else:
        vcol = tl.arange(0, 16)  # [1, r, r², 0...]: 16 wide, the smallest dot
        acc_v = tl.zeros((CP, 16), dtype=ACC)
        for t0 in range(t_lo, t_hi, BLOCK_T):
            j, v = _stats_r_tile(sj_ptr, rr_ptr, t0 + tt, t_hi, vcol, ACC)
            acc_v = _onehot_dot(acc_v, (ccol[:, None] == j[None, :]).to(ACC), v, DOT_PREC)
            bad = _row_bad(bad, v)
        if tl.max(bad, axis=0) > 0:
            for t in range(t_lo, t_hi):
                j = tl.load(sj_ptr + t)
                r = tl.load(rr_ptr + t, mask=j >= 0, other=0.0).to(ACC)
                v = tl.where(vcol == 1, r, tl.where(vcol == 2, r * r, 0.0))  # n is finite
                acc_v = _add_nonfinite(acc_v, v, j, ccol)
        vc = tl.where(vcol == 0, 0, 2 * K64 + vcol.to(tl.int64))  # n at 0, Σr, Σr² at 2K+1, 2K+2
        tl.store(o_rows + vc[None, :], acc_v, mask=rmask & (vcol[None, :] < 3))


@triton.jit
def _gemm_segment(acc, a_ptr, b_ptr, rm, rn, mm, nm, lo, hi, hi_b, s_am, s_ak, s_bk, s_bn,
                  UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += a[rm, lo:hi] b[lo:hi, rn], b's rows read below hi_b only (hi_b <= hi: a's
    columns from hi_b on are zeros, a row padding that keeps a's rows and extent multiples of
    16 elements, while b has no such rows). The offsets are int64 (rm, rn are; the k offsets are
    made so): a weight gradient loops over T, and (T-1)·stride passes 2^31 at T ~ 150k for
    K = 14336. The tile's offsets are loop-invariant; a scalar base pointer advances by
    BLOCK_K·stride per step (loop-carried pointer tensors cost ~70 registers more, and
    spilled in the three-segment dx GEMM: benchmarks/triton_resources.csv)."""
    rk = tl.arange(0, BLOCK_K)
    s_ak64 = tl.cast(s_ak, tl.int64)
    s_bk64 = tl.cast(s_bk, tl.int64)
    rk64 = rk.to(tl.int64)
    a_off = rm[:, None] * s_am + rk64[None, :] * s_ak64
    b_off = rk64[:, None] * s_bk64 + rn[None, :] * s_bn
    a_base = a_ptr + lo * s_ak64
    b_base = b_ptr + lo * s_bk64
    for k0 in range(lo, hi, BLOCK_K):
        km = (k0 + rk) < hi
        a = tl.load(a_base + a_off, mask=mm[:, None] & km[None, :], other=0.0)
        b = tl.load(b_base + b_off, mask=((k0 + rk) < hi_b)[:, None] & nm[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=acc.dtype)
        a_base += BLOCK_K * s_ak64
        b_base += BLOCK_K * s_bk64
    return acc


@triton.jit
def fused_linear_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, a3_ptr, b3_ptr, bias_ptr, out_ptr,
    M, N, K1, K2, K3, K2B, K3B,
    s_a1m, s_a1k, s_b1k, s_b1n,
    s_a2m, s_a2k, s_b2k, s_b2n,
    s_a3m, s_a3k, s_b3k, s_b3n,
    s_om, s_on, s_bias, s_split,
    SPLIT_K, KEY_M, KEY_N, KEY_K,
    HAS_2: tl.constexpr, HAS_3: tl.constexpr, HAS_BIAS: tl.constexpr, IS_FP64: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M, N) = a1 b1 + a2 b2 + a3 b3 (+ bias[N]); a_i (M, K_i), b_i (K_i, N) and bias
    (element stride s_bias) strided. b2, b3 have K2B <= K2, K3B <= K3 rows (a2, a3 are zero
    in the columns beyond: see :func:`_gemm_segment`).

    Split-K (grid axis 1, SPLIT_K programs per tile): program k sums its BLOCK_K-aligned chunk
    of segment 1 and writes the fp32 (fp64) partial at out + k·s_split; split 0 also adds
    segments 2 and 3 (E_L·r and E columns) and the bias. The launcher reduces the partials in
    a fixed order. KEY_M/N/K are not read: they are the autotuning key (power-of-two buckets
    of M, N and K1, so a new token count does not re-tune)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    gid = pid // group
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % gsize)
    pid_n = (pid % group) // gsize

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mm = rm < M
    nm = rn < N
    if IS_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ACC = acc.dtype

    chunk = tl.cdiv(tl.cdiv(K1, SPLIT_K), BLOCK_K) * BLOCK_K
    lo = pid_k * chunk
    hi = tl.minimum(lo + chunk, K1)
    acc = _gemm_segment(acc, a1_ptr, b1_ptr, rm, rn, mm, nm, lo, hi, hi,
                        s_a1m, s_a1k, s_b1k, s_b1n, UPCAST, DOT_PREC, BLOCK_K)
    first = pid_k == 0
    if HAS_2:
        acc = _gemm_segment(acc, a2_ptr, b2_ptr, rm, rn, mm, nm, 0, tl.where(first, K2, 0), K2B,
                            s_a2m, s_a2k, s_b2k, s_b2n, UPCAST, DOT_PREC, BLOCK_K)
    if HAS_3:
        acc = _gemm_segment(acc, a3_ptr, b3_ptr, rm, rn, mm, nm, 0, tl.where(first, K3, 0), K3B,
                            s_a3m, s_a3k, s_b3k, s_b3n, UPCAST, DOT_PREC, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn * s_bias, mask=rn < tl.where(first, N, 0), other=0.0)
        bias = bias.to(ACC)
        acc = acc + bias[None, :]
    o_ptr = out_ptr + pid_k.to(tl.int64) * s_split
    tl.store(o_ptr + rm[:, None] * s_om + rn[None, :] * s_on,
             _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=mm[:, None] & nm[None, :])


@triton.jit(do_not_specialize=["T"])
def route_bwd_kernel(
    dy_ptr, b_ptr, h_ptr, gates_ptr, dgates_ptr,
    dhz_ptr, hg_ptr, db_ptr,
    T, N,
    stride_dyt, stride_bn, stride_dhz, stride_dg, stride_dbp,
    scaling,
    ER: tl.constexpr, R: tl.constexpr, E: tl.constexpr, E_L: tl.constexpr,
    RP: tl.constexpr, EP: tl.constexpr, EW: tl.constexpr,
    HAS_DG: tl.constexpr, DB_MODE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dhg = dy B_all (K loop over N); epilogue writes dhz = [dh | dz | 0] and hg (x dtype).
    dhz's row is ER + EW wide (EW >= E, EW <= EP): the launcher pads it to a multiple of 16
    elements so that the GEMMs reading it (dx, [dA; dR]) get 16-byte aligned rows and K
    extents; the EW - E padding columns are written as zeros.

    dg_e = s Σ_{c in chunk e} dhg_c h_c (+ dgates_e);  dz = g ⊙ (dg − Σ g dg);
    dh = s g_e dhg;  hg = s g_e h.

    DB_MODE > 0 also sums dB_all = dyᵀ hg in the same pass over dy (hg = s g ⊙ h is known
    before the loop; ``docs/method.md`` §6): each step's (BLOCK_K, E_L·r) block of this
    program's tokens goes to db_ptr, fp32 (fp64). DB_MODE 1: stored as this program's partial
    at db_ptr + pid·stride_dbp (the launcher sums the partials in program order:
    deterministic). DB_MODE 2: atomically added into one (N, E_L·r) buffer (order-dependent
    rounding: only when the caller allows non-deterministic algorithms).
    """
    pid = tl.program_id(0)
    ACC = h_ptr.dtype.element_ty
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rows < T
    rows64 = rows.to(tl.int64)
    hcol = tl.arange(0, RP)
    ecol = tl.arange(0, EP)
    kk = tl.arange(0, BLOCK_K)

    if DB_MODE > 0:
        # hg in x's dtype, as the unfused dB GEMM reads it (the epilogue below recomputes it)
        hm = tmask[:, None] & (hcol[None, :] < ER)
        h0 = tl.load(h_ptr + rows64[:, None] * ER + hcol[None, :], mask=hm, other=0.0).to(ACC)
        g0 = tl.load(gates_ptr + rows64[:, None] * E + ecol[None, :],
                     mask=tmask[:, None] & (ecol[None, :] < E), other=0.0).to(ACC)
        hg_op = _cast(scaling * _expand_gates(g0, ecol, hcol, R, E_L) * h0,
                      dy_ptr.dtype.element_ty, UPCAST)
        if UPCAST:
            hg_op = hg_op.to(tl.float32)
        if DB_MODE == 1:
            db_base = db_ptr + pid.to(tl.int64) * stride_dbp
        else:
            db_base = db_ptr

    acc = tl.zeros((BLOCK_T, RP), dtype=ACC)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + kk
        nmask = ns < N
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dyt + ns[None, :],
                     mask=tmask[:, None] & nmask[None, :], other=0.0)
        b = tl.load(b_ptr + ns[:, None].to(tl.int64) * stride_bn + hcol[None, :],
                    mask=nmask[:, None] & (hcol[None, :] < ER), other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(dy, b, acc, input_precision=DOT_PREC, out_dtype=ACC)
        if DB_MODE > 0:
            dbp = tl.dot(tl.trans(dy), hg_op, input_precision=DOT_PREC, out_dtype=ACC)
            dbo = db_base + ns[:, None].to(tl.int64) * ER + hcol[None, :]
            dbm = nmask[:, None] & (hcol[None, :] < ER)
            if DB_MODE == 1:
                tl.store(dbo, dbp, mask=dbm)
            else:
                tl.atomic_add(dbo, dbp, mask=dbm, sem="relaxed")

    hmask = tmask[:, None] & (hcol[None, :] < ER)
    emask = tmask[:, None] & (ecol[None, :] < E)
    h = tl.load(h_ptr + rows64[:, None] * ER + hcol[None, :], mask=hmask, other=0.0).to(ACC)
    g = tl.load(gates_ptr + rows64[:, None] * E + ecol[None, :], mask=emask, other=0.0).to(ACC)
    dg = scaling * _chunk_sums(acc * h, ecol, hcol, R, E_L)
    if HAS_DG:
        dg += tl.load(dgates_ptr + rows64[:, None] * stride_dg + ecol[None, :],
                      mask=emask, other=0.0).to(ACC)
    dz = g * (dg - tl.sum(g * dg, axis=1)[:, None])
    sg = scaling * _expand_gates(g, ecol, hcol, R, E_L)
    dh = sg * acc
    hg = sg * h
    out_ty = dhz_ptr.dtype.element_ty
    tl.store(dhz_ptr + rows64[:, None] * stride_dhz + hcol[None, :], _cast(dh, out_ty, UPCAST),
             mask=hmask)
    tl.store(dhz_ptr + rows64[:, None] * stride_dhz + ER + ecol[None, :],
             _cast(tl.where(ecol[None, :] < E, dz, 0.0), out_ty, UPCAST),
             mask=tmask[:, None] & (ecol[None, :] < EW))
    tl.store(hg_ptr + rows64[:, None] * ER + hcol[None, :], _cast(hg, out_ty, UPCAST), mask=hmask)


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's formula: a + w (b − a) for w < 0.5, else b − (b − a)(1 − w)."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def cluster_ema_kernel(
    c_ptr, v_ptr, rej_ptr, st_ptr, dm_ptr, dv_ptr, inv_ptr, sh_ptr,
    C, K,
    stride_c, stride_v, stride_st, stride_inv, stride_sh,
    momentum, eps,
    HAS_DIST: tl.constexpr, CP: tl.constexpr, BLOCK: tl.constexpr,
):
    """The sliding update of the clusters (``docs/method.md`` §2;
    :func:`slim_kernels.ops.ema.cluster_ema_torch` is the definition) in one launch of one
    program: every entry of the (C, 2K + 3) statistics checked finite (else nothing changes
    and the rejected counter goes up by one); then, per cluster with n > 0, c += mom·S1/n and
    v = lerp(v, max(S2/n − (S1/n)², 0), mom); the distance statistics (HAS_DIST); and the
    routing tensors inv_std = rsqrt(v + eps) (/ sigma) and shift. One program because the
    finiteness test and the distance statistics are global: a second program could not know
    them without a grid-wide barrier, and would race on the scalars. It moves ~2 MB at
    C = 16, K = 4096, in place of a dozen torch launches."""
    ACC = st_ptr.dtype.element_ty
    L = 2 * K + 3
    offs = tl.arange(0, BLOCK)
    crow = tl.arange(0, CP)
    cmask = crow < C
    crow64 = crow.to(tl.int64)
    stride_st64 = tl.cast(stride_st, tl.int64)
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for j in range(0, C):
        row = st_ptr + j * stride_st64
        for k0 in range(0, L, BLOCK):
            s = tl.load(row + k0 + offs, mask=k0 + offs < L, other=0.0)
            bad = tl.maximum(bad, (s - s != 0.0).to(tl.int32))
    ok = tl.max(bad, axis=0) == 0
    n = tl.load(st_ptr + crow64 * stride_st64, mask=cmask, other=0.0)
    n = tl.where(ok, n, 0.0)
    if HAS_DIST:
        count = tl.sum(n, axis=0)
        rcol = st_ptr + crow64 * stride_st64 + 2 * tl.cast(K, tl.int64)  # Σr at +1, Σr² at +2
        r1 = tl.sum(tl.where(ok, tl.load(rcol + 1, mask=cmask, other=0.0), 0.0), axis=0)
        r2 = tl.sum(tl.where(ok, tl.load(rcol + 2, mask=cmask, other=0.0), 0.0), axis=0)
        r1 = r1 / tl.maximum(count, 1.0)
        r2 = r2 / tl.maximum(count, 1.0)
        var_r = tl.maximum(r2 - r1 * r1, 0.0)
        dm = tl.load(dm_ptr)
        dv = tl.load(dv_ptr)
        sigma2 = dv + eps
        wr = tl.where((count > 0) & ok, momentum, 0.0)
        dm = _lerp(dm, (r1 * tl.sqrt(sigma2).to(ACC)).to(tl.float32), wr)
        dv = _lerp(dv, (var_r * sigma2.to(ACC)).to(tl.float32), wr)
        tl.store(dm_ptr, dm)
        tl.store(dv_ptr, dv)
        sigma = tl.sqrt(dv + eps)
        tl.store(sh_ptr + crow64 * stride_sh, tl.zeros((CP,), dtype=tl.float32) + dm / sigma,
                 mask=cmask)
    else:
        tl.store(sh_ptr + crow64 * stride_sh, tl.full((CP,), 1.0, dtype=tl.float32), mask=cmask)
    for j in range(0, C):
        j64 = tl.cast(j, tl.int64)
        nj = tl.where(ok, tl.load(st_ptr + j64 * stride_st64), 0.0)
        rn = 1.0 / tl.maximum(nj, 1.0)
        w = tl.where((nj > 0) & ok, momentum, 0.0).to(tl.float32)
        for k0 in range(0, K, BLOCK):
            ks = k0 + offs
            km = ks < K
            s1 = tl.load(st_ptr + j64 * stride_st64 + 1 + ks, mask=km, other=0.0)
            s2 = tl.load(st_ptr + j64 * stride_st64 + 1 + K + ks, mask=km, other=0.0)
            delta = tl.where(ok, s1, 0.0) * rn
            var = tl.maximum(tl.where(ok, s2, 0.0) * rn - delta * delta, 0.0)
            cp = c_ptr + j64 * stride_c + ks
            vp = v_ptr + j64 * stride_v + ks
            c = tl.load(cp, mask=km, other=0.0)
            v = tl.load(vp, mask=km, other=1.0)
            c = c + delta.to(tl.float32) * w
            v = _lerp(v, var.to(tl.float32), w)
            inv = 1.0 / tl.sqrt_rn(v + eps)
            if HAS_DIST:
                inv = inv / sigma
            tl.store(cp, c, mask=km)
            tl.store(vp, v, mask=km)
            tl.store(inv_ptr + j64 * stride_inv + ks, inv, mask=km)
    tl.store(rej_ptr, tl.load(rej_ptr) + tl.where(ok, 0, 1).to(tl.int64))
