// The per-cluster statistics of the sliding update (docs/method.md §2;
// slim_kernels.reference.reference_cluster_stats), one row per cluster j of 2K + 3 columns:
//   [n_j, Σ (x_t - c_j) (K), Σ (x_t - c_j)² (K), Σ r_t, Σ r_t²]
// over the kept tokens t with sj[t] = j (sj[t] = -1: not kept, or no statistics wanted).
//
// The work of one CUDA block of the cluster-statistics kernel (csrc/cuda/slim_route.cu), as
// two phases that the kernel runs per thread with a __syncthreads() between them, and that
// tests/test_csrc_cluster_stats.py runs on the CPU, thread by thread, with g++: this is the
// code the GPU runs, minus the launch. Header-only, torch-free, no CUDA header; __host__
// __device__ under nvcc.
//
// A block owns the column block `cb` (32 "lanes") of group g (tokens [t_lo, t_hi)). For
// cb < nkb = ceil(K / 32), lane l is channel k = 32 cb + l and sums D = x - c_j and D²;
// block cb = nkb sums the per-token columns [1, r] on lane 0 and [r², -] on lane 1. Its
// `rows` thread rows split the tokens: row i takes t_lo + i, t_lo + i + rows, ... in order.
// Every (row, cluster, lane) has its own two accumulator slots in shared memory (no atomics:
// a slot is written by one thread), and phase 2 sums each (cluster, lane) over the rows in
// row order, then writes it once. So the result is the same bits every run, and a NaN or inf
// (a non-finite centre, or an r made NaN by inv_std) reaches only its own cluster's row.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SLIM_HD __host__ __device__ __forceinline__
#else
#define SLIM_HD inline
#endif

namespace slim_stats {

constexpr int kLanes = 32;  // columns per block (one warp wide)

// Columns of a statistics row after the count and the 2 K sums: Σr, Σr².
constexpr int64_t kExtra = 3;

SLIM_HD int64_t row_len(int64_t K) { return 2 * K + kExtra; }

// The x column blocks plus the [1, r, r²] block.
SLIM_HD int64_t col_blocks(int64_t K) { return (K + kLanes - 1) / kLanes + 1; }

// Shared-memory slots of a block: two arrays (sums, sums of squares) of rows·C·32 each.
SLIM_HD int64_t slots(int rows, int64_t C) { return (int64_t)rows * C * kLanes; }

SLIM_HD int64_t slot(int row, int64_t j, int lane, int64_t C) {
  return ((int64_t)row * C + j) * kLanes + lane;
}

// Phase 0: thread `tid` of `nthreads` zeroes its share of the 2 · slots accumulators.
template <typename A>
SLIM_HD void zero(A* s0, A* s1, int64_t n, int tid, int nthreads) {
  for (int64_t i = tid; i < n; i += nthreads) {
    s0[i] = A(0);
    s1[i] = A(0);
  }
}

// Phase 1: thread (row, lane) of block (cb, g) adds its tokens to its own slots.
// x (T, K) row stride ldx; centers (C, K) fp32 row stride K; sj (T,); r (T,) acc dtype.
// to_acc converts one element of x to the acc dtype A.
template <typename A, typename X, typename ToAcc>
SLIM_HD void accumulate(int64_t cb, int row, int lane, int rows, int64_t t_lo, int64_t t_hi,
                        int64_t K, int64_t C, const X* x, int64_t ldx, const float* centers,
                        const int32_t* sj, const A* r, A* s0, A* s1, ToAcc to_acc) {
  const int64_t nkb = col_blocks(K) - 1;
  if (cb < nkb) {
    const int64_t k = cb * kLanes + lane;
    if (k >= K) return;
    for (int64_t t = t_lo + row; t < t_hi; t += rows) {
      const int64_t j = sj[t];
      if (j < 0) continue;
      const A d = to_acc(x[t * ldx + k]) - (A)centers[j * K + k];
      const int64_t o = slot(row, j, lane, C);
      s0[o] += d;
      s1[o] += d * d;
    }
  } else {
    if (lane > 1) return;
    for (int64_t t = t_lo + row; t < t_hi; t += rows) {
      const int64_t j = sj[t];
      if (j < 0) continue;
      const A rt = r[t];
      const int64_t o = slot(row, j, lane, C);
      if (lane == 0) {
        s0[o] += A(1);
        s1[o] += rt;
      } else {
        s0[o] += rt * rt;
      }
    }
  }
}

// Phase 2: thread `tid` of `nthreads` sums (cluster, lane) pairs over the rows in row order
// and writes them into out (C, 2K + 3), row stride ldo (a group's partial, or the result).
template <typename A>
SLIM_HD void reduce(int64_t cb, int rows, int64_t K, int64_t C, const A* s0, const A* s1,
                    A* out, int64_t ldo, int tid, int nthreads) {
  const int64_t nkb = col_blocks(K) - 1;
  for (int64_t i = tid; i < C * kLanes; i += nthreads) {
    const int64_t j = i / kLanes;
    const int lane = (int)(i % kLanes);
    A a0 = A(0), a1 = A(0);
    for (int row = 0; row < rows; ++row) {
      a0 += s0[slot(row, j, lane, C)];
      a1 += s1[slot(row, j, lane, C)];
    }
    A* o = out + j * ldo;
    if (cb < nkb) {
      const int64_t k = cb * kLanes + lane;
      if (k < K) {
        o[1 + k] = a0;
        o[1 + K + k] = a1;
      }
    } else if (lane == 0) {
      o[0] = a0;
      o[2 * K + 1] = a1;
    } else if (lane == 1) {
      o[2 * K + 2] = a0;
    }
  }
}

}  // namespace slim_stats
