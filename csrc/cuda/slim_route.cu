// SLIM route and route-backward kernels (backend "cuda"). No torch header here: raw
// pointers and explicit half / bfloat16 conversions (torch compiles .cu files with
// -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ and friends).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cluster_stats.h"
#include "common/topk.h"
#include "slim_cuda.h"

namespace slim_cuda {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// to_acc as a functor (a template argument of csrc/common/cluster_stats.h)
template <typename T>
struct ToAccOf {
  __device__ __forceinline__ typename Acc<T>::type operator()(T v) const { return to_acc(v); }
};

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

__device__ __forceinline__ float dev_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double dev_sqrt(double v) { return sqrt(v); }

// x - x is 0 for a finite x, NaN for NaN and ±inf (half types are converted exactly first)
template <typename A>
__device__ __forceinline__ bool dev_finite(A v) { return v - v == (A)0; }

// block-wide sum / max; every thread gets the result. shm: kThreads / 32 slots.
template <typename A>
__device__ A block_sum(A v, A* shm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  A s = 0;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += shm[w];
  return s;
}

template <typename A>
__device__ A block_max(A v, A* shm) {
  for (int o = 16; o > 0; o >>= 1) {
    A u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  A s = shm[0];
  for (int w = 1; w < (int)(blockDim.x >> 5); ++w) s = shm[w] > s ? shm[w] : s;
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
route_forward_kernel(int64_t K, int E, int EL, int r, int C, int top_k,
                     typename Acc<T>::type scaling, typename Acc<T>::type yield_strength,
                     int reduce, const T* __restrict__ x, const T* __restrict__ h_in,
                     int64_t ld_h, const T* __restrict__ z_in, int64_t ld_z,
                     const float* __restrict__ centers, const float* __restrict__ inv_std,
                     const float* __restrict__ shift, int64_t shift_stride,
                     const uint8_t* __restrict__ keep, int64_t keep_stride,
                     typename Acc<T>::type* __restrict__ h_out,
                     typename Acc<T>::type* __restrict__ gates, int64_t* __restrict__ idx,
                     typename Acc<T>::type* __restrict__ dist, int64_t* __restrict__ assign,
                     T* __restrict__ hg, int32_t* __restrict__ stats_j,
                     typename Acc<T>::type* __restrict__ stats_r) {
  using A = typename Acc<T>::type;
  __shared__ A red[kThreads / 32];
  __shared__ A g_sh[kMaxExperts];
  __shared__ A d_sh;
  const int64_t t = blockIdx.x;
  const T* xr = x + t * K;

  A d = 0;
  if (centers != nullptr && C > 0) {
    // j* = argmin_j ||x - c_j||² (ties: lower index; a non-finite one first, §1.5)
    A best = 0;
    int bj = 0;
    for (int j = 0; j < C; ++j) {
      const float* c = centers + (int64_t)j * K;
      A s = 0;
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        A df = to_acc(xr[k]) - (A)c[k];
        s += df * df;
      }
      s = slim_topk::argmin_key(block_sum(s, red));
      if (j == 0 || s < best) {
        best = s;
        bj = j;
      }
    }
    const float* c = centers + (int64_t)bj * K;
    const float* sd = inv_std + (int64_t)bj * K;
    A v = 0, probe = 0;  // probe: NaN when some u is NaN (the max drops NaN; torch.amax not)
    int bad_x = 0;  // a non-finite entry of x (the statistics leave the token out)
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const A xv = to_acc(xr[k]);
      bad_x |= !dev_finite(xv);
      A df = xv - (A)c[k];
      A u = (df < 0 ? -df : df) * (A)sd[k];
      if (reduce == 0) {
        v = u > v ? u : v;
        if (u != u) probe = u;
      } else if (reduce == 1) {
        v += u;
      } else {
        v += u * u;
      }
    }
    if (reduce == 0) {
      v = block_max(v, red);
      v += block_sum(probe, red);
    } else {
      v = block_sum(v, red);
      v = v / (A)K;
      if (reduce == 2) v = dev_sqrt(v);
    }
    // d = r - shift[j*] (the constant 1 without a shift, §2)
    d = v - (shift != nullptr ? (A)shift[(int64_t)bj * shift_stride] : (A)1);
    // stats_j is uniform over the block: every thread reaches the barrier
    const bool any_bad = stats_j != nullptr && __syncthreads_or(bad_x) != 0;
    if (threadIdx.x == 0) {
      dist[t] = d;
      assign[t] = bj;
      if (stats_j != nullptr) {
        const bool kept = !any_bad && (keep == nullptr || keep[t * keep_stride] != 0);
        stats_j[t] = kept ? bj : -1;
        stats_r[t] = v;  // r, before the shift
      }
    }
  } else if (threadIdx.x == 0) {
    dist[t] = 0;
    assign[t] = -1;
  }

  if (threadIdx.x == 0) {
    A z[kMaxExperts];
    for (int e = 0; e < E; ++e) {
      z[e] = to_acc(z_in[t * ld_z + e]);
      // yielding off (λ = 0) adds nothing, not 0 · d: d may be NaN (§1.2, §1.5)
      if (e >= EL && centers != nullptr && C > 0 && yield_strength != (A)0)
        z[e] += yield_strength * d;
    }
    // top-k (NaN last, ties to the lower index) and softmax: csrc/common/topk.h, the code
    // the CPU kernels run (§1.3, §1.5)
    slim_topk::topk_softmax_row<A>(z, E, top_k, g_sh, idx + t * top_k);
    for (int e = 0; e < E; ++e) gates[t * E + e] = g_sh[e];
  }
  __syncthreads();
  const int R = EL * r;
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    const A hv = to_acc(h_in[t * ld_h + j]);
    h_out[t * R + j] = hv;
    hg[t * R + j] = from_acc<T>(scaling * g_sh[j / r] * hv);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
route_backward_kernel(int E, int EL, int r, typename Acc<T>::type scaling,
                      const T* __restrict__ dhg, const typename Acc<T>::type* __restrict__ h,
                      const typename Acc<T>::type* __restrict__ gates,
                      const typename Acc<T>::type* __restrict__ dgates, T* __restrict__ dh,
                      T* __restrict__ dz, T* __restrict__ hg) {
  using A = typename Acc<T>::type;
  __shared__ A g_sh[kMaxExperts];
  __shared__ A dg_sh[kMaxExperts];
  const int64_t t = blockIdx.x;
  const int R = EL * r;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    g_sh[e] = gates[t * E + e];
    dg_sh[e] = dgates != nullptr ? dgates[t * E + e] : (A)0;
  }
  __syncthreads();
  // one warp per LoRA expert chunk: dg_e = s Σ dhg h
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int e = warp; e < EL; e += nwarps) {
    A s = 0;
    for (int j = lane; j < r; j += 32) {
      const int64_t o = t * R + (int64_t)e * r + j;
      s += to_acc(dhg[o]) * h[o];
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) dg_sh[e] += scaling * s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A dot = 0;
    for (int e = 0; e < E; ++e) dot += g_sh[e] * dg_sh[e];
    for (int e = 0; e < E; ++e) dz[t * E + e] = from_acc<T>(g_sh[e] * (dg_sh[e] - dot));
  }
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    const int64_t o = t * R + j;
    const A sg = scaling * g_sh[j / r];
    dh[o] = from_acc<T>(sg * to_acc(dhg[o]));
    hg[o] = from_acc<T>(sg * h[o]);
  }
}

// The cluster statistics, one block per (32-channel column block, token group): the two
// phases of csrc/common/cluster_stats.h with the accumulators in dynamic shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads)
cluster_stats_kernel(int64_t T_, int64_t K, int64_t C, int64_t group_len, const T* __restrict__ x,
                     const float* __restrict__ centers, const int32_t* __restrict__ sj,
                     const typename Acc<T>::type* __restrict__ r,
                     typename Acc<T>::type* __restrict__ out, int64_t group_stride) {
  using A = typename Acc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];  // aligned for double
  A* s0 = reinterpret_cast<A*>(smem_raw);
  const int rows = (int)(blockDim.x / slim_stats::kLanes);
  const int64_t n = slim_stats::slots(rows, C);
  A* s1 = s0 + n;
  const int64_t cb = blockIdx.x, g = blockIdx.y;
  const int64_t t_lo = g * group_len;
  const int64_t t_hi = t_lo + group_len < T_ ? t_lo + group_len : T_;
  const int tid = (int)threadIdx.x;
  slim_stats::zero(s0, s1, n, tid, (int)blockDim.x);
  __syncthreads();
  slim_stats::accumulate<A>(cb, tid / slim_stats::kLanes, tid % slim_stats::kLanes, rows, t_lo,
                            t_hi, K, C, x, K, centers, sj, r, s0, s1, ToAccOf<T>());
  __syncthreads();
  slim_stats::reduce(cb, rows, K, C, s0, s1, out + g * group_stride, slim_stats::row_len(K),
                     tid, (int)blockDim.x);
}

// Thread rows of a statistics block: 8 (256 threads) unless the accumulators of that many
// rows exceed the 48 KB every GPU gives without opting in; at least 1.
template <typename A>
int stats_rows(int64_t C) {
  int rows = kThreads / slim_stats::kLanes;
  while (rows > 1 && 2 * slim_stats::slots(rows, C) * (int64_t)sizeof(A) > 48 * 1024) rows /= 2;
  return rows;
}

template <typename T>
cudaError_t launch_stats(int64_t T_, int64_t K, int64_t C, int64_t groups, const void* x,
                         const float* centers, const int32_t* sj, const void* r, void* out,
                         int64_t group_stride, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (T_ == 0 || C == 0) return cudaSuccess;
  const int rows = stats_rows<A>(C);
  const int64_t bytes = 2 * slim_stats::slots(rows, C) * (int64_t)sizeof(A);
  if (bytes > 48 * 1024) {  // many clusters: opt in to more (fails clearly past the device's)
    cudaError_t err = cudaFuncSetAttribute(cluster_stats_kernel<T>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)bytes);
    if (err != cudaSuccess) return err;
  }
  const int64_t group_len = (T_ + groups - 1) / groups;
  const dim3 grid((unsigned)slim_stats::col_blocks(K), (unsigned)groups);
  cluster_stats_kernel<T><<<grid, rows * slim_stats::kLanes, (size_t)bytes, stream>>>(
      T_, K, C, group_len, static_cast<const T*>(x), centers, sj, static_cast<const A*>(r),
      static_cast<A*>(out), group_stride);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_forward(int64_t T_, int64_t K, int64_t E, int64_t EL, int64_t r, int64_t C,
                           int64_t top_k, double scaling, double yield_strength, int reduce,
                           const void* x, const void* h_in, int64_t ld_h, const void* z_in,
                           int64_t ld_z, const float* centers, const float* inv_std,
                           const float* shift, int64_t shift_stride, const uint8_t* keep,
                           int64_t keep_stride, void* h_out, void* gates, int64_t* idx,
                           void* dist, int64_t* assign, void* hg, int32_t* stats_j,
                           void* stats_r, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (T_ == 0) return cudaSuccess;
  route_forward_kernel<T><<<(unsigned)T_, kThreads, 0, stream>>>(
      K, (int)E, (int)EL, (int)r, (int)C, (int)top_k, (A)scaling, (A)yield_strength, reduce,
      static_cast<const T*>(x), static_cast<const T*>(h_in), ld_h, static_cast<const T*>(z_in),
      ld_z, centers, inv_std, shift, shift_stride, keep, keep_stride, static_cast<A*>(h_out),
      static_cast<A*>(gates), idx, static_cast<A*>(dist), assign, static_cast<T*>(hg),
      stats_j, static_cast<A*>(stats_r));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(int64_t T_, int64_t E, int64_t EL, int64_t r, double scaling,
                            const void* dhg, const void* h, const void* gates,
                            const void* dgates, void* dh, void* dz, void* hg,
                            cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (T_ == 0) return cudaSuccess;
  route_backward_kernel<T><<<(unsigned)T_, kThreads, 0, stream>>>(
      (int)E, (int)EL, (int)r, (A)scaling, static_cast<const T*>(dhg),
      static_cast<const A*>(h), static_cast<const A*>(gates), static_cast<const A*>(dgates),
      static_cast<T*>(dh), static_cast<T*>(dz), static_cast<T*>(hg));
  return cudaGetLastError();
}

}  // namespace

cudaError_t route_forward(DType dtype, int64_t T, int64_t K, int64_t E, int64_t EL, int64_t r,
                          int64_t C, int64_t top_k, double scaling, double yield_strength,
                          int reduce, const void* x, const void* h_in, int64_t ld_h,
                          const void* z_in, int64_t ld_z, const float* centers,
                          const float* inv_std, const float* shift, int64_t shift_stride,
                          const uint8_t* keep, int64_t keep_stride, void* h_out, void* gates,
                          int64_t* idx, void* dist, int64_t* assign, void* hg,
                          int32_t* stats_j, void* stats_r, cudaStream_t stream) {
  if (E > kMaxExperts || E < 1 || top_k < 1 || top_k > E) return cudaErrorInvalidValue;
  if (T > 2147483647LL) return cudaErrorInvalidValue;
  if (stats_j != nullptr && (centers == nullptr || C < 1 || stats_r == nullptr))
    return cudaErrorInvalidValue;
#define SLIM_FWD(TT)                                                                         \
  return launch_forward<TT>(T, K, E, EL, r, C, top_k, scaling, yield_strength, reduce, x,   \
                            h_in, ld_h, z_in, ld_z, centers, inv_std, shift, shift_stride,   \
                            keep, keep_stride, h_out, gates, idx, dist, assign, hg, stats_j, \
                            stats_r, stream)
  switch (dtype) {
    case kF32: SLIM_FWD(float);
    case kF64: SLIM_FWD(double);
    case kF16: SLIM_FWD(__half);
    case kBF16: SLIM_FWD(__nv_bfloat16);
  }
#undef SLIM_FWD
  return cudaErrorInvalidValue;
}

int64_t cluster_stats_groups(int64_t T, int64_t K) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      sms < 1) {
    (void)cudaGetLastError();  // clear it: one group is always valid
    return 1;
  }
  const int64_t per_group = slim_stats::col_blocks(K), want = 4 * (int64_t)sms;
  if (per_group >= want) return 1;
  int64_t g = (want + per_group - 1) / per_group;
  const int64_t by_tokens = (T + 255) / 256;
  if (g > by_tokens) g = by_tokens;
  if (g > 16) g = 16;
  return g < 1 ? 1 : g;
}

cudaError_t cluster_stats(DType dtype, int64_t T, int64_t K, int64_t C, int64_t groups,
                          const void* x, const float* centers, const int32_t* stats_j,
                          const void* stats_r, void* out, int64_t group_stride,
                          cudaStream_t stream) {
  if (T < 0 || K < 0 || C < 0 || groups < 1 || groups > 65535) return cudaErrorInvalidValue;
  if (slim_stats::col_blocks(K) > 2147483647LL) return cudaErrorInvalidValue;
  if (groups > 1 && group_stride < C * slim_stats::row_len(K)) return cudaErrorInvalidValue;
#define SLIM_STATS(TT)                                                                     \
  return launch_stats<TT>(T, K, C, groups, x, centers, stats_j, stats_r, out, group_stride, \
                          stream)
  switch (dtype) {
    case kF32: SLIM_STATS(float);
    case kF64: SLIM_STATS(double);
    case kF16: SLIM_STATS(__half);
    case kBF16: SLIM_STATS(__nv_bfloat16);
  }
#undef SLIM_STATS
  return cudaErrorInvalidValue;
}

cudaError_t route_backward(DType dtype, int64_t T, int64_t E, int64_t EL, int64_t r,
                           double scaling, const void* dhg, const void* h, const void* gates,
                           const void* dgates, void* dh, void* dz, void* hg,
                           cudaStream_t stream) {
  if (E > kMaxExperts || E < 1) return cudaErrorInvalidValue;
  if (T > 2147483647LL) return cudaErrorInvalidValue;
#define SLIM_BWD(TT) \
  return launch_backward<TT>(T, E, EL, r, scaling, dhg, h, gates, dgates, dh, dz, hg, stream)
  switch (dtype) {
    case kF32: SLIM_BWD(float);
    case kF64: SLIM_BWD(double);
    case kF16: SLIM_BWD(__half);
    case kBF16: SLIM_BWD(__nv_bfloat16);
  }
#undef SLIM_BWD
  return cudaErrorInvalidValue;
}

}  // namespace slim_cuda
