// Row-major GEMM on raw pointers for the CPU kernels.
//
// The block loops call many small GEMMs (a few thousand per op call); going through the
// dispatcher (at::mm) costs microseconds each, so fp32/fp64 call the BLAS that torch links
// (sgemm_/dgemm_, looked up once with dlsym). Where torch exposes no BLAS symbol (a build
// without one) the same call falls back to at::addmm_ on from_blob views: slower, same maths.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <cstdint>

namespace slim_cpu {

// C = alpha * op(A) * op(B) + beta * C, all row-major; op(A) is m x k, op(B) k x n.
// beta == 0 ignores C's old contents (BLAS semantics).
void gemm(bool transa, bool transb, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);
void gemm(bool transa, bool transb, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc);

// Inside a parallel region each thread's GEMMs must run on one thread: MKL otherwise may
// start its own threads, which on a busy machine collides with OpenMP's spinning workers
// (measured: the forward 4x slower). Sets MKL's thread-local thread count to 1 for the
// guard's lifetime (no-op where torch's BLAS is not MKL).
struct SerialBlasGuard {
  SerialBlasGuard();
  ~SerialBlasGuard();
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;
 private:
  int prev_ = 0;
};

// true when the GEMMs call the raw BLAS symbols: they were found, and not turned off
bool raw_blas_in_use();
// turn the raw BLAS path off (every GEMM through at::addmm_; for tests) or back on (where the
// symbols exist); returns raw_blas_in_use() from before the call
bool use_raw_blas(bool enable);

}  // namespace slim_cpu
