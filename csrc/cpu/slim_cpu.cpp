// CPU kernels of the SLIM op (backend "cpp"): forward and backward, parallel over token
// blocks with at::parallel_for.
//
// Layout (docs/method.md §6): x (T, K); W (N, K); A_all (E_L*r, K); B_all (N, E_L*r); router
// R (E, K), E = E_L + E_I; clusters centres / inv_std (C, K) fp32. "acc" is fp64 for fp64
// inputs, fp32 otherwise; bf16/fp16 blocks are converted to fp32 before any arithmetic.
//
// Forward, per block of TB tokens (one pass over the block; everything stays in cache):
//   z   = x_b Rᵀ, x_b·c_j                           (TB, E+C)  one small GEMM
//   r   = reduce_k |x - c_{j*}| inv_std_{j*},  j* = argmin_j ||c_j||² - 2 x·c_j
//   d   = r - shift_{j*}  (shift: the optional distance_shift (C,), else the constant 1)
//   z_i += lam * d  (identity experts);  top-k (ties: lower index);  softmax over the kept
//   for each LoRA expert e: the tokens of the block that selected it (sparse mode) or all
//   of them (dense mode): h_e = x_e A_eᵀ, hg_e = s g_e h_e, y[tokens] += hg_e B_eᵀ.
// The base output y = x Wᵀ + b is one GEMM written before the block pass; the expand is
// accumulated into those same rows: no second T x N temporary exists. With cluster_stats,
// the pass that forms x - c_{j*} for r also sums it, its square, r and r² per cluster
// (docs/method.md §2, the statistics of the sliding update) into per-chunk partials.
//
// Backward, per block (chain rule written out in slim_kernels/ops/backends/torch.py):
//   dhg_e = dy_e B_e,  dg_e = s Σ dhg_e ⊙ h_e (+ dgates),  dz = g ⊙ (dg - Σ g dg),
//   dh_e = s g_e dhg_e;  dB_eᵀ += hg_eᵀ dy_e,  dA_e += dh_eᵀ x_e,  dR += dzᵀ x  (per-chunk
//   partial sums, reduced at the end);  dx = dy W (one GEMM first) += dz R + dh_e A_e.
// Only the selected experts are computed in sparse mode; h of the unselected experts is 0
// (the backward never reads it: their gate, hence every term they enter, is 0). Non-finite
// values (docs/method.md §1.5): top-k and the cluster argmin are total over NaN
// (csrc/common/topk.h), and sparse mode computes every expert for a token whose input, h or
// dy row is not finite, and for every token when a LoRA factor is not finite, so that the
// same rows come out non-finite as when every expert is computed.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "blas.h"
#include "common/topk.h"

namespace slim_cpu {
namespace {

constexpr int64_t kDefaultTokenBlock = 128;

// mode: bit 0 = sparse (only the selected experts), bits 8.. = tokens per block (0: the
// default; slim_kernels/ops/backends/cpp.py BLOCK)
constexpr int64_t kSparse = 1;

int64_t token_block(int64_t mode) {
  const int64_t b = mode >> 8;
  return b > 0 ? std::min<int64_t>(b, 4096) : kDefaultTokenBlock;
}

// The forward's cluster statistics are summed per chunk, a run of consecutive blocks that
// one thread takes in token order, into the chunk's own partial; the partials are then added
// in chunk order. The chunking depends on T (and the token block) only, never on the thread
// count or the schedule, so the statistics have the same bits on every run. It caps the
// forward's parallelism at this many threads when statistics are asked for (training
// forwards); their partials cost at most kStatsChunks x C x (2K + 3) values.
constexpr int64_t kStatsChunks = 16;

// ceil(a / b) for a >= 0, b > 0
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct AccOf { using type = float; };
template <>
struct AccOf<double> { using type = double; };

template <typename T>
constexpr bool is_acc_v = std::is_same<T, typename AccOf<T>::type>::value;

// rows [t0, t0+n) of a (T, L) scalar_t matrix as an acc pointer: direct when scalar_t is
// the acc type, else converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t t0, int64_t n, int64_t L,
                         std::vector<acc_t>& buf) {
  if constexpr (std::is_same<scalar_t, acc_t>::value) {
    return src + t0 * L;
  } else {
    buf.resize(static_cast<size_t>(n * L));
    const scalar_t* s = src + t0 * L;
    for (int64_t i = 0; i < n * L; ++i) buf[i] = static_cast<acc_t>(s[i]);
    return buf.data();
  }
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> whole_as_acc(const at::Tensor& t) {
  const int64_t n = t.numel();
  std::vector<acc_t> out(static_cast<size_t>(n));
  const scalar_t* p = t.data_ptr<scalar_t>();
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i]);
  return out;
}

// The router and LoRA factors in the accumulation dtype: the tensors' own data for fp32/fp64,
// a converted copy for half types. Not copyable (the pointers may point into its buffers).
template <typename acc_t, typename scalar_t>
struct SmallWeights {
  std::vector<acc_t> Rbuf, Abuf, Bbuf;
  const acc_t* R;
  const acc_t* A;
  const acc_t* B;
  SmallWeights(const at::Tensor& router, const at::Tensor& lora_A, const at::Tensor& lora_B) {
    if constexpr (is_acc_v<scalar_t>) {
      R = router.data_ptr<acc_t>();
      A = lora_A.data_ptr<acc_t>();
      B = lora_B.data_ptr<acc_t>();
    } else {
      Rbuf = whole_as_acc<acc_t, scalar_t>(router);
      Abuf = whole_as_acc<acc_t, scalar_t>(lora_A);
      Bbuf = whole_as_acc<acc_t, scalar_t>(lora_B);
      R = Rbuf.data();
      A = Abuf.data();
      B = Bbuf.data();
    }
  }
  SmallWeights(const SmallWeights&) = delete;
  SmallWeights& operator=(const SmallWeights&) = delete;
};

// One thread's scratch for the block pass, kept in thread-local storage from call to call:
// at a few tokens, allocating it on every call cost more than the block's arithmetic
// (measured: 0.8 us of a 11.5 us forward). release_large() frees any buffer a call grew past
// kKeepBytes, so a thread keeps at most kBuffers x 64 KB per pass and dtype; a call that
// large spends far longer computing than allocating.
template <typename acc_t, size_t kBuffers>
struct BlockScratch {
  static constexpr size_t kKeepBytes = size_t(1) << 16;
  std::array<std::vector<acc_t>, kBuffers> buf;
  std::vector<std::vector<int64_t>> sel;  // per LoRA expert, the block's tokens that run it
  std::vector<std::vector<int64_t>>& selected(int64_t experts) {
    sel.resize(static_cast<size_t>(experts));
    return sel;
  }
  void release_large() {
    for (auto& v : buf)
      if (v.capacity() * sizeof(acc_t) > kKeepBytes) std::vector<acc_t>().swap(v);
  }
};

// gather rows idx[0..n) (block-local) of a (TB, L) matrix into out (n, L)
template <typename acc_t>
void gather_rows(const acc_t* src, int64_t L, const std::vector<int64_t>& idx, acc_t* out) {
  for (size_t i = 0; i < idx.size(); ++i)
    std::copy(src + idx[i] * L, src + (idx[i] + 1) * L, out + i * L);
}

// The assigned cluster of one token (docs/method.md §2): argmin_j ||x - c_j||², taken as
// argmin_j (||c_j||² - 2 x·c_j) (||x||² is the same for every j), with the dot products x·c_j
// computed by the route GEMM (the centres are stacked under the router rows), as the torch
// backend does. dots[j] = x·c_j, strided by dot_stride; csq[j] = ||c_j||².
template <typename acc_t>
int64_t nearest_cluster(const acc_t* dots, int64_t dot_stride, const acc_t* csq, int64_t C) {
  int64_t best = 0;
  acc_t best_sq = std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < C; ++j) {
    // ties: the lower index; a non-finite sq wins (docs/method.md §1.5)
    const acc_t sq = slim_topk::argmin_key(csq[j] - acc_t(2) * dots[j * dot_stride]);
    if (j == 0 || sq < best_sq) {
      best_sq = sq;
      best = j;
    }
  }
  return best;
}

// r = reduce_k |x_k - c_k| s_k (reduce 0 max, 1 mean, 2 rms), one pass over the assigned
// centre c and its inv_std s, as slim_kernels.routing.cluster_route. kStats: the same pass
// also adds x_k - c_k to sum[k] and its square to sq[k] (the token's share of its cluster's
// statistics, while its row is in cache).
template <typename acc_t, bool kStats>
acc_t reduced_distance(const acc_t* x, const float* c, const float* s, int64_t K,
                       int64_t reduce, acc_t* sum, acc_t* sq) {
  acc_t r = 0;
  if (reduce == 0) {  // max; it drops NaN, so NaN u are summed into probe (as torch.amax)
    acc_t probe = 0;
#pragma omp simd reduction(max : r) reduction(+ : probe)
    for (int64_t k = 0; k < K; ++k) {
      const acc_t v = x[k] - static_cast<acc_t>(c[k]);
      acc_t u = std::abs(v) * static_cast<acc_t>(s[k]);
      r = u > r ? u : r;
      probe += u != u ? u : acc_t(0);
      if constexpr (kStats) {
        sum[k] += v;
        sq[k] += v * v;
      }
    }
    r += probe;
  } else if (reduce == 1) {  // mean
#pragma omp simd reduction(+ : r)
    for (int64_t k = 0; k < K; ++k) {
      const acc_t v = x[k] - static_cast<acc_t>(c[k]);
      r += std::abs(v) * static_cast<acc_t>(s[k]);
      if constexpr (kStats) {
        sum[k] += v;
        sq[k] += v * v;
      }
    }
    r = r / static_cast<acc_t>(K);
  } else {  // rms
#pragma omp simd reduction(+ : r)
    for (int64_t k = 0; k < K; ++k) {
      const acc_t v = x[k] - static_cast<acc_t>(c[k]);
      acc_t u = std::abs(v) * static_cast<acc_t>(s[k]);
      r += u * u;
      if constexpr (kStats) {
        sum[k] += v;
        sq[k] += v * v;
      }
    }
    r = std::sqrt(r / static_cast<acc_t>(K));
  }
  return r;
}

// p[0..n) all finite: the sum of v * 0 is 0 for finite v, NaN otherwise. kLanes independent
// sums (a single one would wait on each add's latency: measured 3.4x slower on the LoRA
// factors).
template <typename acc_t>
bool all_finite(const acc_t* p, int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(acc_t);
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += p[i + j] * acc_t(0);
  }
  acc_t probe = 0;
  for (; i < n; ++i) probe += p[i] * acc_t(0);
  for (int64_t j = 0; j < kLanes; ++j) probe += lane[j];
  return probe == acc_t(0);
}

struct Shapes {
  int64_t T, K, N, E, EL, r, R, C, k;
};

// Sparse mode skips the experts a token did not select. That equals computing them (gate 0)
// only while their factors are finite: a NaN or inf in any A_e or B_e makes every row
// non-finite (0 * NaN), so then every expert runs for every token (docs/method.md §1.5).
template <typename acc_t, typename scalar_t>
bool factors_finite(const SmallWeights<acc_t, scalar_t>& w, const Shapes& s) {
  return all_finite(w.A, s.R * s.K) && all_finite(w.B, s.N * s.R);
}

// the sizes every pass needs, read off the op's tensors (C and k are set by the forward)
Shapes op_shapes(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& router,
                 const at::Tensor& lora_A, int64_t EL) {
  Shapes s{};
  s.T = x.size(0);
  s.K = x.size(1);
  s.N = weight.size(0);
  s.E = router.size(0);
  s.EL = EL;
  s.R = lora_A.size(0);
  s.r = s.R / EL;
  return s;
}

// y = x Wᵀ + b over all tokens. fp32/fp64 call the BLAS directly (the call at::addmm makes,
// without its dispatch, which costs more than the GEMM at a few tokens); the half types go
// through at::addmm.
template <typename scalar_t>
at::Tensor base_output(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias) {
  if constexpr (is_acc_v<scalar_t>) {
    const int64_t T = x.size(0), K = x.size(1), N = weight.size(0);
    at::Tensor y = at::empty({T, N}, x.options());
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (bias.has_value()) {
      const scalar_t* bp = bias->data_ptr<scalar_t>();
      for (int64_t t = 0; t < T; ++t) std::copy(bp, bp + N, yp + t * N);
    }
    gemm(false, true, T, N, K, scalar_t(1), x.data_ptr<scalar_t>(), K,
         weight.data_ptr<scalar_t>(), K, scalar_t(bias.has_value() ? 1 : 0), yp, N);
    return y;
  } else {
    return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  }
}

// a stats_keep entry: token t counts in the statistics (nullptr: every token)
struct KeepMask {
  const bool* p = nullptr;
  int64_t stride = 0;
  bool operator()(int64_t t) const { return p == nullptr || p[t * stride]; }
};

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const c10::optional<at::Tensor>& x_lora,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                     const at::Tensor& router,
                                     const c10::optional<at::Tensor>& centers,
                                     const c10::optional<at::Tensor>& inv_std,
                                     const c10::optional<at::Tensor>& shift, KeepMask keep,
                                     int64_t EL, int64_t top_k, double scaling,
                                     double yield_strength, int64_t reduce, bool cluster_stats,
                                     int64_t mode) {
  using acc_t = typename AccOf<scalar_t>::type;
  Shapes s = op_shapes(x, weight, router, lora_A, EL);
  s.k = top_k;
  const bool has_clusters = centers.has_value() && centers->size(0) > 0;
  s.C = has_clusters ? centers->size(0) : 0;
  const bool do_yield = has_clusters && yield_strength != 0.0 && s.E > EL;
  const bool with_stats = cluster_stats && has_clusters;
  const int64_t W = 2 * s.K + 3;  // a statistics row: n, Σ(x - c) (K), Σ(x - c)² (K), Σr, Σr²
  const bool sparse = mode & kSparse;
  const int64_t kTokenBlock = token_block(mode);

  auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::TensorOptions aopt = x.options().dtype(acc_dtype);
  at::Tensor gates = at::empty({s.T, s.E}, aopt);
  at::Tensor idx = at::empty({s.T, s.k}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({s.T}, aopt);
  at::Tensor assign = at::empty({s.T}, x.options().dtype(at::kLong));
  at::Tensor h = at::empty({s.T, s.R}, aopt);
  at::Tensor y = base_output<scalar_t>(x, weight, bias);
  if (s.T == 0) {
    at::Tensor stats = at::zeros({with_stats ? s.C : 0, W}, aopt);
    return {y, gates, idx, dist, assign, h, stats};
  }

  // the small weights in the acc dtype (direct for fp32/fp64)
  const SmallWeights<acc_t, scalar_t> small(router, lora_A, lora_B);
  const acc_t* Ap = small.A;
  const acc_t* Bp = small.B;
  const bool dense = !sparse || !factors_finite(small, s);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* xlp = x_lora.has_value() ? x_lora->data_ptr<scalar_t>() : nullptr;
  const float* cp = has_clusters ? centers->data_ptr<float>() : nullptr;
  const float* sp = has_clusters ? inv_std->data_ptr<float>() : nullptr;
  const float* shp = has_clusters && shift.has_value() ? shift->data_ptr<float>() : nullptr;
  // route GEMM operand: the router rows, then (with clusters) the centres in the acc dtype,
  // so one skinny GEMM gives the logits and the dot products x·c_j; csq = ||c_j||²
  const int64_t RC_rows = s.E + s.C;
  std::vector<acc_t> RCbuf, csq(static_cast<size_t>(s.C));
  const acc_t* RCp = small.R;
  if (has_clusters) {
    RCbuf.resize(static_cast<size_t>(RC_rows * s.K));
    std::copy(small.R, small.R + s.E * s.K, RCbuf.begin());
    for (int64_t j = 0; j < s.C; ++j) {
      acc_t* dst = RCbuf.data() + (s.E + j) * s.K;
      acc_t sq = 0;
      for (int64_t k = 0; k < s.K; ++k) {
        dst[k] = static_cast<acc_t>(cp[j * s.K + k]);
        sq += dst[k] * dst[k];
      }
      csq[j] = sq;
    }
    RCp = RCbuf.data();
  }
  scalar_t* yp = y.data_ptr<scalar_t>();
  acc_t* gp = gates.data_ptr<acc_t>();
  int64_t* ip = idx.data_ptr<int64_t>();
  acc_t* dp = dist.data_ptr<acc_t>();
  int64_t* ap = assign.data_ptr<int64_t>();
  acc_t* hp = h.data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scaling);
  const acc_t lam = static_cast<acc_t>(yield_strength);

  // Work is handed out dynamically (an atomic counter), not split in halves up front: on a
  // shared machine a descheduled thread then delays the pass by one unit, not by half of it.
  // A unit is one block, or with statistics one chunk of blocks (kStatsChunks). Block
  // boundaries do not depend on the schedule, so every output is deterministic.
  const int64_t nblocks = cdiv(s.T, kTokenBlock);
  const int64_t per_chunk = with_stats ? cdiv(nblocks, std::min(nblocks, kStatsChunks)) : 1;
  const int64_t nchunks = cdiv(nblocks, per_chunk);
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nchunks));
  // statistics: chunk 0 sums into the output, chunk c > 0 into partial c - 1
  at::Tensor stats = at::empty({with_stats ? s.C : 0, W}, aopt);
  at::Tensor partials;
  if (with_stats && nchunks > 1) partials = at::empty({nchunks - 1, s.C, W}, aopt);
  acc_t* stats_p = stats.data_ptr<acc_t>();
  acc_t* part_p = partials.defined() ? partials.data_ptr<acc_t>() : nullptr;
  const int64_t CW = s.C * W;
  // whether x's rows are finite matters to the statistics, and to sparse mode without x_lora
  const bool check_x = with_stats || (!dense && xlp == nullptr);
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    SerialBlasGuard serial;
    static thread_local BlockScratch<acc_t, 9> scratch;
    // one block of tokens; st: its chunk's statistics (C, W), or nullptr
    auto run_block = [&](int64_t blk, acc_t* st) {
      auto& [xbuf, xlbuf, z, zt, xg, hbuf, hgbuf, ybuf, yacc] = scratch.buf;
      auto& sel = scratch.selected(s.EL);
      const int64_t t0 = blk * kTokenBlock;
      const int64_t tb = std::min(kTokenBlock, s.T - t0);
      const acc_t* xb = rows_as_acc<scalar_t, acc_t>(xp, t0, tb, s.K, xbuf);
      const acc_t* xab = xlp ? rows_as_acc<scalar_t, acc_t>(xlp, t0, tb, s.K, xlbuf) : xb;
      // ---- route: logits, distance, yielding, top-k, softmax
      // zᵀ = R x_bᵀ (E, tb): this orientation of the skinny GEMM measured 1.6x faster in MKL
      // than x_b Rᵀ (tb, E)
      zt.resize(static_cast<size_t>(RC_rows * tb));
      z.resize(static_cast<size_t>(tb * s.E));
      gemm(false, true, RC_rows, tb, s.K, acc_t(1), RCp, s.K, xb, s.K, acc_t(0), zt.data(), tb);
      for (int64_t e = 0; e < s.E; ++e)
        for (int64_t i = 0; i < tb; ++i) z[i * s.E + e] = zt[e * tb + i];
      for (auto& v : sel) v.clear();
      for (int64_t i = 0; i < tb; ++i) {
        const int64_t t = t0 + i;
        const acc_t* xi = xb + i * s.K;
        acc_t* zi = z.data() + i * s.E;
        const bool x_finite = !check_x || all_finite(xi, s.K);
        if (has_clusters) {
          const int64_t j = nearest_cluster<acc_t>(zt.data() + s.E * tb + i, tb, csq.data(),
                                                   s.C);
          const float* cj = cp + j * s.K;
          const float* sj = sp + j * s.K;
          acc_t r;
          if (with_stats && x_finite && keep(t)) {  // a kept token: into the statistics
            acc_t* row = st + j * W;
            r = reduced_distance<acc_t, true>(xi, cj, sj, s.K, reduce, row + 1, row + 1 + s.K);
            row[0] += acc_t(1);
            row[2 * s.K + 1] += r;
            row[2 * s.K + 2] += r * r;
          } else {
            r = reduced_distance<acc_t, false>(xi, cj, sj, s.K, reduce, nullptr, nullptr);
          }
          dp[t] = r - (shp != nullptr ? static_cast<acc_t>(shp[j]) : acc_t(1));
          ap[t] = j;
          if (do_yield)
            for (int64_t e = s.EL; e < s.E; ++e) zi[e] += lam * dp[t];
        } else {
          dp[t] = acc_t(0);
          ap[t] = -1;
        }
        slim_topk::topk_softmax_row<acc_t>(zi, s.E, s.k, gp + t * s.E, ip + t * s.k);
        // every expert for a token whose LoRA input is not finite (a NaN gate is != 0
        // already): its row must come out non-finite, as computing all experts gives
        const bool every =
            dense || !(xab == xb ? x_finite : all_finite(xab + i * s.K, s.K));
        for (int64_t e = 0; e < s.EL; ++e)
          if (every || gp[t * s.E + e] != acc_t(0)) sel[e].push_back(i);
      }
      // ---- experts: h, gated expand accumulated into y's rows
      // h of the experts a token skips is 0 (sparse mode): zero the block's rows in cache
      if (!dense) std::fill(hp + t0 * s.R, hp + (t0 + tb) * s.R, acc_t(0));
      acc_t* yb_acc = nullptr;  // where the expand accumulates for this block
      if constexpr (is_acc_v<scalar_t>) {
        yb_acc = reinterpret_cast<acc_t*>(yp) + t0 * s.N;
      } else {
        yacc.assign(static_cast<size_t>(tb * s.N), acc_t(0));
        yb_acc = yacc.data();
      }
      bool any = false;
      for (int64_t e = 0; e < s.EL; ++e) {
        const auto& L = sel[e];
        const int64_t n = static_cast<int64_t>(L.size());
        if (n == 0) continue;
        any = true;
        const bool full = n == tb;  // every token of the block: no gather
        const acc_t* X = xab;
        if (!full) {
          xg.resize(static_cast<size_t>(n * s.K));
          gather_rows(xab, s.K, L, xg.data());
          X = xg.data();
        }
        hbuf.resize(static_cast<size_t>(n * s.r));
        hgbuf.resize(static_cast<size_t>(n * s.r));
        gemm(false, true, n, s.r, s.K, acc_t(1), X, s.K, Ap + e * s.r * s.K, s.K, acc_t(0),
             hbuf.data(), s.r);
        for (int64_t q = 0; q < n; ++q) {
          const int64_t t = t0 + L[q];
          const acc_t g = sc * gp[t * s.E + e];
          acc_t* hrow = hp + t * s.R + e * s.r;
          for (int64_t j = 0; j < s.r; ++j) {
            const acc_t hv = hbuf[q * s.r + j];
            hrow[j] = hv;
            hgbuf[q * s.r + j] = g * hv;
          }
        }
        if (full) {
          gemm(false, true, n, s.N, s.r, acc_t(1), hgbuf.data(), s.r, Bp + e * s.r, s.R,
               acc_t(1), yb_acc, s.N);
        } else {
          ybuf.resize(static_cast<size_t>(n * s.N));
          gemm(false, true, n, s.N, s.r, acc_t(1), hgbuf.data(), s.r, Bp + e * s.r, s.R,
               acc_t(0), ybuf.data(), s.N);
          for (int64_t q = 0; q < n; ++q) {
            acc_t* dst = yb_acc + L[q] * s.N;
            const acc_t* src = ybuf.data() + q * s.N;
#pragma omp simd
            for (int64_t j = 0; j < s.N; ++j) dst[j] += src[j];
          }
        }
      }
      if constexpr (!is_acc_v<scalar_t>) {
        if (any) {
          scalar_t* yb = yp + t0 * s.N;
          for (int64_t i = 0; i < tb * s.N; ++i)
            yb[i] = static_cast<scalar_t>(static_cast<acc_t>(yb[i]) + yacc[i]);
        }
      }
    };
    for (int64_t c = next_chunk.fetch_add(1); c < nchunks; c = next_chunk.fetch_add(1)) {
      acc_t* st = nullptr;
      if (with_stats) {
        st = c == 0 ? stats_p : part_p + (c - 1) * CW;
        std::fill(st, st + CW, acc_t(0));
      }
      for (int64_t blk = c * per_chunk; blk < std::min(nblocks, (c + 1) * per_chunk); ++blk)
        run_block(blk, st);
    }
    scratch.release_large();
  });
  // the chunks' statistics, added in chunk order (each value's sum has a fixed order)
  if (part_p != nullptr) {
    at::parallel_for(0, CW, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t c = 0; c < nchunks - 1; ++c) {
        const acc_t* src = part_p + c * CW;
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) stats_p[i] += src[i];
      }
    });
  }
  return {y, gates, idx, dist, assign, h, stats};
}

// t as a contiguous tensor of dtype dt: t itself when it is one (no dispatcher call)
at::Tensor as_contig(const at::Tensor& t, at::ScalarType dt) {
  if (t.scalar_type() == dt && t.is_contiguous()) return t;
  return t.to(dt).contiguous();
}

// (rows, cols) acc values at src, transposed and converted into a new (cols, rows) scalar_t
// tensor, in tiles that stay in cache: dB from its transposed partial (at::Tensor::t() then
// .contiguous() cost more than the rest of a small backward)
template <typename scalar_t, typename acc_t>
at::Tensor transposed(const acc_t* src, int64_t rows, int64_t cols, const at::TensorOptions& opt) {
  at::Tensor out = at::empty({cols, rows}, opt);
  scalar_t* o = out.data_ptr<scalar_t>();
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c)
        for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
          o[c * rows + r] = static_cast<scalar_t>(src[r * cols + c]);
  return out;
}

template <typename scalar_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& dy, const c10::optional<at::Tensor>& dgates,
                                      const at::Tensor& x, const c10::optional<at::Tensor>& x_lora,
                                      const at::Tensor& weight, const at::Tensor& lora_A,
                                      const at::Tensor& lora_B, const at::Tensor& router,
                                      const at::Tensor& gates, const at::Tensor& h, int64_t EL,
                                      double scaling, int64_t mode) {
  using acc_t = typename AccOf<scalar_t>::type;
  Shapes s = op_shapes(x, weight, router, lora_A, EL);
  const bool sparse = mode & kSparse;
  const bool has_xl = x_lora.has_value();
  const int64_t kTokenBlock = token_block(mode);

  // dx = dy W: one GEMM over all tokens; the block pass adds dz R and dh A_all into it.
  // fp32/fp64 call the BLAS directly, as base_output does.
  at::Tensor dx;
  if constexpr (is_acc_v<scalar_t>) {
    dx = at::empty({s.T, s.K}, x.options());
    gemm(false, false, s.T, s.K, s.N, scalar_t(1), dy.data_ptr<scalar_t>(), s.N,
         weight.data_ptr<scalar_t>(), s.K, scalar_t(0), dx.data_ptr<scalar_t>(), s.K);
  } else {
    dx = at::mm(dy, weight);
  }
  // dx_lora: in fp32/fp64 the pass accumulates into it (zeroing each block's rows first),
  // in bf16/fp16 it writes each block's rows once
  at::Tensor dx_lora = has_xl ? at::empty_like(*x_lora) : at::empty({0}, x.options());
  if (s.T == 0) {
    return {dx, dx_lora, at::zeros_like(lora_A), at::zeros_like(lora_B),
            at::zeros_like(router)};
  }

  const SmallWeights<acc_t, scalar_t> small(router, lora_A, lora_B);
  const acc_t* Rp = small.R;
  const acc_t* Ap = small.A;
  const acc_t* Bp = small.B;
  const bool dense = !sparse || !factors_finite(small, s);
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* xlp = has_xl ? x_lora->data_ptr<scalar_t>() : nullptr;
  const acc_t* gp = gates.data_ptr<acc_t>();
  const acc_t* hp = h.data_ptr<acc_t>();
  const acc_t* dgp = dgates.has_value() ? dgates->data_ptr<acc_t>() : nullptr;
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  scalar_t* dxlp = has_xl ? dx_lora.data_ptr<scalar_t>() : nullptr;
  const acc_t sc = static_cast<acc_t>(scaling);

  // Contiguous token chunks, one partial sum of the weight grads each. The chunking depends
  // on T only (up to kMaxChunks chunks, more only with more threads), so the summation order,
  // hence the result, is the same for every run and thread count <= kMaxChunks. Chunks are
  // handed out dynamically: on a shared machine a descheduled thread delays one chunk, not
  // half the pass.
  constexpr int64_t kMaxChunks = 8;
  const int64_t nblocks = cdiv(s.T, kTokenBlock);
  const int64_t nchunks = std::max<int64_t>(
      1, std::min<int64_t>(std::max<int64_t>(kMaxChunks, at::get_num_threads()), nblocks));
  const int64_t per_chunk = cdiv(nblocks, nchunks) * kTokenBlock;
  const int64_t nworkers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nchunks));
  auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::TensorOptions aopt = x.options().dtype(acc_dtype);
  // The partials, each zeroed by the thread that sums into it. With one chunk there is
  // nothing to add: dA's and dR's partial is the gradient itself (in fp32/fp64).
  const bool one = nchunks == 1;
  at::Tensor dA_p = one ? at::empty({s.R, s.K}, aopt) : at::empty({nchunks, s.R, s.K}, aopt);
  at::Tensor dB_p = one ? at::empty({s.R, s.N}, aopt)  // transposed partials
                        : at::empty({nchunks, s.R, s.N}, aopt);
  at::Tensor dR_p = one ? at::empty({s.E, s.K}, aopt) : at::empty({nchunks, s.E, s.K}, aopt);
  acc_t* dAp_all = dA_p.data_ptr<acc_t>();
  acc_t* dBp_all = dB_p.data_ptr<acc_t>();
  acc_t* dRp_all = dR_p.data_ptr<acc_t>();
  std::atomic<int64_t> next_chunk{0};

  at::parallel_for(0, nworkers, 1, [&](int64_t, int64_t) {
    SerialBlasGuard serial;
    static thread_local BlockScratch<acc_t, 13> scratch;
    auto& [dybuf, xbuf, xlbuf, G, X, dhg, hg, dh, tmp, dz, dg, dxacc, dxlacc] = scratch.buf;
    auto& sel = scratch.selected(s.EL);
    for (int64_t c = next_chunk.fetch_add(1); c < nchunks; c = next_chunk.fetch_add(1)) {
      acc_t* dAp = dAp_all + c * s.R * s.K;
      acc_t* dBp = dBp_all + c * s.N * s.R;
      acc_t* dRp = dRp_all + c * s.E * s.K;
      std::fill(dAp, dAp + s.R * s.K, acc_t(0));
      std::fill(dBp, dBp + s.N * s.R, acc_t(0));
      std::fill(dRp, dRp + s.E * s.K, acc_t(0));
      const int64_t cstart = c * per_chunk;
      const int64_t cstop = std::min(s.T, cstart + per_chunk);
      for (int64_t t0 = cstart; t0 < cstop; t0 += kTokenBlock) {
        const int64_t tb = std::min(kTokenBlock, cstop - t0);
        const acc_t* dyb = rows_as_acc<scalar_t, acc_t>(dyp, t0, tb, s.N, dybuf);
        const acc_t* xb = rows_as_acc<scalar_t, acc_t>(xp, t0, tb, s.K, xbuf);
        const acc_t* xab = has_xl ? rows_as_acc<scalar_t, acc_t>(xlp, t0, tb, s.K, xlbuf) : xb;
        // where dh A_e accumulates: dx's rows (fp32/fp64, no x_lora) or an acc buffer
        acc_t* dxb = nullptr;
        acc_t* dhA = nullptr;
        if constexpr (is_acc_v<scalar_t>) {
          dxb = reinterpret_cast<acc_t*>(dxp) + t0 * s.K;
          dhA = dxb;
          if (has_xl) {
            dhA = reinterpret_cast<acc_t*>(dxlp) + t0 * s.K;
            std::fill(dhA, dhA + tb * s.K, acc_t(0));
          }
        } else {
          dxacc.assign(static_cast<size_t>(tb * s.K), acc_t(0));
          dxb = dxacc.data();
          if (has_xl) {
            dxlacc.assign(static_cast<size_t>(tb * s.K), acc_t(0));
            dhA = dxlacc.data();
          } else {
            dhA = dxb;
          }
        }
        dg.assign(static_cast<size_t>(tb * s.E), acc_t(0));
        if (dgp)
          for (int64_t i = 0; i < tb * s.E; ++i) dg[i] = dgp[t0 * s.E + i];
        for (auto& v : sel) v.clear();
        for (int64_t i = 0; i < tb; ++i) {
          const int64_t t = t0 + i;
          // as the forward: every expert for a token with a non-finite h or dy row
          const bool every = dense || !all_finite(hp + t * s.R, s.R) ||
                             !all_finite(dyb + i * s.N, s.N);
          for (int64_t e = 0; e < s.EL; ++e)
            if (every || gp[t * s.E + e] != acc_t(0)) sel[e].push_back(i);
        }

        for (int64_t e = 0; e < s.EL; ++e) {
          const auto& L = sel[e];
          const int64_t n = static_cast<int64_t>(L.size());
          if (n == 0) continue;
          const bool full = n == tb;
          const acc_t* Gp = dyb;
          const acc_t* Xp = xab;
          if (!full) {
            G.resize(static_cast<size_t>(n * s.N));
            gather_rows(dyb, s.N, L, G.data());
            Gp = G.data();
            X.resize(static_cast<size_t>(n * s.K));
            gather_rows(xab, s.K, L, X.data());
            Xp = X.data();
          }
          // dhg_e = dy_e B_e   (n, r)
          dhg.resize(static_cast<size_t>(n * s.r));
          gemm(false, false, n, s.r, s.N, acc_t(1), Gp, s.N, Bp + e * s.r, s.R, acc_t(0),
               dhg.data(), s.r);
          hg.resize(static_cast<size_t>(n * s.r));
          dh.resize(static_cast<size_t>(n * s.r));
          for (int64_t q = 0; q < n; ++q) {
            const int64_t t = t0 + L[q];
            const acc_t g = gp[t * s.E + e];
            const acc_t* hrow = hp + t * s.R + e * s.r;
            acc_t acc = 0;
            for (int64_t j = 0; j < s.r; ++j) {
              const acc_t v = dhg[q * s.r + j];
              acc += v * hrow[j];
              hg[q * s.r + j] = sc * g * hrow[j];
              dh[q * s.r + j] = sc * g * v;
            }
            dg[L[q] * s.E + e] += sc * acc;
          }
          // dB_eᵀ += hg_eᵀ dy_e   (r, N): the partial is kept transposed, (R, N); this
          // orientation measured 1.6x faster than dy_eᵀ hg_e into (N, R)
          gemm(true, false, s.r, s.N, n, acc_t(1), hg.data(), s.r, Gp, s.N, acc_t(1),
               dBp + e * s.r * s.N, s.N);
          // dA_e += dh_eᵀ x_e   (r, K)
          gemm(true, false, s.r, s.K, n, acc_t(1), dh.data(), s.r, Xp, s.K, acc_t(1),
               dAp + e * s.r * s.K, s.K);
          // dx (or dx_lora) rows += dh_e A_e
          if (full) {
            gemm(false, false, n, s.K, s.r, acc_t(1), dh.data(), s.r, Ap + e * s.r * s.K, s.K,
                 acc_t(1), dhA, s.K);
          } else {
            tmp.resize(static_cast<size_t>(n * s.K));
            gemm(false, false, n, s.K, s.r, acc_t(1), dh.data(), s.r, Ap + e * s.r * s.K, s.K,
                 acc_t(0), tmp.data(), s.K);
            for (int64_t q = 0; q < n; ++q) {
              acc_t* dst = dhA + L[q] * s.K;
              const acc_t* src = tmp.data() + q * s.K;
#pragma omp simd
              for (int64_t j = 0; j < s.K; ++j) dst[j] += src[j];
            }
          }
        }
        // softmax / top-k backward: dz_i = g_i (dg_i - Σ_j g_j dg_j)
        dz.resize(static_cast<size_t>(tb * s.E));
        for (int64_t i = 0; i < tb; ++i) {
          const acc_t* g = gp + (t0 + i) * s.E;
          const acc_t* dgi = dg.data() + i * s.E;
          acc_t dot = 0;
          for (int64_t e = 0; e < s.E; ++e) dot += g[e] * dgi[e];
          for (int64_t e = 0; e < s.E; ++e) dz[i * s.E + e] = g[e] * (dgi[e] - dot);
        }
        // dR += dzᵀ x ;  dx rows += dz R
        gemm(true, false, s.E, s.K, tb, acc_t(1), dz.data(), s.E, xb, s.K, acc_t(1), dRp, s.K);
        gemm(false, false, tb, s.K, s.E, acc_t(1), dz.data(), s.E, Rp, s.K, acc_t(1), dxb, s.K);
        if constexpr (!is_acc_v<scalar_t>) {
          scalar_t* o = dxp + t0 * s.K;
          for (int64_t i = 0; i < tb * s.K; ++i)
            o[i] = static_cast<scalar_t>(static_cast<acc_t>(o[i]) + dxacc[i]);
          if (has_xl) {
            scalar_t* ol = dxlp + t0 * s.K;
            for (int64_t i = 0; i < tb * s.K; ++i) ol[i] = static_cast<scalar_t>(dxlacc[i]);
          }
        }
      }
    }
    scratch.release_large();
  });
  // dA = Σ_c dA_c (the same for dR; dB from its transposed partials): sum(0) over the chunks,
  // nothing to add with one chunk
  const auto dt = x.scalar_type();
  at::Tensor dA = as_contig(one ? dA_p : dA_p.sum(0), dt);
  at::Tensor dR = as_contig(one ? dR_p : dR_p.sum(0), dt);
  at::Tensor dBt = one ? dB_p : dB_p.sum(0);
  at::Tensor dB = transposed<scalar_t, acc_t>(dBt.data_ptr<acc_t>(), s.R, s.N, x.options());
  return {dx, dx_lora, dA, dB, dR};
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                  const at::Tensor& lora_B, const at::Tensor& router, int64_t EL) {
  TORCH_CHECK(x.device().is_cpu(), "slim_kernels_C: the cpp backend runs on CPU tensors");
  TORCH_CHECK(x.dim() == 2, "slim_kernels_C: x must be 2-D (T, K)");
  TORCH_CHECK(EL >= 1 && lora_A.size(0) % EL == 0,
              "slim_kernels_C: lora_A rows must be num_lora_experts x rank");
  for (const at::Tensor* t : {&x, &weight, &lora_A, &lora_B, &router}) {
    TORCH_CHECK(t->is_contiguous(), "slim_kernels_C: inputs must be contiguous");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "slim_kernels_C: dtype mismatch");
  }
}

at::Tensor contig(const at::Tensor& t) { return t.contiguous(); }
c10::optional<at::Tensor> contig(const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return t;
  return t->contiguous();
}

// f(scalar_t{}) for the dtype of x
template <typename F>
auto dispatch_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "slim_kernels_C: unsupported dtype ", dt);
  }
}

std::vector<at::Tensor> slim_forward(const at::Tensor& x, const c10::optional<at::Tensor>& x_lora,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                     const at::Tensor& router,
                                     const c10::optional<at::Tensor>& centers,
                                     const c10::optional<at::Tensor>& inv_std,
                                     const c10::optional<at::Tensor>& distance_shift,
                                     const c10::optional<at::Tensor>& stats_keep,
                                     int64_t num_lora_experts, int64_t top_k, double scaling,
                                     double yield_strength, int64_t reduce, bool cluster_stats,
                                     int64_t mode) {
  auto xc = contig(x);
  auto wc = contig(weight);
  auto Ac = contig(lora_A);
  auto Bc = contig(lora_B);
  auto Rc = contig(router);
  auto xl = contig(x_lora);
  auto bc = contig(bias);
  check_inputs(xc, wc, Ac, Bc, Rc, num_lora_experts);
  TORCH_CHECK(top_k >= 1 && top_k <= Rc.size(0), "slim_kernels_C: top_k out of range");
  TORCH_CHECK(reduce >= 0 && reduce <= 2, "slim_kernels_C: reduce must be 0 (max), 1 (mean), 2 (rms)");
  c10::optional<at::Tensor> cc, sc, shc;
  if (centers.has_value()) {
    TORCH_CHECK(inv_std.has_value(), "slim_kernels_C: centers given without inv_std");
    cc = as_contig(*centers, at::kFloat);
    sc = as_contig(*inv_std, at::kFloat);
    TORCH_CHECK(cc->dim() == 2 && sc->sizes() == cc->sizes() && cc->size(1) == xc.size(1),
                "slim_kernels_C: centers and inv_std must be (C, K)");
    if (distance_shift.has_value()) {
      // a strided view (stride 0: one value expanded) is made contiguous here
      shc = as_contig(*distance_shift, at::kFloat);
      TORCH_CHECK(shc->dim() == 1 && shc->size(0) == cc->size(0),
                  "slim_kernels_C: distance_shift must be (C,)");
    }
  } else {
    TORCH_CHECK(!distance_shift.has_value(),
                "slim_kernels_C: distance_shift given without centers");
  }
  KeepMask keep;  // read through its stride (a strided view is not copied)
  if (cluster_stats && stats_keep.has_value()) {
    TORCH_CHECK(stats_keep->device().is_cpu() && stats_keep->scalar_type() == at::kBool &&
                    stats_keep->dim() == 1 && stats_keep->size(0) == xc.size(0),
                "slim_kernels_C: stats_keep must be a (T,) bool CPU tensor");
    keep.p = stats_keep->data_ptr<bool>();
    keep.stride = stats_keep->stride(0);
  }
  return dispatch_dtype(xc.scalar_type(), [&](auto tag) {
    return forward_impl<decltype(tag)>(xc, xl, wc, bc, Ac, Bc, Rc, cc, sc, shc, keep,
                                       num_lora_experts, top_k, scaling, yield_strength, reduce,
                                       cluster_stats, mode);
  });
}

std::vector<at::Tensor> slim_backward(const at::Tensor& dy, const c10::optional<at::Tensor>& dgates,
                                      const at::Tensor& x, const c10::optional<at::Tensor>& x_lora,
                                      const at::Tensor& weight, const at::Tensor& lora_A,
                                      const at::Tensor& lora_B, const at::Tensor& router,
                                      const at::Tensor& gates, const at::Tensor& h,
                                      int64_t num_lora_experts, double scaling, int64_t mode) {
  auto xc = contig(x);
  auto wc = contig(weight);
  auto Ac = contig(lora_A);
  auto Bc = contig(lora_B);
  auto Rc = contig(router);
  auto xl = contig(x_lora);
  check_inputs(xc, wc, Ac, Bc, Rc, num_lora_experts);
  auto acc = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dyc = as_contig(dy, xc.scalar_type());
  auto gc = as_contig(gates, acc);
  auto hc = as_contig(h, acc);
  c10::optional<at::Tensor> dgc;
  if (dgates.has_value() && dgates->numel() > 0) dgc = as_contig(*dgates, acc);
  return dispatch_dtype(xc.scalar_type(), [&](auto tag) {
    return backward_impl<decltype(tag)>(dyc, dgc, xc, xl, wc, Ac, Bc, Rc, gc, hc,
                                        num_lora_experts, scaling, mode);
  });
}

}  // namespace
}  // namespace slim_cpu

TORCH_LIBRARY_FRAGMENT(slim_kernels_C, m) {
  m.def(
      "forward(Tensor x, Tensor? x_lora, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_B, Tensor router, Tensor? centers, Tensor? inv_std, Tensor? distance_shift, "
      "Tensor? stats_keep, int num_lora_experts, int top_k, float scaling, "
      "float yield_strength, int reduce, bool cluster_stats, int mode) -> Tensor[]");
  m.def(
      "backward(Tensor dy, Tensor? dgates, Tensor x, Tensor? x_lora, Tensor weight, "
      "Tensor lora_A, Tensor lora_B, Tensor router, Tensor gates, Tensor h, "
      "int num_lora_experts, float scaling, int mode) -> Tensor[]");
  // whether the GEMMs call torch's BLAS symbols directly (else at::addmm_); use_raw_blas
  // turns that off or back on (where the symbols exist) and returns the previous state
  m.def("raw_blas() -> bool", &slim_cpu::raw_blas_in_use);
  m.def("use_raw_blas(bool enable) -> bool", &slim_cpu::use_raw_blas);
}

TORCH_LIBRARY_IMPL(slim_kernels_C, CPU, m) {
  m.impl("forward", &slim_cpu::slim_forward);
  m.impl("backward", &slim_cpu::slim_backward);
}
