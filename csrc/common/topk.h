// Top-k, softmax and cluster argmin of one token, total over NaN and ±inf
// (docs/method.md §1.3 and §1.5). Header-only and torch-free: the CPU kernels (csrc/cpu)
// and the CUDA route kernel (csrc/cuda/slim_route.cu, as __host__ __device__ functions)
// compile this very code, and tests/test_csrc_topk.py builds it alone with g++.
//
// Order of the logits: larger first; NaN ranks last (below -inf); equal values, and two
// NaNs, go to the lower index. It is a total order, so the ranks of a token's E logits are
// a permutation of 0..E-1 and the k index slots are each written exactly once.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define SLIM_HD __host__ __device__ __forceinline__
#else
#define SLIM_HD inline
#endif

namespace slim_topk {

// v is neither NaN nor ±inf (v - v is 0 only for finite v; no library call, so the same
// code runs on the host and on the device)
template <typename A>
SLIM_HD bool finite(A v) {
  return v - v == A(0);
}

// expert j ranks before expert i (z_j, z_i their logits): NaN last, ties to the lower index
template <typename A>
SLIM_HD bool ranks_before(A zj, int64_t j, A zi, int64_t i) {
  const bool nj = zj != zj, ni = zi != zi;
  if (nj != ni) return ni;  // a number (even -inf) ranks before NaN
  if (nj) return j < i;     // two NaNs: the lower index
  return zj > zi || (zj == zi && j < i);
}

SLIM_HD float exp_(float v) { return ::expf(v); }
SLIM_HD double exp_(double v) { return ::exp(v); }

// Top-k then softmax over the kept logits of one token (z: E logits). Writes gates[0..E)
// and idx[0..k), the kept experts in rank order. A token with any non-finite logit gets NaN
// for all E gates (its routing is undefined, and it must not pass as finite); its idx slots
// follow the order above all the same.
template <typename A>
SLIM_HD void topk_softmax_row(const A* z, int64_t E, int64_t k, A* gates, int64_t* idx) {
  bool all_finite = true;
  for (int64_t i = 0; i < E; ++i) {
    all_finite = all_finite && finite(z[i]);
    int64_t rank = 0;
    for (int64_t j = 0; j < E; ++j) rank += ranks_before(z[j], j, z[i], i);
    if (rank < k) idx[rank] = i;
    gates[i] = A(0);
  }
  if (!all_finite) {
    for (int64_t i = 0; i < E; ++i) gates[i] = std::numeric_limits<A>::quiet_NaN();
    return;
  }
  const A zmax = z[idx[0]];
  A sum = 0;
  for (int64_t q = 0; q < k; ++q) {
    const A e = exp_(z[idx[q]] - zmax);
    gates[idx[q]] = e;
    sum += e;
  }
  for (int64_t q = 0; q < k; ++q) gates[idx[q]] /= sum;
}

// Cluster assignment key: j* = argmin_j key(sq_j), the first minimum. A non-finite squared
// distance counts as -inf, so the first non-finite one wins (a non-finite centre or token
// makes the distance non-finite instead of disappearing) and no NaN enters a comparison.
template <typename A>
SLIM_HD A argmin_key(A sq) {
  return finite(sq) ? sq : -std::numeric_limits<A>::infinity();
}

}  // namespace slim_topk
