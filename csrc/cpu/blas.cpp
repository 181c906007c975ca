#include "blas.h"

#include <ATen/ops/addmm.h>
#include <atomic>
#ifndef _WIN32
#include <dlfcn.h>
#endif

namespace slim_cpu {
namespace {

// Fortran BLAS ABI (column-major). The hidden string-length arguments are not passed, as
// ATen itself declares these symbols.
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const float*, const float*, const int*, const float*, const int*,
                         const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                         const double*, const double*, const int*, const double*, const int*,
                         const double*, double*, const int*);

// mkl_service.h: #define mkl_set_num_threads_local MKL_Set_Num_Threads_Local (C, by value;
// the lower-case symbols are the Fortran interface, by reference)
using mkl_local_t = int (*)(int);

struct Blas {
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  mkl_local_t mkl_local = nullptr;
  Blas() {
#ifndef _WIN32  // elsewhere: the at::addmm_ fallback
    mkl_local = reinterpret_cast<mkl_local_t>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    sgemm = reinterpret_cast<sgemm_t>(dlsym(RTLD_DEFAULT, "sgemm_"));
    dgemm = reinterpret_cast<dgemm_t>(dlsym(RTLD_DEFAULT, "dgemm_"));
#endif
  }
};

const Blas& blas() {
  static Blas b;
  return b;
}

// use_raw_blas(false) sends every GEMM through the fallback (tests it where the symbols exist)
std::atomic<bool> g_raw_enabled{true};

bool raw_found() { return blas().sgemm != nullptr && blas().dgemm != nullptr; }

constexpr int64_t kIntMax = 2147483647;

template <typename T>
void gemm_aten(bool transa, bool transb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto A = transa ? at::from_blob(const_cast<T*>(a), {m, k}, {1, lda}, opts)
                  : at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts);
  auto B = transb ? at::from_blob(const_cast<T*>(b), {k, n}, {1, ldb}, opts)
                  : at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  C.addmm_(A, B, beta, alpha);
}

template <typename T, typename F>
void gemm_impl(F fn, bool transa, bool transb, int64_t m, int64_t n, int64_t k, T alpha,
               const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // C = beta * C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  // BLAS wants leading dimensions >= 1 and >= the row length; clamp the trivial cases.
  int64_t la = transa ? std::max<int64_t>(lda, m) : std::max<int64_t>(lda, k);
  int64_t lb = transb ? std::max<int64_t>(ldb, k) : std::max<int64_t>(ldb, n);
  int64_t lc = std::max<int64_t>(ldc, n);
  if (fn && m < kIntMax && n < kIntMax && k < kIntMax && la < kIntMax && lb < kIntMax &&
      lc < kIntMax) {
    // row-major C = op(A) op(B)  <=>  column-major C' = op(B)' op(A)'
    const char ta = transb ? 'T' : 'N';
    const char tb = transa ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LA = static_cast<int>(lb), LB = static_cast<int>(la), LC = static_cast<int>(lc);
    fn(&ta, &tb, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
    return;
  }
  gemm_aten<T>(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace

void gemm(bool transa, bool transb, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
  gemm_impl<float>(g_raw_enabled.load(std::memory_order_relaxed) ? blas().sgemm : nullptr,
                   transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool transa, bool transb, int64_t m, int64_t n, int64_t k, double alpha,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
          int64_t ldc) {
  gemm_impl<double>(g_raw_enabled.load(std::memory_order_relaxed) ? blas().dgemm : nullptr,
                    transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

SerialBlasGuard::SerialBlasGuard() {
  if (blas().mkl_local) prev_ = blas().mkl_local(1);
}
SerialBlasGuard::~SerialBlasGuard() {
  if (blas().mkl_local) blas().mkl_local(prev_);
}

bool raw_blas_in_use() { return raw_found() && g_raw_enabled.load(); }

bool use_raw_blas(bool enable) {
  const bool prev = raw_blas_in_use();
  g_raw_enabled.store(enable);
  return prev;
}

}  // namespace slim_cpu
