// Launchers of the SLIM route / route-backward CUDA kernels (csrc/cuda/slim_route.cu).
//
// This header and the .cu file include no torch header: raw pointers, a dtype code, and
// the CUDA runtime only, so that nvcc compiles them without a CUDA build of torch (the
// compile check in tests/test_csrc_nvcc.py). The host binding (slim_cuda.cpp) owns the
// tensors and runs the GEMMs through ATen (cuBLAS).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace slim_cuda {

// dtype codes of the data tensors (x, GEMM outputs, hg, dh, dz)
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// Largest number of experts E the kernels handle (per-token logits live in registers and
// shared memory).
constexpr int kMaxExperts = 64;

// Forward route epilogue, one CUDA block per token:
//   d, assign = cluster distance of x[t] (when centers != nullptr; else d = 0, assign = -1):
//               d = reduce_k |x - c_j*| inv_std_j* - shift[j* * shift_stride] (shift != nullptr;
//               else the constant 1)
//   z[e] (+ yield * d for e >= EL), top-k (ties: lower index), softmax over the kept
//   h_out = float(h_in), hg = scaling * g[e] * h (each r-chunk e)
// h_in / z_in are the GEMM outputs [x_lora A_allᵀ | x Rᵀ] in the data dtype, with leading
// dimensions ld_h / ld_z. gates, dist and h_out are in the acc dtype (fp64 for kF64, else
// fp32); hg in the data dtype; idx (T, top_k) and assign (T,) int64.
// With stats_j != nullptr (and clusters) it also writes the per-token input of
// cluster_stats: stats_j[t] = j* when the token is kept (every entry of x[t] finite, and
// keep[t * keep_stride] != 0 when keep != nullptr), else -1; stats_r[t] = r, the reduced
// distance before the shift (acc dtype).
cudaError_t route_forward(DType dtype, int64_t T, int64_t K, int64_t E, int64_t EL, int64_t r,
                          int64_t C, int64_t top_k, double scaling, double yield_strength,
                          int reduce, const void* x, const void* h_in, int64_t ld_h,
                          const void* z_in, int64_t ld_z, const float* centers,
                          const float* inv_std, const float* shift, int64_t shift_stride,
                          const uint8_t* keep, int64_t keep_stride, void* h_out, void* gates,
                          int64_t* idx, void* dist, int64_t* assign, void* hg,
                          int32_t* stats_j, void* stats_r, cudaStream_t stream);

// Token groups of cluster_stats for T tokens and K channels on the current device (its SM
// count, asked from the runtime without a sync): 1 when the column blocks alone give 4 blocks
// per SM, else enough groups for that, each >= 256 tokens, at most 16.
int64_t cluster_stats_groups(int64_t T, int64_t K);

// The (C, 2K + 3) cluster statistics (csrc/common/cluster_stats.h) from x (T, K) contiguous
// in `dtype`, the centres (C, K) fp32 contiguous, and route_forward's stats_j / stats_r.
// out: `groups` partials (acc dtype) of (C, 2K + 3) each, group_stride apart (0 when
// groups = 1: the result itself); the caller sums them over the groups in order. Grid
// (ceil(K / 32) + 1, groups), 32 x rows threads; deterministic (no atomics).
cudaError_t cluster_stats(DType dtype, int64_t T, int64_t K, int64_t C, int64_t groups,
                          const void* x, const float* centers, const int32_t* stats_j,
                          const void* stats_r, void* out, int64_t group_stride,
                          cudaStream_t stream);

// Backward route epilogue, one CUDA block per token (chain rule of
// slim_kernels/ops/torch_backend.py::backward):
//   dg[e] = scaling * Σ_{j in chunk e} dhg[j] h[j]  (+ dgates[e] when dgates != nullptr)
//   dz = g ⊙ (dg - Σ g dg);  dh = scaling * g[e] * dhg;  hg = scaling * g[e] * h
// dhg (T, EL*r) in the data dtype (the GEMM dy B_all); h, gates, dgates in the acc dtype;
// dh, hg (T, EL*r) and dz (T, E) written in the data dtype.
cudaError_t route_backward(DType dtype, int64_t T, int64_t E, int64_t EL, int64_t r,
                           double scaling, const void* dhg, const void* h, const void* gates,
                           const void* dgates, void* dh, void* dz, void* hg,
                           cudaStream_t stream);

}  // namespace slim_cuda
